/*
 * kernels.h - the data-moving operations of the cache, as one contract for
 * two implementations: C loops on host memory (kernels_cpu.c) and CUDA
 * kernels (cuda/ *.cu files, behind extern "C" launchers).  Both must produce the
 * same bytes for the same input; the GPU tests compare them bit for bit.
 *
 * K/V never need arithmetic here, only copies, so every operation works on
 * rows of `row_bytes` bytes and is independent of the dtype.
 *
 * Page table layout (one allocation per tier):
 *     [num_layers, num_pages, 2, page_size, num_heads, head_dim]
 * so one (layer, page) is a contiguous block of page_bytes = 2 * page_size *
 * row_bytes, K rows first (index 0), then V rows (index 1).
 *
 * Staging layout for page transfers: [num_layers, n, page_bytes], i.e. layer
 * major, so one layer of n pages is one contiguous piece (layer-wise onboard
 * copies one piece per layer).
 *
 * All index arrays are int32.  On the CUDA path every pointer is a device
 * pointer and work is queued on `stream` (a cudaStream_t, 0 for the legacy
 * default stream); nothing synchronizes.
 */
#ifndef HKV_KERNELS_H
#define HKV_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct hkv_table_desc {
    void *base;          /* start of the whole table                      */
    int32_t num_layers;
    int32_t num_pages;
    int32_t page_size;   /* tokens per page, power of two 2..256          */
    int64_t row_bytes;   /* num_heads * head_dim * element size            */
} hkv_table_desc;

static inline int64_t hkv_page_bytes(const hkv_table_desc *t)
{
    return 2 * (int64_t)t->page_size * t->row_bytes;
}

static inline int64_t hkv_layer_bytes(const hkv_table_desc *t)
{
    return (int64_t)t->num_pages * hkv_page_bytes(t);
}

/*
 * append / read: move token rows between the caller's jagged K and V and
 * their pages.
 *
 * For each token t in [0, nnz):
 *     b    = batch_indices[t]
 *     j    = t - token_offsets[b]              (index among b's tokens)
 *     row  = row_offsets[b] + j                (row in the caller's k / v)
 *     pos  = positions[t]                      (absolute position in history)
 *     page = kv_indices[kv_indptr[b] + pos / page_size], slot = pos % page_size
 * and for each layer l in [first_layer, first_layer + num_layers):
 *     append: table[l, page, 0, slot] = k[l - first_layer][row]
 *             table[l, page, 1, slot] = v[l - first_layer][row]
 *     read:   the same copies in the other direction.
 * For append, the tokens are a batch's new history tokens: token_offsets is
 * new_history_offsets, and row_offsets differs from it when the caller's rows
 * also hold candidates (never cached), which are simply skipped.  For read,
 * the tokens are usually every history token of the batch.
 * Row r of layer i of k starts at k + i * k_layer_stride + r * k_row_stride
 * (strides in bytes); each row's row_bytes are contiguous.
 */
typedef struct hkv_rows_args {
    hkv_table_desc table;
    int32_t first_layer;
    int32_t num_layers;
    void *k;                        /* read: written; append: only read   */
    void *v;
    int64_t k_row_stride, v_row_stride;       /* bytes */
    int64_t k_layer_stride, v_layer_stride;   /* bytes */
    const int32_t *batch_indices;   /* [nnz] */
    const int32_t *positions;       /* [nnz] */
    const int32_t *token_offsets;   /* [B+1] */
    const int32_t *row_offsets;     /* [B+1] */
    const int32_t *kv_indptr;       /* [B+1] */
    const int32_t *kv_indices;      /* [kv_indptr[B]] */
    int64_t nnz;
} hkv_rows_args;

/*
 * gather / scatter: move whole pages (K and V) of layers
 * [first_layer, first_layer + num_layers) between the table and a staging
 * buffer laid out [num_layers, n, page_bytes]:
 *     gather:  staging[l - first_layer, i] = table[l, page_ids[i]]
 *     scatter: table[l, page_ids[i]] = staging[l - first_layer, i]
 * page_ids must not repeat for scatter.
 */
typedef struct hkv_pages_args {
    hkv_table_desc table;
    int32_t first_layer;
    int32_t num_layers;
    const int32_t *page_ids;   /* [n] */
    int64_t n;
    void *staging;
} hkv_pages_args;

/*
 * copy pages between two tables of the same page geometry, e.g. the GPU tier
 * and the host tier (onboard, offload):
 *     dst[l, dst_ids[i]] = src[l, src_ids[i]]
 * for l in [first_layer, first_layer + num_layers) and i in [0, n).  Each
 * table is [layers, *_num_pages, page_bytes].  On CUDA either table may be
 * pinned host memory (mapped into the device's address space): the kernel
 * then reads or writes it across PCIe itself ("zero-copy"), which moves
 * scattered pages at close to the link's speed with a few dozen blocks and
 * needs no staging buffer.  max_blocks bounds the SMs taken from concurrent
 * work (0: a default of 32).  On CUDA every pointer (tables and ids) is the
 * device's address (hkv_cuda_host_device_pointer for pinned memory), and
 * dst_ids must not repeat.
 */
typedef struct hkv_copy_pages_args {
    const void *src;
    void *dst;
    int32_t src_num_pages;
    int32_t dst_num_pages;
    int64_t page_bytes;
    int32_t first_layer;
    int32_t num_layers;
    const int32_t *src_ids;   /* [n] */
    const int32_t *dst_ids;   /* [n] */
    int64_t n;
    int32_t max_blocks;
} hkv_copy_pages_args;

/*
 * token metadata: for each new token t in [0, nnz) find its user b (the b
 * with new_offsets[b] <= t < new_offsets[b+1]) and write
 *     batch_indices[t] = b
 *     positions[t]     = cached_lengths[b] + (t - new_offsets[b])
 * new_offsets has batch + 1 entries, new_offsets[batch] == nnz.
 */
typedef struct hkv_token_meta_args {
    const int32_t *new_offsets;     /* [batch+1] */
    const int32_t *cached_lengths;  /* [batch]   */
    int32_t batch;
    int64_t nnz;
    int32_t *batch_indices;         /* [nnz] out */
    int32_t *positions;             /* [nnz] out */
} hkv_token_meta_args;

/*
 * strip: remove each user's first num_drop[b] tokens (clamped to its length)
 * from a jagged tensor of rows of row_bytes bytes:
 *     len_b       = offsets[b+1] - offsets[b]
 *     drop_b      = min(max(num_drop[b], 0), len_b)
 *     out_lengths[b] = len_b - drop_b
 *     out_offsets = exclusive scan of out_lengths (batch + 1 entries)
 *     out_values[out_offsets[b] + i] = values[offsets[b] + drop_b + i]
 * offsets, out_lengths and out_offsets are int64 when index_int64 != 0,
 * else int32.  out_total (= out_offsets[batch]) is computed by the caller
 * on the host to size out_values; the kernel must not write past it.
 */
typedef struct hkv_strip_args {
    const void *values;
    int64_t row_bytes;
    const void *offsets;            /* [batch+1] */
    int32_t index_int64;
    const int32_t *num_drop;        /* [batch]   */
    int32_t batch;
    void *out_values;               /* [out_total rows] */
    void *out_lengths;              /* [batch]   */
    void *out_offsets;              /* [batch+1] */
    int64_t out_total;
} hkv_strip_args;

/* ---- host implementations (kernels_cpu.c); never fail on valid input ---- */
void hkv_cpu_append(const hkv_rows_args *a);
void hkv_cpu_read(const hkv_rows_args *a);
void hkv_cpu_gather_pages(const hkv_pages_args *a);
void hkv_cpu_scatter_pages(const hkv_pages_args *a);
void hkv_cpu_copy_pages(const hkv_copy_pages_args *a);
void hkv_cpu_token_meta(const hkv_token_meta_args *a);
void hkv_cpu_strip(const hkv_strip_args *a);

/* ---- CUDA launchers (cuda/ *.cu files, or stubs in cuda_stub.c) ----
 * Each sets the current device to `device`, queues its kernels on `stream`
 * and returns HKV_OK, or an error (with message) if a launch failed.  With
 * an empty workload they launch nothing and return HKV_OK. */
hkv_status hkv_cuda_append(const hkv_rows_args *a, int device, void *stream);
hkv_status hkv_cuda_read(const hkv_rows_args *a, int device, void *stream);
hkv_status hkv_cuda_gather_pages(const hkv_pages_args *a, int device, void *stream);
hkv_status hkv_cuda_scatter_pages(const hkv_pages_args *a, int device, void *stream);
hkv_status hkv_cuda_copy_pages(const hkv_copy_pages_args *a, int device, void *stream);
hkv_status hkv_cuda_token_meta(const hkv_token_meta_args *a, int device, void *stream);
/*
 * CRC-32C (crc32c.h's convention, continuing from `crc`) of len bytes of
 * device memory, written to *out (device memory) on `stream`.  scratch:
 * hkv_cuda_crc32c_scratch_words(len) uint32 words of device memory.  For
 * checking disk records read straight into GPU memory.
 */
int64_t hkv_cuda_crc32c_scratch_words(int64_t len);
hkv_status hkv_cuda_crc32c(const void *data, int64_t len, uint32_t crc, uint32_t *scratch,
                           uint32_t *out, int device, void *stream);

/* n int32 words from pinned host memory (its device address) to the device,
 * by a kernel on `stream` (no copy engine: see token_meta.cu). */
hkv_status hkv_cuda_upload_words(int32_t *dst, const int32_t *src_mapped, int64_t n,
                                 int device, void *stream);
hkv_status hkv_cuda_strip(const hkv_strip_args *a, int device, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* HKV_KERNELS_H */
