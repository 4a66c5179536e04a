/*
 * user_index.h - the per-user index: user id -> cached history and pages.
 *
 * Users live in a fixed array of slots; an open-addressing hash table maps
 * ids to slots; a doubly linked list through the slots keeps them in least
 * recently used order (head = least recent), which eviction walks.
 *
 * A user's pages form a chain through the page pool (page_pool.h), head =
 * history tokens 0..page_size-1.  Only the tail page may be partly filled.
 *
 * `length` counts the tokens whose K/V are complete for every layer: only
 * those are ever reported as cached.  `reserved` (>= length) also counts
 * tokens that an open batch has pages for but is still writing.  `epoch`
 * changes whenever cached tokens are dropped (eviction, truncation), so a
 * lookup result taken before can be detected as stale.
 */
#ifndef HKV_USER_INDEX_H
#define HKV_USER_INDEX_H

#include <stdint.h>

#include "page_pool.h"
#include "status.h"

#define HKV_NO_USER (-1)

typedef struct hkv_user {
    int64_t id;
    int64_t length;     /* tokens with complete K/V                        */
    int64_t reserved;   /* tokens with pages (>= length)                   */
    uint64_t epoch;     /* bumped when cached tokens are dropped           */
    int32_t head_page;  /* GPU tier chain: pages 0 .. num_pages-1          */
    int32_t tail_page;
    int32_t num_pages;
    int32_t host_head;  /* host tier chain: full pages 0 .. host_pages-1   */
    int32_t host_tail;
    int32_t host_pages;
    int32_t pins;       /* open batches holding this user                  */
    int32_t filling;    /* uncommitted batches writing its tokens (0..2):
                           a batch may continue one still in flight       */
    int32_t broken;     /* a filling batch was released unfinished while a
                           later one continues it: the later one's tokens
                           are dropped when it ends                       */
    void *fill_batch;   /* the last batch filling this user, and its      */
    uint32_t fill_gen;  /* block generation                               */
    int32_t lru_prev;
    int32_t lru_next;
    int32_t in_use;     /* slot holds a user                               */
    uint64_t prefetch;  /* seq of a prefetch still copying pages in, or 0  */
    int32_t disk_pages; /* leading pages known to be on the disk tier      */
    int32_t disk_admitted; /* requests seen reached disk_admit_after      */
} hkv_user;

typedef struct hkv_user_index {
    hkv_user *users;
    int32_t capacity;       /* number of slots                             */
    int32_t count;          /* slots in use                                */
    int32_t free_head;      /* free slots, linked through lru_next          */
    int32_t lru_head;       /* least recently used                          */
    int32_t lru_tail;       /* most recently used                           */
    int32_t *table;         /* hash table of slot numbers, -1 = empty       */
    uint32_t table_mask;    /* table size - 1 (power of two)               */
    uint64_t next_epoch;    /* epochs are unique across users and time     */
} hkv_user_index;

hkv_status hkv_user_index_init(hkv_user_index *ix, int32_t capacity);
void hkv_user_index_free_all(hkv_user_index *ix);

/* Slot of `id`, or HKV_NO_USER. */
int32_t hkv_user_find(const hkv_user_index *ix, int64_t id);

/* Slot of `id`, created (empty, most recently used) if absent.
 * HKV_NO_USER only when every slot is in use. */
int32_t hkv_user_find_or_add(hkv_user_index *ix, int64_t id);

/* Remove a user that owns no pages and is not pinned. */
void hkv_user_remove(hkv_user_index *ix, int32_t slot);

/* Mark a user most recently used. */
void hkv_user_touch(hkv_user_index *ix, int32_t slot);

/* Give the user a fresh epoch (its cached tokens changed). */
static inline void hkv_user_new_epoch(hkv_user_index *ix, hkv_user *u)
{
    u->epoch = ix->next_epoch++;
}

/* Page chain edits. */
void hkv_user_push_page(hkv_page_pool *pool, hkv_user *u, int32_t page);
int32_t hkv_user_pop_page(hkv_page_pool *pool, hkv_user *u);

static inline int64_t hkv_div_up(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

#endif /* HKV_USER_INDEX_H */
