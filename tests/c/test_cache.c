/*
 * test_cache.c - the cache (cache.h) on the CPU device, case by case.
 *
 * The metadata tests use hand-computed values: they are the contract a
 * paged attention kernel relies on, and a formula in the test would only
 * repeat the code's own mistakes.  Page ids are predictable because a
 * fresh pool hands out pages lowest first and a freed page is reused
 * first.
 *
 * Every test ends with hkv_cache_check and frees everything, so under
 * LeakSanitizer a leaked batch or buffer fails the run.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "cache_util.h"

static int64_t user_len(hkv_cache *c, int64_t uid)
{
    int64_t n = -1;
    (void)hkv_cache_user_length(c, uid, &n);
    return n;
}

/* ------------------------------------------------------------------ */

static void test_cache_config_invalid(void)
{
    hkv_cache *c = (hkv_cache *)&c;      /* must be reset to NULL on failure */
    hkv_config good = cfg_small(2, 4, 16, 4, 64);
    struct {
        const char *what;
        hkv_config cfg;
        hkv_status want;
    } cases[24];
    int n = 0;
#define BAD(field, value, st)                                              \
    do {                                                                   \
        cases[n].what = #field "=" #value;                                 \
        cases[n].cfg = good;                                               \
        cases[n].cfg.field = (value);                                      \
        cases[n].want = (st);                                              \
        n++;                                                               \
    } while (0)
    BAD(num_layers, 0, HKV_EINVAL);
    BAD(num_layers, 1025, HKV_EINVAL);
    BAD(num_heads, 0, HKV_EINVAL);
    BAD(head_dim, -1, HKV_EINVAL);
    BAD(page_size, 1, HKV_EINVAL);
    BAD(page_size, 3, HKV_EINVAL);
    BAD(page_size, 512, HKV_EINVAL);
    BAD(num_pages, 0, HKV_EINVAL);
    BAD(dtype_bits, 8, HKV_EINVAL);
    BAD(dtype_code, 0, HKV_EINVAL);           /* ints are not K/V */
    BAD(device_kind, 7, HKV_EINVAL);
    BAD(max_batch_size, 0, HKV_EINVAL);
    BAD(max_seq_len, 0, HKV_EINVAL);
    BAD(max_batch_tokens, -1, HKV_EINVAL);
    BAD(max_open_batches, 2000, HKV_EINVAL);
    /* A CUDA cache in a build without CUDA is a clear error, not a crash. */
    BAD(device_kind, HKV_DEVICE_CUDA, HKV_ENODEV);
#undef BAD
    for (int i = 0; i < n; i++) {
        hkv_status st = hkv_cache_create(&cases[i].cfg, &c);
        if (st != cases[i].want || c != NULL) {
            test_fail(__FILE__, __LINE__, "%s: got %s, want %s", cases[i].what,
                      hkv_status_name(st), hkv_status_name(cases[i].want));
            return;
        }
        CHECK(hkv_last_error()[0] != '\0');   /* says what to change */
    }
    /* The extremes that are allowed. */
    hkv_config ok = good;
    ok.page_size = 2;
    ok.dtype_code = 4, ok.dtype_bits = 16;    /* bfloat16 */
    ok.max_open_batches = 1024;
    CREATE(&ok, &c);
    CHECK(hkv_cache_config(c)->max_open_batches == 1024);
    hkv_cache_destroy(c);
    ok = good;
    ok.page_size = 256;
    ok.dtype_bits = 16;                       /* float16 */
    CREATE(&ok, &c);
    /* Defaults are filled in. */
    CHECK_EQ(hkv_cache_config(c)->max_open_batches, 8);
    CHECK_EQ(hkv_cache_config(c)->max_batch_tokens, 4 * 64);
    hkv_buffer *table = hkv_cache_table(c);
    CHECK_EQ(table->bytes, 2 * 16 * 2 * 256 * 2 * 3 * 2);
    hkv_buffer_unref(table);
    hkv_cache_destroy(c);
    hkv_cache_destroy(NULL);                  /* no-op */
}

/*
 * First batch on an empty cache, by hand (page_size 4):
 *   user 101: 5 tokens -> pages 0,1 (1 token in the last)
 *   user 202: 8 tokens -> pages 2,3 (full)
 *   user 303: 0 tokens -> no pages, not even an index entry
 */
static void test_cache_metadata_first_batch(void)
{
    hkv_config cfg = cfg_small(2, 4, 16, 4, 64);
    hkv_cache *c;
    hkv_batch *b;
    hkv_batch_info info;
    hkv_stats st;
    req r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 101, 5);
    req_add(&r, 202, 8);
    req_add(&r, 303, 0);
    CHECK_OK(req_lookup(c, &r));
    CHECK(r.cached[0] == 0 && r.cached[1] == 0 && r.cached[2] == 0);
    CHECK(r.epochs[0] == 0 && r.epochs[1] == 0 && r.epochs[2] == 0);
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK_CACHE(c);

    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.batch_size, 3);
    CHECK_EQ(info.total_pages, 4);
    CHECK_EQ(info.total_tokens, 13);
    CHECK_EQ(info.new_tokens, 13);
    CHECK_EQ(info.num_rows, 13);
    CHECK_EQ(info.committed, 0);
    CHECK_EQ(info.closed, 0);
    CHECK(info.device_meta == info.host_meta);      /* CPU: one copy */

    CHECK(!check_i32("kv_indptr", meta_of(c, b, HKV_META_KV_INDPTR),
                     (const int32_t[]){0, 2, 4, 4}, 4));
    CHECK(!check_i32("kv_indices", meta_of(c, b, HKV_META_KV_INDICES),
                     (const int32_t[]){0, 1, 2, 3}, 4));
    CHECK(!check_i32("kv_last_page_len", meta_of(c, b, HKV_META_KV_LAST_PAGE_LEN),
                     (const int32_t[]){1, 4, 0}, 3));
    CHECK(!check_i32("total_lengths", meta_of(c, b, HKV_META_TOTAL_LENGTHS),
                     (const int32_t[]){5, 8, 0}, 3));
    CHECK(!check_i32("total_offsets", meta_of(c, b, HKV_META_TOTAL_OFFSETS),
                     (const int32_t[]){0, 5, 13, 13}, 4));
    CHECK(!check_i32("cached_lengths", meta_of(c, b, HKV_META_CACHED_LENGTHS),
                     (const int32_t[]){0, 0, 0}, 3));
    CHECK(!check_i32("new_lengths", meta_of(c, b, HKV_META_NEW_LENGTHS),
                     (const int32_t[]){5, 8, 0}, 3));
    CHECK(!check_i32("new_offsets", meta_of(c, b, HKV_META_NEW_OFFSETS),
                     (const int32_t[]){0, 5, 13, 13}, 4));
    CHECK(!check_i32("row_offsets", meta_of(c, b, HKV_META_ROW_OFFSETS),
                     (const int32_t[]){0, 5, 13, 13}, 4));
    CHECK(!check_i32("batch_indices", meta_of(c, b, HKV_META_BATCH_INDICES),
                     (const int32_t[]){0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1}, 13));
    CHECK(!check_i32("positions", meta_of(c, b, HKV_META_POSITIONS),
                     (const int32_t[]){0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7}, 13));
    CHECK(!check_i32("zeros", meta_of(c, b, HKV_META_ZEROS),
                     (const int32_t[]){0, 0, 0, 0}, 4));

    hkv_cache_stats(c, &st);
    CHECK_EQ(st.lookups, 1);
    CHECK_EQ(st.lookup_users, 3);
    CHECK_EQ(st.hit_tokens, 0);
    CHECK_EQ(st.missed_tokens, 13);
    CHECK_EQ(st.batches_allocated, 1);
    CHECK_EQ(st.pages_allocated, 4);
    CHECK_EQ(st.pages_used, 4);
    CHECK_EQ(st.pages_free, 12);
    CHECK_EQ(st.pages_pinned, 4);
    CHECK_EQ(st.users_cached, 2);          /* 303 has nothing: not indexed */
    CHECK_EQ(st.open_batches, 1);

    /* Nothing counts as cached before every layer is written. */
    CHECK_OK(req_append(c, b, &r, 0, 1, 0, 0));
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.committed, 0);
    CHECK_EQ(user_len(c, 101), 0);
    CHECK_OK(req_append(c, b, &r, 1, 1, 0, 0));
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.committed, 1);
    CHECK_EQ(user_len(c, 101), 5);
    CHECK_EQ(user_len(c, 202), 8);
    CHECK_EQ(user_len(c, 303), 0);
    CHECK(req_check_read(c, b, &r, 0) == 0);
    CHECK(req_check_read(c, b, &r, 1) == 0);
    hkv_batch_free(b);

    hkv_cache_stats(c, &st);
    CHECK_EQ(st.batches_committed, 1);
    CHECK_EQ(st.batches_aborted, 0);
    CHECK_EQ(st.tokens_appended, 26);      /* 13 tokens x 2 layers */
    CHECK_EQ(st.open_batches, 0);
    CHECK_EQ(st.pages_pinned, 0);
    CHECK(check_user_default(c, 101, 5) == 0);
    CHECK(check_user_default(c, 202, 8) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/*
 * The second and third batches of the same users, by hand:
 *   101: 5 cached, history 7 -> 2 new tokens into page 1 (slots 1, 2)
 *   202: 8 cached, history 8 -> nothing new (pages 2, 3 read only)
 *   404: new, 3 tokens       -> page 4
 * with candidates (1, 2, 0) after each user's new tokens in the rows.
 * Then 101 grows to 9: the 9th token opens page 5.
 */
static void test_cache_metadata_growth_and_candidates(void)
{
    hkv_config cfg = cfg_small(2, 4, 16, 4, 64);
    hkv_cache *c;
    hkv_batch *b;
    hkv_batch_info info;
    hkv_stats st;
    req r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 101, 5);
    req_add(&r, 202, 8);
    CHECK(req_round(c, &r) == 0);

    req_init(&r);
    req_add(&r, 101, 7);
    req_add(&r, 202, 8);
    req_add(&r, 404, 3);
    r.use_cands = 1;
    r.cands[0] = 1, r.cands[1] = 2, r.cands[2] = 0;
    CHECK_OK(req_lookup(c, &r));
    CHECK(r.cached[0] == 5 && r.cached[1] == 8 && r.cached[2] == 0);
    CHECK(r.epochs[0] != 0 && r.epochs[1] != 0 && r.epochs[2] == 0);
    CHECK_OK(req_allocate(c, &r, &b));
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.total_pages, 5);
    CHECK_EQ(info.total_tokens, 18);
    CHECK_EQ(info.new_tokens, 5);
    CHECK_EQ(info.num_rows, 8);
    CHECK(!check_i32("kv_indptr", meta_of(c, b, HKV_META_KV_INDPTR),
                     (const int32_t[]){0, 2, 4, 5}, 4));
    CHECK(!check_i32("kv_indices", meta_of(c, b, HKV_META_KV_INDICES),
                     (const int32_t[]){0, 1, 2, 3, 4}, 5));
    CHECK(!check_i32("kv_last_page_len", meta_of(c, b, HKV_META_KV_LAST_PAGE_LEN),
                     (const int32_t[]){3, 4, 3}, 3));
    CHECK(!check_i32("total_lengths", meta_of(c, b, HKV_META_TOTAL_LENGTHS),
                     (const int32_t[]){7, 8, 3}, 3));
    CHECK(!check_i32("total_offsets", meta_of(c, b, HKV_META_TOTAL_OFFSETS),
                     (const int32_t[]){0, 7, 15, 18}, 4));
    CHECK(!check_i32("cached_lengths", meta_of(c, b, HKV_META_CACHED_LENGTHS),
                     (const int32_t[]){5, 8, 0}, 3));
    CHECK(!check_i32("new_lengths", meta_of(c, b, HKV_META_NEW_LENGTHS),
                     (const int32_t[]){2, 0, 3}, 3));
    CHECK(!check_i32("new_offsets", meta_of(c, b, HKV_META_NEW_OFFSETS),
                     (const int32_t[]){0, 2, 2, 5}, 4));
    CHECK(!check_i32("row_offsets", meta_of(c, b, HKV_META_ROW_OFFSETS),
                     (const int32_t[]){0, 3, 5, 8}, 4));
    CHECK(!check_i32("batch_indices", meta_of(c, b, HKV_META_BATCH_INDICES),
                     (const int32_t[]){0, 0, 2, 2, 2}, 5));
    CHECK(!check_i32("positions", meta_of(c, b, HKV_META_POSITIONS),
                     (const int32_t[]){5, 6, 0, 1, 2}, 5));
    /* Layer 0 with the candidate rows (skipped), layer 1 as a one-layer
     * 4-D tensor of the new tokens only: both row counts are accepted. */
    CHECK_OK(req_append(c, b, &r, 0, 1, 0, 1));
    CHECK_OK(req_append(c, b, &r, 1, 1, 3, 0));
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.committed, 1);
    CHECK(req_check_read(c, b, &r, 0) == 0);
    CHECK(req_check_read(c, b, &r, 1) == 0);
    hkv_batch_free(b);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.lookups, 2);
    CHECK_EQ(st.hit_tokens, 13);
    CHECK_EQ(st.missed_tokens, 13 + 5);
    CHECK_EQ(st.pages_allocated, 5);
    CHECK_EQ(st.tokens_appended, 26 + 10);
    CHECK(check_user_default(c, 101, 7) == 0);
    CHECK(check_user_default(c, 202, 8) == 0);
    CHECK(check_user_default(c, 404, 3) == 0);

    /* 101: 7 -> 9 tokens: the 8th fills page 1, the 9th takes page 5. */
    req_init(&r);
    req_add(&r, 101, 9);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 7);
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK(!check_i32("kv_indptr", meta_of(c, b, HKV_META_KV_INDPTR),
                     (const int32_t[]){0, 3}, 2));
    CHECK(!check_i32("kv_indices", meta_of(c, b, HKV_META_KV_INDICES),
                     (const int32_t[]){0, 1, 5}, 3));
    CHECK(!check_i32("kv_last_page_len", meta_of(c, b, HKV_META_KV_LAST_PAGE_LEN),
                     (const int32_t[]){1}, 1));
    CHECK(!check_i32("new_offsets", meta_of(c, b, HKV_META_NEW_OFFSETS),
                     (const int32_t[]){0, 2}, 2));
    CHECK(!check_i32("positions", meta_of(c, b, HKV_META_POSITIONS),
                     (const int32_t[]){7, 8}, 2));
    /* Both layers in one 4-D append. */
    CHECK_OK(req_append(c, b, &r, 0, 2, 3, 0));
    CHECK(req_check_read(c, b, &r, 0) == 0);
    CHECK(req_check_read(c, b, &r, 1) == 0);
    hkv_batch_free(b);
    CHECK(check_user_default(c, 101, 9) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/*
 * Random contents through every tensor form, over rounds that grow
 * histories across page boundaries: whatever goes in comes out bit for
 * bit, through the batch read and through read_user.
 */
static void test_cache_append_forms_roundtrip(void)
{
    hkv_config cfg = cfg_small(3, 8, 64, 6, 100);
    hkv_cache *c;
    test_rng rng = {99};
    int64_t lens[6] = {0};
    CREATE(&cfg, &c);
    for (int round = 0; round < 12; round++) {
        req r;
        hkv_batch *b;
        req_init(&r);
        r.use_cands = round % 2;
        for (int u = 0; u < 6; u++) {
            int64_t len = lens[u] + rng_range(&rng, 0, 9);
            if (len > 100)
                len = 100;
            req_add(&r, 1000 + u, len);
            r.cands[u] = rng_range(&rng, 0, 3);
        }
        CHECK_OK(req_lookup(c, &r));
        for (int u = 0; u < 6; u++)
            CHECK_EQ(r.cached[u], lens[u]);
        CHECK_OK(req_allocate(c, &r, &b));
        hkv_batch_info info;
        hkv_batch_get_info(b, &info);
        switch (round % 4) {
        case 0:   /* one call per layer, 3-D / 2-D / padded 3-D */
            CHECK_OK(req_append(c, b, &r, 0, 1, 0, r.use_cands));
            CHECK_OK(req_append(c, b, &r, 1, 1, 1, 0));
            CHECK_OK(req_append(c, b, &r, 2, 1, 2, r.use_cands));
            break;
        case 1:   /* all layers at once */
            CHECK_OK(req_append(c, b, &r, 0, 3, 3, r.use_cands));
            break;
        case 2:   /* layers out of order, in groups */
            CHECK_OK(req_append(c, b, &r, 2, 1, 3, 0));
            CHECK_OK(req_append(c, b, &r, 0, 2, 3, r.use_cands));
            break;
        default:
            CHECK_OK(req_append(c, b, &r, 1, 2, 3, 0));
            CHECK_OK(req_append(c, b, &r, 0, 1, 1, r.use_cands));
            break;
        }
        hkv_batch_get_info(b, &info);
        CHECK(info.committed || info.new_tokens == 0);
        for (int l = 0; l < 3; l++)
            CHECK(req_check_read(c, b, &r, l) == 0);
        hkv_batch_free(b);
        for (int u = 0; u < 6; u++) {
            lens[u] = r.lens[u];
            CHECK(check_user_default(c, 1000 + u, lens[u]) == 0);
        }
        CHECK_CACHE(c);
    }
    hkv_cache_destroy(c);
}

/*
 * Eviction takes pages from the least recently used user first, and from
 * a user's tail first, so a partly evicted user keeps a usable prefix.
 * page_size 4, 8 pages, every user 2+ pages; the page ids are predictable.
 */
static void test_cache_eviction_lru_tail_first(void)
{
    hkv_config cfg = cfg_small(2, 4, 8, 4, 64);
    hkv_cache *c;
    hkv_batch *b;
    hkv_stats st;
    req r;
    CREATE(&cfg, &c);
    for (int64_t u = 1; u <= 3; u++) {          /* A=1, B=2, C=3: pages 0..5 */
        req_init(&r);
        req_add(&r, u, 8);
        CHECK(req_round(c, &r) == 0);
    }
    /* D needs 3 pages, 2 are free: one page goes, A's tail (page 1). */
    req_init(&r);
    req_add(&r, 4, 12);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK(!check_i32("kv_indices", meta_of(c, b, HKV_META_KV_INDICES),
                     (const int32_t[]){6, 7, 1}, 3));
    CHECK_OK(req_append_all(c, b, &r));
    hkv_batch_free(b);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_evicted, 1);
    CHECK_EQ(st.users_evicted, 0);
    CHECK(check_user_default(c, 1, 4) == 0);    /* prefix intact */
    CHECK(check_user_default(c, 2, 8) == 0);
    CHECK(check_user_default(c, 3, 8) == 0);
    CHECK(check_user_default(c, 4, 12) == 0);
    CHECK_CACHE(c);
    /* Looking A up again finds the prefix. */
    req_init(&r);
    req_add(&r, 1, 8);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 4);

    /* E needs 2 pages: A's last page (A is gone) and B's tail are evicted
     * first, then handed out in address order from the cursor (after D's
     * page 1): B's page 3, then A's page 0. */
    req_init(&r);
    req_add(&r, 5, 8);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK(!check_i32("kv_indices", meta_of(c, b, HKV_META_KV_INDICES),
                     (const int32_t[]){3, 0}, 2));
    CHECK_OK(req_append_all(c, b, &r));
    hkv_batch_free(b);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_evicted, 3);
    CHECK_EQ(st.users_evicted, 1);
    CHECK_EQ(st.users_cached, 4);
    CHECK_EQ(user_len(c, 1), 0);
    CHECK(check_user_default(c, 2, 4) == 0);
    CHECK_CACHE(c);

    /* Using B (fully cached: nothing new) makes it most recent, so F's
     * page comes from C, the least recent now, not from B. */
    req_init(&r);
    req_add(&r, 2, 4);
    CHECK(req_round(c, &r) == 0);
    req_init(&r);
    req_add(&r, 6, 4);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK(!check_i32("kv_indices", meta_of(c, b, HKV_META_KV_INDICES),
                     (const int32_t[]){5}, 1));
    CHECK_OK(req_append_all(c, b, &r));
    hkv_batch_free(b);
    CHECK(check_user_default(c, 2, 4) == 0);
    CHECK(check_user_default(c, 3, 4) == 0);

    /* G needs 4 pages: C's last (C gone), then all of D, tail first; they
     * come back in address order from the cursor (after F's page 5), so
     * D's run 6, 7 stays a run. */
    req_init(&r);
    req_add(&r, 7, 16);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK(!check_i32("kv_indices", meta_of(c, b, HKV_META_KV_INDICES),
                     (const int32_t[]){6, 7, 1, 4}, 4));
    CHECK_OK(req_append_all(c, b, &r));
    hkv_batch_free(b);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_evicted, 8);
    CHECK_EQ(st.users_evicted, 3);
    CHECK_EQ(st.pages_free, 0);
    CHECK_EQ(user_len(c, 3), 0);
    CHECK_EQ(user_len(c, 4), 0);
    CHECK(check_user_default(c, 2, 4) == 0);
    CHECK(check_user_default(c, 5, 8) == 0);
    CHECK(check_user_default(c, 6, 4) == 0);
    CHECK(check_user_default(c, 7, 16) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/*
 * A batch the pool cannot hold fails with HKV_EFULL and changes nothing:
 * not the users, not the counters, not the pages.  Pages of users in open
 * batches, and of users in the failing batch itself, cannot be taken.
 */
static void test_cache_full_unchanged(void)
{
    hkv_config cfg = cfg_small(2, 4, 4, 4, 64);
    hkv_cache *c;
    hkv_batch *hold, *b = NULL;
    hkv_stats before, after;
    req r, rh;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 8);                          /* A: pages 0, 1 */
    CHECK(req_round(c, &r) == 0);

    /* A and B in one batch: A's pages are the batch's own, so B's three
     * pages must come from the 2 free ones. */
    req_init(&r);
    req_add(&r, 1, 8);
    req_add(&r, 2, 12);
    CHECK_OK(req_lookup(c, &r));
    hkv_cache_stats(c, &before);
    CHECK_ST(req_allocate(c, &r, &b), HKV_EFULL);
    CHECK(b == NULL);
    CHECK(strstr(hkv_last_error(), "pages") != NULL);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK_CACHE(c);
    CHECK(check_user_default(c, 1, 8) == 0);

    /* A pinned by an open (committed) batch: same answer for B alone. */
    req_init(&rh);
    req_add(&rh, 1, 8);
    CHECK_OK(req_lookup(c, &rh));
    CHECK_OK(req_allocate(c, &rh, &hold));
    req_init(&r);
    req_add(&r, 2, 12);
    CHECK_OK(req_lookup(c, &r));
    hkv_cache_stats(c, &before);
    CHECK_ST(req_allocate(c, &r, &b), HKV_EFULL);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK_CACHE(c);
    /* Two new users of 2 pages each: 4 > 2 free. */
    req_init(&r);
    req_add(&r, 3, 8);
    req_add(&r, 4, 5);
    CHECK_OK(req_lookup(c, &r));
    hkv_cache_stats(c, &before);
    CHECK_ST(req_allocate(c, &r, &b), HKV_EFULL);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK_EQ(user_len(c, 3), 0);
    CHECK_CACHE(c);
    hkv_batch_free(hold);

    /* Larger than the whole pool: fails even with everything evictable. */
    req_init(&r);
    req_add(&r, 5, 17);
    CHECK_OK(req_lookup(c, &r));
    hkv_cache_stats(c, &before);
    CHECK_ST(req_allocate(c, &r, &b), HKV_EFULL);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK(check_user_default(c, 1, 8) == 0);

    /* Unpinned, B fits by taking A's tail page; exactly the pool. */
    req_init(&r);
    req_add(&r, 2, 12);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user_default(c, 1, 4) == 0);
    CHECK(check_user_default(c, 2, 12) == 0);
    req_init(&r);
    req_add(&r, 5, 16);
    CHECK(req_round(c, &r) == 0);
    CHECK_EQ(user_len(c, 1), 0);
    CHECK_EQ(user_len(c, 2), 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* A lookup result that no longer describes the cache is refused. */
static void test_cache_stale(void)
{
    hkv_config cfg = cfg_small(2, 4, 8, 4, 64);
    hkv_cache *c;
    hkv_batch *b = NULL;
    hkv_stats before, after;
    req r, other;
    CREATE(&cfg, &c);

    /* Unknown at lookup, created by another batch before allocate. */
    req_init(&r);
    req_add(&r, 1, 6);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.epochs[0], 0);
    req_init(&other);
    req_add(&other, 1, 6);
    CHECK(req_round(c, &other) == 0);
    hkv_cache_stats(c, &before);
    CHECK_ST(req_allocate(c, &r, &b), HKV_ESTALE);
    CHECK(b == NULL);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK(check_user_default(c, 1, 6) == 0);

    /* Explicitly evicted between lookup and allocate. */
    req_init(&r);
    req_add(&r, 1, 9);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 6);
    CHECK_OK(hkv_cache_evict(c, 1, (const int64_t[]){1}, HKV_TIER_ALL, 0, NULL));
    CHECK_ST(req_allocate(c, &r, &b), HKV_ESTALE);
    CHECK_EQ(user_len(c, 1), 0);
    CHECK_CACHE(c);

    /* Partly evicted (LRU) between lookup and allocate: user 2 keeps 4 of
     * its 8 tokens, and a lookup that counted on 8 must not be used. */
    req_init(&other);
    req_add(&other, 2, 8);
    CHECK(req_round(c, &other) == 0);
    req_init(&r);
    req_add(&r, 2, 10);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 8);
    req_init(&other);
    req_add(&other, 3, 28);                     /* 7 pages of 8: 6 free */
    CHECK(req_round(c, &other) == 0);
    CHECK_EQ(user_len(c, 2), 4);
    CHECK_ST(req_allocate(c, &r, &b), HKV_ESTALE);
    CHECK(strstr(hkv_last_error(), "look") != NULL);   /* says what to do */
    CHECK(check_user_default(c, 2, 4) == 0);
    /* A fresh lookup works. */
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user_default(c, 2, 10) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* Bad batch descriptions: HKV_EINVAL, with nothing changed. */
static void test_cache_batch_einval(void)
{
    hkv_config cfg = cfg_small(2, 4, 16, 4, 16);
    cfg.max_batch_tokens = 10;
    hkv_cache *c;
    hkv_batch *b = NULL;
    hkv_stats before, after;
    int64_t cached[5] = {0}, lens[5] = {1, 1, 1, 1, 1};
    uint64_t epochs[5] = {0};
    CREATE(&cfg, &c);
    req r;
    req_init(&r);
    req_add(&r, 7, 6);
    CHECK(req_round(c, &r) == 0);
    hkv_cache_stats(c, &before);

#define LOOKUP_ALLOC_EINVAL(n, ids, lens_)                                          \
    do {                                                                            \
        CHECK_ST(hkv_cache_lookup(c, (n), (ids), (lens_), NULL, 0, cached, epochs), \
                 HKV_EINVAL);                                                       \
        memset(cached, 0, sizeof cached);                                           \
        memset(epochs, 0, sizeof epochs);                                           \
        CHECK_ST(hkv_cache_allocate(c, (n), (ids), (lens_), cached, epochs, NULL,   \
                                    0, NULL, NULL, &b),                             \
                 HKV_EINVAL);                                                       \
        CHECK(b == NULL);                                                           \
    } while (0)

    /* batch larger than max_batch_size, or negative */
    LOOKUP_ALLOC_EINVAL(5, ((const int64_t[]){1, 2, 3, 4, 5}), lens);
    CHECK(strstr(hkv_last_error(), "max_batch_size") != NULL);
    LOOKUP_ALLOC_EINVAL(-1, ((const int64_t[]){1}), lens);
    /* duplicate ids, including the int64 extremes */
    LOOKUP_ALLOC_EINVAL(3, ((const int64_t[]){1, 2, 1}), lens);
    CHECK(strstr(hkv_last_error(), "more than once") != NULL);
    LOOKUP_ALLOC_EINVAL(2, ((const int64_t[]){INT64_MIN, INT64_MIN}), lens);
    LOOKUP_ALLOC_EINVAL(4, ((const int64_t[]){-1, 0, INT64_MAX, INT64_MAX}), lens);
    /* negative and too long histories */
    LOOKUP_ALLOC_EINVAL(2, ((const int64_t[]){1, 2}), ((const int64_t[]){3, -1}));
    LOOKUP_ALLOC_EINVAL(1, ((const int64_t[]){1}), ((const int64_t[]){17}));
    CHECK(strstr(hkv_last_error(), "max_seq_len") != NULL);
    LOOKUP_ALLOC_EINVAL(1, ((const int64_t[]){1}), ((const int64_t[]){INT64_MIN}));
#undef LOOKUP_ALLOC_EINVAL
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));

    /* Distinct extremes are not mistaken for duplicates; 16 = max_seq_len
     * is allowed. */
    CHECK_OK(hkv_cache_lookup(c, 4, (const int64_t[]){INT64_MIN, INT64_MAX, 0, -1},
                              (const int64_t[]){16, 0, 1, 2}, NULL, 0, cached,
                              epochs));
    hkv_cache_stats(c, &before);

    const int64_t one[1] = {7}, six[1] = {6};
    int64_t cl[1];
    uint64_t ep[1];
    CHECK_OK(hkv_cache_lookup(c, 1, one, (const int64_t[]){8}, NULL, 0, cl, ep));
    CHECK_EQ(cl[0], 6);
    hkv_cache_stats(c, &before);
    /* allocate without the lookup's results */
    CHECK_ST(hkv_cache_allocate(c, 1, one, (const int64_t[]){8}, NULL, ep, NULL, 0,
                                NULL, NULL, &b), HKV_EINVAL);
    CHECK_ST(hkv_cache_allocate(c, 1, one, (const int64_t[]){8}, cl, NULL, NULL, 0,
                                NULL, NULL, &b), HKV_EINVAL);
    /* cached lengths outside 0..history, or more than the cache holds */
    CHECK_ST(hkv_cache_allocate(c, 1, one, (const int64_t[]){8},
                                (const int64_t[]){9}, ep, NULL, 0, NULL, NULL, &b),
             HKV_EINVAL);
    CHECK_ST(hkv_cache_allocate(c, 1, one, (const int64_t[]){8},
                                (const int64_t[]){-1}, ep, NULL, 0, NULL, NULL, &b),
             HKV_EINVAL);
    CHECK_ST(hkv_cache_allocate(c, 1, one, (const int64_t[]){8},
                                (const int64_t[]){7}, ep, NULL, 0, NULL, NULL, &b),
             HKV_EINVAL);
    CHECK_ST(hkv_cache_allocate(c, 1, (const int64_t[]){99}, (const int64_t[]){8},
                                (const int64_t[]){2}, (const uint64_t[]){0}, NULL, 0,
                                NULL, NULL, &b), HKV_EINVAL);
    /* candidates: negative or longer than a history may be */
    CHECK_ST(hkv_cache_allocate(c, 1, one, (const int64_t[]){8}, cl, ep, NULL, 0,
                                (const int64_t[]){-1}, NULL, &b), HKV_EINVAL);
    CHECK_ST(hkv_cache_allocate(c, 1, one, (const int64_t[]){8}, cl, ep, NULL, 0,
                                (const int64_t[]){17}, NULL, &b), HKV_EINVAL);
    /* token keys in trust mode */
    CHECK_ST(hkv_cache_lookup(c, 1, one, six, (const int64_t[]){1, 2, 3, 4, 5, 6}, 6,
                              cl, ep), HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "trust mode") != NULL);
    /* more new tokens than max_batch_tokens (10) */
    CHECK_ST(hkv_cache_allocate(c, 2, (const int64_t[]){50, 51},
                                (const int64_t[]){6, 6}, (const int64_t[]){0, 0},
                                (const uint64_t[]){0, 0}, NULL, 0, NULL, NULL, &b),
             HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "max_batch_tokens") != NULL);
    CHECK(b == NULL);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK_CACHE(c);
    /* and exactly max_batch_tokens is fine */
    req_init(&r);
    req_add(&r, 50, 5);
    req_add(&r, 51, 5);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user_default(c, 7, 6) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* Bad append and read arguments, and appends in the wrong state. */
static void test_cache_append_read_args(void)
{
    hkv_config cfg = cfg_small(3, 4, 16, 4, 64);
    hkv_cache *c;
    hkv_batch *b;
    hkv_stats st;
    float k[64 * 6], v[64 * 6];
    req r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 5);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    memset(k, 0, sizeof k);
    memset(v, 0, sizeof v);

    hkv_tensor good = t_rows3(k, 5, 2, 3, 6), gv = t_rows3(v, 5, 2, 3, 6), t;
    /* layers out of range */
    CHECK_ST(hkv_batch_append(b, -1, 1, &good, &gv, NULL), HKV_EINVAL);
    CHECK_ST(hkv_batch_append(b, 3, 1, &good, &gv, NULL), HKV_EINVAL);
    CHECK_ST(hkv_batch_append(b, 0, 0, &good, &gv, NULL), HKV_EINVAL);
    CHECK_ST(hkv_batch_append(b, 2, 2, &good, &gv, NULL), HKV_EINVAL);
    /* dtype, device, shape, strides */
    t = good, t.dtype_bits = 16;
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = good, t.dtype_code = 4, t.dtype_bits = 16;
    CHECK_ST(hkv_batch_append(b, 0, 1, &good, &t, NULL), HKV_EINVAL);
    t = good, t.device_kind = HKV_DEVICE_CUDA;
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = good, t.device_kind = -1;
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = t_rows3(k, 4, 2, 3, 6);                           /* rows */
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "rows") != NULL);
    t = t_rows3(k, 5, 3, 2, 6);                           /* heads x dim */
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = good, t.strides[2] = 2;                           /* head_dim strided */
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = good, t.strides[1] = 4;                           /* heads strided */
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = good, t.strides[0] = 5;                           /* rows overlap */
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = good, t.strides[0] = -6;                          /* backwards */
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = good, t.ndim = 5;
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = good, t.ndim = 1;
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = t_rows2(k, 5, 5, 6);                              /* 2-D width */
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = t_rows4(k, 2, 5, 2, 3, 30, 6);                    /* 4-D: 2 layers for 1 */
    CHECK_ST(hkv_batch_append(b, 0, 1, &t, &gv, NULL), HKV_EINVAL);
    t = t_rows4(k, 1, 5, 2, 3, 30, 6);
    hkv_tensor t2 = t_rows4(v, 1, 5, 2, 3, 30, 6);
    CHECK_ST(hkv_batch_append(b, 0, 2, &t, &t2, NULL), HKV_EINVAL);
    /* 3-D tensors for several layers */
    CHECK_ST(hkv_batch_append(b, 0, 2, &good, &gv, NULL), HKV_EINVAL);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.tokens_appended, 0);

    /* None of that touched the batch: appending still works, once. */
    CHECK_OK(req_append(c, b, &r, 1, 1, 0, 0));
    CHECK_ST(req_append(c, b, &r, 1, 1, 0, 0), HKV_ESTATE);
    CHECK_ST(req_append(c, b, &r, 0, 2, 3, 0), HKV_ESTATE);   /* overlaps 1 */
    hkv_batch_info info;
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.committed, 0);
    CHECK_OK(req_append(c, b, &r, 0, 1, 1, 0));
    CHECK_OK(req_append(c, b, &r, 2, 1, 2, 0));
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.committed, 1);
    CHECK_ST(req_append(c, b, &r, 0, 1, 0, 0), HKV_ESTATE);   /* committed */
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.tokens_appended, 15);

    /* read arguments */
    float rk[8 * 6], rv[8 * 6];
    int32_t bi[8], pos[8];
    int64_t bi64[8];
    hkv_tensor tk = t_rows3(rk, 5, 2, 3, 6), tv = t_rows3(rv, 5, 2, 3, 6);
    hkv_tensor tb = t_i32(bi, 5), tp = t_i32(pos, 5);
    CHECK_ST(hkv_batch_read(b, -1, &tk, &tv, &tb, &tp, NULL), HKV_EINVAL);
    CHECK_ST(hkv_batch_read(b, 3, &tk, &tv, &tb, &tp, NULL), HKV_EINVAL);
    t = t_i32(bi, 4);
    CHECK_ST(hkv_batch_read(b, 0, &tk, &tv, &t, &tp, NULL), HKV_EINVAL);
    t = t_i64(bi64, 5);
    CHECK_ST(hkv_batch_read(b, 0, &tk, &tv, &tb, &t, NULL), HKV_EINVAL);
    t = t_rows3(rk, 6, 2, 3, 6);                          /* rows != tokens */
    CHECK_ST(hkv_batch_read(b, 0, &t, &tv, &tb, &tp, NULL), HKV_EINVAL);
    t = t_i32(bi, 5), t.strides[0] = 2;                   /* strided index */
    CHECK_ST(hkv_batch_read(b, 0, &tk, &tv, &t, &tp, NULL), HKV_EINVAL);
    CHECK_OK(hkv_batch_read(b, 0, &tk, &tv, &tb, &tp, NULL));
    t = t_i32(bi, 8);                                     /* longer is fine */
    CHECK_OK(hkv_batch_read(b, 2, &tk, &tv, &t, &tp, NULL));
    CHECK(req_check_read(c, b, &r, 2) == 0);

    /* After close: nothing more on this batch. */
    hkv_batch_close(b);
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.closed, 1);
    CHECK_ST(hkv_batch_read(b, 0, &tk, &tv, &tb, &tp, NULL), HKV_ESTATE);
    CHECK_ST(req_append(c, b, &r, 0, 1, 0, 0), HKV_ESTATE);
    hkv_batch_free(b);
    CHECK(check_user_default(c, 1, 5) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* Users held by unfinished work: HKV_EBUSY, and nothing changed. */
static void test_cache_busy(void)
{
    hkv_config cfg = cfg_small(2, 4, 32, 4, 64);
    hkv_cache *c;
    hkv_batch *a, *b = NULL, *b2;
    hkv_stats before, after;
    req ra, r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 9, 8);                          /* Z: cached, not busy */
    CHECK(req_round(c, &r) == 0);

    /* Batch A is writing new user X. */
    req_init(&ra);
    req_add(&ra, 1, 5);
    CHECK_OK(req_lookup(c, &ra));
    CHECK_OK(req_allocate(c, &ra, &a));

    /* Another batch with X (looked up now: X exists, 0 tokens cached). */
    req_init(&r);
    req_add(&r, 2, 4);                          /* Y: new, listed first */
    req_add(&r, 1, 5);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[1], 0);
    CHECK(r.epochs[1] != 0);
    hkv_cache_stats(c, &before);
    CHECK_ST(req_allocate(c, &r, &b), HKV_EBUSY);
    CHECK(b == NULL);
    CHECK(strstr(hkv_last_error(), "1") != NULL);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK_EQ(after.users_cached, 2);            /* Y was not created */
    /* Even a batch that only reads X: its tokens are not complete. */
    req_init(&r);
    req_add(&r, 1, 0);
    CHECK_OK(req_lookup(c, &r));
    CHECK_ST(req_allocate(c, &r, &b), HKV_EBUSY);

    /* Evicting X fails, for all listed users or none. */
    CHECK_ST(hkv_cache_evict(c, 2, (const int64_t[]){9, 1}, HKV_TIER_ALL, 0, NULL), HKV_EBUSY);
    CHECK_EQ(user_len(c, 9), 8);
    CHECK_EQ(hkv_cache_evict_all(c, HKV_TIER_ALL, 0, NULL), 1);        /* Z only */
    CHECK_EQ(user_len(c, 9), 0);
    hkv_cache_stats(c, &after);
    CHECK_EQ(after.users_cached, 1);
    CHECK_CACHE(c);

    /* Once A is committed (still open), X can be read by another batch,
     * and extended by one more, but not evicted. */
    CHECK_OK(req_append_all(c, a, &ra));
    req_init(&r);
    req_add(&r, 1, 5);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 5);
    CHECK_OK(req_allocate(c, &r, &b));
    hkv_batch_info info;
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.committed, 1);
    req_init(&r);
    req_add(&r, 1, 9);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b2));
    CHECK_ST(hkv_cache_evict(c, 1, (const int64_t[]){1}, HKV_TIER_ALL, 0, NULL), HKV_EBUSY);
    hkv_cache_stats(c, &after);
    CHECK_EQ(after.open_batches, 3);
    CHECK_EQ(after.pages_pinned, 3);
    CHECK_OK(req_append_all(c, b2, &r));
    CHECK(req_check_read(c, b2, &r, 1) == 0);
    CHECK(req_check_read(c, a, &ra, 1) == 0);   /* A's view is intact */
    hkv_batch_free(b2);
    hkv_batch_free(b);
    hkv_batch_free(a);
    hkv_cache_stats(c, &after);
    CHECK_EQ(after.open_batches, 0);
    CHECK_EQ(after.pages_pinned, 0);
    CHECK(check_user_default(c, 1, 9) == 0);
    CHECK_OK(hkv_cache_evict(c, 1, (const int64_t[]){1}, HKV_TIER_ALL, 0, NULL));
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* A batch closed before every layer was appended is rolled back. */
static void test_cache_abort_rollback(void)
{
    hkv_config cfg = cfg_small(3, 4, 16, 4, 64);
    hkv_cache *c;
    hkv_batch *b;
    hkv_stats before, after;
    hkv_batch_info info;
    req r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 6);                          /* X: pages 0, 1 (2 tokens) */
    CHECK(req_round(c, &r) == 0);
    hkv_cache_stats(c, &before);

    /* X grows to 13 (2 more pages) and a new user Y comes; only layer 0
     * (and for Y's sake a 4-D group of layer 1) is written, then close.
     * Layer 0 wrote slots 2..3 of X's page 1, past X's 6 tokens. */
    req_init(&r);
    req_add(&r, 1, 13);
    req_add(&r, 2, 7);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK_OK(req_append(c, b, &r, 0, 1, 0, 0));
    CHECK_OK(req_append(c, b, &r, 1, 1, 3, 0));
    CHECK_EQ(user_len(c, 1), 6);
    hkv_batch_close(b);
    hkv_batch_close(b);                         /* idempotent */
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.closed, 1);
    CHECK_EQ(info.committed, 0);
    hkv_cache_stats(c, &after);
    CHECK_EQ(after.batches_aborted, before.batches_aborted + 1);
    CHECK_EQ(after.batches_committed, before.batches_committed);
    CHECK_EQ(after.pages_dropped, before.pages_dropped + 4);  /* X 2, Y 2 */
    CHECK_EQ(after.pages_used, 2);
    CHECK_EQ(after.pages_pinned, 0);
    CHECK_EQ(after.users_cached, 1);            /* Y is gone again */
    CHECK_EQ(after.open_batches, 0);
    hkv_batch_free(b);
    hkv_cache_stats(c, &after);
    CHECK_EQ(after.batches_aborted, before.batches_aborted + 1);  /* once */
    CHECK(check_user_default(c, 1, 6) == 0);    /* the old tokens, intact */
    CHECK_EQ(user_len(c, 2), 0);
    CHECK_CACHE(c);

    /* Free without close does the same; never appended at all. */
    req_init(&r);
    req_add(&r, 1, 9);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    hkv_batch_free(b);
    CHECK(check_user_default(c, 1, 6) == 0);
    CHECK_CACHE(c);

    /* And the user goes on normally afterwards. */
    req_init(&r);
    req_add(&r, 1, 13);
    req_add(&r, 2, 7);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 6);
    CHECK_EQ(r.cached[1], 0);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user_default(c, 1, 13) == 0);
    CHECK(check_user_default(c, 2, 7) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/*
 * Verified mode: only the prefix whose keys match is reused, and the
 * tokens after a divergence are recomputed (written again, with the new
 * history's contents).
 */
static void test_cache_verified_rewrite(void)
{
    hkv_config cfg = cfg_small(2, 4, 32, 4, 64);
    cfg.verify_tokens = 1;
    hkv_cache *c;
    hkv_batch *b = NULL;
    int64_t h1[16], h2[16], h3[16];
    req r, stale;
    CREATE(&cfg, &c);
    for (int i = 0; i < 16; i++) {
        h1[i] = 5000 + i;
        h2[i] = i < 6 ? h1[i] : 9000 + i;       /* diverges at 6 (mid page) */
        h3[i] = 7000 + i;                       /* diverges at 0 */
    }
    req_init(&r);
    req_add_keys(&r, 1, 10, h1);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user(c, 1, h1, 10) == 0);

    /* Same history: all cached; a longer one: the old part cached. */
    req_init(&r);
    req_add_keys(&r, 1, 10, h1);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 10);
    req_init(&r);
    req_add_keys(&r, 1, 14, h1);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 10);
    /* Every divergence point gives exactly that prefix. */
    for (int d = 0; d < 10; d++) {
        int64_t q[12];
        memcpy(q, h1, sizeof q);
        q[d] = -1;
        req_init(&r);
        req_add_keys(&r, 1, 12, q);
        CHECK_OK(req_lookup(c, &r));
        CHECK_EQ(r.cached[0], d);
    }

    /* Rewritten history: the tail from 6 on is recomputed. */
    req_init(&stale);
    req_add_keys(&stale, 1, 11, h1);
    CHECK_OK(req_lookup(c, &stale));            /* a lookup about to go stale */
    req_init(&r);
    req_add_keys(&r, 1, 12, h2);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 6);
    CHECK_OK(req_allocate(c, &r, &b));
    hkv_batch_info info;
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.new_tokens, 6);
    CHECK(!check_i32("positions", meta_of(c, b, HKV_META_POSITIONS),
                     (const int32_t[]){6, 7, 8, 9, 10, 11}, 6));
    /* Keep page 1 (tokens 4, 5 still valid), one page more for 8..11:
     * the next free one after the cursor, not the page 2 just dropped. */
    CHECK(!check_i32("kv_indices", meta_of(c, b, HKV_META_KV_INDICES),
                     (const int32_t[]){0, 1, 3}, 3));
    CHECK_OK(req_append_all(c, b, &r));
    CHECK(req_check_read(c, b, &r, 0) == 0);
    CHECK(req_check_read(c, b, &r, 1) == 0);
    hkv_batch_free(b);
    CHECK(check_user(c, 1, h2, 12) == 0);
    CHECK_ST(req_allocate(c, &stale, &b), HKV_ESTALE);
    /* The old history now matches only up to the divergence. */
    req_init(&r);
    req_add_keys(&r, 1, 10, h1);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 6);

    /* A truncated history (same prefix, shorter): all of it cached,
     * nothing to compute, and the longer cached history is kept. */
    req_init(&r);
    req_add_keys(&r, 1, 5, h2);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 5);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user(c, 1, h2, 12) == 0);

    /* Divergence at the very first token: everything recomputed. */
    req_init(&r);
    req_add_keys(&r, 1, 3, h3);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 0);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user(c, 1, h3, 3) == 0);
    hkv_stats st;
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_used, 1);
    CHECK(st.pages_dropped >= 3);

    /* Divergence inside a partial page (3 tokens in page 0). */
    int64_t q[6] = {h3[0], h3[1], 42, 43, 44, 45};
    req_init(&r);
    req_add_keys(&r, 1, 6, q);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 2);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user(c, 1, q, 6) == 0);

    /* Keys are required, one per history token. */
    int64_t cl[1];
    uint64_t ep[1];
    CHECK_ST(hkv_cache_lookup(c, 1, (const int64_t[]){1}, (const int64_t[]){6}, NULL,
                              0, cl, ep), HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "verified") != NULL);
    CHECK_ST(hkv_cache_lookup(c, 1, (const int64_t[]){1}, (const int64_t[]){6}, q, 5,
                              cl, ep), HKV_EINVAL);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* Verified mode: a rewrite of tokens that an open batch reads must wait;
 * an extension need not. */
static void test_cache_verified_busy_rewrite(void)
{
    hkv_config cfg = cfg_small(2, 4, 32, 4, 64);
    cfg.verify_tokens = 1;
    hkv_cache *c;
    hkv_batch *reader, *b = NULL;
    hkv_stats before, after;
    int64_t h[12], g[12];
    req rr, r;
    CREATE(&cfg, &c);
    for (int i = 0; i < 12; i++) {
        h[i] = 100 + i;
        g[i] = i < 3 ? h[i] : 200 + i;
    }
    req_init(&rr);
    req_add_keys(&rr, 1, 8, h);
    CHECK(req_round(c, &rr) == 0);
    CHECK_OK(req_lookup(c, &rr));
    CHECK_OK(req_allocate(c, &rr, &reader));    /* committed, open */

    req_init(&r);
    req_add_keys(&r, 1, 10, g);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 3);
    hkv_cache_stats(c, &before);
    CHECK_ST(req_allocate(c, &r, &b), HKV_EBUSY);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK(req_check_read(c, reader, &rr, 0) == 0);

    req_init(&r);
    req_add_keys(&r, 1, 12, h);                 /* extension: fine */
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 8);
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK_OK(req_append_all(c, b, &r));
    hkv_batch_free(b);
    CHECK(req_check_read(c, reader, &rr, 1) == 0);
    hkv_batch_free(reader);

    /* Released: now the rewrite goes through. */
    req_init(&r);
    req_add_keys(&r, 1, 10, g);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 3);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user(c, 1, g, 10) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

static void test_cache_read_user_args(void)
{
    hkv_config cfg = cfg_small(2, 4, 16, 4, 64);
    hkv_cache *c;
    float k[16 * 6], v[16 * 6];
    int64_t n = -1;
    req r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 6);
    CHECK(req_round(c, &r) == 0);
    hkv_tensor tk = t_rows3(k, 16, 2, 3, 6), tv = t_rows3(v, 16, 2, 3, 6), t;

    CHECK_OK(hkv_cache_read_user(c, 12345, 0, &tk, &tv, NULL, &n));   /* unknown */
    CHECK_EQ(n, 0);
    CHECK_OK(hkv_cache_user_length(c, 12345, &n));
    CHECK_EQ(n, 0);
    CHECK_ST(hkv_cache_read_user(c, 1, -1, &tk, &tv, NULL, &n), HKV_EINVAL);
    CHECK_ST(hkv_cache_read_user(c, 1, 2, &tk, &tv, NULL, &n), HKV_EINVAL);
    CHECK_EQ(n, 0);
    t = t_rows3(k, 5, 2, 3, 6);                           /* too few rows */
    hkv_tensor t2 = t_rows3(v, 5, 2, 3, 6);
    CHECK_ST(hkv_cache_read_user(c, 1, 0, &t, &t2, NULL, &n), HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "6") != NULL);
    t = t_rows3(k, 15, 2, 3, 6);                          /* k, v differ */
    CHECK_ST(hkv_cache_read_user(c, 1, 0, &t, &tv, NULL, &n), HKV_EINVAL);
    t = t_rows3(k, 8, 2, 3, 12);                          /* padded rows */
    t2 = t_rows3(v, 8, 2, 3, 12);
    CHECK_ST(hkv_cache_read_user(c, 1, 0, &t, &t2, NULL, &n), HKV_EINVAL);
    t = tk, t.dtype_bits = 64;
    CHECK_ST(hkv_cache_read_user(c, 1, 0, &t, &tv, NULL, &n), HKV_EINVAL);
    /* exactly as many rows as tokens, and the 2-D form, are fine */
    t = t_rows2(k, 6, 6, 6);
    t2 = t_rows2(v, 6, 6, 6);
    CHECK_OK(hkv_cache_read_user(c, 1, 1, &t, &t2, NULL, &n));
    CHECK_EQ(n, 6);
    CHECK(k[5 * 6 + 5] == kv_val(tok_key(1, 5), 1, 0, 5));
    CHECK(v[0] == kv_val(tok_key(1, 0), 1, 1, 0));
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

static void test_cache_evict_explicit(void)
{
    hkv_config cfg = cfg_small(2, 4, 16, 4, 64);
    hkv_cache *c;
    hkv_stats st;
    req r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 4);
    req_add(&r, 2, 9);
    req_add(&r, 3, 1);
    req_add(&r, INT64_MIN, 5);
    CHECK(req_round(c, &r) == 0);
    /* unknown ids and repeats are ignored */
    CHECK_OK(hkv_cache_evict(c, 4, (const int64_t[]){2, 99, 2, -5}, HKV_TIER_ALL, 0, NULL));
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_dropped, 3);
    CHECK_EQ(st.users_evicted, 1);
    CHECK_EQ(st.users_cached, 3);
    CHECK_EQ(st.pages_used, 4);
    CHECK_EQ(user_len(c, 2), 0);
    CHECK(check_user_default(c, INT64_MIN, 5) == 0);
    CHECK_OK(hkv_cache_evict(c, 0, NULL, HKV_TIER_ALL, 0, NULL));
    CHECK_EQ(hkv_cache_evict_all(c, HKV_TIER_ALL, 0, NULL), 3);
    CHECK_EQ(hkv_cache_evict_all(c, HKV_TIER_ALL, 0, NULL), 0);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_dropped, 7);
    CHECK_EQ(st.users_evicted, 4);
    CHECK_EQ(st.users_cached, 0);
    CHECK_EQ(st.pages_free, 16);
    CHECK_CACHE(c);
    /* An evicted user starts over. */
    req_init(&r);
    req_add(&r, 2, 3);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 0);
    CHECK(req_round(c, &r) == 0);
    CHECK(check_user_default(c, 2, 3) == 0);
    hkv_cache_destroy(c);
}

/* Batches with nothing to compute commit at once; appending their (empty)
 * layers is harmless. */
static void test_cache_empty_batches(void)
{
    hkv_config cfg = cfg_small(2, 4, 16, 4, 64);
    hkv_cache *c;
    hkv_batch *b;
    hkv_batch_info info;
    hkv_stats st;
    req r;
    CREATE(&cfg, &c);

    /* zero users */
    req_init(&r);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.batch_size, 0);
    CHECK_EQ(info.committed, 1);
    CHECK_EQ(info.total_tokens, 0);
    CHECK_EQ(meta_of(c, b, HKV_META_KV_INDPTR)[0], 0);
    CHECK(req_check_read(c, b, &r, 0) == 0);
    hkv_batch_free(b);

    /* unknown users with empty histories: nobody is created */
    req_init(&r);
    req_add(&r, 1, 0);
    req_add(&r, 2, 0);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(req_allocate(c, &r, &b));
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.committed, 1);
    CHECK(!check_i32("kv_indptr", meta_of(c, b, HKV_META_KV_INDPTR),
                     (const int32_t[]){0, 0, 0}, 3));
    CHECK(!check_i32("kv_last_page_len", meta_of(c, b, HKV_META_KV_LAST_PAGE_LEN),
                     (const int32_t[]){0, 0}, 2));
    CHECK_OK(req_append_all(c, b, &r));          /* no-op */
    hkv_batch_free(b);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.users_cached, 0);
    CHECK_EQ(st.tokens_appended, 0);
    CHECK_EQ(st.batches_aborted, 0);
    CHECK_CACHE(c);

    /* a cached user with an empty history now, and a fully cached one:
     * both pinned while the batch is open, nothing written */
    req_init(&r);
    req_add(&r, 3, 6);
    req_add(&r, 4, 4);
    CHECK(req_round(c, &r) == 0);
    req_init(&r);
    req_add(&r, 3, 0);
    req_add(&r, 4, 4);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 0);
    CHECK_EQ(r.cached[1], 4);
    CHECK_OK(req_allocate(c, &r, &b));
    hkv_batch_get_info(b, &info);
    CHECK_EQ(info.committed, 1);
    CHECK_EQ(info.new_tokens, 0);
    CHECK(!check_i32("kv_indptr", meta_of(c, b, HKV_META_KV_INDPTR),
                     (const int32_t[]){0, 0, 1}, 3));
    CHECK(!check_i32("kv_last_page_len", meta_of(c, b, HKV_META_KV_LAST_PAGE_LEN),
                     (const int32_t[]){0, 4}, 2));
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_pinned, 3);
    CHECK_OK(req_append(c, b, &r, 0, 2, 3, 0));   /* empty 4-D: no-op */
    CHECK_OK(req_append_all(c, b, &r));
    CHECK(req_check_read(c, b, &r, 1) == 0);
    hkv_batch_free(b);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_pinned, 0);
    CHECK_EQ(st.batches_aborted, 0);
    CHECK(check_user_default(c, 3, 6) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* Metadata blocks: a bounded number, reused, and kept while exported. */
static void test_cache_open_batch_limit(void)
{
    hkv_config cfg = cfg_small(1, 4, 64, 2, 16);
    cfg.max_open_batches = 2;
    hkv_cache *c;
    hkv_batch *b1, *b2, *b3 = NULL;
    hkv_stats before, after;
    req r1, r2, r3;
    CREATE(&cfg, &c);
    req_init(&r1);
    req_add(&r1, 1, 3);
    req_init(&r2);
    req_add(&r2, 2, 3);
    req_init(&r3);
    req_add(&r3, 3, 3);
    CHECK_OK(req_lookup(c, &r1));
    CHECK_OK(req_allocate(c, &r1, &b1));
    CHECK_OK(req_lookup(c, &r2));
    CHECK_OK(req_allocate(c, &r2, &b2));
    CHECK_OK(req_lookup(c, &r3));
    hkv_cache_stats(c, &before);
    CHECK_ST(req_allocate(c, &r3, &b3), HKV_EBUSY);
    CHECK(strstr(hkv_last_error(), "max_open_batches") != NULL);
    hkv_cache_stats(c, &after);
    CHECK(stats_equal(&before, &after));
    CHECK_EQ(user_len(c, 3), 0);
    CHECK_CACHE(c);
    /* A closed (not freed) batch still holds its block. */
    CHECK_OK(req_append_all(c, b1, &r1));
    hkv_batch_close(b1);
    CHECK_ST(req_allocate(c, &r3, &b3), HKV_EBUSY);
    hkv_batch_free(b1);
    CHECK_OK(req_allocate(c, &r3, &b3));
    CHECK_OK(req_append_all(c, b3, &r3));

    /* A block whose metadata is exported (a reference held) is not
     * reused after the batch is freed, until the reference goes. */
    hkv_batch_info info;
    hkv_batch_get_info(b2, &info);
    hkv_buffer *exported = info.host_meta;
    hkv_buffer_ref(exported);
    hkv_batch_free(b2);
    hkv_batch_free(b3);
    req_init(&r1);
    req_add(&r1, 1, 5);
    CHECK_OK(req_lookup(c, &r1));
    CHECK_OK(req_allocate(c, &r1, &b1));        /* b3's block */
    CHECK(b1 != b2);
    req_init(&r3);
    req_add(&r3, 3, 5);
    CHECK_OK(req_lookup(c, &r3));
    CHECK_ST(req_allocate(c, &r3, &b3), HKV_EBUSY);
    hkv_buffer_unref(exported);
    CHECK_OK(req_allocate(c, &r3, &b3));
    hkv_batch_free(b3);
    hkv_batch_free(b1);

    /* Many rounds through the two blocks. */
    for (int i = 0; i < 200; i++) {
        req r;
        req_init(&r);
        req_add(&r, 10 + i % 7, 1 + i % 16);
        req_add(&r, 20 + i % 5, 16 - i % 16);
        if (req_round(c, &r) != 0)
            break;
    }
    CHECK(!hkv_test_failed);
    hkv_cache_stats(c, &after);
    CHECK_EQ(after.open_batches, 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/*
 * Destroying the cache while batches are still held abandons them: their
 * handles fail cleanly, and freeing them releases their memory (checked
 * by LeakSanitizer).  Exported buffers outlive the cache.
 */
static void test_cache_destroy_with_open_batches(void)
{
    hkv_config cfg = cfg_small(2, 4, 16, 4, 64);
    hkv_cache *c;
    hkv_batch *open_b, *closed_b, *committed_b, *freed_b;
    req r1, r2, r3, r4;
    CREATE(&cfg, &c);
    req_init(&r1);
    req_add(&r1, 1, 5);
    req_init(&r2);
    req_add(&r2, 2, 5);
    req_init(&r3);
    req_add(&r3, 3, 5);
    req_init(&r4);
    req_add(&r4, 4, 5);
    CHECK_OK(req_lookup(c, &r1));
    CHECK_OK(req_allocate(c, &r1, &open_b));
    CHECK_OK(req_append(c, open_b, &r1, 0, 1, 0, 0));    /* half written */
    CHECK_OK(req_lookup(c, &r2));
    CHECK_OK(req_allocate(c, &r2, &closed_b));
    hkv_batch_close(closed_b);
    CHECK_OK(req_lookup(c, &r3));
    CHECK_OK(req_allocate(c, &r3, &committed_b));
    CHECK_OK(req_append_all(c, committed_b, &r3));
    CHECK_OK(req_lookup(c, &r4));
    CHECK_OK(req_allocate(c, &r4, &freed_b));
    hkv_batch_free(freed_b);

    hkv_buffer *table = hkv_cache_table(c);
    hkv_batch_info info;
    hkv_batch_get_info(committed_b, &info);
    hkv_buffer *meta = info.host_meta;
    hkv_buffer_ref(meta);

    hkv_cache_destroy(c);

    /* The handles still answer, without the cache. */
    hkv_batch_get_info(open_b, &info);
    CHECK_EQ(info.batch_size, 1);
    CHECK_EQ(info.new_tokens, 5);
    float k[5 * 6] = {0}, v[5 * 6] = {0};
    int32_t bi[5], pos[5];
    hkv_tensor tk = t_rows3(k, 5, 2, 3, 6), tv = t_rows3(v, 5, 2, 3, 6);
    hkv_tensor tb = t_i32(bi, 5), tp = t_i32(pos, 5);
    CHECK_ST(hkv_batch_append(open_b, 1, 1, &tk, &tv, NULL), HKV_ESTATE);
    CHECK(strstr(hkv_last_error(), "cache") != NULL);
    CHECK_ST(hkv_batch_read(committed_b, 0, &tk, &tv, &tb, &tp, NULL), HKV_ESTATE);
    hkv_batch_close(open_b);                    /* no-op, no crash */
    hkv_batch_close(committed_b);
    hkv_batch_free(open_b);
    hkv_batch_free(closed_b);
    hkv_batch_free(committed_b);

    /* Exported memory is still readable: the committed batch's metadata
     * (kv_indptr of one user with 2 pages) and the table's bytes. */
    CHECK(meta->ptr != NULL);
    CHECK_EQ(((int32_t *)meta->ptr)[0], 0);
    CHECK_EQ(table->bytes, 2 * 16 * 2 * 4 * 6 * 4);
    volatile float x = ((float *)table->ptr)[0];
    (void)x;
    hkv_buffer_unref(meta);
    hkv_buffer_unref(table);
}

/*
 * A table that no machine can hold fails with HKV_ENOMEM, and the
 * half-built cache is released (LeakSanitizer checks).  2^52 bytes is past
 * any 64-bit address space, so the answer does not depend on overcommit;
 * the sanitizer build runs with allocator_may_return_null=1 so that ASan
 * returns NULL as libc would instead of aborting (it still prints a
 * "failed to allocate" WARNING on stderr: expected).
 */
static void test_cache_create_enomem(void)
{
    hkv_config cfg = cfg_small(1, 256, 2048, 4, 64);
    cfg.num_heads = 1 << 20;
    cfg.head_dim = 1 << 10;          /* rows of 2^32 bytes, pages of 2^41 */
    hkv_cache *c = (hkv_cache *)&c;
    CHECK_ST(hkv_cache_create(&cfg, &c), HKV_ENOMEM);
    CHECK(c == NULL);
    CHECK(hkv_last_error()[0] != '\0');
}

/*
 * Regression (found by this suite): the table size used to be computed
 * without overflow checks, so 8 layers x 1024 pages x 2 x 256 tokens x 2^40
 * elements x 4 bytes = 2^71 bytes wrapped to 0 and a 256-byte table was
 * "successfully" created, which the first append overran.  It must fail.
 */
static void test_table_size_overflow(void)
{
    hkv_config cfg = cfg_small(8, 256, 1024, 1, 256);
    cfg.num_heads = 1 << 20;
    cfg.head_dim = 1 << 20;
    hkv_cache *c = NULL;
    hkv_status st = hkv_cache_create(&cfg, &c);
    if (st == HKV_OK) {
        hkv_buffer *t = hkv_cache_table(c);
        size_t bytes = t->bytes;
        hkv_buffer_unref(t);
        hkv_cache_destroy(c);
        test_fail(__FILE__, __LINE__, "a 2^71-byte table was created with %zu "
                  "bytes", bytes);
        return;
    }
    CHECK(st == HKV_EINVAL || st == HKV_ENOMEM);
}


/*
 * Page transfers through the cache (the building block of offload and
 * onboard): gather copies pages out into [layers, n, 2, page_size, H, D],
 * scatter copies them back in, and bad arguments are refused before any
 * byte moves.
 */
static void test_cache_copy_pages(void)
{
    enum { PS = 4, H = 2, D = 3, L = 3 };
    hkv_config cfg = cfg_small(L, PS, 16, 4, 64);
    hkv_cache *c;
    req r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 8);                          /* pages 0, 1 (full) */
    req_add(&r, 2, 8);                          /* pages 2, 3 (full) */
    CHECK(req_round(c, &r) == 0);

    /* gather layers 1..2 of user 1's pages 0, 1 */
    const int64_t per_page = 2 * PS * H * D;
    float staging[2 * 2 * 2 * PS * H * D];
    int32_t ids[2] = {0, 1};
    hkv_tensor ti = t_i32(ids, 2);
    hkv_tensor ts;
    memset(&ts, 0, sizeof ts);
    ts.data = staging;
    ts.device_kind = HKV_DEVICE_CPU;
    ts.dtype_code = 2, ts.dtype_bits = 32, ts.ndim = 6;
    const int64_t shape[6] = {2, 2, 2, PS, H, D};
    for (int i = 5, st = 1; i >= 0; st *= (int)shape[i], i--)
        ts.shape[i] = shape[i], ts.strides[i] = st;
    CHECK_OK(hkv_cache_copy_pages(c, 1, 1, 2, &ti, &ts, NULL));
    for (int l = 0; l < 2; l++)
        for (int p = 0; p < 2; p++)
            for (int kv = 0; kv < 2; kv++)
                for (int slot = 0; slot < PS; slot++)
                    for (int e = 0; e < H * D; e++) {
                        float got = staging[(l * 2 + p) * per_page +
                                            (kv * PS + slot) * H * D + e];
                        CHECK(got == kv_val(tok_key(1, p * PS + slot), 1 + l, kv, e));
                    }

    /* scatter them over user 2's pages (2, 3): user 2 now reads user 1's
     * K/V in layers 1..2 and its own in layer 0 */
    ids[0] = 2, ids[1] = 3;
    CHECK_OK(hkv_cache_copy_pages(c, 0, 1, 2, &ti, &ts, NULL));
    float k[8 * 6], v[8 * 6];
    int64_t n = 0;
    hkv_tensor tk = t_rows3(k, 8, H, D, H * D), tv = t_rows3(v, 8, H, D, H * D);
    CHECK_OK(hkv_cache_read_user(c, 2, 2, &tk, &tv, NULL, &n));
    CHECK_EQ(n, 8);
    CHECK(k[7 * 6 + 5] == kv_val(tok_key(1, 7), 2, 0, 5));
    CHECK(v[0] == kv_val(tok_key(1, 0), 2, 1, 0));
    CHECK_OK(hkv_cache_read_user(c, 2, 0, &tk, &tv, NULL, &n));
    CHECK(k[0] == kv_val(tok_key(2, 0), 0, 0, 0));
    CHECK(check_user_default(c, 1, 8) == 0);    /* the source is untouched */

    /* refused: layers, page ids, index tensor, staging shape/dtype/device */
    hkv_tensor t;
    CHECK_ST(hkv_cache_copy_pages(c, 1, 2, 2, &ti, &ts, NULL), HKV_EINVAL);
    CHECK_ST(hkv_cache_copy_pages(c, 1, -1, 2, &ti, &ts, NULL), HKV_EINVAL);
    CHECK_ST(hkv_cache_copy_pages(c, 1, 0, 0, &ti, &ts, NULL), HKV_EINVAL);
    ids[1] = 16;
    CHECK_ST(hkv_cache_copy_pages(c, 0, 1, 2, &ti, &ts, NULL), HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "16") != NULL);
    ids[1] = -1;
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &ti, &ts, NULL), HKV_EINVAL);
    ids[1] = 3;
    int64_t ids64[2] = {2, 3};
    t = t_i64(ids64, 2);
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &t, &ts, NULL), HKV_EINVAL);
    t = ti, t.ndim = 2, t.shape[1] = 1, t.strides[1] = 1;
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &t, &ts, NULL), HKV_EINVAL);
    t = ts, t.shape[0] = 1;                     /* 1 layer of staging for 2 */
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &ti, &t, NULL), HKV_EINVAL);
    t = ts, t.shape[1] = 3;                     /* 3 pages for 2 ids */
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &ti, &t, NULL), HKV_EINVAL);
    t = ts, t.strides[1] = per_page + 1;        /* padded pages */
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &ti, &t, NULL), HKV_EINVAL);
    t = ts, t.dtype_bits = 16;
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &ti, &t, NULL), HKV_EINVAL);
    t = ts, t.ndim = 5;
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &ti, &t, NULL), HKV_EINVAL);
    t = ts, t.device_kind = HKV_DEVICE_CUDA;
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &ti, &t, NULL), HKV_EINVAL);
    t = ti, t.device_kind = HKV_DEVICE_CUDA;
    CHECK_ST(hkv_cache_copy_pages(c, 1, 1, 2, &t, &ts, NULL), HKV_EINVAL);
    /* nothing to copy is fine */
    t = ti, t.shape[0] = 0;
    hkv_tensor t0 = ts;
    t0.shape[1] = 0;
    CHECK_OK(hkv_cache_copy_pages(c, 0, 0, 2, &t, &t0, NULL));
    CHECK(check_user_default(c, 1, 8) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* Latency histograms: one sample per served lookup / allocate, in
 * Prometheus-style buckets (a sample equal to a bound goes in its bucket). */
static void test_cache_latency_histograms(void)
{
    hkv_histogram h;
    memset(&h, 0, sizeof h);
    hkv_histogram_observe(&h, 0);
    hkv_histogram_observe(&h, hkv_hist_bounds_ns[0]);         /* le 1 us */
    hkv_histogram_observe(&h, hkv_hist_bounds_ns[0] + 1);
    hkv_histogram_observe(&h, hkv_hist_bounds_ns[HKV_HIST_BUCKETS - 2]);
    hkv_histogram_observe(&h, UINT64_C(5000000000));          /* +Inf */
    CHECK_EQ(h.counts[0], 2);
    CHECK_EQ(h.counts[1], 1);
    CHECK_EQ(h.counts[HKV_HIST_BUCKETS - 2], 1);
    CHECK_EQ(h.counts[HKV_HIST_BUCKETS - 1], 1);
    CHECK_EQ(h.count, 5);
    CHECK(h.sum_ns == 2 * hkv_hist_bounds_ns[0] + 1 +
                      hkv_hist_bounds_ns[HKV_HIST_BUCKETS - 2] + UINT64_C(5000000000));
    for (int i = 1; i < HKV_HIST_BUCKETS - 1; i++)
        CHECK(hkv_hist_bounds_ns[i] > hkv_hist_bounds_ns[i - 1]);
    uint64_t t0 = hkv_now_ns(), t1 = hkv_now_ns();
    CHECK(t0 > 0 && t1 >= t0);

    hkv_config cfg = cfg_small(1, 4, 16, 4, 64);
    hkv_cache *c;
    hkv_batch *b = NULL;
    hkv_stats st;
    req r;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 5);
    CHECK(req_round(c, &r) == 0);
    CHECK(req_round(c, &r) == 0);
    CHECK_ST(hkv_cache_lookup(c, -1, NULL, NULL, NULL, 0, NULL, NULL), HKV_EINVAL);
    CHECK_OK(req_lookup(c, &r));
    CHECK_OK(hkv_cache_evict(c, 1, (const int64_t[]){1}, HKV_TIER_ALL, 0, NULL));
    CHECK_ST(req_allocate(c, &r, &b), HKV_ESTALE);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.lookup_latency.count, 3);       /* failed calls not counted */
    CHECK_EQ(st.allocate_latency.count, 2);
    uint64_t sum = 0;
    for (int i = 0; i < HKV_HIST_BUCKETS; i++)
        sum += st.allocate_latency.counts[i];
    CHECK_EQ(sum, 2);
    hkv_cache_destroy(c);
}

/*
 * Several threads on one cache: each drives its own users through full
 * rounds while the others' allocations evict (LRU) around them and one
 * thread keeps checking the invariants.  Under ASan this catches a missing
 * lock as a crash or a corrupted structure; contents are checked through
 * each batch's own read (pinned users cannot change under it).  A stale
 * lookup (another thread evicted the user) is retried.
 */
enum { TH_WORKERS = 4, TH_ROUNDS = 150 };

typedef struct th_arg {
    hkv_cache *c;
    int id;
    int failed;          /* 1: a check failed (reported by the main thread) */
    atomic_int stop;     /* checker: set by the main thread when done */
} th_arg;

static void *th_worker(void *p)
{
    th_arg *a = p;
    test_rng r = {(uint64_t)a->id * 7 + 1};
    for (int round = 0; round < TH_ROUNDS && !a->failed; round++) {
        req q;
        hkv_batch *b = NULL;
        req_init(&q);
        req_add(&q, a->id * 100 + rng_below(&r, 3), rng_range(&r, 0, 16));
        req_add(&q, a->id * 100 + 3 + rng_below(&r, 3), rng_range(&r, 1, 16));
        hkv_status st;
        do {
            if (req_lookup(a->c, &q) != HKV_OK) {
                a->failed = 1;
                return NULL;
            }
            st = req_allocate(a->c, &q, &b);
        } while (st == HKV_ESTALE);
        if (st != HKV_OK || req_append_all(a->c, b, &q) != HKV_OK) {
            a->failed = 1;
            if (b != NULL)
                hkv_batch_free(b);
            return NULL;
        }
        /* req_check_read reports through test_fail, which is not thread
         * safe: compare quietly here instead. */
        const hkv_config *cfg = hkv_cache_config(a->c);
        int64_t total = q.lens[0] + q.lens[1], hd = cfg->num_heads * cfg->head_dim;
        float k[32 * 6], v[32 * 6];
        int32_t bi[32], pos[32];
        hkv_tensor tk = t_rows3(k, total, 2, 3, hd), tv = t_rows3(v, total, 2, 3, hd);
        hkv_tensor tb = t_i32(bi, total), tp = t_i32(pos, total);
        int32_t layer = (int32_t)rng_below(&r, cfg->num_layers);
        if (hkv_batch_read(b, layer, &tk, &tv, &tb, &tp, NULL) != HKV_OK)
            a->failed = 1;
        for (int64_t t = 0; t < total && !a->failed; t++)
            for (int64_t e = 0; e < hd; e++)
                if (k[t * hd + e] != kv_val(q.keys[t], layer, 0, e) ||
                    v[t * hd + e] != kv_val(q.keys[t], layer, 1, e))
                    a->failed = 1;
        hkv_batch_free(b);
    }
    return NULL;
}

static void *th_checker(void *p)
{
    th_arg *a = p;
    int n = 0;
    while (!atomic_load(&a->stop) && !a->failed) {
        hkv_stats st;
        hkv_cache_stats(a->c, &st);
        if (hkv_cache_check(a->c) != HKV_OK || st.pages_used + st.pages_free !=
                                                    st.pages_total)
            a->failed = 1;
        if (++n % 50 == 0)
            (void)hkv_cache_evict(a->c, 1, (const int64_t[]){(n / 50 % 4) * 100}, HKV_TIER_ALL, 0, NULL);
    }
    return NULL;
}

static void test_cache_threads(void)
{
    hkv_config cfg = cfg_small(2, 4, 40, 2, 16);
    cfg.max_open_batches = TH_WORKERS;
    hkv_cache *c;
    pthread_t th[TH_WORKERS + 1];
    th_arg args[TH_WORKERS + 1];
    CREATE(&cfg, &c);
    memset(args, 0, sizeof args);
    for (int i = 0; i <= TH_WORKERS; i++) {
        args[i].c = c;
        args[i].id = i;
        atomic_init(&args[i].stop, 0);
        CHECK_EQ(pthread_create(&th[i], NULL, i < TH_WORKERS ? th_worker : th_checker,
                                &args[i]), 0);
    }
    for (int i = 0; i < TH_WORKERS; i++)
        pthread_join(th[i], NULL);
    atomic_store(&args[TH_WORKERS].stop, 1);
    pthread_join(th[TH_WORKERS], NULL);
    for (int i = 0; i <= TH_WORKERS; i++)
        if (args[i].failed)
            test_fail(__FILE__, __LINE__, "thread %d failed", i);
    CHECK(!hkv_test_failed);
    hkv_stats st;
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.open_batches, 0);
    CHECK_EQ(st.pages_pinned, 0);
    CHECK_EQ(st.batches_committed, st.batches_allocated);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* Early reuse: a batch continues one still appending, reads its layers
 * once appended, and fails (nothing read) when the earlier one is released
 * unfinished; the cache rolls back to the committed tokens. */
static void test_cache_early_reuse_chain(void)
{
    hkv_config cfg = cfg_small(2, 4, 16, 4, 64);
    cfg.early_reuse = 1;
    hkv_cache *c;
    hkv_batch *x, *y, *z;
    req rx, ry, rz;
    CREATE(&cfg, &c);
    req_init(&rx);
    req_add(&rx, 1, 6);
    CHECK_OK(req_lookup(c, &rx));
    CHECK_OK(req_allocate(c, &rx, &x));
    req_init(&ry);
    req_add(&ry, 1, 10);
    CHECK_OK(req_lookup(c, &ry));
    CHECK_EQ(ry.cached[0], 6);
    CHECK_OK(req_allocate(c, &ry, &y));
    CHECK_CACHE(c);
    /* y's layer 0 before x's: refused, nothing written */
    CHECK_ST(req_append(c, y, &ry, 0, 1, 0, 0), HKV_EBUSY);
    CHECK_OK(req_append(c, x, &rx, 0, 1, 0, 0));
    CHECK_OK(req_append(c, y, &ry, 0, 1, 0, 0));
    CHECK(req_check_read(c, y, &ry, 0) == 0);
    /* x finishes, then y */
    CHECK_OK(req_append(c, x, &rx, 1, 1, 0, 0));
    CHECK_OK(req_append(c, y, &ry, 1, 1, 0, 0));
    CHECK(req_check_read(c, y, &ry, 1) == 0);
    hkv_batch_free(x);
    hkv_batch_free(y);
    CHECK(check_user_default(c, 1, 10) == 0);
    CHECK_CACHE(c);

    /* a chain whose first batch is released unfinished */
    req_init(&rx);
    req_add(&rx, 1, 14);
    CHECK_OK(req_lookup(c, &rx));
    CHECK_OK(req_allocate(c, &rx, &x));
    req_init(&ry);
    req_add(&ry, 1, 18);
    CHECK_OK(req_lookup(c, &ry));
    CHECK_OK(req_allocate(c, &ry, &y));
    req_init(&rz);
    req_add(&rz, 1, 20);
    CHECK_OK(req_lookup(c, &rz));
    CHECK_EQ(rz.cached[0], 18);
    CHECK_ST(req_allocate(c, &rz, &z), HKV_EBUSY);      /* two in flight */
    CHECK_OK(req_append(c, x, &rx, 0, 1, 0, 0));
    hkv_batch_free(x);                                  /* unfinished */
    CHECK_CACHE(c);
    CHECK_ST(req_append(c, y, &ry, 0, 1, 0, 0), HKV_ESTALE);
    CHECK_ST(req_lookup(c, &rz), HKV_OK);
    CHECK_EQ(rz.cached[0], 10);                         /* only committed */
    CHECK_ST(req_allocate(c, &rz, &z), HKV_EBUSY);      /* chain broken */
    hkv_batch_free(y);
    CHECK_CACHE(c);
    CHECK(check_user_default(c, 1, 10) == 0);
    CHECK_OK(req_lookup(c, &rz));
    CHECK_OK(req_allocate(c, &rz, &z));
    CHECK_OK(req_append_all(c, z, &rz));
    hkv_batch_free(z);
    CHECK(check_user_default(c, 1, 20) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

/* prefetch on the CPU path: host pages come back, skipped users change
 * nothing, a full GPU tier without host copies drops the hint. */
static void test_cache_prefetch(void)
{
    hkv_config cfg = cfg_small(2, 4, 8, 4, 64);
    cfg.host_pages = 16;
    hkv_cache *c;
    req r;
    hkv_stats st;
    int32_t started = -1;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 16);
    CHECK(req_round(c, &r) == 0);
    int64_t one = 1, gpu = -1, host = -1, disk = -1;
    CHECK_OK(hkv_cache_evict(c, 1, &one, HKV_TIER_GPU, 1, NULL));
    hkv_cache_user_tiers(c, 1, &gpu, &host, &disk);
    CHECK_EQ(gpu, 0);
    CHECK_EQ(host, 16);
    CHECK_ST(hkv_cache_prefetch(c, 5, (const int64_t[]){1, 1, 2, 3, 4}, NULL, &started),
             HKV_EINVAL);                              /* more than max_batch_size */
    CHECK_OK(hkv_cache_prefetch(c, 3, (const int64_t[]){2, 1, 1}, NULL, &started));
    CHECK_EQ(started, 1);                              /* unknown and duplicate skipped */
    hkv_cache_user_tiers(c, 1, &gpu, &host, &disk);
    CHECK_EQ(gpu, 16);
    CHECK_EQ(disk, 0);
    CHECK(check_user_default(c, 1, 16) == 0);
    CHECK_CACHE(c);
    /* GPU full of pages without host copies: no room, nothing evicted */
    CHECK_OK(hkv_cache_evict(c, 1, &one, HKV_TIER_GPU, 0, NULL));
    req_init(&r);
    req_add(&r, 2, 32);
    CHECK(req_round(c, &r) == 0);
    hkv_cache_stats(c, &st);
    uint64_t evicted = st.pages_evicted;
    CHECK_OK(hkv_cache_prefetch(c, 1, &one, NULL, &started));
    CHECK_EQ(started, 0);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.pages_evicted, evicted);
    CHECK_EQ(st.prefetch_dropped, 1);
    CHECK(check_user_default(c, 2, 32) == 0);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
}

void run_cache_tests(void)
{
    RUN(test_cache_config_invalid);
    RUN(test_cache_metadata_first_batch);
    RUN(test_cache_metadata_growth_and_candidates);
    RUN(test_cache_append_forms_roundtrip);
    RUN(test_cache_eviction_lru_tail_first);
    RUN(test_cache_full_unchanged);
    RUN(test_cache_stale);
    RUN(test_cache_batch_einval);
    RUN(test_cache_append_read_args);
    RUN(test_cache_busy);
    RUN(test_cache_early_reuse_chain);
    RUN(test_cache_prefetch);
    RUN(test_cache_abort_rollback);
    RUN(test_cache_verified_rewrite);
    RUN(test_cache_verified_busy_rewrite);
    RUN(test_cache_read_user_args);
    RUN(test_cache_evict_explicit);
    RUN(test_cache_empty_batches);
    RUN(test_cache_open_batch_limit);
    RUN(test_cache_destroy_with_open_batches);
    RUN(test_cache_create_enomem);
    RUN(test_cache_copy_pages);
    RUN(test_cache_latency_histograms);
    RUN(test_cache_threads);
    RUN(test_table_size_overflow);
}
