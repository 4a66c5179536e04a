/*
 * page_pool.c - free list of pages.
 *
 * Pages are handed out lowest id first on a fresh pool, which keeps early
 * batches' pages contiguous in memory; after that the free list is LIFO, so
 * a page freed a moment ago (likely still in cache) is reused first.
 */
#include "page_pool.h"

#include <stdlib.h>

hkv_status hkv_page_pool_init(hkv_page_pool *pool, int32_t num_pages)
{
    pool->pages = NULL;
    pool->num_pages = 0;
    pool->num_free = 0;
    pool->free_head = HKV_NO_PAGE;
    if (num_pages <= 0)
        return hkv_error(HKV_EINVAL, "num_pages must be positive, got %d",
                         (int)num_pages);
    pool->pages = calloc((size_t)num_pages, sizeof *pool->pages);
    if (pool->pages == NULL)
        return hkv_error(HKV_ENOMEM, "cannot allocate bookkeeping for %d pages",
                         (int)num_pages);
    for (int32_t i = 0; i < num_pages; i++) {
        pool->pages[i].owner = -1;
        pool->pages[i].prev = HKV_NO_PAGE;
        pool->pages[i].next = i + 1 < num_pages ? i + 1 : HKV_NO_PAGE;
        pool->pages[i].pins = 0;
    }
    pool->num_pages = num_pages;
    pool->num_free = num_pages;
    pool->free_head = 0;
    return HKV_OK;
}

void hkv_page_pool_free_all(hkv_page_pool *pool)
{
    free(pool->pages);
    pool->pages = NULL;
    pool->num_pages = pool->num_free = 0;
    pool->free_head = HKV_NO_PAGE;
}

int32_t hkv_page_alloc(hkv_page_pool *pool, int32_t owner)
{
    int32_t page = pool->free_head;
    if (page == HKV_NO_PAGE)
        return HKV_NO_PAGE;
    hkv_page *p = &pool->pages[page];
    pool->free_head = p->next;
    pool->num_free--;
    p->owner = owner;
    p->prev = p->next = HKV_NO_PAGE;
    /* pins is left alone: a page dropped while a copy still reads it keeps
     * its count until the copy is reaped, whoever owns it by then (its
     * new owner's writers are ordered after that copy). */
    return page;
}

void hkv_page_release(hkv_page_pool *pool, int32_t page)
{
    hkv_page *p = &pool->pages[page];
    p->owner = -1;
    p->prev = HKV_NO_PAGE;
    p->next = pool->free_head;
    pool->free_head = page;
    pool->num_free++;
}
