/*
 * user_index.c - hash table, slots and LRU list of users.
 *
 * The hash table uses linear probing with backward-shift deletion (no
 * tombstones), sized to at least twice the slots so probes stay short.
 */
#include "user_index.h"

#include <stdlib.h>

static uint32_t hash_id(int64_t id)
{
    /* splitmix64 finaliser: ids are often sequential, spread them out */
    uint64_t x = (uint64_t)id;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return (uint32_t)x;
}

hkv_status hkv_user_index_init(hkv_user_index *ix, int32_t capacity)
{
    ix->users = NULL;
    ix->table = NULL;
    if (capacity <= 0 || capacity > (1 << 29))
        return hkv_error(HKV_EINVAL, "user capacity %d out of range",
                         (int)capacity);
    uint32_t size = 16;
    while (size < 2u * (uint32_t)capacity)
        size <<= 1;
    ix->users = calloc((size_t)capacity, sizeof *ix->users);
    ix->table = malloc((size_t)size * sizeof *ix->table);
    if (ix->users == NULL || ix->table == NULL) {
        hkv_user_index_free_all(ix);
        return hkv_error(HKV_ENOMEM, "cannot allocate the index of %d users",
                         (int)capacity);
    }
    for (uint32_t i = 0; i < size; i++)
        ix->table[i] = HKV_NO_USER;
    for (int32_t i = 0; i < capacity; i++) {
        ix->users[i].in_use = 0;
        ix->users[i].lru_next = i + 1 < capacity ? i + 1 : HKV_NO_USER;
    }
    ix->capacity = capacity;
    ix->count = 0;
    ix->free_head = 0;
    ix->lru_head = ix->lru_tail = HKV_NO_USER;
    ix->table_mask = size - 1;
    ix->next_epoch = 1;
    return HKV_OK;
}

void hkv_user_index_free_all(hkv_user_index *ix)
{
    free(ix->users);
    free(ix->table);
    ix->users = NULL;
    ix->table = NULL;
    ix->capacity = ix->count = 0;
}

int32_t hkv_user_find(const hkv_user_index *ix, int64_t id)
{
    uint32_t i = hash_id(id) & ix->table_mask;
    for (;;) {
        int32_t slot = ix->table[i];
        if (slot == HKV_NO_USER)
            return HKV_NO_USER;
        if (ix->users[slot].id == id)
            return slot;
        i = (i + 1) & ix->table_mask;
    }
}

static void lru_unlink(hkv_user_index *ix, int32_t slot)
{
    hkv_user *u = &ix->users[slot];
    if (u->lru_prev != HKV_NO_USER)
        ix->users[u->lru_prev].lru_next = u->lru_next;
    else
        ix->lru_head = u->lru_next;
    if (u->lru_next != HKV_NO_USER)
        ix->users[u->lru_next].lru_prev = u->lru_prev;
    else
        ix->lru_tail = u->lru_prev;
    u->lru_prev = u->lru_next = HKV_NO_USER;
}

static void lru_push_tail(hkv_user_index *ix, int32_t slot)
{
    hkv_user *u = &ix->users[slot];
    u->lru_next = HKV_NO_USER;
    u->lru_prev = ix->lru_tail;
    if (ix->lru_tail != HKV_NO_USER)
        ix->users[ix->lru_tail].lru_next = slot;
    else
        ix->lru_head = slot;
    ix->lru_tail = slot;
}

int32_t hkv_user_find_or_add(hkv_user_index *ix, int64_t id)
{
    uint32_t i = hash_id(id) & ix->table_mask;
    for (;;) {
        int32_t slot = ix->table[i];
        if (slot == HKV_NO_USER)
            break;
        if (ix->users[slot].id == id)
            return slot;
        i = (i + 1) & ix->table_mask;
    }
    int32_t slot = ix->free_head;
    if (slot == HKV_NO_USER)
        return HKV_NO_USER;
    hkv_user *u = &ix->users[slot];
    ix->free_head = u->lru_next;
    u->id = id;
    u->length = u->reserved = 0;
    u->head_page = u->tail_page = HKV_NO_PAGE;
    u->num_pages = 0;
    u->host_head = u->host_tail = HKV_NO_PAGE;
    u->host_pages = 0;
    u->pins = 0;
    u->filling = 0;
    u->broken = 0;
    u->fill_batch = NULL;
    u->fill_gen = 0;
    u->prefetch = 0;
    u->disk_pages = 0;
    u->disk_admitted = 0;
    u->in_use = 1;
    hkv_user_new_epoch(ix, u);
    ix->table[i] = slot;
    ix->count++;
    lru_push_tail(ix, slot);
    return slot;
}

void hkv_user_remove(hkv_user_index *ix, int32_t slot)
{
    hkv_user *u = &ix->users[slot];
    uint32_t i = hash_id(u->id) & ix->table_mask;
    while (ix->table[i] != slot)
        i = (i + 1) & ix->table_mask;
    /* Backward-shift: move later entries of the probe run into the hole so
     * lookups never stop early at an empty bucket. */
    uint32_t hole = i;
    uint32_t j = i;
    for (;;) {
        j = (j + 1) & ix->table_mask;
        int32_t s = ix->table[j];
        if (s == HKV_NO_USER)
            break;
        uint32_t home = hash_id(ix->users[s].id) & ix->table_mask;
        /* s may move to the hole if its home is not in (hole, j]. */
        int movable = hole <= j ? (home <= hole || home > j)
                                : (home <= hole && home > j);
        if (movable) {
            ix->table[hole] = s;
            hole = j;
        }
    }
    ix->table[hole] = HKV_NO_USER;
    lru_unlink(ix, slot);
    u->in_use = 0;
    u->lru_next = ix->free_head;
    ix->free_head = slot;
    ix->count--;
}

void hkv_user_touch(hkv_user_index *ix, int32_t slot)
{
    if (ix->lru_tail == slot)
        return;
    lru_unlink(ix, slot);
    lru_push_tail(ix, slot);
}

void hkv_user_push_page(hkv_page_pool *pool, hkv_user *u, int32_t page)
{
    hkv_page *p = &pool->pages[page];
    p->prev = u->tail_page;
    p->next = HKV_NO_PAGE;
    if (u->tail_page != HKV_NO_PAGE)
        pool->pages[u->tail_page].next = page;
    else
        u->head_page = page;
    u->tail_page = page;
    u->num_pages++;
}

int32_t hkv_user_pop_page(hkv_page_pool *pool, hkv_user *u)
{
    int32_t page = u->tail_page;
    if (page == HKV_NO_PAGE)
        return HKV_NO_PAGE;
    hkv_page *p = &pool->pages[page];
    u->tail_page = p->prev;
    if (p->prev != HKV_NO_PAGE)
        pool->pages[p->prev].next = HKV_NO_PAGE;
    else
        u->head_page = HKV_NO_PAGE;
    p->prev = p->next = HKV_NO_PAGE;
    u->num_pages--;
    return page;
}
