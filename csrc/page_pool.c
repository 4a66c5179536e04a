/*
 * page_pool.c - the free pages of a tier, as a bitmap searched next-fit.
 *
 * A bitmap rather than a free list because the order pages come out in
 * matters for transfers: next fit hands out pages in address order, so the
 * pages a user gets in one allocation (and the pages freed together by an
 * eviction, then reused together) form runs of consecutive ids.  A run of
 * one layer is one contiguous piece of memory, which the transfer engine
 * copies with a single DMA instead of a kernel per page (transfer.c).
 * The search skips 64 pages per word; with a cursor it is amortized O(1)
 * per page while the pool has free space ahead of the cursor.
 */
#include "page_pool.h"

#include <stdlib.h>

hkv_status hkv_page_pool_init(hkv_page_pool *pool, int32_t num_pages)
{
    pool->pages = NULL;
    pool->free_bits = NULL;
    pool->num_pages = 0;
    pool->num_free = 0;
    pool->cursor = 0;
    if (num_pages <= 0)
        return hkv_error(HKV_EINVAL, "num_pages must be positive, got %d",
                         (int)num_pages);
    size_t words = ((size_t)num_pages + 63) / 64;
    pool->pages = calloc((size_t)num_pages, sizeof *pool->pages);
    pool->free_bits = calloc(words, sizeof *pool->free_bits);
    if (pool->pages == NULL || pool->free_bits == NULL) {
        hkv_page_pool_free_all(pool);
        return hkv_error(HKV_ENOMEM, "cannot allocate bookkeeping for %d pages",
                         (int)num_pages);
    }
    for (int32_t i = 0; i < num_pages; i++) {
        pool->pages[i].owner = -1;
        pool->pages[i].prev = HKV_NO_PAGE;
        pool->pages[i].next = HKV_NO_PAGE;
        pool->pages[i].pins = 0;
        pool->free_bits[i / 64] |= 1ull << (i % 64);
    }
    pool->num_pages = num_pages;
    pool->num_free = num_pages;
    return HKV_OK;
}

void hkv_page_pool_free_all(hkv_page_pool *pool)
{
    free(pool->pages);
    free(pool->free_bits);
    pool->pages = NULL;
    pool->free_bits = NULL;
    pool->num_pages = pool->num_free = 0;
    pool->cursor = 0;
}

int32_t hkv_page_alloc(hkv_page_pool *pool, int32_t owner)
{
    if (pool->num_free == 0)
        return HKV_NO_PAGE;
    int32_t words = (pool->num_pages + 63) / 64;
    int32_t w = pool->cursor / 64;
    uint64_t mask = ~0ull << (pool->cursor % 64);
    for (int32_t k = 0; k <= words; k++) {
        uint64_t bits = pool->free_bits[w] & mask;
        if (bits != 0) {
            int32_t page = w * 64 + __builtin_ctzll(bits);
            pool->free_bits[w] &= ~(1ull << (page % 64));
            pool->num_free--;
            pool->cursor = page + 1 < pool->num_pages ? page + 1 : 0;
            hkv_page *p = &pool->pages[page];
            p->owner = owner;
            p->prev = p->next = HKV_NO_PAGE;
            /* pins is left alone: a page dropped while a copy still reads
             * it keeps its count until the copy is reaped, whoever owns it
             * by then (its new owner's writers are ordered after that
             * copy). */
            return page;
        }
        w = w + 1 < words ? w + 1 : 0;
        mask = ~0ull;
    }
    return HKV_NO_PAGE;  /* not reached: num_free > 0 */
}

void hkv_page_release(hkv_page_pool *pool, int32_t page)
{
    hkv_page *p = &pool->pages[page];
    p->owner = -1;
    p->prev = p->next = HKV_NO_PAGE;
    pool->free_bits[page / 64] |= 1ull << (page % 64);
    pool->num_free++;
}

int hkv_page_is_free(const hkv_page_pool *pool, int32_t page)
{
    return (pool->free_bits[page / 64] >> (page % 64)) & 1;
}
