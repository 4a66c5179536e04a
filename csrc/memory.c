/*
 * memory.c - allocation and release of hkv_buffer.
 */
#include "memory.h"

#include <stdlib.h>

#include "cuda_rt.h"

#define HOST_ALIGN 256   /* DMA- and vector-friendly */

hkv_status hkv_buffer_new(hkv_mem_kind kind, int device, size_t bytes,
                          hkv_buffer **out)
{
    *out = NULL;
    hkv_buffer *b = malloc(sizeof *b);
    if (b == NULL)
        return hkv_error(HKV_ENOMEM, "out of host memory");
    b->kind = kind;
    b->device = device;
    b->bytes = bytes;
    b->ptr = NULL;
    atomic_init(&b->refs, 1);
    size_t n = bytes ? bytes : 1;
    hkv_status st = HKV_OK;
    switch (kind) {
    case HKV_MEM_HOST:
        n = (n + HOST_ALIGN - 1) / HOST_ALIGN * HOST_ALIGN;
        b->ptr = aligned_alloc(HOST_ALIGN, n);
        if (b->ptr == NULL)
            st = hkv_error(HKV_ENOMEM, "cannot allocate %zu bytes of host memory",
                           bytes);
        break;
    case HKV_MEM_PINNED:
        st = hkv_cuda_host_alloc(n, &b->ptr);
        break;
    case HKV_MEM_DEVICE:
        st = hkv_cuda_malloc(device, n, &b->ptr);
        break;
    }
    if (st != HKV_OK) {
        free(b);
        return st;
    }
    *out = b;
    return HKV_OK;
}

void hkv_buffer_ref(hkv_buffer *b)
{
    atomic_fetch_add(&b->refs, 1);
}

void hkv_buffer_unref(hkv_buffer *b)
{
    if (b == NULL || atomic_fetch_sub(&b->refs, 1) != 1)
        return;
    /* Release errors cannot be reported to anyone here; the memory is gone
     * either way. */
    switch (b->kind) {
    case HKV_MEM_HOST:
        free(b->ptr);
        break;
    case HKV_MEM_PINNED:
        (void)hkv_cuda_host_free(b->ptr);
        break;
    case HKV_MEM_DEVICE:
        (void)hkv_cuda_free(b->device, b->ptr);
        break;
    }
    free(b);
}
