/*
 * runtime.cu - the CUDA runtime services of cuda_rt.h.
 *
 * Thin wrappers: make the device current, call the runtime, turn a
 * failure into HKV_ECUDA with "<call> failed: <reason>".  Nothing here
 * synchronizes unless the contract says so (memset, stream_sync,
 * event_sync).
 */
#include "../csrc/cuda_rt.h"
#include "common.cuh"

extern "C" int hkv_cuda_built(void)
{
    return 1;
}

/*
 * Errors that mean "this machine has no usable GPU" rather than "something
 * broke": no driver, a driver too old for this runtime, a stub libcuda,
 * no device, or devices that exist but cannot be used.  The package must
 * then work on the CPU, so these give a count of 0 and HKV_OK.
 */
static bool means_no_gpu(cudaError_t err)
{
    switch (err) {
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInitializationError:
    case cudaErrorStubLibrary:
    case cudaErrorCallRequiresNewerDriver:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemNotReady:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
    case cudaErrorNotPermitted:
        return true;
    default:
        return false;
    }
}

extern "C" hkv_status hkv_cuda_device_count(int *count)
{
    int n = 0;
    cudaError_t err;

    if (!count)
        return hkv_error(HKV_EINVAL, "hkv_cuda_device_count: count is NULL");
    *count = 0;
    err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        /* Clear the thread's last-error slot either way: the caller has
         * its answer, later launch checks must not see this. */
        (void)cudaGetLastError();
        if (means_no_gpu(err))
            return HKV_OK;
        return hkv_error(HKV_ECUDA, "cudaGetDeviceCount failed: %s",
                         cudaGetErrorString(err));
    }
    *count = n;
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_malloc(int device, size_t bytes, void **ptr)
{
    if (!ptr)
        return hkv_error(HKV_EINVAL, "hkv_cuda_malloc: ptr is NULL");
    *ptr = NULL;
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaMalloc(ptr, bytes));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_free(int device, void *ptr)
{
    if (!ptr)
        return HKV_OK;
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaFree(ptr));
    return HKV_OK;
}

/*
 * Portable: the pinned pages serve DMA to any device of the process, not
 * only to the one current when they were allocated.
 */
extern "C" hkv_status hkv_cuda_host_alloc(size_t bytes, void **ptr)
{
    if (!ptr)
        return hkv_error(HKV_EINVAL, "hkv_cuda_host_alloc: ptr is NULL");
    *ptr = NULL;
    HKV_CUDA_TRY(cudaHostAlloc(ptr, bytes, cudaHostAllocPortable));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_host_device_pointer(void *host, void **dev)
{
    *dev = NULL;
    HKV_CUDA_TRY(cudaHostGetDevicePointer(dev, host, 0));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_host_free(void *ptr)
{
    if (!ptr)
        return HKV_OK;
    HKV_CUDA_TRY(cudaFreeHost(ptr));
    return HKV_OK;
}

/*
 * Synchronous: the fill is queued on the legacy default stream and waited
 * for, so the memory is initialised when this returns whatever stream
 * the caller uses next.
 */
extern "C" hkv_status hkv_cuda_memset(int device, void *ptr, int value,
                                      size_t bytes)
{
    if (bytes == 0)
        return HKV_OK;
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaMemsetAsync(ptr, value, bytes, cudaStreamLegacy));
    HKV_CUDA_TRY(cudaStreamSynchronize(cudaStreamLegacy));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_memcpy_async(int device, void *dst,
                                            const void *src, size_t bytes,
                                            void *stream)
{
    if (bytes == 0)
        return HKV_OK;
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault,
                                 (cudaStream_t)stream));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_memcpy2d_async(int device, void *dst, size_t dpitch,
                                              const void *src, size_t spitch,
                                              size_t width, size_t height, void *stream)
{
    if (width == 0 || height == 0)
        return HKV_OK;
    HKV_TRY(hkv::set_device(device));
    int max_pitch = 0;
    HKV_CUDA_TRY(cudaDeviceGetAttribute(&max_pitch, cudaDevAttrMaxPitch, device));
    cudaStream_t s = (cudaStream_t)stream;
    if (height == 1 || (dpitch <= (size_t)max_pitch && spitch <= (size_t)max_pitch)) {
        HKV_CUDA_TRY(cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height,
                                       cudaMemcpyDefault, s));
        return HKV_OK;
    }
    /* a table layer larger than the pitch limit: one copy per row */
    for (size_t r = 0; r < height; r++)
        HKV_CUDA_TRY(cudaMemcpyAsync((char *)dst + r * dpitch,
                                     (const char *)src + r * spitch, width,
                                     cudaMemcpyDefault, s));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_stream_sync(int device, void *stream)
{
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaStreamSynchronize((cudaStream_t)stream));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_set_device(int device)
{
    return hkv::set_device(device);
}

extern "C" hkv_status hkv_cuda_stream_create(int device, void **stream)
{
    cudaStream_t s = NULL;
    *stream = NULL;
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    *stream = (void *)s;
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_stream_destroy(int device, void *stream)
{
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaStreamDestroy((cudaStream_t)stream));
    return HKV_OK;
}

/*
 * Events only order and signal work (the contract has no elapsed-time
 * query), so they are created without timing, which makes record and
 * query cheaper.
 */
extern "C" hkv_status hkv_cuda_event_create(int device, void **event)
{
    cudaEvent_t ev = NULL;

    if (!event)
        return hkv_error(HKV_EINVAL, "hkv_cuda_event_create: event is NULL");
    *event = NULL;
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    *event = (void *)ev;
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_event_destroy(int device, void *event)
{
    if (!event)
        return HKV_OK;
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaEventDestroy((cudaEvent_t)event));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_event_record(int device, void *event,
                                            void *stream)
{
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaEventRecord((cudaEvent_t)event, (cudaStream_t)stream));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_event_query(int device, void *event,
                                           int *done)
{
    cudaError_t err;

    if (!done)
        return hkv_error(HKV_EINVAL, "hkv_cuda_event_query: done is NULL");
    *done = 0;
    HKV_TRY(hkv::set_device(device));
    err = cudaEventQuery((cudaEvent_t)event);
    if (err == cudaSuccess) {
        *done = 1;
        return HKV_OK;
    }
    if (err == cudaErrorNotReady) {
        (void)cudaGetLastError();   /* "not yet" is an answer, not an error */
        return HKV_OK;
    }
    return hkv_error(HKV_ECUDA, "cudaEventQuery failed: %s",
                     cudaGetErrorString(err));
}

extern "C" hkv_status hkv_cuda_event_sync(int device, void *event)
{
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaEventSynchronize((cudaEvent_t)event));
    return HKV_OK;
}

extern "C" hkv_status hkv_cuda_stream_wait_event(int device, void *stream,
                                                 void *event)
{
    HKV_TRY(hkv::set_device(device));
    HKV_CUDA_TRY(cudaStreamWaitEvent((cudaStream_t)stream,
                                     (cudaEvent_t)event, 0));
    return HKV_OK;
}
