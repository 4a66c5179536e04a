/*
 * rows.cu - append / read: move token rows between the caller's jagged K
 * and V tensors and their pages (kernels.h, hkv_rows_args).
 *
 * Work decomposition.  A warp owns a tile of up to 32 consecutive tokens
 * and a chunk of layers (blockIdx.y picks the chunk; normally one layer,
 * so the warps running at the same time work in the same layer, which
 * keeps DRAM accesses close together).  Lane j of the warp resolves token
 * j of the tile (user, row, page, slot: a chain of dependent index loads),
 * all lanes at once; the warp then walks the tile's (token, layer) items,
 * taking each token's addresses from its lane with __shfl_sync, and the
 * 32 lanes stride over each row in vectors, so every access of the warp
 * is a coalesced sweep (512 bytes per instruction at 16-byte width).
 *
 * Why tiles: the index chain costs about a microsecond of latency and a
 * K+V pair of a 4 x 64 bf16 row is only 1 KiB.  One chain per token per
 * warp left each warp idle most of its life; one chain per tile of tokens
 * spreads it over several KiB of copying.  Tiles are sized on the host
 * (HKV_ROWS_WARP_BYTES of K+V per warp and layer, two tokens at least),
 * shrunk when the batch is too small to fill the GPU.
 *
 * Latency hiding inside the copy: items are taken two at a time, i.e.
 * four rows (K and V of both), and all four loads are issued before the
 * first store, so each lane has four independent loads in flight.
 *
 * All layers go in one launch either way.
 */
#include "common.cuh"

/*
 * Build-time tuning knobs (the defaults are what the H100 measurements
 * chose; kernel_check --bench compares variants):
 *   HKV_ROWS_SPLIT_LAYERS  1: one layer per warp, tokens tiled (default);
 *                          0: one token per warp taking every layer when
 *                             the tokens alone fill the GPU (first design).
 *   HKV_ROWS_WARP_BYTES    target K+V bytes per warp and layer: sets the
 *                          tile size (4096 -> 4 tokens of a 512-byte row).
 *   HKV_ROWS_MIN_TILE      smallest tile while the GPU stays full.
 *   HKV_ROWS_WARPS_PER_SM  warps per SM below which tiles shrink (or, with
 *                          SPLIT_LAYERS 0, layers are split).
 *
 * H100, 8 layers x 8 users x 4096 tokens, 4 heads, bf16, fraction of
 * cudaMemcpy D2D (append / read, page sizes 2..128):
 *   first design (SPLIT 0):      0.94-0.96 at every head_dim
 *   tiles of 4096 B:             D=64 0.95-0.96, D=128 0.97-0.98,
 *                                D=256 append 0.97 but read 0.90-0.93
 *                                (tile of one token)
 *   tiles of 8192 B:             D=64 0.95, D=128 0.97, D=256 0.96-0.97
 * hence 4096 B with at least two tokens per tile.
 */
#ifndef HKV_ROWS_SPLIT_LAYERS
#define HKV_ROWS_SPLIT_LAYERS 1
#endif
#ifndef HKV_ROWS_WARP_BYTES
#define HKV_ROWS_WARP_BYTES 4096
#endif
#ifndef HKV_ROWS_MIN_TILE
#define HKV_ROWS_MIN_TILE 2
#endif
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
    int32_t tokens_per_warp;  /* tile size, 1..32                            */
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
    int64_t ntiles;           /* ceil(nnz / tokens_per_warp)                 */
};

/*
 * The warp's cursor over the (token, layer) items of its tile, token
 * major.  Every field is warp-uniform, so the __shfl_sync calls in
 * next() are executed by all 32 lanes.
 */
struct ItemCursor {
    int32_t j, l;             /* token index in the tile, absolute layer    */
    int64_t t, k, v;          /* byte offsets of token j's rows (layer 0)   */
};

__device__ __forceinline__ void cursor_load(ItemCursor &c, int32_t j,
                                            int64_t my_t, int64_t my_k,
                                            int64_t my_v)
{
    c.t = __shfl_sync(0xffffffffu, my_t, j);
    c.k = __shfl_sync(0xffffffffu, my_k, j);
    c.v = __shfl_sync(0xffffffffu, my_v, j);
}

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
        const int32_t nl = l_end - l_begin;

        for (int64_t tile = warp0; tile < p.ntiles; tile += nwarps) {
            const int64_t t0 = tile * p.tokens_per_warp;
            const int32_t ntok =
                (int32_t)min((int64_t)p.tokens_per_warp, p.nnz - t0);

            /* Lane j resolves token t0 + j: the byte offsets of its K row
             * in the table (layer first_layer) and of its K and V rows in
             * the caller's tensors (layer 0). */
            int64_t my_t = 0, my_k = 0, my_v = 0;
            if (lane < ntok) {
                const int64_t tok = t0 + lane;
                const int32_t b = __ldg(p.batch_indices + tok);
                const int32_t pos = __ldg(p.positions + tok);
                const int64_t row = (int64_t)__ldg(p.row_offsets + b) +
                                    (tok - __ldg(p.token_offsets + b));
                const int64_t page =
                    __ldg(p.kv_indices + __ldg(p.kv_indptr + b) +
                          (pos >> p.page_shift));
                my_t = page * p.page_bytes +
                       (int64_t)(pos & page_mask) * p.row_bytes;
                my_k = row * p.k_row_stride;
                my_v = row * p.v_row_stride;
            }

            ItemCursor c;
            c.j = 0;
            c.l = l_begin;
            cursor_load(c, 0, my_t, my_k, my_v);
            const int32_t nitems = ntok * nl;

            for (int32_t q = 0; q < nitems; q += 2) {
                const bool two = q + 1 < nitems;
                const char *tab[4], *usr[4];

#pragma unroll
                for (int u = 0; u < 2; u++) {
                    /* Item u of the pair (the second repeats the first when
                     * there is none; it is then neither loaded nor stored). */
                    const char *t = p.table + c.t + c.l * p.layer_bytes;
                    tab[2 * u] = t;
                    tab[2 * u + 1] = t + p.v_half;
                    usr[2 * u] = p.k + c.k + c.l * p.k_layer_stride;
                    usr[2 * u + 1] = p.v + c.v + c.l * p.v_layer_stride;
                    if (u == 0 && !two)
                        break;
                    /* Advance: next layer of this token, else next token. */
                    if (++c.l == l_end) {
                        c.l = l_begin;
                        if (++c.j < ntok)
                            cursor_load(c, c.j, my_t, my_k, my_v);
                    }
                }
                if (!two) {
                    tab[2] = tab[0];
                    tab[3] = tab[1];
                    usr[2] = usr[0];
                    usr[3] = usr[1];
                }

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
     * Geometry.  Aim for HKV_ROWS_WARPS_PER_SM warps per SM (two full
     * waves at 32 resident warps).
     */
    const int sms = hkv::sm_count(device);
    const int64_t want_warps = (int64_t)sms * HKV_ROWS_WARPS_PER_SM;
    int64_t chunks, tpw;
    if (HKV_ROWS_SPLIT_LAYERS) {
        /* One layer per warp (unless the layer count exceeds gridDim.y),
         * tiles sized for HKV_ROWS_WARP_BYTES but of two tokens at least,
         * halved (down to one token) while the grid would not fill the
         * GPU. */
        p.layers_per_warp =
            (int32_t)hkv::div_up(a->num_layers, hkv::kMaxGridY);
        chunks = hkv::div_up(a->num_layers, p.layers_per_warp);
        tpw = HKV_ROWS_WARP_BYTES / (2 * t->row_bytes);
        tpw = tpw < HKV_ROWS_MIN_TILE ? HKV_ROWS_MIN_TILE : (tpw > 32 ? 32 : tpw);
        while (tpw > 1 && hkv::div_up(a->nnz, tpw) * chunks < want_warps)
            tpw = (tpw + 1) / 2;
    } else {
        /* One token per warp; layers split only when tokens are few. */
        tpw = 1;
        chunks = hkv::div_up(want_warps, a->nnz);
        if (chunks > a->num_layers)
            chunks = a->num_layers;
        if (chunks > (int64_t)hkv::kMaxGridY)
            chunks = hkv::kMaxGridY;
        p.layers_per_warp = (int32_t)hkv::div_up(a->num_layers, chunks);
        chunks = hkv::div_up(a->num_layers, p.layers_per_warp);
    }
    p.tokens_per_warp = (int32_t)tpw;
    p.ntiles = hkv::div_up(a->nnz, tpw);

    /* Blocks over tiles; past a few waves the warps loop (grid-stride). */
    int64_t blocks = hkv::div_up(p.ntiles, hkv::kWarpsPerBlock);
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
