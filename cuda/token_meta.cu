/*
 * token_meta.cu - per-new-token user index and absolute position
 * (kernels.h, hkv_token_meta_args).
 *
 * One thread per token.  The token's user is found by binary search over
 * new_offsets: log2(batch) dependent loads that stay in L1 (the offsets
 * are a few KiB at most), which is cheaper than any scheme that first
 * expands the offsets, and needs no second pass or atomics.
 */
#include "common.cuh"

namespace {

/* Largest b in [0, batch) with offsets[b] <= t; offsets[0] <= t holds for
 * every valid token, so the result is the user whose range holds t, even
 * when users with no new tokens (equal offsets) surround it. */
__device__ __forceinline__ int32_t find_user(const int32_t *offsets,
                                             int32_t batch, int64_t t)
{
    int32_t lo = 0, hi = batch - 1;
    while (lo < hi) {
        const int32_t mid = lo + ((hi - lo + 1) >> 1);
        if ((int64_t)__ldg(offsets + mid) <= t)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

__global__ void __launch_bounds__(hkv::kBlockThreads)
token_meta_kernel(const int32_t *new_offsets, const int32_t *cached_lengths,
                  int32_t batch, int64_t nnz, int32_t *batch_indices,
                  int32_t *positions)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;

    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < nnz;
         t += stride) {
        const int32_t b = find_user(new_offsets, batch, t);
        batch_indices[t] = b;
        positions[t] = (int32_t)(__ldg(cached_lengths + b) +
                                 (t - __ldg(new_offsets + b)));
    }
}

/* Words from pinned host memory (read through its device mapping) into
 * device memory. */
__global__ void __launch_bounds__(hkv::kBlockThreads)
upload_words_kernel(int32_t *dst, const int32_t *src, int64_t n)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        dst[i] = src[i];
}

}  // namespace

/* The batch metadata upload.  A kernel rather than cudaMemcpyAsync: a copy
 * on the compute stream would sit in the copy engine's queue, in order
 * with the onboarding DMAs queued on the side streams; while it waits for
 * the compute stream's earlier work (an embedding lookup) the DMAs behind
 * it wait too, and onboarding no longer overlaps that work (measured on an
 * H100: 38 ms instead of 20).  The kernel touches no copy engine. */
extern "C" hkv_status hkv_cuda_upload_words(int32_t *dst, const int32_t *src_mapped,
                                            int64_t n, int device, void *stream)
{
    HKV_TRY(hkv::launch_begin(device));
    if (n <= 0)
        return HKV_OK;
    int64_t blocks = hkv::div_up(n, hkv::kBlockThreads);
    if (blocks > 64)
        blocks = 64;  /* a few KiB to a few hundred: latency-bound anyway */
    upload_words_kernel<<<(unsigned)blocks, hkv::kBlockThreads, 0, (cudaStream_t)stream>>>(
        dst, src_mapped, n);
    return hkv::launch_check("hkv_cuda_upload_words");
}

extern "C" hkv_status hkv_cuda_token_meta(const hkv_token_meta_args *a,
                                          int device, void *stream)
{
    HKV_TRY(hkv::launch_begin(device));
    if (a->nnz <= 0 || a->batch <= 0)
        return HKV_OK;

    int64_t blocks = hkv::div_up(a->nnz, hkv::kBlockThreads);
    const int64_t max_blocks = (int64_t)hkv::sm_count(device) * 64;
    if (blocks > max_blocks)
        blocks = max_blocks;

    token_meta_kernel<<<(unsigned)blocks, hkv::kBlockThreads, 0,
                        (cudaStream_t)stream>>>(
        a->new_offsets, a->cached_lengths, a->batch, a->nnz,
        a->batch_indices, a->positions);
    return hkv::launch_check("hkv_cuda_token_meta");
}
