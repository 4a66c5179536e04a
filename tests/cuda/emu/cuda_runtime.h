/*
 * emu/cuda_runtime.h - a host-only stand-in for the CUDA runtime, so that
 * the kernels of cuda/ and tests/cuda/kernel_check.cu can be compiled by
 * g++ and run on a machine without a GPU (CI, a laptop).
 *
 * It is a test tool, not a simulator of performance: "device" memory is
 * host memory (so AddressSanitizer checks every kernel access), streams
 * and events are synchronous no-ops, and a launch runs every thread of
 * every block as a cooperative fiber (emu.cc), which is enough for the
 * intrinsics these kernels use: __ldg, __shfl_sync, __shfl_up_sync,
 * __syncthreads.
 *
 * Launch syntax kernel<<<grid, block, smem, stream>>>(args) is rewritten
 * by translate.py into emu::launch([=] { kernel(args); }, grid, block,
 * smem, stream) before compiling.
 */
#ifndef HKV_EMU_CUDA_RUNTIME_H
#define HKV_EMU_CUDA_RUNTIME_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <algorithm>
#include <functional>

/* ---- errors ---- */
enum cudaError {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInitializationError = 3,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorStubLibrary = 34,
    cudaErrorInsufficientDriver = 35,
    cudaErrorCallRequiresNewerDriver = 36,
    cudaErrorDevicesUnavailable = 46,
    cudaErrorNoDevice = 100,
    cudaErrorInvalidDevice = 101,
    cudaErrorNotReady = 600,
    cudaErrorNotPermitted = 800,
    cudaErrorSystemNotReady = 802,
    cudaErrorSystemDriverMismatch = 803,
    cudaErrorCompatNotSupportedOnDevice = 804,
};
typedef enum cudaError cudaError_t;

typedef struct CUstream_st *cudaStream_t;
typedef struct CUevent_st *cudaEvent_t;
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamNonBlocking 0x01
#define cudaHostAllocDefault 0x00
#define cudaHostAllocPortable 0x01
#define cudaEventDefault 0x00
#define cudaEventDisableTiming 0x02

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4,
};
enum cudaDeviceAttr {
    cudaDevAttrMultiProcessorCount = 16,
    cudaDevAttrClockRate = 13,
    cudaDevAttrMaxPitch = 11
};

struct cudaDeviceProp {
    char name[256];
    int multiProcessorCount;
};

/* ---- launch geometry and device-side names ---- */
struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
/* One block runs at a time, so a function-static array is block-shared. */
#define __shared__ static

using std::max;
using std::min;

template <typename T> inline T __ldg(const T *p) { return *p; }

namespace emu {
/* The emulated device's SM count: small, so that the grid caps of the
 * launchers kick in and the grid-stride loops are exercised. */
enum { kSMs = 2, kMaxThreads = 1024 };

void launch(std::function<void()> body, dim3 grid, dim3 block,
            size_t smem = 0, cudaStream_t stream = 0);
void syncthreads();
uint64_t shfl_up(uint64_t v, unsigned delta);
uint64_t shfl_idx(uint64_t v, int src_lane);

extern cudaError_t last_error;
extern int current_device;
inline cudaError_t fail(cudaError_t e) { last_error = e; return e; }
}  // namespace emu

inline void __syncthreads() { emu::syncthreads(); }
/* a cycle counter for the fault-injection spin kernel: no cycles pass in
 * the emulation, so the spin ends at once */
inline long long clock64() { static long long t = 0; return t += 1 << 30; }

template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta)
{
    static_assert(sizeof(T) <= 8, "shfl of at most 8 bytes");
    uint64_t x = 0;
    (void)mask;
    memcpy(&x, &v, sizeof(T));
    x = emu::shfl_up(x, delta);
    memcpy(&v, &x, sizeof(T));
    return v;
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane)
{
    static_assert(sizeof(T) <= 8, "shfl of at most 8 bytes");
    uint64_t x = 0;
    (void)mask;
    memcpy(&x, &v, sizeof(T));
    x = emu::shfl_idx(x, src_lane);
    memcpy(&v, &x, sizeof(T));
    return v;
}

/* ---- runtime API: one device, synchronous ---- */
inline const char *cudaGetErrorString(cudaError_t e)
{
    switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNotReady: return "device not ready";
    default: return "emulated error";
    }
}
inline cudaError_t cudaGetLastError(void)
{
    cudaError_t e = emu::last_error;
    emu::last_error = cudaSuccess;
    return e;
}
inline cudaError_t cudaPeekAtLastError(void) { return emu::last_error; }
inline cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaGetDevice(int *d) { *d = emu::current_device; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d)
{
    if (d != 0)
        return emu::fail(cudaErrorInvalidDevice);
    emu::current_device = d;
    return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int *v, cudaDeviceAttr a, int d)
{
    if (d != 0)
        return emu::fail(cudaErrorInvalidDevice);
    *v = a == cudaDevAttrMaxPitch ? 2147483647 : a == cudaDevAttrClockRate ? 1500000
                                                                            : emu::kSMs;
    return cudaSuccess;
}
inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp *p, int d)
{
    if (d != 0)
        return emu::fail(cudaErrorInvalidDevice);
    memset(p, 0, sizeof *p);
    strcpy(p->name, "host emulation");
    p->multiProcessorCount = emu::kSMs;
    return cudaSuccess;
}
inline cudaError_t cudaMalloc(void **p, size_t n)
{
    *p = aligned_alloc(256, (n + 255) / 256 * 256);
    return *p ? cudaSuccess : emu::fail(cudaErrorMemoryAllocation);
}
inline cudaError_t cudaFree(void *p) { free(p); return cudaSuccess; }
inline cudaError_t cudaHostAlloc(void **p, size_t n, unsigned flags)
{
    (void)flags;
    return cudaMalloc(p, n);
}
inline cudaError_t cudaFreeHost(void *p) { free(p); return cudaSuccess; }
/* host memory is the device's memory here: the same address */
inline cudaError_t cudaHostGetDevicePointer(void **d, void *h, unsigned flags)
{
    (void)flags;
    *d = h;
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void *p, int v, size_t n) { memset(p, v, n); return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t s = 0)
{
    (void)s;
    memset(p, v, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void *d, const void *s, size_t n, cudaMemcpyKind k)
{
    (void)k;
    memcpy(d, s, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void *d, const void *s, size_t n,
                                   cudaMemcpyKind k, cudaStream_t st = 0)
{
    (void)st;
    return cudaMemcpy(d, s, n, k);
}
inline cudaError_t cudaMemcpy2DAsync(void *d, size_t dpitch, const void *s, size_t spitch,
                                     size_t width, size_t height, cudaMemcpyKind k,
                                     cudaStream_t st = 0)
{
    (void)k;
    (void)st;
    for (size_t r = 0; r < height; r++)
        memcpy((char *)d + r * dpitch, (const char *)s + r * spitch, width);
    return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t s) { (void)s; return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t *s, unsigned f)
{
    (void)f;
    *s = (cudaStream_t)malloc(1);
    return cudaSuccess;
}
inline cudaError_t cudaStreamDestroy(cudaStream_t s) { free(s); return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t *e) { *e = (cudaEvent_t)malloc(1); return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t *e, unsigned f)
{
    (void)f;
    return cudaEventCreate(e);
}
inline cudaError_t cudaEventDestroy(cudaEvent_t e) { free(e); return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s = 0)
{
    (void)e;
    (void)s;
    return cudaSuccess;
}
inline cudaError_t cudaEventQuery(cudaEvent_t e) { (void)e; return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { (void)e; return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t a, cudaEvent_t b)
{
    (void)a;
    (void)b;
    *ms = 1.0f;
    return cudaSuccess;
}
inline cudaError_t cudaStreamWaitEvent(cudaStream_t s, cudaEvent_t e, unsigned f)
{
    (void)s;
    (void)e;
    (void)f;
    return cudaSuccess;
}

#endif /* HKV_EMU_CUDA_RUNTIME_H */
