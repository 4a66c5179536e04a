/*
 * memory.h - reference-counted memory blocks of one tier or device.
 *
 * A page table or a batch's metadata may be exported to Python (DLPack) and
 * outlive the call, or even the cache: each export holds a reference, and
 * the memory goes back to the system when the last reference drops.
 */
#ifndef HKV_MEMORY_H
#define HKV_MEMORY_H

#include <stdatomic.h>
#include <stddef.h>

#include "status.h"

typedef enum hkv_mem_kind {
    HKV_MEM_HOST = 0,     /* plain host memory (CPU device path)          */
    HKV_MEM_PINNED = 1,   /* page-locked host memory (cudaHostAlloc)      */
    HKV_MEM_DEVICE = 2    /* GPU memory (cudaMalloc)                      */
} hkv_mem_kind;

typedef struct hkv_buffer {
    hkv_mem_kind kind;
    int device;           /* CUDA device of HKV_MEM_DEVICE                 */
    void *ptr;
    size_t bytes;
    atomic_int refs;
} hkv_buffer;

/* New buffer with one reference; contents undefined. */
hkv_status hkv_buffer_new(hkv_mem_kind kind, int device, size_t bytes,
                          hkv_buffer **out);
void hkv_buffer_ref(hkv_buffer *b);
void hkv_buffer_unref(hkv_buffer *b);

#endif /* HKV_MEMORY_H */
