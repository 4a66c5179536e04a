/*
 * cuda_stub.c - the CUDA services of cuda_rt.h and the launchers of
 * kernels.h for a package built without CUDA.
 *
 * The package stays importable and fully usable on the CPU: the device
 * count is 0 (not an error, so "is there a GPU?" has a plain answer), and
 * any attempt to use a GPU fails with HKV_ENODEV and a message that says
 * why, instead of crashing or silently doing nothing.
 */
#include "cuda_rt.h"
#include "kernels.h"

#include <stddef.h>

static hkv_status no_cuda(const char *what)
{
    return hkv_error(HKV_ENODEV,
                     "%s: hstu_kvcache was built without CUDA support "
                     "(rebuild with nvcc on the PATH to use a GPU)", what);
}

int hkv_cuda_built(void)
{
    return 0;
}

hkv_status hkv_cuda_device_count(int *count)
{
    if (count)
        *count = 0;
    return HKV_OK;
}

hkv_status hkv_cuda_malloc(int device, size_t bytes, void **ptr)
{
    (void)device;
    (void)bytes;
    if (ptr)
        *ptr = NULL;
    return no_cuda("hkv_cuda_malloc");
}

hkv_status hkv_cuda_free(int device, void *ptr)
{
    (void)device;
    (void)ptr;
    return no_cuda("hkv_cuda_free");
}

hkv_status hkv_cuda_host_alloc(size_t bytes, void **ptr)
{
    (void)bytes;
    if (ptr)
        *ptr = NULL;
    return no_cuda("hkv_cuda_host_alloc");
}

hkv_status hkv_cuda_host_free(void *ptr)
{
    (void)ptr;
    return no_cuda("hkv_cuda_host_free");
}

hkv_status hkv_cuda_memset(int device, void *ptr, int value, size_t bytes)
{
    (void)device;
    (void)ptr;
    (void)value;
    (void)bytes;
    return no_cuda("hkv_cuda_memset");
}

hkv_status hkv_cuda_memcpy_async(int device, void *dst, const void *src,
                                 size_t bytes, void *stream)
{
    (void)device;
    (void)dst;
    (void)src;
    (void)bytes;
    (void)stream;
    return no_cuda("hkv_cuda_memcpy_async");
}

hkv_status hkv_cuda_memcpy2d_async(int device, void *dst, size_t dpitch, const void *src,
                                   size_t spitch, size_t width, size_t height,
                                   void *stream)
{
    (void)device;
    (void)dst;
    (void)dpitch;
    (void)src;
    (void)spitch;
    (void)width;
    (void)height;
    (void)stream;
    return no_cuda("hkv_cuda_memcpy2d_async");
}

hkv_status hkv_cuda_stream_create(int device, void **stream)
{
    (void)device;
    *stream = NULL;
    return no_cuda("hkv_cuda_stream_create");
}

hkv_status hkv_cuda_stream_destroy(int device, void *stream)
{
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_stream_destroy");
}

hkv_status hkv_cuda_spin(int device, void *stream, int us)
{
    (void)device;
    (void)stream;
    (void)us;
    return no_cuda("hkv_cuda_spin");
}

hkv_status hkv_cuda_host_device_pointer(void *host, void **dev)
{
    (void)host;
    *dev = NULL;
    return no_cuda("hkv_cuda_host_device_pointer");
}

hkv_status hkv_cuda_stream_sync(int device, void *stream)
{
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_stream_sync");
}

hkv_status hkv_cuda_set_device(int device)
{
    (void)device;
    return no_cuda("hkv_cuda_set_device");
}

hkv_status hkv_cuda_event_create(int device, void **event)
{
    (void)device;
    if (event)
        *event = NULL;
    return no_cuda("hkv_cuda_event_create");
}

hkv_status hkv_cuda_event_destroy(int device, void *event)
{
    (void)device;
    (void)event;
    return no_cuda("hkv_cuda_event_destroy");
}

hkv_status hkv_cuda_event_record(int device, void *event, void *stream)
{
    (void)device;
    (void)event;
    (void)stream;
    return no_cuda("hkv_cuda_event_record");
}

hkv_status hkv_cuda_event_query(int device, void *event, int *done)
{
    (void)device;
    (void)event;
    if (done)
        *done = 0;
    return no_cuda("hkv_cuda_event_query");
}

hkv_status hkv_cuda_event_sync(int device, void *event)
{
    (void)device;
    (void)event;
    return no_cuda("hkv_cuda_event_sync");
}

hkv_status hkv_cuda_stream_wait_event(int device, void *stream, void *event)
{
    (void)device;
    (void)stream;
    (void)event;
    return no_cuda("hkv_cuda_stream_wait_event");
}

/* ---- kernel launchers ---- */

hkv_status hkv_cuda_append(const hkv_rows_args *a, int device, void *stream)
{
    (void)a;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_append");
}

hkv_status hkv_cuda_read(const hkv_rows_args *a, int device, void *stream)
{
    (void)a;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_read");
}

hkv_status hkv_cuda_gather_pages(const hkv_pages_args *a, int device,
                                 void *stream)
{
    (void)a;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_gather_pages");
}

hkv_status hkv_cuda_scatter_pages(const hkv_pages_args *a, int device,
                                  void *stream)
{
    (void)a;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_scatter_pages");
}

hkv_status hkv_cuda_copy_pages(const hkv_copy_pages_args *a, int device,
                               void *stream)
{
    (void)a;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_copy_pages");
}

int64_t hkv_cuda_crc32c_scratch_words(int64_t len)
{
    (void)len;
    return 1;
}

hkv_status hkv_cuda_crc32c(const void *data, int64_t len, uint32_t crc, uint32_t *scratch,
                           uint32_t *out, int device, void *stream)
{
    (void)data;
    (void)len;
    (void)crc;
    (void)scratch;
    (void)out;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_crc32c");
}

hkv_status hkv_cuda_upload_words(int32_t *dst, const int32_t *src_mapped, int64_t n,
                                 int device, void *stream)
{
    (void)dst;
    (void)src_mapped;
    (void)n;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_upload_words");
}

hkv_status hkv_cuda_token_meta(const hkv_token_meta_args *a, int device,
                               void *stream)
{
    (void)a;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_token_meta");
}

hkv_status hkv_cuda_strip(const hkv_strip_args *a, int device, void *stream)
{
    (void)a;
    (void)device;
    (void)stream;
    return no_cuda("hkv_cuda_strip");
}
