/*
 * transfer.cu - copy pages between two tables (kernels.h,
 * hkv_copy_pages_args): the GPU tier and the pinned host tier.
 *
 * Either side may be pinned host memory mapped into the device: the kernel
 * then moves the bytes across PCIe itself.  Measured on an H100
 * (benchmarks/transfer_probe.cu): scattered 32-128 KiB pages reach 50-52
 * GB/s this way with 16-32 blocks, against 26 GB/s for one cudaMemcpyAsync
 * per 128 KiB page, and no staging buffer or contiguous runs are needed.
 * The grid is kept small (max_blocks) so the copy leaves most SMs to the
 * model running beside it.
 *
 * Loads use the plain (coherent) path, not the read-only one: a source in
 * host memory is not a candidate for the non-coherent cache.
 */
#include "common.cuh"

namespace {

constexpr int kVecsPerLane = 4;
constexpr int kChunkVecs = 32 * kVecsPerLane;
constexpr int kDefaultBlocks = 32;

struct CopyParams {
    const char *src;
    char *dst;
    const int32_t *src_ids;
    const int32_t *dst_ids;
    int64_t n;
    int64_t src_layer_bytes;
    int64_t dst_layer_bytes;
    int64_t page_bytes;
    int64_t page_vecs;
    int64_t chunks_per_page;
    int32_t num_layers;
};

template <typename V>
__global__ void __launch_bounds__(hkv::kBlockThreads)
copy_pages_kernel(const CopyParams p)
{
    const int lane = threadIdx.x & 31;
    const int64_t warp0 = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    const int64_t work = (int64_t)p.num_layers * p.n * p.chunks_per_page;

    for (int64_t w = warp0; w < work; w += nwarps) {
        const int64_t lc = w / p.chunks_per_page;   /* (layer, page) index */
        const int64_t c = w - lc * p.chunks_per_page;
        const int64_t l = lc / p.n;
        const int64_t i = lc - l * p.n;
        const V *src = (const V *)(p.src + l * p.src_layer_bytes +
                                   (int64_t)p.src_ids[i] * p.page_bytes);
        V *dst = (V *)(p.dst + l * p.dst_layer_bytes +
                       (int64_t)p.dst_ids[i] * p.page_bytes);
        const int64_t first = c * kChunkVecs + lane;
        V x[kVecsPerLane];
#pragma unroll
        for (int u = 0; u < kVecsPerLane; u++) {
            const int64_t e = first + u * 32;
            if (e < p.page_vecs)
                x[u] = src[e];
        }
#pragma unroll
        for (int u = 0; u < kVecsPerLane; u++) {
            const int64_t e = first + u * 32;
            if (e < p.page_vecs)
                dst[e] = x[u];
        }
    }
}

}  // namespace

extern "C" hkv_status hkv_cuda_copy_pages(const hkv_copy_pages_args *a, int device,
                                          void *stream)
{
    HKV_TRY(hkv::launch_begin(device));
    if (a->n <= 0 || a->num_layers <= 0 || a->page_bytes <= 0)
        return HKV_OK;
    /* every pointer is the device's address already (kernels.h) */
    const void *src = a->src, *dst = a->dst;
    const void *src_ids = a->src_ids, *dst_ids = a->dst_ids;

    const int width = hkv::pick_width(hkv::addr_bits(src) | hkv::addr_bits(dst) |
                                      (uint64_t)a->page_bytes);
    CopyParams p;
    p.src_layer_bytes = (int64_t)a->src_num_pages * a->page_bytes;
    p.dst_layer_bytes = (int64_t)a->dst_num_pages * a->page_bytes;
    p.src = (const char *)src + (int64_t)a->first_layer * p.src_layer_bytes;
    p.dst = (char *)dst + (int64_t)a->first_layer * p.dst_layer_bytes;
    p.src_ids = (const int32_t *)src_ids;
    p.dst_ids = (const int32_t *)dst_ids;
    p.n = a->n;
    p.page_bytes = a->page_bytes;
    p.page_vecs = a->page_bytes / width;
    p.chunks_per_page = hkv::div_up(p.page_vecs, kChunkVecs);
    p.num_layers = a->num_layers;

    const int64_t work = (int64_t)a->num_layers * a->n * p.chunks_per_page;
    int64_t blocks = hkv::div_up(work, hkv::kWarpsPerBlock);
    int64_t cap = a->max_blocks > 0 ? a->max_blocks : kDefaultBlocks;
    if (blocks > cap)
        blocks = cap;
    cudaStream_t s = (cudaStream_t)stream;
    HKV_DISPATCH_WIDTH(width, V,
        copy_pages_kernel<V><<<(unsigned)blocks, hkv::kBlockThreads, 0, s>>>(p))
    return hkv::launch_check("hkv_cuda_copy_pages");
}

/* Fault injection for the ordering tests: keep `stream` busy for about
 * `us` microseconds, so a copy queued after it lands late and any missing
 * wait shows up as wrong data. */
__global__ void spin_kernel(long long cycles)
{
    long long start = clock64();
    while (clock64() - start < cycles) {
    }
}

extern "C" hkv_status hkv_cuda_spin(int device, void *stream, int us)
{
    HKV_TRY(hkv::launch_begin(device));
    int khz = 0;
    if (cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, device) != cudaSuccess || khz <= 0) {
        (void)cudaGetLastError();
        khz = 1500000;
    }
    spin_kernel<<<1, 1, 0, (cudaStream_t)stream>>>((long long)us * khz / 1000);
    return hkv::launch_check("spin_kernel");
}
