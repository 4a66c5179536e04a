/*
 * test_async.c - the prepare worker (async_queue.c) under the sanitizers:
 * results equal the synchronous path, errors travel to the waiter, dropped
 * jobs free their batches, full slots, stopping with jobs queued or held.
 */
#include "async_queue.h"
#include "cache_util.h"
#include "harness.h"

/* Submit r's allocation to the worker (after a lookup). */
static hkv_status submit(hkv_cache *c, req *r, hkv_prepare_job **job)
{
    hkv_status st = req_lookup(c, r);
    if (st != HKV_OK)
        return st;
    return hkv_cache_prepare_async(c, r->n, r->ids, r->lens, r->cached, r->epochs, NULL, 0,
                                   NULL, NULL, job);
}

static void test_async_matches_sync(void)
{
    hkv_config cfg = cfg_small(2, 4, 64, 4, 64);
    hkv_cache *c = NULL;
    CHECK_OK(hkv_cache_create(&cfg, &c));
    for (int round = 0; round < 5; round++) {
        req r;
        req_init(&r);
        req_add(&r, 1, 3 + 4 * round);
        req_add(&r, 2, 10 + round);
        hkv_prepare_job *job = NULL;
        CHECK_OK(submit(c, &r, &job));
        hkv_batch *bt = NULL;
        CHECK_OK(hkv_prepare_wait(job, -1, &bt));
        CHECK(hkv_prepare_done(job));
        hkv_batch *again = NULL;
        CHECK_ST(hkv_prepare_wait(job, 0, &again), HKV_ESTATE);  /* taken once */
        CHECK(again == NULL);
        hkv_prepare_free(job);
        CHECK_OK(req_append_all(c, bt, &r));
        CHECK(req_check_read(c, bt, &r, 1) == 0);
        hkv_batch_free(bt);
        CHECK(check_user_default(c, 1, 3 + 4 * round) == 0);
    }
    CHECK_OK(hkv_cache_check(c));
    hkv_cache_destroy(c);
}

static void test_async_errors_reach_the_waiter(void)
{
    hkv_config cfg = cfg_small(1, 4, 4, 4, 64);
    hkv_cache *c = NULL;
    CHECK_OK(hkv_cache_create(&cfg, &c));
    req r;
    req_init(&r);
    req_add(&r, 1, 40);  /* 10 pages > 4 */
    hkv_prepare_job *job = NULL;
    CHECK_OK(submit(c, &r, &job));
    hkv_batch *bt = NULL;
    CHECK_ST(hkv_prepare_wait(job, -1, &bt), HKV_EFULL);
    CHECK(bt == NULL);
    CHECK(hkv_last_error()[0] != '\0');
    hkv_prepare_free(job);
    CHECK_OK(hkv_cache_check(c));
    hkv_cache_destroy(c);
}

static void test_async_dropped_jobs_and_slots(void)
{
    hkv_config cfg = cfg_small(1, 4, 64, 4, 64);
    cfg.max_open_batches = 2;
    hkv_cache *c = NULL;
    CHECK_OK(hkv_cache_create(&cfg, &c));
    /* held jobs fill the slots ... */
    req r1, r2, r3;
    req_init(&r1);
    req_add(&r1, 1, 5);
    req_init(&r2);
    req_add(&r2, 2, 5);
    req_init(&r3);
    req_add(&r3, 3, 5);
    hkv_prepare_job *j1 = NULL, *j2 = NULL, *j3 = NULL;
    CHECK_OK(submit(c, &r1, &j1));
    CHECK_OK(submit(c, &r2, &j2));
    CHECK_ST(submit(c, &r3, &j3), HKV_EBUSY);
    /* ... dropped ones come back (and their batches are freed) */
    hkv_prepare_free(j1);
    hkv_prepare_free(j2);
    for (int i = 0; i < 50; i++) {
        req r;
        req_init(&r);
        req_add(&r, 100 + i, 6);
        hkv_prepare_job *j = NULL;
        CHECK_OK(submit(c, &r, &j));
        hkv_prepare_free(j);
    }
    CHECK_OK(submit(c, &r3, &j3));
    hkv_batch *bt = NULL;
    CHECK_OK(hkv_prepare_wait(j3, -1, &bt));
    hkv_prepare_free(j3);
    hkv_batch_free(bt);
    hkv_cache_destroy(c);  /* the worker finishes the dropped jobs first */
}

static void test_async_stop_with_jobs_held(void)
{
    for (int k = 0; k < 20; k++) {
        hkv_config cfg = cfg_small(1, 4, 64, 4, 64);
        hkv_cache *c = NULL;
        CHECK_OK(hkv_cache_create(&cfg, &c));
        hkv_prepare_job *jobs[6];
        for (int i = 0; i < 6; i++) {
            req r;
            req_init(&r);
            req_add(&r, i + 1, 7);
            CHECK_OK(submit(c, &r, &jobs[i]));
        }
        hkv_cache_destroy(c);  /* queued jobs are cancelled, the worker outlives */
        for (int i = 0; i < 6; i++) {
            hkv_batch *bt = NULL;
            hkv_status st = hkv_prepare_wait(jobs[i], -1, &bt);
            CHECK(st == HKV_OK || st == HKV_ESTATE);
            if (bt != NULL)
                hkv_batch_free(bt);  /* abandoned by the cache: memory only */
            hkv_prepare_free(jobs[i]);
        }
    }
}

void run_async_tests(void)
{
    RUN(test_async_matches_sync);
    RUN(test_async_errors_reach_the_waiter);
    RUN(test_async_dropped_jobs_and_slots);
    RUN(test_async_stop_with_jobs_held);
}
