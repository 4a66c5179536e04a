/*
 * test_events.c - the event ring (events.h) on its own: order, run
 * merging, wraparound, overflow (the oldest records go, counted), partial
 * drains, a disabled ring; and the cache's emission for one sequence of
 * commit, eviction and truncation.
 */
#include <stdlib.h>

#include "cache_util.h"
#include "events.h"
#include "harness.h"

static void test_events_disabled(void)
{
    hkv_event_ring r;
    CHECK_OK(hkv_events_init(&r, 0));
    CHECK(r.buf == NULL);
    hkv_events_emit(&r, HKV_EVENT_STORED, 1, 1, 7, 0, 3);
    CHECK_EQ(r.count, 0);
    CHECK_EQ(r.dropped, 0);
    hkv_event out[1];
    CHECK_EQ(hkv_events_drain(&r, out, 1), 0);
    hkv_events_free(&r);
    CHECK_ST(hkv_events_init(&r, -1), HKV_EINVAL);
    CHECK_ST(hkv_events_init(&r, (int64_t)HKV_EVENTS_MAX_CAPACITY + 1), HKV_EINVAL);
}

static void test_events_order_and_fields(void)
{
    hkv_event_ring r;
    CHECK_OK(hkv_events_init(&r, 8));
    hkv_events_emit(&r, HKV_EVENT_STORED, 1, 1, 42, 0, 3);
    hkv_events_emit(&r, HKV_EVENT_OFFLOADED, 2, 1, 42, 0, 2);
    hkv_events_emit(&r, HKV_EVENT_REMOVED, 1, 1, -5, 9, 0);   /* empty: nothing */
    CHECK_EQ(r.count, 2);
    hkv_event out[4];
    CHECK_EQ(hkv_events_drain(&r, out, 4), 2);
    CHECK_EQ(out[0].seq, 0);
    CHECK_EQ(out[0].kind, HKV_EVENT_STORED);
    CHECK_EQ(out[0].tier, 1);
    CHECK_EQ(out[0].from_tier, 1);
    CHECK_EQ(out[0].user_id, 42);
    CHECK_EQ(out[0].page_index, 0);
    CHECK_EQ(out[0].num_pages, 3);
    CHECK_EQ(out[1].seq, 1);
    CHECK_EQ(out[1].kind, HKV_EVENT_OFFLOADED);
    CHECK_EQ(out[1].tier, 2);
    CHECK_EQ(out[1].from_tier, 1);
    CHECK(out[1].timestamp_ns >= out[0].timestamp_ns && out[0].timestamp_ns > 0);
    CHECK_EQ(r.count, 0);
    CHECK_EQ(hkv_events_drain(&r, out, 4), 0);
    CHECK_EQ(hkv_event_kind_name(HKV_EVENT_ONBOARDED)[0], 'o');
    CHECK_EQ(strcmp(hkv_event_kind_name(99), "unknown"), 0);
    hkv_events_free(&r);
}

static void test_events_runs_merge(void)
{
    hkv_event_ring r;
    CHECK_OK(hkv_events_init(&r, 8));
    /* tail pages dropped one by one, 5 down to 2: one record [2, 6) */
    for (int64_t p = 5; p >= 2; p--)
        hkv_events_emit(&r, HKV_EVENT_REMOVED, 1, 1, 3, p, 1);
    /* upward runs extend too */
    hkv_events_emit(&r, HKV_EVENT_STORED, 1, 1, 3, 0, 2);
    hkv_events_emit(&r, HKV_EVENT_STORED, 1, 1, 3, 2, 1);
    /* a gap, another user, another tier or kind: new records */
    hkv_events_emit(&r, HKV_EVENT_STORED, 1, 1, 3, 5, 1);
    hkv_events_emit(&r, HKV_EVENT_STORED, 1, 1, 4, 6, 1);
    hkv_events_emit(&r, HKV_EVENT_REMOVED, 2, 2, 4, 5, 1);
    hkv_events_emit(&r, HKV_EVENT_REMOVED, 1, 1, 4, 4, 1);
    hkv_event out[8];
    CHECK_EQ(hkv_events_drain(&r, out, 8), 6);
    CHECK_EQ(out[0].kind, HKV_EVENT_REMOVED);
    CHECK_EQ(out[0].page_index, 2);
    CHECK_EQ(out[0].num_pages, 4);
    CHECK_EQ(out[1].page_index, 0);
    CHECK_EQ(out[1].num_pages, 3);
    CHECK_EQ(out[2].page_index, 5);
    CHECK_EQ(out[3].user_id, 4);
    CHECK_EQ(out[4].tier, 2);
    CHECK_EQ(out[5].page_index, 4);
    for (int i = 0; i < 6; i++)
        CHECK_EQ(out[i].seq, i);    /* merged runs take no sequence number */
    /* a drained record is never extended: the next one is new */
    hkv_events_emit(&r, HKV_EVENT_REMOVED, 1, 1, 4, 3, 1);
    CHECK_EQ(hkv_events_drain(&r, out, 8), 1);
    CHECK_EQ(out[0].page_index, 3);
    CHECK_EQ(out[0].num_pages, 1);
    CHECK_EQ(out[0].seq, 6);
    hkv_events_free(&r);
}

/* Overflow drops the oldest records, counts them, and the ring wraps. */
static void test_events_overflow_wraparound(void)
{
    hkv_event_ring r;
    CHECK_OK(hkv_events_init(&r, 4));
    /* distinct users so nothing merges */
    for (int64_t i = 0; i < 10; i++)
        hkv_events_emit(&r, HKV_EVENT_STORED, 1, 1, 100 + i, 0, 1);
    CHECK_EQ(r.count, 4);
    CHECK_EQ(r.dropped, 6);
    hkv_event out[4];
    CHECK_EQ(hkv_events_drain(&r, out, 4), 4);
    for (int i = 0; i < 4; i++) {
        CHECK_EQ(out[i].seq, 6 + i);         /* the newest four, in order */
        CHECK_EQ(out[i].user_id, 106 + i);
    }
    /* drain in pieces across the wrap point, interleaved with emission */
    int64_t next_user = 200, expect = 200;
    for (int round = 0; round < 9; round++) {
        for (int k = 0; k < 3; k++)
            hkv_events_emit(&r, HKV_EVENT_REMOVED, 1, 1, next_user++, 1, 1);
        int64_t n = hkv_events_drain(&r, out, 2);
        CHECK_EQ(n, 2);
        for (int64_t i = 0; i < n; i++) {
            if (out[i].user_id != expect) {
                /* records lost to overflow come out as a seq gap */
                CHECK(out[i].user_id > expect);
                expect = out[i].user_id;
            }
            CHECK_EQ(out[i].seq, 10 + (out[i].user_id - 200));
            expect++;
        }
    }
    /* +3 -2 per round into 4 slots: it settles at 2 held, 1 dropped a round */
    int64_t held = r.count;
    CHECK_EQ(held, 2);
    CHECK_EQ(r.dropped, 6 + (next_user - 200) - 18 - held);
    CHECK_EQ(hkv_events_drain(&r, out, 4), held);
    CHECK_EQ(out[held - 1].user_id, next_user - 1);
    CHECK_EQ(hkv_events_drain(&r, out, 4), 0);
    hkv_events_free(&r);
}

/* The cache: commit, truncation, eviction emit what they did, in order. */
static void test_events_cache_emission(void)
{
    hkv_config cfg = cfg_small(2, 4, 6, 2, 64);
    cfg.event_capacity = 64;
    hkv_cache *c = NULL;
    CHECK_OK(hkv_cache_create(&cfg, &c));
    req r;
    req_init(&r);
    req_add(&r, 1, 10);          /* 3 pages */
    CHECK(req_round(c, &r) == 0);
    req_init(&r);
    req_add(&r, 2, 12);          /* 3 pages: pool full */
    CHECK(req_round(c, &r) == 0);
    req_init(&r);
    req_add(&r, 3, 5);           /* 2 pages: evicts user 1's tail (LRU) */
    CHECK(req_round(c, &r) == 0);
    CHECK_OK(hkv_cache_evict(c, 1, (int64_t[]){2}, HKV_TIER_ALL, 0, NULL));
    hkv_stats s;
    hkv_cache_stats(c, &s);
    CHECK_EQ(s.events_pending, 5);
    CHECK_EQ(s.events_dropped, 0);
    hkv_event out[16];
    int64_t n = 0;
    CHECK_OK(hkv_cache_drain_events(c, out, 2, &n));
    CHECK_EQ(n, 2);
    CHECK_OK(hkv_cache_drain_events(c, out + 2, 16, &n));
    CHECK_EQ(n, 3);
    const struct { int kind; int64_t user, page, pages; } want[] = {
        {HKV_EVENT_STORED, 1, 0, 3},
        {HKV_EVENT_STORED, 2, 0, 3},
        {HKV_EVENT_REMOVED, 1, 1, 2},
        {HKV_EVENT_STORED, 3, 0, 2},
        {HKV_EVENT_REMOVED, 2, 0, 3},
    };
    for (int i = 0; i < 5; i++) {
        CHECK_EQ(out[i].seq, i);
        CHECK_EQ(out[i].kind, want[i].kind);
        CHECK_EQ(out[i].tier, HKV_TIER_GPU);
        CHECK_EQ(out[i].user_id, want[i].user);
        CHECK_EQ(out[i].page_index, want[i].page);
        CHECK_EQ(out[i].num_pages, want[i].pages);
    }
    CHECK_ST(hkv_cache_drain_events(c, out, -1, &n), HKV_EINVAL);
    CHECK_EQ(hkv_cache_events_pending(c), 0);
    CHECK_OK(hkv_cache_check(c));
    hkv_cache_destroy(c);

    cfg.event_capacity = -1;
    CHECK_ST(hkv_cache_create(&cfg, &c), HKV_EINVAL);
    CHECK(c == NULL);
}

void run_events_tests(void)
{
    RUN(test_events_disabled);
    RUN(test_events_order_and_fields);
    RUN(test_events_runs_merge);
    RUN(test_events_overflow_wraparound);
    RUN(test_events_cache_emission);
}
