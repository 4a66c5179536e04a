/*
 * token_filter.h - verified mode: which cached tokens are still valid.
 *
 * In trust mode (recsys-examples semantics) histories are append-only and
 * the cached prefix is min(cached length, history length).  In verified
 * mode the caller gives one 64-bit key per history token (item, action and
 * time folded together) and only the longest prefix whose keys equal the
 * keys stored with the pages is reused: a rewritten or truncated history
 * costs a recompute, never a wrong answer.
 *
 * Keys are stored exactly (8 bytes per token, next to tens of KiB of K/V per
 * token) and compared exactly, so there is no hash collision to fear.  Each
 * full page also gets a fingerprint chained with its predecessor's, which
 * names a whole prefix in one word: the identity lower tiers store with a
 * page's record.
 */
#ifndef HKV_TOKEN_FILTER_H
#define HKV_TOKEN_FILTER_H

#include <stdint.h>

#include "page_pool.h"
#include "status.h"
#include "user_index.h"

typedef struct hkv_token_filter {
    int64_t *keys;            /* [num_pages * page_size]                  */
    uint64_t *fingerprints;   /* [num_pages], valid for full pages         */
    int32_t page_size;
    int32_t enabled;
} hkv_token_filter;

hkv_status hkv_token_filter_init(hkv_token_filter *tf, int32_t num_pages,
                                 int32_t page_size, int enabled);
void hkv_token_filter_free_all(hkv_token_filter *tf);

/* Chained fingerprint of n keys following a page whose fingerprint is prev
 * (0 for the first page). */
uint64_t hkv_fingerprint(uint64_t prev, const int64_t *keys, int32_t n);

/* Number of leading tokens of keys[0..n) equal to the keys stored with the
 * chain of pages starting at `head` (links in `pages`); n must not exceed
 * the tokens the chain holds. */
int64_t hkv_filter_match(const hkv_token_filter *tf, const hkv_page *pages, int32_t head,
                         const int64_t *keys, int64_t n);

/* Copy one page's keys and fingerprint between filters (tier moves). */
void hkv_filter_copy_page(const hkv_token_filter *from, int32_t from_page,
                          hkv_token_filter *to, int32_t to_page);

/* Store keys[from..to) (indexed by history position) into the user's pages,
 * which must already cover position to-1, and fingerprint pages that
 * become full. */
void hkv_filter_store(hkv_token_filter *tf, const hkv_page_pool *pool,
                      const hkv_user *u, const int64_t *keys, int64_t from,
                      int64_t to);

#endif /* HKV_TOKEN_FILTER_H */
