/*
 * test_pool_index.c - the bookkeeping modules under the cache: the page
 * pool (page_pool.h), the per-user index (user_index.h) and the token
 * filter of verified mode (token_filter.h).
 *
 * These are tested through their own headers, below the cache, because a
 * bug here shows up in the cache only as a rare, far-away corruption; here
 * it shows up as a named broken invariant.
 */
#include <stdlib.h>

#include "harness.h"
#include "page_pool.h"
#include "token_filter.h"
#include "transfer.h"
#include "user_index.h"

/* ------------------------------------------------------------------ */
/* page pool                                                           */

static void test_pool_alloc_until_empty(void)
{
    hkv_page_pool pool;
    CHECK_OK(hkv_page_pool_init(&pool, 8));
    CHECK_EQ(pool.num_pages, 8);
    CHECK_EQ(pool.num_free, 8);
    CHECK_EQ(hkv_page_pool_used(&pool), 0);

    /* A fresh pool hands out the lowest ids first (contiguous early
     * batches), each with the requested owner and clean links. */
    for (int32_t i = 0; i < 8; i++) {
        int32_t p = hkv_page_alloc(&pool, 100 + i);
        CHECK_EQ(p, i);
        CHECK_EQ(pool.pages[p].owner, 100 + i);
        CHECK_EQ(pool.pages[p].prev, HKV_NO_PAGE);
        CHECK_EQ(pool.pages[p].next, HKV_NO_PAGE);
        CHECK_EQ(pool.pages[p].pins, 0);
        CHECK_EQ(hkv_page_pool_used(&pool), i + 1);
    }
    CHECK_EQ(pool.num_free, 0);
    CHECK_EQ(hkv_page_alloc(&pool, 1), HKV_NO_PAGE);
    CHECK_EQ(hkv_page_alloc(&pool, 1), HKV_NO_PAGE);   /* stays empty */
    CHECK_EQ(pool.num_free, 0);

    /* Freed pages come back in address order from the next-fit cursor
     * (here wrapped to 0), so pages freed together are reused as a run,
     * with the owner cleared.  The pin count belongs to the copies still
     * reading the page, not to its owner, so it survives reuse: the new
     * owner's writers are ordered after those copies. */
    pool.pages[5].pins = 3;
    hkv_page_release(&pool, 3);
    hkv_page_release(&pool, 5);
    CHECK_EQ(pool.num_free, 2);
    CHECK_EQ(pool.pages[3].owner, -1);
    CHECK_EQ(pool.pages[5].owner, -1);
    CHECK(hkv_page_is_free(&pool, 3) && hkv_page_is_free(&pool, 5));
    CHECK(!hkv_page_is_free(&pool, 4));
    CHECK_EQ(hkv_page_alloc(&pool, 7), 3);
    CHECK_EQ(hkv_page_alloc(&pool, 7), 5);
    CHECK_EQ(pool.pages[5].pins, 3);
    CHECK_EQ(pool.pages[5].owner, 7);
    CHECK_EQ(hkv_page_alloc(&pool, 7), HKV_NO_PAGE);
    CHECK_EQ(hkv_page_pool_used(&pool), 8);

    hkv_page_pool_free_all(&pool);
    CHECK(pool.pages == NULL);
    CHECK_EQ(pool.num_pages, 0);
    CHECK(pool.free_bits == NULL);
    /* An emptied pool behaves as empty, not as a dangling one. */
    CHECK_EQ(hkv_page_alloc(&pool, 1), HKV_NO_PAGE);
}

static void test_pool_init_invalid(void)
{
    hkv_page_pool pool;
    CHECK_ST(hkv_page_pool_init(&pool, 0), HKV_EINVAL);
    CHECK(strstr(hkv_last_error(), "num_pages") != NULL);
    CHECK(pool.pages == NULL);
    CHECK_EQ(hkv_page_alloc(&pool, 0), HKV_NO_PAGE);
    hkv_page_pool_free_all(&pool);          /* safe after a failed init */
    CHECK_ST(hkv_page_pool_init(&pool, -5), HKV_EINVAL);
    hkv_page_pool_free_all(&pool);

    CHECK_OK(hkv_page_pool_init(&pool, 1));
    CHECK_EQ(hkv_page_alloc(&pool, 0), 0);
    CHECK_EQ(hkv_page_alloc(&pool, 0), HKV_NO_PAGE);
    hkv_page_release(&pool, 0);
    CHECK_EQ(hkv_page_alloc(&pool, 0), 0);
    hkv_page_pool_free_all(&pool);
}

/* Random alloc/free against a bitmap of pages in use: no page is ever
 * handed out twice, and the counters track the bitmap. */
static void test_pool_random(void)
{
    enum { N = 500 };
    hkv_page_pool pool;
    unsigned char used[N] = {0};
    int32_t held[N];
    int32_t nheld = 0;
    test_rng r = {42};

    CHECK_OK(hkv_page_pool_init(&pool, N));
    for (int op = 0; op < 20000; op++) {
        if (rng_chance(&r, 1, 2)) {
            int32_t p = hkv_page_alloc(&pool, op);
            if (nheld == N) {
                if (p != HKV_NO_PAGE)
                    hkv_page_pool_free_all(&pool);
                CHECK_EQ(p, HKV_NO_PAGE);
                continue;
            }
            if (p < 0 || p >= N || used[p]) {
                hkv_page_pool_free_all(&pool);
                CHECK(!"alloc returned a bad or busy page");
            }
            used[p] = 1;
            held[nheld++] = p;
        } else if (nheld > 0) {
            int32_t i = (int32_t)rng_below(&r, nheld);
            int32_t p = held[i];
            held[i] = held[--nheld];
            used[p] = 0;
            hkv_page_release(&pool, p);
        }
        if (pool.num_free != N - nheld || hkv_page_pool_used(&pool) != nheld) {
            hkv_page_pool_free_all(&pool);
            CHECK(!"pool counters disagree with the pages held");
        }
    }
    /* The bitmap marks exactly the pages not held. */
    int32_t walked = 0;
    for (int32_t p = 0; p < N; p++) {
        if (hkv_page_is_free(&pool, p) == used[p])
            break;
        walked += !used[p];
    }
    hkv_page_pool_free_all(&pool);
    CHECK_EQ(walked, N - nheld);
}

/* ------------------------------------------------------------------ */
/* user index                                                          */

/*
 * A copy of user_index.c's hash (splitmix64 finaliser), used only to build
 * ids that collide in the table and to check the probe-run invariant.  If
 * the core's hash changes, test_index_hash_copy says so, and this copy
 * must follow.
 */
static uint32_t index_hash(int64_t id)
{
    uint64_t x = (uint64_t)id;
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return (uint32_t)x;
}

/*
 * Full consistency check of an index against the reference list of
 * (id, slot) pairs that should be in it:
 *  - every table entry names an in-use slot, each slot once;
 *  - linear probing: no empty bucket between an entry's home bucket and
 *    its bucket (what backward-shift deletion must preserve: an empty
 *    bucket there would end lookups early and lose the user);
 *  - every reference id is found at its slot;
 *  - the LRU list is a consistent doubly linked list of the in-use slots;
 *  - the free list holds exactly the other slots.
 */
static int index_check(const hkv_user_index *ix, const int64_t *ids,
                       const int32_t *slots, int32_t n)
{
    uint32_t size = ix->table_mask + 1;
    int32_t *seen = calloc((size_t)ix->capacity, sizeof *seen);
    HCHECK(seen != NULL);
    int bad = 0;
    for (uint32_t i = 0; i < size && !bad; i++) {
        int32_t s = ix->table[i];
        if (s == HKV_NO_USER)
            continue;
        if (s < 0 || s >= ix->capacity || !ix->users[s].in_use || seen[s]++) {
            bad = 1;
            break;
        }
        for (uint32_t j = index_hash(ix->users[s].id) & ix->table_mask; j != i;
             j = (j + 1) & ix->table_mask)
            if (ix->table[j] == HKV_NO_USER)
                bad = 2;
    }
    int32_t in_use = 0;
    for (int32_t s = 0; s < ix->capacity && !bad; s++) {
        if (ix->users[s].in_use) {
            in_use++;
            if (seen[s] != 1)
                bad = 3;
        }
    }
    free(seen);
    HCHECK_EQ(bad, 0);
    HCHECK_EQ(in_use, n);
    HCHECK_EQ(ix->count, n);
    for (int32_t k = 0; k < n; k++) {
        HCHECK_EQ(hkv_user_find(ix, ids[k]), slots[k]);
        HCHECK_EQ(ix->users[slots[k]].id, ids[k]);
    }
    int32_t prev = HKV_NO_USER, walked = 0;
    for (int32_t s = ix->lru_head; s != HKV_NO_USER; s = ix->users[s].lru_next) {
        HCHECK(ix->users[s].in_use);
        HCHECK_EQ(ix->users[s].lru_prev, prev);
        prev = s;
        HCHECK(++walked <= n);
    }
    HCHECK_EQ(walked, n);
    HCHECK_EQ(ix->lru_tail, prev);
    int32_t nfree = 0;
    for (int32_t s = ix->free_head; s != HKV_NO_USER; s = ix->users[s].lru_next) {
        HCHECK(!ix->users[s].in_use);
        HCHECK(++nfree <= ix->capacity);
    }
    HCHECK_EQ(nfree, ix->capacity - n);
    return 0;
}

static void test_index_hash_copy(void)
{
    /* On an empty table a new id lands in its home bucket: if that is not
     * where index_hash says, user_index.c's hash changed. */
    const int64_t probe[] = {0, 1, -1, 12345, INT64_MIN, INT64_MAX};
    for (size_t k = 0; k < sizeof probe / sizeof probe[0]; k++) {
        hkv_user_index ix;
        CHECK_OK(hkv_user_index_init(&ix, 64));
        int32_t slot = hkv_user_find_or_add(&ix, probe[k]);
        uint32_t home = index_hash(probe[k]) & ix.table_mask;
        int at_home = ix.table[home] == slot;
        hkv_user_index_free_all(&ix);
        CHECK(at_home);   /* else: update index_hash() to match the core */
    }
}

static void test_index_init_invalid(void)
{
    hkv_user_index ix;
    CHECK_ST(hkv_user_index_init(&ix, 0), HKV_EINVAL);
    hkv_user_index_free_all(&ix);
    CHECK_ST(hkv_user_index_init(&ix, -1), HKV_EINVAL);
    hkv_user_index_free_all(&ix);
    CHECK_ST(hkv_user_index_init(&ix, (1 << 29) + 1), HKV_EINVAL);
    hkv_user_index_free_all(&ix);

    /* The table is a power of two, at least twice the slots (short probes,
     * and always an empty bucket to end a miss). */
    CHECK_OK(hkv_user_index_init(&ix, 100));
    CHECK_EQ(ix.table_mask + 1, 256);
    CHECK_EQ(ix.count, 0);
    CHECK_EQ(ix.lru_head, HKV_NO_USER);
    CHECK_EQ(hkv_user_find(&ix, 7), HKV_NO_USER);
    hkv_user_index_free_all(&ix);
}

static void test_index_basic_and_full(void)
{
    hkv_user_index ix;
    int64_t ids[4] = {10, -10, INT64_MIN, INT64_MAX};
    int32_t slots[4];
    CHECK_OK(hkv_user_index_init(&ix, 4));
    for (int i = 0; i < 4; i++) {
        slots[i] = hkv_user_find_or_add(&ix, ids[i]);
        CHECK(slots[i] >= 0 && slots[i] < 4);
        const hkv_user *u = &ix.users[slots[i]];
        CHECK_EQ(u->id, ids[i]);
        CHECK_EQ(u->length, 0);
        CHECK_EQ(u->reserved, 0);
        CHECK_EQ(u->num_pages, 0);
        CHECK_EQ(u->head_page, HKV_NO_PAGE);
        CHECK_EQ(u->tail_page, HKV_NO_PAGE);
        CHECK_EQ(u->pins, 0);
        CHECK(u->epoch != 0);          /* 0 means "absent" to lookups */
        /* find_or_add of a present id is a find */
        CHECK_EQ(hkv_user_find_or_add(&ix, ids[i]), slots[i]);
    }
    CHECK(index_check(&ix, ids, slots, 4) == 0);
    /* Full: a new id cannot be added, present ones are still found. */
    CHECK_EQ(hkv_user_find_or_add(&ix, 11), HKV_NO_USER);
    CHECK_EQ(hkv_user_find(&ix, 11), HKV_NO_USER);
    CHECK_EQ(hkv_user_find_or_add(&ix, INT64_MIN), slots[2]);
    CHECK(index_check(&ix, ids, slots, 4) == 0);

    /* Remove one, add another: the freed slot is reused. */
    hkv_user_remove(&ix, slots[1]);
    CHECK_EQ(hkv_user_find(&ix, -10), HKV_NO_USER);
    int32_t s = hkv_user_find_or_add(&ix, 11);
    CHECK_EQ(s, slots[1]);
    ids[1] = 11;
    CHECK(index_check(&ix, ids, slots, 4) == 0);
    hkv_user_index_free_all(&ix);
}

static void test_index_epochs(void)
{
    hkv_user_index ix;
    CHECK_OK(hkv_user_index_init(&ix, 8));
    int32_t a = hkv_user_find_or_add(&ix, 1);
    int32_t b = hkv_user_find_or_add(&ix, 2);
    uint64_t ea = ix.users[a].epoch, eb = ix.users[b].epoch;
    CHECK(ea != 0 && eb != 0 && ea != eb);
    hkv_user_new_epoch(&ix, &ix.users[a]);
    CHECK(ix.users[a].epoch != ea && ix.users[a].epoch != eb);
    /* A user removed and added again is a new entry: new epoch, so a
     * lookup taken before the removal is detected as stale. */
    uint64_t eb_old = ix.users[b].epoch;
    hkv_user_remove(&ix, b);
    b = hkv_user_find_or_add(&ix, 2);
    CHECK(ix.users[b].epoch != eb_old);
    CHECK(ix.users[b].epoch > ix.users[a].epoch);
    hkv_user_index_free_all(&ix);
}

/* Walk the LRU list from both ends and compare with the expected ids. */
static int lru_is(const hkv_user_index *ix, const int64_t *want, int n)
{
    int i = 0;
    for (int32_t s = ix->lru_head; s != HKV_NO_USER; s = ix->users[s].lru_next) {
        HCHECK(i < n);
        HCHECK_EQ(ix->users[s].id, want[i]);
        i++;
    }
    HCHECK_EQ(i, n);
    for (int32_t s = ix->lru_tail; s != HKV_NO_USER; s = ix->users[s].lru_prev) {
        HCHECK(i > 0);
        HCHECK_EQ(ix->users[s].id, want[--i]);
    }
    HCHECK_EQ(i, 0);
    return 0;
}

static void test_index_lru(void)
{
    hkv_user_index ix;
    CHECK_OK(hkv_user_index_init(&ix, 8));
    int32_t s[6];
    for (int i = 0; i < 4; i++)
        s[i] = hkv_user_find_or_add(&ix, 'A' + i);
    CHECK(lru_is(&ix, (const int64_t[]){'A', 'B', 'C', 'D'}, 4) == 0);
    hkv_user_touch(&ix, s[1]);                       /* B most recent */
    CHECK(lru_is(&ix, (const int64_t[]){'A', 'C', 'D', 'B'}, 4) == 0);
    hkv_user_touch(&ix, s[1]);                       /* already the tail */
    CHECK(lru_is(&ix, (const int64_t[]){'A', 'C', 'D', 'B'}, 4) == 0);
    hkv_user_touch(&ix, s[0]);                       /* the head moves */
    CHECK(lru_is(&ix, (const int64_t[]){'C', 'D', 'B', 'A'}, 4) == 0);
    hkv_user_remove(&ix, s[3]);                      /* middle */
    CHECK(lru_is(&ix, (const int64_t[]){'C', 'B', 'A'}, 3) == 0);
    hkv_user_remove(&ix, s[2]);                      /* head */
    CHECK(lru_is(&ix, (const int64_t[]){'B', 'A'}, 2) == 0);
    s[4] = hkv_user_find_or_add(&ix, 'E');           /* new = most recent */
    CHECK(lru_is(&ix, (const int64_t[]){'B', 'A', 'E'}, 3) == 0);
    hkv_user_remove(&ix, s[4]);                      /* tail */
    CHECK(lru_is(&ix, (const int64_t[]){'B', 'A'}, 2) == 0);
    hkv_user_remove(&ix, s[0]);
    hkv_user_remove(&ix, s[1]);
    CHECK(lru_is(&ix, NULL, 0) == 0);
    CHECK_EQ(ix.lru_head, HKV_NO_USER);
    CHECK_EQ(ix.lru_tail, HKV_NO_USER);
    s[5] = hkv_user_find_or_add(&ix, 'F');
    hkv_user_touch(&ix, s[5]);                       /* the only user */
    CHECK(lru_is(&ix, (const int64_t[]){'F'}, 1) == 0);
    hkv_user_index_free_all(&ix);
}

/*
 * Ids that all hash to bucket `home` of a table of mask+1 buckets, found
 * by scanning a sequence of candidates (a few hundred thousand hashes).
 */
static int colliding_ids(uint32_t mask, uint32_t home, int64_t start, int64_t *out,
                         int n)
{
    int found = 0;
    for (int64_t x = start; found < n && x < start + 64 * (int64_t)(mask + 1) * n;
         x++)
        if ((index_hash(x) & mask) == home)
            out[found++] = x;
    return found;
}

/*
 * Thousands of random adds, finds and removes against a reference list.
 * The ids mix plain random ones, small and negative ones, the int64
 * extremes and clusters that share a home bucket, including clusters at
 * the end of the table whose probe runs wrap around to bucket 0: those are
 * exactly the cases where backward-shift deletion can go wrong.
 */
static void test_index_random_vs_reference(void)
{
    enum { CAP = 1024, POOL = 4096, OPS = 30000 };
    hkv_user_index ix;
    CHECK_OK(hkv_user_index_init(&ix, CAP));
    const uint32_t mask = ix.table_mask;

    /* The id pool: what random operations draw from. */
    int64_t *pool = malloc(POOL * sizeof *pool);
    int64_t *ids = malloc(CAP * sizeof *ids);
    int32_t *slots = malloc(CAP * sizeof *slots);
    int32_t *where = malloc(POOL * sizeof *where);   /* index in ids, or -1 */
    if (pool == NULL || ids == NULL || slots == NULL || where == NULL) {
        free(pool), free(ids), free(slots), free(where);
        hkv_user_index_free_all(&ix);
        CHECK(!"out of memory");
    }
    test_rng r = {7};
    int np = 0;
    const int64_t fixed[] = {0, 1, -1, 2, -2, INT64_MIN, INT64_MIN + 1, INT64_MAX,
                             INT64_MAX - 1, (int64_t)1 << 32, -((int64_t)1 << 32)};
    for (size_t k = 0; k < sizeof fixed / sizeof fixed[0]; k++)
        pool[np++] = fixed[k];
    /* Clusters: 40 ids in each of the last three buckets and the first two,
     * so runs pile up across the wrap, plus one cluster mid-table. */
    const uint32_t homes[] = {mask - 2, mask - 1, mask, 0, 1, mask / 2};
    for (size_t h = 0; h < sizeof homes / sizeof homes[0]; h++) {
        int got = colliding_ids(mask, homes[h], 1000000 + (int64_t)h * 50000000,
                                pool + np, 40);
        np += got;
    }
    for (int i = 0; i < 200; i++)
        pool[np++] = -(int64_t)rng_range(&r, 1, 100000);   /* negative ids */
    while (np < POOL) {
        /* random 64-bit ids; duplicates in the pool would confuse the
         * reference, and are astronomically unlikely, but check anyway */
        int64_t id = (int64_t)rng_next(&r);
        int dup = 0;
        for (int k = 0; k < np && !dup; k++)
            dup = pool[k] == id;
        if (!dup)
            pool[np++] = id;
    }
    for (int i = 0; i < POOL; i++)
        where[i] = -1;

    int32_t n = 0;
    int fail = 0;
    for (int op = 0; op < OPS && !fail; op++) {
        /* Bias towards the colliding ids (indices 11..250) half the time. */
        int k = rng_chance(&r, 1, 2) ? (int)rng_range(&r, 0, 250)
                                     : (int)rng_below(&r, POOL);
        int64_t id = pool[k];
        int action = (int)rng_below(&r, 10);
        if (action < 5) {                               /* add */
            int32_t s = hkv_user_find_or_add(&ix, id);
            if (where[k] >= 0) {
                fail |= s != slots[where[k]];
            } else if (n == CAP) {
                fail |= s != HKV_NO_USER;
            } else {
                fail |= s < 0 || s >= CAP;
                if (!fail) {
                    ids[n] = id, slots[n] = s, where[k] = n++;
                }
            }
        } else if (action < 8) {                        /* remove */
            if (where[k] >= 0) {
                int32_t i = where[k];
                hkv_user_remove(&ix, slots[i]);
                /* swap-remove from the reference */
                n--;
                if (i != n) {
                    ids[i] = ids[n], slots[i] = slots[n];
                    for (int q = 0; q < POOL; q++)
                        if (where[q] == n) {
                            where[q] = i;
                            break;
                        }
                }
                where[k] = -1;
            }
        } else {                                        /* find */
            int32_t s = hkv_user_find(&ix, id);
            fail |= where[k] >= 0 ? s != slots[where[k]] : s != HKV_NO_USER;
        }
        if (op % 1000 == 999 && index_check(&ix, ids, slots, n) != 0)
            fail = 1;
    }
    if (!fail && index_check(&ix, ids, slots, n) != 0)
        fail = 1;
    /* Empty it completely, in random order, checking as we go. */
    while (!fail && n > 0) {
        int32_t i = (int32_t)rng_below(&r, n);
        hkv_user_remove(&ix, slots[i]);
        n--;
        ids[i] = ids[n], slots[i] = slots[n];
        if (n % 97 == 0 && index_check(&ix, ids, slots, n) != 0)
            fail = 1;
    }
    if (!fail && index_check(&ix, ids, slots, 0) != 0)
        fail = 1;
    free(pool), free(ids), free(slots), free(where);
    hkv_user_index_free_all(&ix);
    CHECK(!fail);
}

static void test_index_page_chain(void)
{
    hkv_page_pool pool;
    hkv_user_index ix;
    CHECK_OK(hkv_page_pool_init(&pool, 16));
    CHECK_OK(hkv_user_index_init(&ix, 4));
    int32_t slot = hkv_user_find_or_add(&ix, 99);
    hkv_user *u = &ix.users[slot];

    CHECK_EQ(hkv_user_pop_page(&pool, u), HKV_NO_PAGE);   /* empty chain */

    /* Take pages 0..5, give back 1 and 4, so the chain is not sorted. */
    for (int i = 0; i < 6; i++)
        (void)hkv_page_alloc(&pool, slot);
    hkv_page_release(&pool, 1);
    hkv_page_release(&pool, 4);
    const int32_t order[4] = {5, 0, 3, 2};
    for (int i = 0; i < 4; i++) {
        hkv_user_push_page(&pool, u, order[i]);
        CHECK_EQ(u->num_pages, i + 1);
        CHECK_EQ(u->head_page, order[0]);
        CHECK_EQ(u->tail_page, order[i]);
    }
    /* Head to tail is history order, and the back links mirror it. */
    int32_t p = u->head_page, prev = HKV_NO_PAGE;
    for (int i = 0; i < 4; i++) {
        CHECK_EQ(p, order[i]);
        CHECK_EQ(pool.pages[p].prev, prev);
        prev = p;
        p = pool.pages[p].next;
    }
    CHECK_EQ(p, HKV_NO_PAGE);

    /* Pops come from the tail (tail-first eviction keeps a prefix). */
    CHECK_EQ(hkv_user_pop_page(&pool, u), 2);
    CHECK_EQ(pool.pages[2].prev, HKV_NO_PAGE);
    CHECK_EQ(pool.pages[2].next, HKV_NO_PAGE);
    CHECK_EQ(u->tail_page, 3);
    CHECK_EQ(pool.pages[3].next, HKV_NO_PAGE);
    CHECK_EQ(u->num_pages, 3);
    hkv_user_push_page(&pool, u, 2);                  /* push after a pop */
    CHECK_EQ(u->tail_page, 2);
    CHECK_EQ(pool.pages[3].next, 2);
    CHECK_EQ(hkv_user_pop_page(&pool, u), 2);
    CHECK_EQ(hkv_user_pop_page(&pool, u), 3);
    CHECK_EQ(hkv_user_pop_page(&pool, u), 0);
    CHECK_EQ(u->head_page, 5);
    CHECK_EQ(u->tail_page, 5);
    CHECK_EQ(hkv_user_pop_page(&pool, u), 5);
    CHECK_EQ(u->head_page, HKV_NO_PAGE);
    CHECK_EQ(u->tail_page, HKV_NO_PAGE);
    CHECK_EQ(u->num_pages, 0);
    CHECK_EQ(hkv_user_pop_page(&pool, u), HKV_NO_PAGE);
    hkv_user_index_free_all(&ix);
    hkv_page_pool_free_all(&pool);
}

/* Transfers split into DMA runs (consecutive on both sides, long enough)
 * and the pages the kernel copies; every pair is kept exactly once. */
static void test_split_runs(void)
{
    /* pairs: a run of 4 (10..13 -> 0..3), a break on the dst side, a run of
     * 2 (14,15 -> 7,8), a lone page, a run of 3 on both (40..42 -> 20..22) */
    const int32_t src[] = {10, 11, 12, 13, 14, 15, 30, 40, 41, 42};
    const int32_t dst[] = {0, 1, 2, 3, 7, 8, 9, 20, 21, 22};
    const int64_t n = 10;
    hkv_xfer_run runs[10];
    int32_t so[10], dso[10];
    int64_t rest = -1;
    int64_t nr = hkv_xfer_split_runs(src, dst, n, 3, runs, so, dso, &rest);
    CHECK_EQ(nr, 2);
    CHECK_EQ(rest, 3);
    CHECK_EQ(runs[0].src, 10);
    CHECK_EQ(runs[0].dst, 0);
    CHECK_EQ(runs[0].n, 4);
    CHECK_EQ(runs[1].src, 40);
    CHECK_EQ(runs[1].dst, 20);
    CHECK_EQ(runs[1].n, 3);
    /* the kernel's pairs come first, in order */
    CHECK_EQ(so[0], 14);
    CHECK_EQ(dso[0], 7);
    CHECK_EQ(so[1], 15);
    CHECK_EQ(so[2], 30);
    CHECK_EQ(dso[2], 9);
    /* every pair exactly once, still paired */
    int seen[10] = {0};
    for (int64_t i = 0; i < n; i++) {
        int64_t k = 0;
        while (k < n && src[k] != so[i])
            k++;
        CHECK(k < n);
        CHECK_EQ(dst[k], dso[i]);
        seen[k]++;
    }
    for (int64_t k = 0; k < n; k++)
        CHECK_EQ(seen[k], 1);
    /* no DMA: everything goes to the kernel, unchanged */
    nr = hkv_xfer_split_runs(src, dst, n, 0, runs, so, dso, &rest);
    CHECK_EQ(nr, 0);
    CHECK_EQ(rest, n);
    for (int64_t i = 0; i < n; i++) {
        CHECK_EQ(so[i], src[i]);
        CHECK_EQ(dso[i], dst[i]);
    }
    /* one long run of everything */
    const int32_t s2[] = {5, 6, 7, 8};
    const int32_t d2[] = {100, 101, 102, 103};
    nr = hkv_xfer_split_runs(s2, d2, 4, 2, runs, so, dso, &rest);
    CHECK_EQ(nr, 1);
    CHECK_EQ(rest, 0);
    CHECK_EQ(runs[0].n, 4);
}

void run_pool_index_tests(void)
{
    RUN(test_split_runs);
    RUN(test_pool_alloc_until_empty);
    RUN(test_pool_init_invalid);
    RUN(test_pool_random);
    RUN(test_index_hash_copy);
    RUN(test_index_init_invalid);
    RUN(test_index_basic_and_full);
    RUN(test_index_epochs);
    RUN(test_index_lru);
    RUN(test_index_random_vs_reference);
    RUN(test_index_page_chain);
}

/* ------------------------------------------------------------------ */
/* token filter                                                        */

/* A user whose chain covers `tokens` tokens of pages of size ps, pages
 * taken from the pool in a shuffled order (keys are stored per page id,
 * so a sorted chain could hide an indexing mistake). */
static int filter_user(hkv_page_pool *pool, hkv_user *u, int32_t ps, int64_t tokens)
{
    memset(u, 0, sizeof *u);
    u->head_page = u->tail_page = HKV_NO_PAGE;
    int64_t pages = hkv_div_up(tokens, ps);
    int32_t got[64];
    HCHECK(pages <= 64);
    for (int64_t i = 0; i < pages; i++) {
        got[i] = hkv_page_alloc(pool, 0);
        HCHECK(got[i] != HKV_NO_PAGE);
    }
    for (int64_t i = pages - 1; i >= 0; i--)          /* reversed */
        hkv_user_push_page(pool, u, got[i]);
    u->length = u->reserved = tokens;
    return 0;
}

static void test_filter_match_lengths(void)
{
    enum { PS = 4, LEN = 10 };          /* pages of 4, 4 and 2 tokens */
    hkv_page_pool pool;
    hkv_token_filter tf;
    hkv_user u;
    int64_t keys[LEN], q[LEN];
    for (int i = 0; i < LEN; i++)
        keys[i] = 1000 + 7 * i;
    CHECK_OK(hkv_page_pool_init(&pool, 8));
    CHECK_OK(hkv_token_filter_init(&tf, 8, PS, 1));
    CHECK(filter_user(&pool, &u, PS, LEN) == 0);
    hkv_filter_store(&tf, &pool, &u, keys, 0, LEN);

    /* Equal history: everything matches; a shorter query matches itself. */
    CHECK_EQ(hkv_filter_match(&tf, pool.pages, u.head_page, keys, LEN), LEN);
    CHECK_EQ(hkv_filter_match(&tf, pool.pages, u.head_page, keys, 7), 7);
    CHECK_EQ(hkv_filter_match(&tf, pool.pages, u.head_page, keys, 4), 4);
    CHECK_EQ(hkv_filter_match(&tf, pool.pages, u.head_page, keys, 0), 0);

    /* Diverging at every position d (first page, page boundaries, mid
     * page, the partial last page) matches exactly d tokens, whatever
     * the query's length past d. */
    for (int d = 0; d < LEN; d++) {
        memcpy(q, keys, sizeof q);
        q[d] = -q[d];
        for (int n = d; n <= LEN; n++) {
            CHECK_EQ(hkv_filter_match(&tf, pool.pages, u.head_page, q, n), d);
        }
        /* A difference after the first one changes nothing. */
        if (d + 2 < LEN) {
            q[d + 2] = -q[d + 2];
            CHECK_EQ(hkv_filter_match(&tf, pool.pages, u.head_page, q, LEN), d);
        }
    }
    /* Only the last token differs (in the partial page). */
    memcpy(q, keys, sizeof q);
    q[LEN - 1]++;
    CHECK_EQ(hkv_filter_match(&tf, pool.pages, u.head_page, q, LEN), LEN - 1);
    hkv_token_filter_free_all(&tf);
    hkv_page_pool_free_all(&pool);
}

static void test_filter_store_in_steps(void)
{
    /* Keys stored in pieces that start and end mid page (as growing
     * histories do) give the same stored keys and fingerprints as one
     * store of the whole history. */
    enum { PS = 4, LEN = 13 };
    hkv_page_pool pool_a, pool_b;
    hkv_token_filter ta, tb;
    hkv_user ua, ub;
    int64_t keys[LEN];
    for (int i = 0; i < LEN; i++)
        keys[i] = (int64_t)test_mix((uint64_t)i + 1);
    CHECK_OK(hkv_page_pool_init(&pool_a, 8));
    CHECK_OK(hkv_page_pool_init(&pool_b, 8));
    CHECK_OK(hkv_token_filter_init(&ta, 8, PS, 1));
    CHECK_OK(hkv_token_filter_init(&tb, 8, PS, 1));
    CHECK(filter_user(&pool_a, &ua, PS, LEN) == 0);
    hkv_filter_store(&ta, &pool_a, &ua, keys, 0, LEN);
    /* b: grow the chain as the cache does (pages for the new tokens first,
     * then their keys), one step at a time */
    memset(&ub, 0, sizeof ub);
    ub.head_page = ub.tail_page = HKV_NO_PAGE;
    const int64_t steps[] = {0, 3, 4, 6, 11, 13};
    for (int s = 0; s + 1 < 6; s++) {
        while ((int64_t)ub.num_pages * PS < steps[s + 1])
            hkv_user_push_page(&pool_b, &ub, hkv_page_alloc(&pool_b, 0));
        hkv_filter_store(&tb, &pool_b, &ub, keys, steps[s], steps[s + 1]);
    }
    hkv_filter_store(&tb, &pool_b, &ub, keys, 5, 5);       /* empty: no-op */

    uint64_t fp = 0;
    int32_t pa = ua.head_page, pb = ub.head_page;
    for (int page = 0; page < 3; page++) {              /* the full pages */
        fp = hkv_fingerprint(fp, keys + page * PS, PS);
        CHECK(ta.fingerprints[pa] == fp);
        CHECK(tb.fingerprints[pb] == fp);
        CHECK(memcmp(ta.keys + (int64_t)pa * PS, keys + page * PS,
                     PS * sizeof *keys) == 0);
        CHECK(memcmp(tb.keys + (int64_t)pb * PS, keys + page * PS,
                     PS * sizeof *keys) == 0);
        pa = pool_a.pages[pa].next;
        pb = pool_b.pages[pb].next;
    }
    CHECK_EQ(tb.keys[(int64_t)pb * PS], keys[12]);           /* partial page */
    CHECK_EQ(hkv_filter_match(&tb, pool_b.pages, ub.head_page, keys, LEN), LEN);
    hkv_token_filter_free_all(&ta);
    hkv_token_filter_free_all(&tb);
    hkv_page_pool_free_all(&pool_a);
    hkv_page_pool_free_all(&pool_b);
}

static void test_filter_fingerprint_sensitivity(void)
{
    int64_t k[8], q[8];
    for (int i = 0; i < 8; i++)
        k[i] = 500 + i;
    uint64_t base = hkv_fingerprint(0, k, 8);
    CHECK(base == hkv_fingerprint(0, k, 8));            /* deterministic */
    /* Any single key changed, by one bit or by sign, changes it. */
    for (int i = 0; i < 8; i++) {
        memcpy(q, k, sizeof q);
        q[i] ^= 1;
        CHECK(hkv_fingerprint(0, q, 8) != base);
        q[i] = -k[i];
        CHECK(hkv_fingerprint(0, q, 8) != base);
    }
    /* Order matters: any two keys swapped change it. */
    for (int i = 0; i < 8; i++)
        for (int j = i + 1; j < 8; j++) {
            memcpy(q, k, sizeof q);
            q[i] = k[j], q[j] = k[i];
            CHECK(hkv_fingerprint(0, q, 8) != base);
        }
    /* The chain: a different predecessor, or length, changes it. */
    CHECK(hkv_fingerprint(1, k, 8) != base);
    CHECK(hkv_fingerprint(base, k, 8) != base);
    CHECK(hkv_fingerprint(0, k, 7) != base);
    /* Zero keys still depend on the predecessor and the count. */
    int64_t z[2] = {0, 0};
    CHECK(hkv_fingerprint(0, z, 1) != hkv_fingerprint(0, z, 2));
    CHECK(hkv_fingerprint(0, z, 0) != hkv_fingerprint(5, z, 0));
}

static void test_filter_disabled(void)
{
    hkv_token_filter tf;
    hkv_page_pool pool;
    hkv_user u;
    int64_t keys[4] = {1, 2, 3, 4};
    CHECK_OK(hkv_token_filter_init(&tf, 4, 2, 0));
    CHECK(tf.keys == NULL && tf.fingerprints == NULL);   /* trust mode: no memory */
    CHECK_OK(hkv_page_pool_init(&pool, 4));
    CHECK(filter_user(&pool, &u, 2, 4) == 0);
    hkv_filter_store(&tf, &pool, &u, keys, 0, 4);        /* a no-op, no crash */
    hkv_token_filter_free_all(&tf);
    hkv_token_filter_free_all(&tf);                      /* twice is safe */
    hkv_page_pool_free_all(&pool);
}

void run_filter_tests(void)
{
    RUN(test_filter_match_lengths);
    RUN(test_filter_store_in_steps);
    RUN(test_filter_fingerprint_sensitivity);
    RUN(test_filter_disabled);
}
