/*
 * strip.cu - remove each user's cached leading tokens from a jagged
 * tensor (kernels.h, hkv_strip_args).
 *
 * Two kernels on the caller's stream:
 *
 *   1. strip_scan_kernel, one block: per user, the kept length
 *      len - clamp(num_drop, 0, len), and the exclusive scan of those
 *      lengths into out_offsets.  The block walks the batch in chunks of
 *      blockDim users (batches of a few thousand users are a handful of
 *      chunks), carrying the running total from chunk to chunk.
 *
 *   2. strip_copy_kernel: one group of lanes per output row.  Each row
 *      finds its user by binary search in out_offsets, which kernel 1
 *      wrote in device memory: the two kernels are on the same stream, so
 *      kernel 2 starts only after kernel 1 has finished.
 *
 * The copy never writes at or past the caller's out_total, and never
 * past the true total either (a caller that over-sized out_total gets its
 * extra rows untouched).  values and out_values must not overlap (no
 * in-place strip): the copy reads values through the read-only path, and
 * the CPU version uses memcpy.
 */
#include "common.cuh"

namespace {

constexpr int kScanThreads = 1024;

/*
 * Kernel 1.  I is int32_t or int64_t (index_int64).  Kept lengths are
 * summed in int64 whatever I is.
 */
template <typename I>
__global__ void __launch_bounds__(kScanThreads)
strip_scan_kernel(const I *offsets, const int32_t *num_drop, int32_t batch,
                  I *out_lengths, I *out_offsets)
{
    __shared__ int64_t warp_sums[kScanThreads / 32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    int64_t carry = 0;      /* kept rows of all previous chunks */

    for (int32_t base = 0; base < batch; base += blockDim.x) {
        const int32_t b = base + threadIdx.x;
        int64_t keep = 0;

        if (b < batch) {
            const int64_t len = (int64_t)offsets[b + 1] - (int64_t)offsets[b];
            int64_t drop = num_drop[b];
            drop = drop < 0 ? 0 : (drop > len ? len : drop);
            keep = len - drop;
        }

        /* Inclusive scan inside the warp. */
        int64_t x = keep;
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
            const int64_t y = __shfl_up_sync(0xffffffffu, x, d);
            if (lane >= d)
                x += y;
        }
        if (lane == 31)
            warp_sums[warp] = x;
        __syncthreads();

        /* Warp 0 turns the warp totals into an inclusive scan. */
        if (warp == 0) {
            int64_t s = lane < nwarps ? warp_sums[lane] : 0;
#pragma unroll
            for (int d = 1; d < 32; d <<= 1) {
                const int64_t y = __shfl_up_sync(0xffffffffu, s, d);
                if (lane >= d)
                    s += y;
            }
            if (lane < nwarps)
                warp_sums[lane] = s;
        }
        __syncthreads();

        if (b < batch) {
            const int64_t before = warp > 0 ? warp_sums[warp - 1] : 0;
            out_lengths[b] = (I)keep;
            out_offsets[b] = (I)(carry + before + x - keep);
        }
        carry += warp_sums[nwarps - 1];
        /* Nobody may overwrite warp_sums for the next chunk before every
         * thread has read this chunk's values. */
        __syncthreads();
    }
    if (threadIdx.x == 0)
        out_offsets[batch] = (I)carry;
}

/* Largest b in [0, batch) with off[b] <= r (off[0] == 0 <= r). */
template <typename I>
__device__ __forceinline__ int32_t find_user(const I *off, int32_t batch,
                                             int64_t r)
{
    int32_t lo = 0, hi = batch - 1;
    while (lo < hi) {
        const int32_t mid = lo + ((hi - lo + 1) >> 1);
        if ((int64_t)off[mid] <= r)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/*
 * Kernel 2.  Groups of 2^group_shift lanes (1..32, the smallest power of
 * two covering a row, so rows of one 8-byte id don't waste a warp) copy
 * one row each, in vectors of V.
 *
 * out_offsets is read with plain loads, not __ldg: kernel 1 wrote it, and
 * although stream order makes that safe for the read-only path too, plain
 * loads make the dependence obvious.
 */
template <typename V, typename I>
__global__ void __launch_bounds__(hkv::kBlockThreads)
strip_copy_kernel(const char *values, char *out_values, int64_t row_vecs,
                  const I *offsets, const I *out_offsets, int32_t batch,
                  int64_t out_total, int group_shift)
{
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t ngroups = ((int64_t)gridDim.x * blockDim.x) >> group_shift;
    const int64_t glane = tid & ((1 << group_shift) - 1);
    const int64_t group_size = (int64_t)1 << group_shift;
    const int64_t total = (int64_t)out_offsets[batch];
    const int64_t rows = out_total < total ? out_total : total;

    for (int64_t r = tid >> group_shift; r < rows; r += ngroups) {
        const int32_t b = find_user(out_offsets, batch, r);
        /* src = offsets[b] + drop_b + (r - out_offsets[b])
         *     = offsets[b+1] - out_offsets[b+1] + r, since
         * drop_b = len_b - kept_b. */
        const int64_t src = (int64_t)__ldg(offsets + b + 1) -
                            (int64_t)out_offsets[b + 1] + r;
        const V *s = (const V *)values + src * row_vecs;
        V *d = (V *)out_values + r * row_vecs;

        for (int64_t e = glane; e < row_vecs; e += group_size)
            hkv::store(d + e, hkv::load_ro(s + e));
    }
}

template <typename I>
hkv_status strip_launch(const hkv_strip_args *a, int device,
                        cudaStream_t s)
{
    const I *offsets = (const I *)a->offsets;
    I *out_offsets = (I *)a->out_offsets;

    strip_scan_kernel<I><<<1, kScanThreads, 0, s>>>(
        offsets, a->num_drop, a->batch, (I *)a->out_lengths, out_offsets);
    HKV_TRY(hkv::launch_check("hkv_cuda_strip (scan)"));

    if (a->out_total <= 0 || a->row_bytes <= 0)
        return HKV_OK;

    const int width = hkv::pick_width(hkv::addr_bits(a->values) |
                                      hkv::addr_bits(a->out_values) |
                                      (uint64_t)a->row_bytes);
    const int64_t row_vecs = a->row_bytes / width;
    int group_shift = 0;
    while (group_shift < 5 && ((int64_t)1 << group_shift) < row_vecs)
        group_shift++;

    const int64_t rows_per_block = hkv::kBlockThreads >> group_shift;
    int64_t blocks = hkv::div_up(a->out_total, rows_per_block);
    const int64_t max_blocks = (int64_t)hkv::sm_count(device) * 64;
    if (blocks > max_blocks)
        blocks = max_blocks;

    HKV_DISPATCH_WIDTH(width, V,
        strip_copy_kernel<V, I><<<(unsigned)blocks, hkv::kBlockThreads, 0, s>>>(
            (const char *)a->values, (char *)a->out_values, row_vecs,
            offsets, out_offsets, a->batch, a->out_total, group_shift))
    return hkv::launch_check("hkv_cuda_strip (copy)");
}

}  // namespace

extern "C" hkv_status hkv_cuda_strip(const hkv_strip_args *a, int device,
                                     void *stream)
{
    cudaStream_t s = (cudaStream_t)stream;

    HKV_TRY(hkv::launch_begin(device));
    if (a->batch <= 0) {
        /* No users: the only output is out_offsets[0] = 0, as on the CPU. */
        const size_t esize = a->index_int64 ? sizeof(int64_t) : sizeof(int32_t);
        HKV_CUDA_TRY(cudaMemsetAsync(a->out_offsets, 0, esize, s));
        return HKV_OK;
    }
    if (a->index_int64)
        return strip_launch<int64_t>(a, device, s);
    return strip_launch<int32_t>(a, device, s);
}
