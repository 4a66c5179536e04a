/*
 * token_filter.c - exact key storage and prefix matching.
 */
#include "token_filter.h"

#include <stdlib.h>
#include <string.h>

hkv_status hkv_token_filter_init(hkv_token_filter *tf, int32_t num_pages,
                                 int32_t page_size, int enabled)
{
    tf->keys = NULL;
    tf->fingerprints = NULL;
    tf->page_size = page_size;
    tf->enabled = enabled;
    if (!enabled)
        return HKV_OK;
    tf->keys = malloc((size_t)num_pages * (size_t)page_size * sizeof *tf->keys);
    tf->fingerprints = calloc((size_t)num_pages, sizeof *tf->fingerprints);
    if (tf->keys == NULL || tf->fingerprints == NULL) {
        hkv_token_filter_free_all(tf);
        return hkv_error(HKV_ENOMEM, "cannot allocate token keys for %d pages",
                         (int)num_pages);
    }
    return HKV_OK;
}

void hkv_token_filter_free_all(hkv_token_filter *tf)
{
    free(tf->keys);
    free(tf->fingerprints);
    tf->keys = NULL;
    tf->fingerprints = NULL;
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

uint64_t hkv_fingerprint(uint64_t prev, const int64_t *keys, int32_t n)
{
    uint64_t h = mix64(prev ^ 0x9e3779b97f4a7c15ULL);
    for (int32_t i = 0; i < n; i++)
        h = mix64(h ^ (uint64_t)keys[i]) + 0x9e3779b97f4a7c15ULL * (uint64_t)(i + 1);
    return mix64(h ^ (uint64_t)n);
}

int64_t hkv_filter_match(const hkv_token_filter *tf, const hkv_page *pages, int32_t head,
                         const int64_t *keys, int64_t n)
{
    const int32_t ps = tf->page_size;
    int64_t matched = 0;
    for (int32_t page = head; page != HKV_NO_PAGE && matched < n;
         page = pages[page].next) {
        int64_t m = n - matched < ps ? n - matched : ps;
        const int64_t *stored = tf->keys + (int64_t)page * ps;
        if (memcmp(stored, keys + matched, (size_t)m * sizeof *keys) == 0) {
            matched += m;
            continue;
        }
        int64_t i = 0;
        while (i < m && stored[i] == keys[matched + i])
            i++;
        matched += i;
        break;
    }
    return matched;
}

void hkv_filter_store(hkv_token_filter *tf, const hkv_page_pool *pool,
                      const hkv_user *u, const int64_t *keys, int64_t from,
                      int64_t to)
{
    if (!tf->enabled || from >= to)
        return;
    const int32_t ps = tf->page_size;
    /* The positions are at the user's tail: walk back from there. */
    int64_t first_page_ix = from / ps;
    int64_t ix = u->num_pages - 1;
    int32_t page = u->tail_page;
    while (ix > first_page_ix) {
        page = pool->pages[page].prev;
        ix--;
    }
    int32_t prev_page = pool->pages[page].prev;
    uint64_t prev_fp = prev_page == HKV_NO_PAGE ? 0 : tf->fingerprints[prev_page];
    for (int64_t pos = from; pos < to; page = pool->pages[page].next, ix++) {
        int64_t page_start = ix * ps;
        int64_t end = page_start + ps < to ? page_start + ps : to;
        memcpy(tf->keys + (int64_t)page * ps + (pos - page_start), keys + pos,
               (size_t)(end - pos) * sizeof *keys);
        if (end == page_start + ps) {
            prev_fp = hkv_fingerprint(prev_fp, tf->keys + (int64_t)page * ps, ps);
            tf->fingerprints[page] = prev_fp;
        }
        pos = end;
    }
}

void hkv_filter_copy_page(const hkv_token_filter *from, int32_t from_page,
                          hkv_token_filter *to, int32_t to_page)
{
    if (!from->enabled || !to->enabled)
        return;
    memcpy(to->keys + (int64_t)to_page * to->page_size,
           from->keys + (int64_t)from_page * from->page_size,
           (size_t)to->page_size * sizeof *to->keys);
    to->fingerprints[to_page] = from->fingerprints[from_page];
}
