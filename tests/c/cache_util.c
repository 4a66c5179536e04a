/*
 * cache_util.c - see cache_util.h.
 */
#include "cache_util.h"

#include <stdlib.h>

#define CAND_FILL (-1.0f)   /* candidate rows: never a token's value */
#define PAD_FILL (-2.0f)    /* padding between rows and layers       */

hkv_config cfg_small(int32_t num_layers, int32_t page_size, int32_t num_pages,
                     int32_t max_batch, int64_t max_seq_len)
{
    hkv_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.num_layers = num_layers;
    cfg.num_heads = 2;
    cfg.head_dim = 3;
    cfg.page_size = page_size;
    cfg.num_pages = num_pages;
    cfg.dtype_code = 2;          /* float */
    cfg.dtype_bits = 32;
    cfg.device_kind = HKV_DEVICE_CPU;
    cfg.device_index = 0;
    cfg.max_batch_size = max_batch;
    cfg.max_seq_len = max_seq_len;
    cfg.max_batch_tokens = 0;
    cfg.verify_tokens = 0;
    cfg.max_open_batches = 0;
    return cfg;
}

float kv_val(int64_t key, int32_t layer, int kv, int64_t e)
{
    uint64_t h = test_mix((uint64_t)key * 0x100000001b3ULL + 0x51ed27);
    h = test_mix(h ^ ((uint64_t)layer << 32) ^ ((uint64_t)kv << 31) ^ (uint64_t)e);
    return (float)(h & 0xFFFFFF);
}

static hkv_tensor t_base(void *data, int32_t code, int32_t bits, int32_t ndim)
{
    hkv_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.device_kind = HKV_DEVICE_CPU;
    t.device_index = 0;
    t.dtype_code = code;
    t.dtype_bits = bits;
    t.ndim = ndim;
    return t;
}

hkv_tensor t_rows3(float *data, int64_t rows, int32_t heads, int32_t dim,
                   int64_t row_stride)
{
    hkv_tensor t = t_base(data, 2, 32, 3);
    t.shape[0] = rows, t.shape[1] = heads, t.shape[2] = dim;
    t.strides[0] = row_stride, t.strides[1] = dim, t.strides[2] = 1;
    return t;
}

hkv_tensor t_rows2(float *data, int64_t rows, int64_t width, int64_t row_stride)
{
    hkv_tensor t = t_base(data, 2, 32, 2);
    t.shape[0] = rows, t.shape[1] = width;
    t.strides[0] = row_stride, t.strides[1] = 1;
    return t;
}

hkv_tensor t_rows4(float *data, int32_t layers, int64_t rows, int32_t heads,
                   int32_t dim, int64_t layer_stride, int64_t row_stride)
{
    hkv_tensor t = t_base(data, 2, 32, 4);
    t.shape[0] = layers, t.shape[1] = rows, t.shape[2] = heads, t.shape[3] = dim;
    t.strides[0] = layer_stride, t.strides[1] = row_stride;
    t.strides[2] = dim, t.strides[3] = 1;
    return t;
}

hkv_tensor t_i32(int32_t *data, int64_t n)
{
    hkv_tensor t = t_base(data, 0, 32, 1);
    t.shape[0] = n;
    t.strides[0] = 1;
    return t;
}

hkv_tensor t_i64(int64_t *data, int64_t n)
{
    hkv_tensor t = t_base(data, 0, 64, 1);
    t.shape[0] = n;
    t.strides[0] = 1;
    return t;
}

hkv_tensor t_f32(float *data, int64_t rows, int64_t cols)
{
    hkv_tensor t = t_base(data, 2, 32, 2);
    t.shape[0] = rows, t.shape[1] = cols;
    t.strides[0] = cols, t.strides[1] = 1;
    return t;
}

/* ------------------------------------------------------------------ */

void req_init(req *r)
{
    memset(r, 0, sizeof *r);
}

int64_t req_key_off(const req *r, int32_t b)
{
    int64_t off = 0;
    for (int32_t i = 0; i < b; i++)
        off += r->lens[i];
    return off;
}

void req_add_keys(req *r, int64_t uid, int64_t len, const int64_t *keys)
{
    int64_t off = req_key_off(r, r->n);
    if (r->n >= REQ_MAX_USERS || off + len > REQ_MAX_TOKENS) {
        /* a test asked for more than the structure holds: its own bug */
        fprintf(stderr, "req_add: request too large\n");
        abort();
    }
    r->ids[r->n] = uid;
    r->lens[r->n] = len;
    if (len > 0)
        memcpy(r->keys + off, keys, (size_t)len * sizeof *keys);
    r->n++;
}

void req_add(req *r, int64_t uid, int64_t len)
{
    int64_t off = req_key_off(r, r->n);
    if (r->n >= REQ_MAX_USERS || off + len > REQ_MAX_TOKENS) {
        fprintf(stderr, "req_add: request too large\n");
        abort();
    }
    r->ids[r->n] = uid;
    r->lens[r->n] = len;
    for (int64_t p = 0; p < len; p++)
        r->keys[off + p] = tok_key(uid, p);
    r->n++;
}

static int64_t req_total(const req *r)
{
    return req_key_off(r, r->n);
}

hkv_status req_lookup(hkv_cache *c, req *r)
{
    int verify = hkv_cache_config(c)->verify_tokens;
    return hkv_cache_lookup(c, r->n, r->ids, r->lens, verify ? r->keys : NULL,
                            verify ? req_total(r) : 0, r->cached, r->epochs);
}

hkv_status req_allocate(hkv_cache *c, req *r, hkv_batch **out)
{
    int verify = hkv_cache_config(c)->verify_tokens;
    return hkv_cache_allocate(c, r->n, r->ids, r->lens, r->cached, r->epochs,
                              verify ? r->keys : NULL, verify ? req_total(r) : 0,
                              r->use_cands ? r->cands : NULL, NULL, out);
}

hkv_status req_append(hkv_cache *c, hkv_batch *b, const req *r, int32_t first,
                      int32_t count, int form, int with_cands)
{
    const hkv_config *cfg = hkv_cache_config(c);
    const int64_t hd = (int64_t)cfg->num_heads * cfg->head_dim;
    int64_t rows = 0;
    for (int32_t i = 0; i < r->n; i++)
        rows += r->lens[i] - r->cached[i] + (with_cands ? r->cands[i] : 0);
    int64_t row_stride = form >= 2 ? hd + 3 : hd;
    int64_t layer_stride = rows * row_stride + 5;
    size_t elems = (size_t)(count * layer_stride + 1);
    float *k = malloc(elems * sizeof *k);
    float *v = malloc(elems * sizeof *v);
    if (k == NULL || v == NULL) {
        free(k), free(v);
        return hkv_error(HKV_ENOMEM, "test: out of memory");
    }
    for (size_t i = 0; i < elems; i++)
        k[i] = v[i] = PAD_FILL;
    for (int32_t l = 0; l < count; l++) {
        float *kl = k + l * layer_stride, *vl = v + l * layer_stride;
        int64_t row = 0, off = 0;
        for (int32_t i = 0; i < r->n; i++) {
            for (int64_t p = r->cached[i]; p < r->lens[i]; p++, row++)
                for (int64_t e = 0; e < hd; e++) {
                    kl[row * row_stride + e] = kv_val(r->keys[off + p], first + l, 0, e);
                    vl[row * row_stride + e] = kv_val(r->keys[off + p], first + l, 1, e);
                }
            for (int64_t q = 0; with_cands && q < r->cands[i]; q++, row++)
                for (int64_t e = 0; e < hd; e++)
                    kl[row * row_stride + e] = vl[row * row_stride + e] = CAND_FILL;
            off += r->lens[i];
        }
    }
    hkv_tensor tk, tv;
    switch (form) {
    case 0:
    case 2:
        tk = t_rows3(k, rows, cfg->num_heads, cfg->head_dim, row_stride);
        tv = t_rows3(v, rows, cfg->num_heads, cfg->head_dim, row_stride);
        break;
    case 1:
        tk = t_rows2(k, rows, hd, row_stride);
        tv = t_rows2(v, rows, hd, row_stride);
        break;
    default:
        tk = t_rows4(k, count, rows, cfg->num_heads, cfg->head_dim, layer_stride,
                     row_stride);
        tv = t_rows4(v, count, rows, cfg->num_heads, cfg->head_dim, layer_stride,
                     row_stride);
        break;
    }
    hkv_status st = hkv_batch_append(b, first, count, &tk, &tv, NULL);
    free(k);
    free(v);
    return st;
}

hkv_status req_append_all(hkv_cache *c, hkv_batch *b, const req *r)
{
    int32_t layers = hkv_cache_config(c)->num_layers;
    for (int32_t l = 0; l < layers; l++) {
        hkv_status st = req_append(c, b, r, l, 1, 0, 0);
        if (st != HKV_OK)
            return st;
    }
    return HKV_OK;
}

int req_check_read(hkv_cache *c, hkv_batch *b, const req *r, int32_t layer)
{
    const hkv_config *cfg = hkv_cache_config(c);
    const int64_t hd = (int64_t)cfg->num_heads * cfg->head_dim;
    hkv_batch_info info;
    hkv_batch_get_info(b, &info);
    int64_t total = req_total(r);
    HCHECK_EQ(info.total_tokens, total);
    /* One spare row and index: the read must not write past the tokens. */
    float *k = malloc((size_t)(total + 1) * hd * sizeof *k);
    float *v = malloc((size_t)(total + 1) * hd * sizeof *v);
    int32_t *bi = malloc((size_t)(total + 1) * sizeof *bi);
    int32_t *pos = malloc((size_t)(total + 1) * sizeof *pos);
    int bad = k == NULL || v == NULL || bi == NULL || pos == NULL;
    hkv_status st = HKV_OK;
    if (!bad) {
        for (int64_t i = 0; i < (total + 1) * hd; i++)
            k[i] = v[i] = PAD_FILL;
        bi[total] = pos[total] = -7;
        hkv_tensor tk = t_rows3(k, total, cfg->num_heads, cfg->head_dim, hd);
        hkv_tensor tv = t_rows3(v, total, cfg->num_heads, cfg->head_dim, hd);
        hkv_tensor tb = t_i32(bi, total + 1), tp = t_i32(pos, total + 1);
        st = hkv_batch_read(b, layer, &tk, &tv, &tb, &tp, NULL);
    }
    int64_t t = 0, bad_at = -1;
    for (int32_t i = 0; !bad && st == HKV_OK && i < r->n; i++)
        for (int64_t p = 0; p < r->lens[i]; p++, t++) {
            if (bi[t] != i || pos[t] != p)
                bad_at = t;
            for (int64_t e = 0; e < hd; e++)
                if (k[t * hd + e] != kv_val(r->keys[t], layer, 0, e) ||
                    v[t * hd + e] != kv_val(r->keys[t], layer, 1, e))
                    bad_at = t;
        }
    if (!bad && st == HKV_OK && (bi[total] != -7 || pos[total] != -7 ||
                                 k[total * hd] != PAD_FILL))
        bad_at = total;
    free(k), free(v), free(bi), free(pos);
    HCHECK(!bad);
    HCHECK_ST(st, HKV_OK);
    if (bad_at >= 0)
        test_fail(__FILE__, __LINE__, "batch read of layer %d differs at token %lld",
                  (int)layer, (long long)bad_at);
    return bad_at >= 0;
}

int check_user(hkv_cache *c, int64_t uid, const int64_t *keys, int64_t len)
{
    const hkv_config *cfg = hkv_cache_config(c);
    const int64_t hd = (int64_t)cfg->num_heads * cfg->head_dim;
    int64_t got = -1;
    HCHECK_ST(hkv_cache_user_length(c, uid, &got), HKV_OK);
    HCHECK_EQ(got, len);
    int64_t cap = len + 2;
    float *k = malloc((size_t)cap * hd * sizeof *k);
    float *v = malloc((size_t)cap * hd * sizeof *v);
    HCHECK(k != NULL && v != NULL);
    int bad = 0;
    hkv_status st = HKV_OK;
    for (int32_t l = 0; l < cfg->num_layers && !bad && st == HKV_OK; l++) {
        for (int64_t i = 0; i < cap * hd; i++)
            k[i] = v[i] = PAD_FILL;
        hkv_tensor tk = t_rows3(k, cap, cfg->num_heads, cfg->head_dim, hd);
        hkv_tensor tv = t_rows3(v, cap, cfg->num_heads, cfg->head_dim, hd);
        got = -1;
        st = hkv_cache_read_user(c, uid, l, &tk, &tv, NULL, &got);
        if (st != HKV_OK || got != len) {
            bad = 1;
            break;
        }
        for (int64_t p = 0; p < len; p++)
            for (int64_t e = 0; e < hd; e++)
                if (k[p * hd + e] != kv_val(keys[p], l, 0, e) ||
                    v[p * hd + e] != kv_val(keys[p], l, 1, e))
                    bad = 2;
        if (k[len * hd] != PAD_FILL || v[len * hd] != PAD_FILL)
            bad = 3;      /* wrote past the user's tokens */
    }
    free(k), free(v);
    HCHECK_ST(st, HKV_OK);
    if (bad)
        test_fail(__FILE__, __LINE__, "read_user(%lld): %s", (long long)uid,
                  bad == 1 ? "wrong length" : bad == 2 ? "wrong contents"
                                                       : "wrote past the tokens");
    return bad != 0;
}

int check_user_default(hkv_cache *c, int64_t uid, int64_t len)
{
    int64_t *keys = malloc((size_t)(len + 1) * sizeof *keys);
    HCHECK(keys != NULL);
    for (int64_t p = 0; p < len; p++)
        keys[p] = tok_key(uid, p);
    int rc = check_user(c, uid, keys, len);
    free(keys);
    return rc;
}

int req_round(hkv_cache *c, req *r)
{
    hkv_batch *b = NULL;
    HCHECK_ST(req_lookup(c, r), HKV_OK);
    HCHECK_ST(req_allocate(c, r, &b), HKV_OK);
    hkv_status st = req_append_all(c, b, r);
    int bad = st != HKV_OK;
    if (bad)
        test_fail(__FILE__, __LINE__, "append: %s (%s)", hkv_status_name(st),
                  hkv_last_error());
    if (!bad)
        bad = req_check_read(c, b, r, 0) ||
              req_check_read(c, b, r, hkv_cache_config(c)->num_layers - 1);
    hkv_batch_info info;
    hkv_batch_get_info(b, &info);
    if (!bad && !info.committed) {
        test_fail(__FILE__, __LINE__, "batch not committed after every layer");
        bad = 1;
    }
    hkv_batch_free(b);
    if (!bad && hkv_cache_check(c) != HKV_OK) {
        test_fail(__FILE__, __LINE__, "hkv_cache_check: %s", hkv_last_error());
        bad = 1;
    }
    return bad;
}

int32_t *meta_of(hkv_cache *c, hkv_batch *b, int field)
{
    hkv_batch_info info;
    hkv_batch_get_info(b, &info);
    return (int32_t *)info.host_meta->ptr + hkv_cache_meta_offsets(c)[field];
}

int check_i32(const char *what, const int32_t *got, const int32_t *want, int n)
{
    for (int i = 0; i < n; i++)
        if (got[i] != want[i]) {
            test_fail(__FILE__, __LINE__, "%s[%d] = %d, want %d", what, i,
                      (int)got[i], (int)want[i]);
            return 1;
        }
    return 0;
}

int stats_equal(const hkv_stats *a, const hkv_stats *b)
{
#define SAME(f)                                                             \
    if (a->f != b->f) {                                                     \
        test_fail(__FILE__, __LINE__, "stats." #f " changed: %lld -> %lld", \
                  (long long)a->f, (long long)b->f);                        \
        return 0;                                                           \
    }
    SAME(lookups) SAME(lookup_users) SAME(hit_tokens) SAME(missed_tokens)
    SAME(batches_allocated) SAME(batches_committed) SAME(batches_aborted)
    SAME(pages_allocated) SAME(pages_evicted) SAME(pages_dropped)
    SAME(users_evicted) SAME(tokens_appended) SAME(pages_total) SAME(pages_free)
    SAME(pages_used) SAME(pages_pinned) SAME(users_cached) SAME(open_batches)
    /* a failed call is not a served call: it adds no latency sample */
    SAME(lookup_latency.count) SAME(allocate_latency.count)
#undef SAME
    return 1;
}
