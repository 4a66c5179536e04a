/*
 * kernels_cpu.c - host implementations of the data-moving operations of
 * kernels.h.
 *
 * These are both the CPU inference path and the reference the CUDA kernels
 * are checked against bit for bit, so they follow the contract of kernels.h
 * literally and stay simple: every operation is a loop of memcpy() calls,
 * one per row or per page, never a loop over bytes.
 *
 * Byte offsets are computed in int64_t and only then added to a char
 * pointer, so tables larger than 4 GiB work on 64-bit hosts.
 *
 * Nothing here validates its input: the Python layer and the C core check
 * shapes and index ranges before calling, and on valid input these
 * functions cannot fail.
 */
#include "kernels.h"

#include <string.h>

/* Byte address of the K (kv == 0) or V (kv == 1) row of `slot` in page
 * `page` of absolute layer `layer`. */
static char *table_row(const hkv_table_desc *t, int64_t layer, int64_t page,
                       int kv, int64_t slot)
{
    int64_t off = layer * hkv_layer_bytes(t) + page * hkv_page_bytes(t) +
                  ((int64_t)kv * t->page_size + slot) * t->row_bytes;
    return (char *)t->base + off;
}

/*
 * append (to_table != 0) and read (to_table == 0) share one loop: only the
 * direction of the two memcpy() calls differs.  Tokens are the outer loop
 * so that the index arithmetic (user, row, page, slot) is done once per
 * token, not once per token and layer.
 */
static void rows_copy(const hkv_rows_args *a, int to_table)
{
    const hkv_table_desc *t = &a->table;
    size_t rb = (size_t)t->row_bytes;
    int64_t tok;

    for (tok = 0; tok < a->nnz; tok++) {
        int32_t b = a->batch_indices[tok];
        int64_t j = tok - a->token_offsets[b];
        int64_t row = a->row_offsets[b] + j;
        int32_t pos = a->positions[tok];
        int64_t page = a->kv_indices[a->kv_indptr[b] + pos / t->page_size];
        int64_t slot = pos % t->page_size;
        char *k = (char *)a->k + row * a->k_row_stride;
        char *v = (char *)a->v + row * a->v_row_stride;
        int32_t i;

        for (i = 0; i < a->num_layers; i++) {
            int64_t layer = (int64_t)a->first_layer + i;
            char *tk = table_row(t, layer, page, 0, slot);
            char *tv = table_row(t, layer, page, 1, slot);
            char *uk = k + i * a->k_layer_stride;
            char *uv = v + i * a->v_layer_stride;

            if (to_table) {
                memcpy(tk, uk, rb);
                memcpy(tv, uv, rb);
            } else {
                memcpy(uk, tk, rb);
                memcpy(uv, tv, rb);
            }
        }
    }
}

void hkv_cpu_append(const hkv_rows_args *a)
{
    rows_copy(a, 1);
}

void hkv_cpu_read(const hkv_rows_args *a)
{
    rows_copy(a, 0);
}

/*
 * gather / scatter: one memcpy per (layer, page) of page_bytes, which is
 * K and V of the page together since they are adjacent in the table.
 */
static void pages_copy(const hkv_pages_args *a, int to_table)
{
    const hkv_table_desc *t = &a->table;
    int64_t pb = hkv_page_bytes(t);
    int32_t i;
    int64_t p;

    for (i = 0; i < a->num_layers; i++) {
        char *table = (char *)t->base +
                      ((int64_t)a->first_layer + i) * hkv_layer_bytes(t);
        char *staging = (char *)a->staging + (int64_t)i * a->n * pb;

        for (p = 0; p < a->n; p++) {
            char *tp = table + (int64_t)a->page_ids[p] * pb;
            char *sp = staging + p * pb;

            if (to_table)
                memcpy(tp, sp, (size_t)pb);
            else
                memcpy(sp, tp, (size_t)pb);
        }
    }
}

void hkv_cpu_gather_pages(const hkv_pages_args *a)
{
    pages_copy(a, 0);
}

void hkv_cpu_scatter_pages(const hkv_pages_args *a)
{
    pages_copy(a, 1);
}

/* copy pages between two tables: one memcpy per (layer, page). */
void hkv_cpu_copy_pages(const hkv_copy_pages_args *a)
{
    const int64_t pb = a->page_bytes;
    for (int32_t l = a->first_layer; l < a->first_layer + a->num_layers; l++) {
        const char *src = (const char *)a->src + (int64_t)l * a->src_num_pages * pb;
        char *dst = (char *)a->dst + (int64_t)l * a->dst_num_pages * pb;
        for (int64_t i = 0; i < a->n; i++)
            memcpy(dst + (int64_t)a->dst_ids[i] * pb, src + (int64_t)a->src_ids[i] * pb,
                   (size_t)pb);
    }
}

/*
 * token metadata: walk the users in order and fill each one's range of new
 * tokens; O(batch + nnz) with no search.  Users with no new token have an
 * empty range and write nothing.  Tokens past new_offsets[batch] (none, on
 * valid input) are left untouched, as on the GPU.
 */
void hkv_cpu_token_meta(const hkv_token_meta_args *a)
{
    int32_t b;

    for (b = 0; b < a->batch; b++) {
        int64_t lo = a->new_offsets[b];
        int64_t hi = a->new_offsets[b + 1];
        int32_t cached = a->cached_lengths[b];
        int64_t t;

        if (hi > a->nnz)
            hi = a->nnz;
        for (t = lo; t < hi; t++) {
            a->batch_indices[t] = b;
            a->positions[t] = (int32_t)(cached + (t - lo));
        }
    }
}

/* strip helpers: offsets and lengths are int32 or int64 arrays. */
static int64_t idx_get(const void *p, int is64, int64_t i)
{
    return is64 ? ((const int64_t *)p)[i] : ((const int32_t *)p)[i];
}

static void idx_set(void *p, int is64, int64_t i, int64_t val)
{
    if (is64)
        ((int64_t *)p)[i] = val;
    else
        ((int32_t *)p)[i] = (int32_t)val;
}

/*
 * strip: each user's kept rows are contiguous both in `values` and in
 * `out_values`, so one memcpy per user does the copy.  Rows at or past
 * out_total are never written, even if the caller's out_total is smaller
 * than the true total (the lengths and offsets are still the true ones).
 */
void hkv_cpu_strip(const hkv_strip_args *a)
{
    int is64 = a->index_int64 != 0;
    int64_t out_off = 0;
    int32_t b;

    for (b = 0; b < a->batch; b++) {
        int64_t start = idx_get(a->offsets, is64, b);
        int64_t len = idx_get(a->offsets, is64, b + 1) - start;
        int64_t drop = a->num_drop[b];
        int64_t keep, n;

        if (drop < 0)
            drop = 0;
        if (drop > len)
            drop = len;
        keep = len - drop;

        idx_set(a->out_lengths, is64, b, keep);
        idx_set(a->out_offsets, is64, b, out_off);

        n = keep;
        if (out_off + n > a->out_total)
            n = a->out_total > out_off ? a->out_total - out_off : 0;
        if (n > 0)
            memcpy((char *)a->out_values + out_off * a->row_bytes,
                   (const char *)a->values + (start + drop) * a->row_bytes,
                   (size_t)(n * a->row_bytes));
        out_off += keep;
    }
    idx_set(a->out_offsets, is64, a->batch, out_off);
}
