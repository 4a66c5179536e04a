/*
 * page_pool.h - a fixed set of pages: alloc (next fit, in address order)
 * and free.
 *
 * The pool only does bookkeeping; the bytes of a page live in the tier's
 * page table (memory.h).  Each page also carries the links of its owner's
 * page chain (head to tail, history order), so a user's pages need no
 * separate array, and a pin count: a pinned page is never freed by
 * eviction (a transfer reading or writing it is in flight).
 *
 * All storage is allocated once by hkv_page_pool_init; alloc and free touch
 * no allocator.
 */
#ifndef HKV_PAGE_POOL_H
#define HKV_PAGE_POOL_H

#include <stdint.h>

#include "status.h"

#define HKV_NO_PAGE (-1)

typedef struct hkv_page {
    int32_t owner;   /* user slot, or -1 while free                       */
    int32_t prev;    /* previous page of the owner's chain, or -1         */
    int32_t next;    /* next page of the chain, or -1                     */
    int32_t pins;    /* transfers in flight reading this page (a count that
                        survives a change of owner)                       */
} hkv_page;

typedef struct hkv_page_pool {
    hkv_page *pages;
    int32_t num_pages;
    int32_t num_free;
    int32_t cursor;     /* next-fit start                                 */
    uint64_t *free_bits;  /* 1 = free                                      */
} hkv_page_pool;

hkv_status hkv_page_pool_init(hkv_page_pool *pool, int32_t num_pages);
void hkv_page_pool_free_all(hkv_page_pool *pool);

/* Take a free page for `owner`, the first free one at or after the cursor
 * (wrapping), so successive calls give consecutive ids where the pool
 * allows; HKV_NO_PAGE when none is free. */
int32_t hkv_page_alloc(hkv_page_pool *pool, int32_t owner);

/* Return a page to the pool.  The caller has unlinked it already. */
void hkv_page_release(hkv_page_pool *pool, int32_t page);

/* 1 if the page is free (for the invariant checker). */
int hkv_page_is_free(const hkv_page_pool *pool, int32_t page);

static inline int32_t hkv_page_pool_used(const hkv_page_pool *pool)
{
    return pool->num_pages - pool->num_free;
}

#endif /* HKV_PAGE_POOL_H */
