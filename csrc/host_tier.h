/*
 * host_tier.h - the host tier: pinned host pages below the GPU tier.
 *
 * Its table has the GPU table's layout, [num_layers, num_pages, 2,
 * page_size, H, D], in pinned memory on CUDA (plain memory on the CPU
 * path), so a page moves between tiers with the same page geometry.
 * Pages are handed out in address order from a next-fit cursor: a fresh
 * pool gives a user one run of consecutive pages (large DMA pieces), a
 * fragmented pool still works, page by page.
 *
 * Each user's host pages form a chain (like its GPU pages) covering a
 * prefix of its history; host pages are always full.
 */
#ifndef HKV_HOST_TIER_H
#define HKV_HOST_TIER_H

#include <stdint.h>

#include "memory.h"
#include "page_pool.h"
#include "status.h"
#include "token_filter.h"
#include "user_index.h"

#define HKV_ZOMBIE (-2)   /* owner of a dropped page still read by a copy */

typedef struct hkv_host_tier {
    hkv_buffer *table;
    void *table_dev;          /* the table's device address (CUDA), else ptr */
    hkv_page *pages;          /* owner / prev / next / pins per page      */
    uint64_t *free_bits;      /* 1 = free                                 */
    int32_t *writes;          /* offloads in flight writing each page: an
                                 onboard reading such a page waits for them */
    int32_t num_pages;
    int32_t num_free;
    int32_t cursor;           /* next-fit start                           */
    hkv_token_filter keys;    /* keys of host pages (verified mode)       */
} hkv_host_tier;

hkv_status hkv_host_tier_init(hkv_host_tier *ht, int32_t num_pages, size_t table_bytes,
                              hkv_mem_kind kind, int device, int32_t page_size,
                              int verify);
void hkv_host_tier_free_all(hkv_host_tier *ht);

/* A free page for `owner` at or after the cursor (wrapping); -1 if none. */
int32_t hkv_host_alloc(hkv_host_tier *ht, int32_t owner);
/* Free a page, or mark it a zombie while a copy still reads it (pins). */
void hkv_host_release(hkv_host_tier *ht, int32_t page);
/* Drop one pin; frees a zombie whose last pin this was. */
void hkv_host_unpin(hkv_host_tier *ht, int32_t page);

/* The user's host chain (host_head / host_tail / host_pages). */
void hkv_host_push(hkv_host_tier *ht, hkv_user *u, int32_t page);
int32_t hkv_host_pop(hkv_host_tier *ht, hkv_user *u);
/* The host page of the user's page index `ix` (walks the chain). */
int32_t hkv_host_page_at(const hkv_host_tier *ht, const hkv_user *u, int64_t ix);

#endif /* HKV_HOST_TIER_H */
