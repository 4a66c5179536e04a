/*
 * cache_util.h - helpers shared by the cache tests and the soak: small
 * configurations, hkv_tensor views of host arrays, deterministic K/V
 * contents, and a request structure that drives one batch through
 * lookup -> allocate -> append -> read.
 *
 * K/V contents are a pure function of (token key, layer, K or V, element),
 * so any token read back anywhere can be checked without remembering what
 * was written: the test only has to know which key the cache should hold
 * at that position.  Values are integers below 2^24, exact in float32.
 */
#ifndef HKV_TEST_CACHE_UTIL_H
#define HKV_TEST_CACHE_UTIL_H

#include "cache.h"
#include "harness.h"

/* Create a cache or fail the test. */
#define CREATE(cfgp, cp) CHECK_OK(hkv_cache_create((cfgp), (cp)))

#define CHECK_CACHE(c)                                                     \
    do {                                                                   \
        hkv_status cst_ = hkv_cache_check(c);                              \
        if (cst_ != HKV_OK) {                                              \
            test_fail(__FILE__, __LINE__, "hkv_cache_check: %s",           \
                      hkv_last_error());                                   \
            return;                                                        \
        }                                                                  \
    } while (0)

#define REQ_MAX_USERS 16
#define REQ_MAX_TOKENS 2048   /* sum of the history lengths of a request */

/* A float32, CPU, trust-mode configuration with small sizes. */
hkv_config cfg_small(int32_t num_layers, int32_t page_size, int32_t num_pages,
                     int32_t max_batch, int64_t max_seq_len);

/* Content of element e of the K (kv = 0) or V (kv = 1) row of the token
 * with key `key`, in layer `layer`. */
float kv_val(int64_t key, int32_t layer, int kv, int64_t e);

/* The key of token `pos` of user `uid` in tests that do not choose keys.
 * Unsigned arithmetic: ids go up to INT64_MAX, and signed overflow would be
 * undefined behaviour (which UBSan rightly stops on). */
static inline int64_t tok_key(int64_t uid, int64_t pos)
{
    return (int64_t)((uint64_t)uid * 1000003u + (uint64_t)pos);
}

/* hkv_tensor views of host arrays (strides in elements). */
hkv_tensor t_rows3(float *data, int64_t rows, int32_t heads, int32_t dim,
                   int64_t row_stride);
hkv_tensor t_rows2(float *data, int64_t rows, int64_t width, int64_t row_stride);
hkv_tensor t_rows4(float *data, int32_t layers, int64_t rows, int32_t heads,
                   int32_t dim, int64_t layer_stride, int64_t row_stride);
hkv_tensor t_i32(int32_t *data, int64_t n);
hkv_tensor t_i64(int64_t *data, int64_t n);
hkv_tensor t_f32(float *data, int64_t rows, int64_t cols);

/* One batch request and the lookup results for it. */
typedef struct req {
    int32_t n;
    int64_t ids[REQ_MAX_USERS];
    int64_t lens[REQ_MAX_USERS];
    int64_t keys[REQ_MAX_TOKENS];      /* users' token keys, one after another */
    int64_t cands[REQ_MAX_USERS];      /* candidates per user               */
    int use_cands;                     /* pass cands to allocate            */
    int64_t cached[REQ_MAX_USERS];     /* from lookup                       */
    uint64_t epochs[REQ_MAX_USERS];
} req;

/* Start a request; add users with default keys tok_key(uid, pos), or with
 * explicit keys. */
void req_init(req *r);
void req_add(req *r, int64_t uid, int64_t len);
void req_add_keys(req *r, int64_t uid, int64_t len, const int64_t *keys);
/* Offset of user b's keys in r->keys. */
int64_t req_key_off(const req *r, int32_t b);

/* lookup and allocate with the request's arrays; keys are passed only when
 * the cache is in verified mode. */
hkv_status req_lookup(hkv_cache *c, req *r);
hkv_status req_allocate(hkv_cache *c, req *r, hkv_batch **out);

/*
 * Append layers [first, first + count) of the batch's new tokens with the
 * contents kv_val(key, layer, ...).  `form` chooses the tensor shape:
 *   0  [rows, H, D] contiguous      1  [rows, H*D]
 *   2  [rows, H, D] with padded rows (row stride > H*D)
 *   3  [count, rows, H, D] with padded rows and layers (any count)
 * Forms 0..2 need count == 1.  With `with_cands` the rows also hold each
 * user's candidate rows (filled with a value no token has) after its new
 * tokens.  Returns the status of hkv_batch_append.
 */
hkv_status req_append(hkv_cache *c, hkv_batch *b, const req *r, int32_t first,
                      int32_t count, int form, int with_cands);
/* Append every layer, one call per layer, form 0. */
hkv_status req_append_all(hkv_cache *c, hkv_batch *b, const req *r);

/* Read layer `layer` of every history token of the batch and compare with
 * the request's keys; 0 if all equal. */
int req_check_read(hkv_cache *c, hkv_batch *b, const req *r, int32_t layer);

/* hkv_cache_read_user of every layer: the user holds exactly `len` tokens
 * and they are keys[0..len). */
int check_user(hkv_cache *c, int64_t uid, const int64_t *keys, int64_t len);
/* The same with default keys. */
int check_user_default(hkv_cache *c, int64_t uid, int64_t len);

/* A whole round: lookup, allocate, append all layers, check the read of
 * layer 0, free.  Returns 0 when everything succeeded. */
int req_round(hkv_cache *c, req *r);

/* int32 metadata field `field` of a batch (host copy). */
int32_t *meta_of(hkv_cache *c, hkv_batch *b, int field);

/* Compare an int32 array with expected values; 0 if equal. */
int check_i32(const char *what, const int32_t *got, const int32_t *want, int n);

/* The counters of hkv_stats (not the gauges), for "nothing changed". */
int stats_equal(const hkv_stats *a, const hkv_stats *b);

#endif /* HKV_TEST_CACHE_UTIL_H */
