/*
 * pages.cu - gather / scatter of whole pages between the table and a
 * layer-major staging buffer (kernels.h, hkv_pages_args).
 *
 * A (layer, page) is one contiguous block of page_bytes in the table (K
 * rows then V rows) and one contiguous block in staging, so both
 * directions are plain block copies through a page-id indirection.
 *
 * Work decomposition.  Each page is cut into chunks of kVecsPerLane * 32
 * vectors (2 KiB at 16-byte width); one warp copies one chunk, every lane
 * issuing its kVecsPerLane loads before its first store.  Small pages
 * (page_size 2 with 4 x 64 bf16 heads is exactly 2 KiB) are one chunk, big
 * pages are spread over many warps, so the GPU fills up whatever the page
 * size.  blockIdx.y walks the layers, so all layers go in one launch.
 *
 * The source is read through the read-only path, so staging and table
 * must not overlap (they never do: staging is a separate buffer).
 */
#include "common.cuh"

/* Vectors each lane moves per chunk (loads in flight per lane).  A
 * build-time knob for tuning runs. */
#ifndef HKV_PAGES_VECS_PER_LANE
#define HKV_PAGES_VECS_PER_LANE 4
#endif

namespace {

constexpr int kVecsPerLane = HKV_PAGES_VECS_PER_LANE;
constexpr int kChunkVecs = 32 * kVecsPerLane;

struct PagesParams {
    char *table;            /* table base + first_layer * layer_bytes */
    char *staging;
    const int32_t *page_ids;
    int64_t n;              /* pages per layer                        */
    int64_t layer_bytes;    /* table stride between layers            */
    int64_t page_bytes;
    int64_t page_vecs;      /* page_bytes / sizeof(V)                 */
    int64_t chunks_per_page;
    int32_t num_layers;
};

/* kToTable: scatter (staging -> table) when true, gather otherwise. */
template <typename V, bool kToTable>
__global__ void __launch_bounds__(hkv::kBlockThreads)
pages_kernel(const PagesParams p)
{
    const int lane = threadIdx.x & 31;
    const int64_t warp0 =
        ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    const int64_t work = p.n * p.chunks_per_page;

    for (int32_t l = blockIdx.y; l < p.num_layers; l += gridDim.y) {
        char *table = p.table + l * p.layer_bytes;
        char *staging = p.staging + l * p.n * p.page_bytes;

        for (int64_t w = warp0; w < work; w += nwarps) {
            /* Pages of up to one chunk (small page sizes) skip the 64-bit
             * division; the branch is uniform over the grid. */
            const int64_t i = p.chunks_per_page == 1 ? w : w / p.chunks_per_page;
            const int64_t c = w - i * p.chunks_per_page;
            const int64_t page = __ldg(p.page_ids + i);
            char *tp = table + page * p.page_bytes;
            char *sp = staging + i * p.page_bytes;
            const V *src = (const V *)(kToTable ? sp : tp);
            V *dst = (V *)(kToTable ? tp : sp);
            const int64_t first = c * kChunkVecs + lane;
            V x[kVecsPerLane];

#pragma unroll
            for (int u = 0; u < kVecsPerLane; u++) {
                const int64_t e = first + u * 32;
                if (e < p.page_vecs)
                    x[u] = hkv::load_ro(src + e);
            }
#pragma unroll
            for (int u = 0; u < kVecsPerLane; u++) {
                const int64_t e = first + u * 32;
                if (e < p.page_vecs)
                    hkv::store(dst + e, x[u]);
            }
        }
    }
}

hkv_status pages_launch(const hkv_pages_args *a, int device, void *stream,
                        bool to_table, const char *name)
{
    const hkv_table_desc *t = &a->table;

    HKV_TRY(hkv::launch_begin(device));
    if (a->n <= 0 || a->num_layers <= 0 || hkv_page_bytes(t) <= 0)
        return HKV_OK;

    const int64_t page_bytes = hkv_page_bytes(t);
    const int width = hkv::pick_width(hkv::addr_bits(t->base) |
                                      hkv::addr_bits(a->staging) |
                                      (uint64_t)page_bytes);

    PagesParams p;
    p.table = (char *)t->base + (int64_t)a->first_layer * hkv_layer_bytes(t);
    p.staging = (char *)a->staging;
    p.page_ids = a->page_ids;
    p.n = a->n;
    p.layer_bytes = hkv_layer_bytes(t);
    p.page_bytes = page_bytes;
    p.page_vecs = page_bytes / width;
    p.chunks_per_page = hkv::div_up(p.page_vecs, kChunkVecs);
    p.num_layers = a->num_layers;

    /* One warp per chunk of one layer; cap the grid at a few waves and
     * let warps loop past that. */
    const int sms = hkv::sm_count(device);
    const int64_t work = p.n * p.chunks_per_page;
    int64_t blocks = hkv::div_up(work, hkv::kWarpsPerBlock);
    int64_t max_blocks = (int64_t)sms * 256;
    unsigned ly = a->num_layers < (int32_t)hkv::kMaxGridY
                      ? (unsigned)a->num_layers : hkv::kMaxGridY;
    /* With many layers, fewer blocks per layer keep the total bounded. */
    max_blocks = max_blocks / ly > 0 ? max_blocks / ly : 1;
    if (blocks > max_blocks)
        blocks = max_blocks;

    dim3 grid((unsigned)blocks, ly);
    cudaStream_t s = (cudaStream_t)stream;
    if (to_table) {
        HKV_DISPATCH_WIDTH(width, V,
            pages_kernel<V, true><<<grid, hkv::kBlockThreads, 0, s>>>(p))
    } else {
        HKV_DISPATCH_WIDTH(width, V,
            pages_kernel<V, false><<<grid, hkv::kBlockThreads, 0, s>>>(p))
    }
    return hkv::launch_check(name);
}

}  // namespace

extern "C" hkv_status hkv_cuda_gather_pages(const hkv_pages_args *a,
                                            int device, void *stream)
{
    return pages_launch(a, device, stream, false, "hkv_cuda_gather_pages");
}

extern "C" hkv_status hkv_cuda_scatter_pages(const hkv_pages_args *a,
                                             int device, void *stream)
{
    return pages_launch(a, device, stream, true, "hkv_cuda_scatter_pages");
}
