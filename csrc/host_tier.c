/*
 * host_tier.c - host page allocation (bitmap, next fit) and host chains.
 */
#include "host_tier.h"

#include <stdlib.h>
#include <string.h>

#include "cuda_rt.h"

hkv_status hkv_host_tier_init(hkv_host_tier *ht, int32_t num_pages, size_t table_bytes,
                              hkv_mem_kind kind, int device, int32_t page_size,
                              int verify)
{
    memset(ht, 0, sizeof *ht);
    if (num_pages <= 0)
        return HKV_OK;  /* no host tier */
    size_t words = ((size_t)num_pages + 63) / 64;
    ht->pages = calloc((size_t)num_pages, sizeof *ht->pages);
    ht->free_bits = calloc(words, sizeof *ht->free_bits);
    ht->writes = calloc((size_t)num_pages, sizeof *ht->writes);
    if (ht->pages == NULL || ht->free_bits == NULL || ht->writes == NULL) {
        hkv_host_tier_free_all(ht);
        return hkv_error(HKV_ENOMEM, "cannot allocate the host tier's bookkeeping");
    }
    for (int32_t i = 0; i < num_pages; i++) {
        ht->pages[i].owner = -1;
        ht->pages[i].prev = ht->pages[i].next = HKV_NO_PAGE;
        ht->free_bits[i / 64] |= 1ull << (i % 64);
    }
    ht->num_pages = ht->num_free = num_pages;
    hkv_status st = hkv_token_filter_init(&ht->keys, num_pages, page_size, verify);
    if (st == HKV_OK)
        st = hkv_buffer_new(kind, device, table_bytes, &ht->table);
    if (st == HKV_OK) {
        ht->table_dev = ht->table->ptr;
        if (kind == HKV_MEM_PINNED)
            st = hkv_cuda_host_device_pointer(ht->table->ptr, &ht->table_dev);
    }
    if (st != HKV_OK)
        hkv_host_tier_free_all(ht);
    return st;
}

void hkv_host_tier_free_all(hkv_host_tier *ht)
{
    hkv_buffer_unref(ht->table);
    hkv_token_filter_free_all(&ht->keys);
    free(ht->pages);
    free(ht->free_bits);
    free(ht->writes);
    memset(ht, 0, sizeof *ht);
}

int32_t hkv_host_alloc(hkv_host_tier *ht, int32_t owner)
{
    if (ht->num_free == 0)
        return HKV_NO_PAGE;
    int32_t words = (ht->num_pages + 63) / 64;
    int32_t w = ht->cursor / 64;
    uint64_t mask = ~0ull << (ht->cursor % 64);
    for (int32_t k = 0; k <= words; k++) {
        uint64_t bits = ht->free_bits[w] & mask;
        if (bits != 0) {
            int32_t page = w * 64 + __builtin_ctzll(bits);
            ht->free_bits[w] &= ~(1ull << (page % 64));
            ht->num_free--;
            ht->cursor = page + 1 < ht->num_pages ? page + 1 : 0;
            hkv_page *p = &ht->pages[page];
            p->owner = owner;
            p->prev = p->next = HKV_NO_PAGE;
            p->pins = 0;
            return page;
        }
        w = w + 1 < words ? w + 1 : 0;
        mask = ~0ull;
    }
    return HKV_NO_PAGE;  /* not reached: num_free > 0 */
}

static void free_page(hkv_host_tier *ht, int32_t page)
{
    ht->pages[page].owner = -1;
    ht->free_bits[page / 64] |= 1ull << (page % 64);
    ht->num_free++;
}

void hkv_host_release(hkv_host_tier *ht, int32_t page)
{
    hkv_page *p = &ht->pages[page];
    p->prev = p->next = HKV_NO_PAGE;
    if (p->pins > 0)
        p->owner = HKV_ZOMBIE;
    else
        free_page(ht, page);
}

void hkv_host_unpin(hkv_host_tier *ht, int32_t page)
{
    hkv_page *p = &ht->pages[page];
    if (--p->pins == 0 && p->owner == HKV_ZOMBIE)
        free_page(ht, page);
}

void hkv_host_push(hkv_host_tier *ht, hkv_user *u, int32_t page)
{
    hkv_page *p = &ht->pages[page];
    p->prev = u->host_tail;
    p->next = HKV_NO_PAGE;
    if (u->host_tail != HKV_NO_PAGE)
        ht->pages[u->host_tail].next = page;
    else
        u->host_head = page;
    u->host_tail = page;
    u->host_pages++;
}

int32_t hkv_host_pop(hkv_host_tier *ht, hkv_user *u)
{
    int32_t page = u->host_tail;
    if (page == HKV_NO_PAGE)
        return HKV_NO_PAGE;
    hkv_page *p = &ht->pages[page];
    u->host_tail = p->prev;
    if (p->prev != HKV_NO_PAGE)
        ht->pages[p->prev].next = HKV_NO_PAGE;
    else
        u->host_head = HKV_NO_PAGE;
    p->prev = p->next = HKV_NO_PAGE;
    u->host_pages--;
    return page;
}

int32_t hkv_host_page_at(const hkv_host_tier *ht, const hkv_user *u, int64_t ix)
{
    int32_t page = u->host_head;
    for (int64_t i = 0; i < ix && page != HKV_NO_PAGE; i++)
        page = ht->pages[page].next;
    return page;
}
