/*
 * rows.cu - append / read: move token rows between the caller's jagged K
 * and V tensors and their pages (kernels.h, hkv_rows_args).
 *
 * Work decomposition.  One warp owns one token and a contiguous chunk of
 * layers (blockIdx.y picks the chunk).  The warp resolves the token's
 * user, row, page and slot once, then copies K and V of each of its
 * layers; the 32 lanes stride over the row in vectors, so every access of
 * the warp is one coalesced 512-byte sweep (at 16-byte width).
 *
 * Latency hiding.  The index chain (batch_indices -> offsets -> kv_indptr
 * -> kv_indices) is paid once per (token, layer chunk).  The copy then
 * handles two layers at a time, i.e. four rows (K and V of both), issuing
 * all four loads before the first store so that each lane has four
 * independent 16-byte loads in flight.
 *
 * The layer chunking is chosen on the host: with many tokens each warp
 * takes every layer (the index chain is amortized over all of them); with
 * few tokens the layers are split over blockIdx.y until the grid has
 * enough warps to fill the GPU.  Either way all layers go in one launch.
 */
#include "common.cuh"

/*
 * Warps per SM the launcher aims for before it splits layers over
 * blockIdx.y (see rows_launch).  A build-time knob for tuning runs.
 */
#ifndef HKV_ROWS_WARPS_PER_SM
#define HKV_ROWS_WARPS_PER_SM 64
#endif

namespace {

struct RowsParams {
    char *table;              /* table base + first_layer * layer_bytes     */
    int64_t layer_bytes;
    int64_t page_bytes;
    int64_t v_half;           /* page_size * row_bytes: V rows follow K rows */
    int64_t row_bytes;
    int32_t page_shift;       /* log2(page_size)                             */
    int32_t num_layers;
    int32_t layers_per_warp;
    int32_t row_vecs;         /* row_bytes / sizeof(V)                       */
    char *k;
    char *v;
    int64_t k_row_stride, v_row_stride;
    int64_t k_layer_stride, v_layer_stride;
    const int32_t *batch_indices;
    const int32_t *positions;
    const int32_t *token_offsets;
    const int32_t *row_offsets;
    const int32_t *kv_indptr;
    const int32_t *kv_indices;
    int64_t nnz;
};

/*
 * kToTable: append (caller rows -> pages) when true, read otherwise.
 * V: the access type, 1 to 16 bytes; every address is a multiple of it.
 */
template <typename V, bool kToTable>
__global__ void __launch_bounds__(hkv::kBlockThreads, 4)
rows_kernel(const RowsParams p)
{
    const int lane = threadIdx.x & 31;
    const int64_t warp0 =
        ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    const int32_t page_mask = (1 << p.page_shift) - 1;

    for (int64_t chunk = blockIdx.y;
         chunk * p.layers_per_warp < p.num_layers; chunk += gridDim.y) {
        const int32_t l_begin = (int32_t)chunk * p.layers_per_warp;
        const int32_t l_end = min(l_begin + p.layers_per_warp, p.num_layers);

        for (int64_t tok = warp0; tok < p.nnz; tok += nwarps) {
            /* Every lane loads the same words: one broadcast request each. */
            const int32_t b = __ldg(p.batch_indices + tok);
            const int32_t pos = __ldg(p.positions + tok);
            const int64_t row = (int64_t)__ldg(p.row_offsets + b) +
                                (tok - __ldg(p.token_offsets + b));
            const int64_t page =
                __ldg(p.kv_indices + __ldg(p.kv_indptr + b) +
                      (pos >> p.page_shift));
            /* K row of this token in layer first_layer. */
            const char *trow = p.table + page * p.page_bytes +
                               (int64_t)(pos & page_mask) * p.row_bytes;
            const char *krow = p.k + row * p.k_row_stride;
            const char *vrow = p.v + row * p.v_row_stride;

            for (int32_t l = l_begin; l < l_end; l += 2) {
                const bool two = l + 1 < l_end;
                /* The four rows: K and V of layer l, then of layer l + 1
                 * (duplicates of the first two when there is no l + 1;
                 * they are then neither loaded nor stored). */
                const int32_t l2 = two ? l + 1 : l;
                const char *t0 = trow + l * p.layer_bytes;
                const char *t2 = trow + l2 * p.layer_bytes;
                const char *u0 = krow + l * p.k_layer_stride;
                const char *u1 = vrow + l * p.v_layer_stride;
                const char *u2 = krow + l2 * p.k_layer_stride;
                const char *u3 = vrow + l2 * p.v_layer_stride;
                const char *tab[4] = {t0, t0 + p.v_half, t2, t2 + p.v_half};
                const char *usr[4] = {u0, u1, u2, u3};
                const V *src[4];
                V *dst[4];

#pragma unroll
                for (int r = 0; r < 4; r++) {
                    src[r] = (const V *)(kToTable ? usr[r] : tab[r]);
                    dst[r] = (V *)(kToTable ? tab[r] : usr[r]);
                }

                /* Not unrolled: stores may alias the next loads as far as
                 * the compiler knows, so unrolling would add registers
                 * but no loads in flight. */
#pragma unroll 1
                for (int32_t i = lane; i < p.row_vecs; i += 32) {
                    V x0 = hkv::load_ro(src[0] + i);
                    V x1 = hkv::load_ro(src[1] + i);
                    V x2, x3;
                    if (two) {
                        x2 = hkv::load_ro(src[2] + i);
                        x3 = hkv::load_ro(src[3] + i);
                    }
                    hkv::store(dst[0] + i, x0);
                    hkv::store(dst[1] + i, x1);
                    if (two) {
                        hkv::store(dst[2] + i, x2);
                        hkv::store(dst[3] + i, x3);
                    }
                }
            }
        }
    }
}

hkv_status rows_launch(const hkv_rows_args *a, int device, void *stream,
                       bool to_table, const char *name)
{
    const hkv_table_desc *t = &a->table;

    HKV_TRY(hkv::launch_begin(device));
    if (a->nnz <= 0 || a->num_layers <= 0 || t->row_bytes <= 0)
        return HKV_OK;

    const int shift = hkv::log2_exact(t->page_size);
    if (shift < 0)
        return hkv_error(HKV_EINVAL, "%s: page_size %d is not a power of two",
                         name, (int)t->page_size);

    /* Every address is a sum of these (layer, page and V offsets of the
     * table are multiples of row_bytes); layer strides only matter when
     * there is more than one layer. */
    uint64_t bits = hkv::addr_bits(t->base) | hkv::addr_bits(a->k) |
                    hkv::addr_bits(a->v) | (uint64_t)t->row_bytes |
                    (uint64_t)a->k_row_stride | (uint64_t)a->v_row_stride;
    if (a->num_layers > 1)
        bits |= (uint64_t)a->k_layer_stride | (uint64_t)a->v_layer_stride;
    const int width = hkv::pick_width(bits);

    RowsParams p;
    p.table = (char *)t->base + (int64_t)a->first_layer * hkv_layer_bytes(t);
    p.layer_bytes = hkv_layer_bytes(t);
    p.page_bytes = hkv_page_bytes(t);
    p.v_half = (int64_t)t->page_size * t->row_bytes;
    p.row_bytes = t->row_bytes;
    p.page_shift = shift;
    p.num_layers = a->num_layers;
    p.row_vecs = (int32_t)(t->row_bytes / width);
    p.k = (char *)a->k;
    p.v = (char *)a->v;
    p.k_row_stride = a->k_row_stride;
    p.v_row_stride = a->v_row_stride;
    p.k_layer_stride = a->k_layer_stride;
    p.v_layer_stride = a->v_layer_stride;
    p.batch_indices = a->batch_indices;
    p.positions = a->positions;
    p.token_offsets = a->token_offsets;
    p.row_offsets = a->row_offsets;
    p.kv_indptr = a->kv_indptr;
    p.kv_indices = a->kv_indices;
    p.nnz = a->nnz;

    /*
     * Aim for about 64 warps (two full waves at 32 resident warps) per SM.
     * If the tokens alone give that, one warp takes all layers of a token;
     * otherwise split the layers into chunks over blockIdx.y.
     */
    const int sms = hkv::sm_count(device);
    const int64_t want_warps = (int64_t)sms * HKV_ROWS_WARPS_PER_SM;
    int64_t chunks = hkv::div_up(want_warps, a->nnz);
    if (chunks > a->num_layers)
        chunks = a->num_layers;
    if (chunks > (int64_t)hkv::kMaxGridY)
        chunks = hkv::kMaxGridY;
    p.layers_per_warp = (int32_t)hkv::div_up(a->num_layers, chunks);
    chunks = hkv::div_up(a->num_layers, p.layers_per_warp);

    /* Blocks over tokens; past a few waves the warps loop (grid-stride). */
    int64_t blocks = hkv::div_up(a->nnz, hkv::kWarpsPerBlock);
    const int64_t max_blocks = (int64_t)sms * 256;
    if (blocks > max_blocks)
        blocks = max_blocks;

    dim3 grid((unsigned)blocks, (unsigned)chunks);
    cudaStream_t s = (cudaStream_t)stream;
    if (to_table) {
        HKV_DISPATCH_WIDTH(width, V,
            rows_kernel<V, true><<<grid, hkv::kBlockThreads, 0, s>>>(p))
    } else {
        HKV_DISPATCH_WIDTH(width, V,
            rows_kernel<V, false><<<grid, hkv::kBlockThreads, 0, s>>>(p))
    }
    return hkv::launch_check(name);
}

}  // namespace

extern "C" hkv_status hkv_cuda_append(const hkv_rows_args *a, int device,
                                      void *stream)
{
    return rows_launch(a, device, stream, true, "hkv_cuda_append");
}

extern "C" hkv_status hkv_cuda_read(const hkv_rows_args *a, int device,
                                    void *stream)
{
    return rows_launch(a, device, stream, false, "hkv_cuda_read");
}
