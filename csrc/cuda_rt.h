/*
 * cuda_rt.h - the few CUDA runtime services the core needs, as plain C
 * functions, so the C core never includes CUDA headers.  Implemented in
 * cuda/runtime.cu when the package is built with CUDA and by cuda_stub.c
 * otherwise (every call then fails with HKV_ENODEV, device count 0).
 *
 * Streams and events are opaque `void *` (cudaStream_t / cudaEvent_t).
 */
#ifndef HKV_CUDA_RT_H
#define HKV_CUDA_RT_H

#include <stddef.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when the package was compiled with CUDA support. */
int hkv_cuda_built(void);

/* Number of usable CUDA devices; 0 (and HKV_OK) without driver or GPU. */
hkv_status hkv_cuda_device_count(int *count);

hkv_status hkv_cuda_malloc(int device, size_t bytes, void **ptr);
hkv_status hkv_cuda_free(int device, void *ptr);
/* Pinned (page-locked) host memory. */
hkv_status hkv_cuda_host_alloc(size_t bytes, void **ptr);
hkv_status hkv_cuda_host_free(void *ptr);
/* The device's address of pinned host memory (kernels read it directly). */
hkv_status hkv_cuda_host_device_pointer(void *host, void **dev);

/* Synchronous fill, for initialisation only. */
hkv_status hkv_cuda_memset(int device, void *ptr, int value, size_t bytes);
/* Asynchronous copies on `stream`; any direction (cudaMemcpyDefault). */
hkv_status hkv_cuda_memcpy_async(int device, void *dst, const void *src,
                                 size_t bytes, void *stream);
/* `height` rows of `width` bytes, rows `dpitch` / `spitch` bytes apart
 * (one row per layer of a page run).  Falls back to one copy per row when
 * a pitch exceeds what cudaMemcpy2DAsync accepts. */
hkv_status hkv_cuda_memcpy2d_async(int device, void *dst, size_t dpitch, const void *src,
                                   size_t spitch, size_t width, size_t height,
                                   void *stream);

hkv_status hkv_cuda_stream_sync(int device, void *stream);
/* Make `device` current on the calling thread (threads of the core's own
 * that call CUDA libraries, e.g. cuFile, rather than hkv_cuda_*). */
hkv_status hkv_cuda_set_device(int device);
/* A non-blocking stream (no implicit sync with the legacy stream). */
hkv_status hkv_cuda_stream_create(int device, void **stream);
hkv_status hkv_cuda_stream_destroy(int device, void *stream);

hkv_status hkv_cuda_event_create(int device, void **event);
hkv_status hkv_cuda_event_destroy(int device, void *event);
hkv_status hkv_cuda_event_record(int device, void *event, void *stream);
/* *done = 1 when all work captured by the event has completed. */
hkv_status hkv_cuda_event_query(int device, void *event, int *done);
hkv_status hkv_cuda_event_sync(int device, void *event);
/* Fault injection: keep `stream` busy for about `us` microseconds. */
hkv_status hkv_cuda_spin(int device, void *stream, int us);

/* Make `stream` wait for `event` without blocking the host. */
hkv_status hkv_cuda_stream_wait_event(int device, void *stream, void *event);

#ifdef __cplusplus
}
#endif

#endif /* HKV_CUDA_RT_H */
