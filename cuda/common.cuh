/*
 * common.cuh - what every kernel file of cuda/ shares: turning CUDA errors
 * into hkv_status, selecting the device, launch geometry, and the
 * vectorized copy helpers.
 *
 * All the kernels of this package are copies (K/V never need arithmetic),
 * so their speed is decided by three things this file centralizes:
 *   - the access width: 16-byte loads and stores when every address and
 *     stride involved allows it, else the widest legal narrower width,
 *     picked once per launch on the host (hkv::pick_width);
 *   - enough independent loads in flight per thread (each kernel issues
 *     several loads before its first store);
 *   - enough warps to fill every SM (hkv::sm_count).
 */
#ifndef HKV_CUDA_COMMON_CUH
#define HKV_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "../csrc/kernels.h"
#include "../csrc/status.h"

/*
 * Evaluate a CUDA runtime call; on failure record
 * "<call> failed: <reason>" as this thread's message and return HKV_ECUDA
 * from the enclosing function.
 */
#define HKV_CUDA_TRY(call)                                                  \
    do {                                                                    \
        cudaError_t hkv_err_ = (call);                                      \
        if (hkv_err_ != cudaSuccess)                                        \
            return hkv_error(HKV_ECUDA, "%s failed: %s", #call,             \
                             cudaGetErrorString(hkv_err_));                 \
    } while (0)

/* Same, for a hkv_status-returning helper. */
#define HKV_TRY(expr)                                                       \
    do {                                                                    \
        hkv_status hkv_st_ = (expr);                                        \
        if (hkv_st_ != HKV_OK)                                              \
            return hkv_st_;                                                 \
    } while (0)

namespace hkv {

/* Threads per block of the copy kernels: 8 warps, small enough that
 * several blocks share an SM, large enough to keep the block count low. */
constexpr int kBlockThreads = 256;
constexpr int kWarpsPerBlock = kBlockThreads / 32;

/* CUDA's limit on gridDim.y and gridDim.z. */
constexpr unsigned kMaxGridY = 65535;

/*
 * Make `device` current for the calling thread.  cudaGetDevice is a
 * thread-local read, so the common case (already current) costs no
 * driver call.
 */
static inline hkv_status set_device(int device)
{
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur == device)
        return HKV_OK;
    HKV_CUDA_TRY(cudaSetDevice(device));
    return HKV_OK;
}

/*
 * Prepare a kernel launch: make the device current and forget any error
 * a previous, unrelated runtime call left in the thread's last-error slot
 * (it was already returned to whoever made that call), so that the
 * cudaGetLastError() after our launch reports our launch only.
 */
static inline hkv_status launch_begin(int device)
{
    HKV_TRY(set_device(device));
    (void)cudaGetLastError();
    return HKV_OK;
}

/* After each launch: a bad configuration or a sticky device error. */
static inline hkv_status launch_check(const char *kernel)
{
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        return hkv_error(HKV_ECUDA, "launch of %s failed: %s", kernel,
                         cudaGetErrorString(err));
    return HKV_OK;
}

/*
 * Number of SMs of `device`, cached: launch geometry needs it on every
 * call and the answer never changes.  Racing first calls store the same
 * value, so a relaxed int store is enough.
 */
static inline int sm_count(int device)
{
    enum { kMaxDevices = 64 };
    static volatile int cache[kMaxDevices];
    int n = 0;

    if (device >= 0 && device < kMaxDevices && cache[device] > 0)
        return cache[device];
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device) !=
            cudaSuccess || n <= 0) {
        (void)cudaGetLastError();
        n = 132;    /* an H100; only launch geometry depends on it */
    }
    if (device >= 0 && device < kMaxDevices)
        cache[device] = n;
    return n;
}

/*
 * Widest access width (16, 8, 4, 2 or 1 bytes) that divides `bits`, the
 * bitwise OR of every base address, stride and size a kernel will add
 * together: if the OR is a multiple of W, so is every sum of multiples.
 */
static inline int pick_width(uint64_t bits)
{
    if ((bits & 15) == 0)
        return 16;
    if ((bits & 7) == 0)
        return 8;
    if ((bits & 3) == 0)
        return 4;
    if ((bits & 1) == 0)
        return 2;
    return 1;
}

static inline uint64_t addr_bits(const void *p)
{
    return (uint64_t)(uintptr_t)p;
}

/* The unsigned integer type of each access width. */
template <int W> struct VecOf;
template <> struct VecOf<16> { typedef uint4 type; };
template <> struct VecOf<8>  { typedef uint2 type; };
template <> struct VecOf<4>  { typedef unsigned int type; };
template <> struct VecOf<2>  { typedef unsigned short type; };
template <> struct VecOf<1>  { typedef unsigned char type; };

/*
 * Source loads go through the read-only path (ld.global.nc): every kernel
 * here reads a buffer it never writes in the same launch, and the
 * non-coherent path lets the compiler keep several loads in flight.
 */
template <typename V>
__device__ __forceinline__ V load_ro(const V *p)
{
    return __ldg(p);
}

template <typename V>
__device__ __forceinline__ void store(V *p, const V &x)
{
    *p = x;
}

/* Round up a / b for positive 64-bit values. */
static inline int64_t div_up(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* log2 of a power of two (page_size); -1 if not a power of two. */
static inline int log2_exact(int64_t x)
{
    int s = 0;
    if (x <= 0 || (x & (x - 1)) != 0)
        return -1;
    while ((int64_t)1 << s != x)
        s++;
    return s;
}

}  // namespace hkv

/*
 * Call body(V) with V the vector type of width `w` (16, 8, 4, 2, 1).
 * Used on the host to instantiate one kernel per width.
 */
#define HKV_DISPATCH_WIDTH(w, V, ...)                                       \
    switch (w) {                                                            \
    case 16: { typedef hkv::VecOf<16>::type V; __VA_ARGS__; } break;        \
    case 8:  { typedef hkv::VecOf<8>::type V;  __VA_ARGS__; } break;        \
    case 4:  { typedef hkv::VecOf<4>::type V;  __VA_ARGS__; } break;        \
    case 2:  { typedef hkv::VecOf<2>::type V;  __VA_ARGS__; } break;        \
    default: { typedef hkv::VecOf<1>::type V;  __VA_ARGS__; } break;        \
    }

#endif /* HKV_CUDA_COMMON_CUH */
