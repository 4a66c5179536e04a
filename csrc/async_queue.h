/*
 * async_queue.h - asynchronous prepare: allocation (eviction, write-back,
 * metadata upload, onboarding launch) on a worker thread of the cache.
 *
 * The caller looks its batch up synchronously (it needs the cached lengths
 * at once to strip cached tokens), submits the allocation and goes on with
 * its embedding lookup; the worker runs hkv_cache_allocate, which queues
 * its GPU work on the caller's stream and the side streams.  The caller
 * then waits for the job (or polls it) and gets the batch.
 *
 * Jobs come from a fixed set (max_open_batches of them), so submitting
 * allocates nothing but the copy of verified-mode keys.
 */
#ifndef HKV_ASYNC_QUEUE_H
#define HKV_ASYNC_QUEUE_H

#include <stdint.h>

#include "cache.h"
#include "status.h"

typedef struct hkv_worker hkv_worker;
typedef struct hkv_prepare_job hkv_prepare_job;

hkv_status hkv_worker_start(hkv_cache *c, int32_t max_jobs, int32_t max_batch,
                            hkv_worker **out);
/* Cancel queued jobs (they fail with HKV_ESTATE), finish the running one,
 * join the thread.  Jobs still held by callers stay valid until freed. */
void hkv_worker_stop(hkv_worker *w);

/* Queue the allocation of a looked-up batch (arguments as
 * hkv_cache_allocate; they are copied). */
hkv_status hkv_prepare_submit(hkv_worker *w, int32_t batch, const int64_t *user_ids,
                              const int64_t *history_lengths, const int64_t *cached_lengths,
                              const uint64_t *epochs, const int64_t *token_keys,
                              int64_t num_keys, const int64_t *num_candidates,
                              void *stream, hkv_prepare_job **out);

/* 1 once the allocation has finished (successfully or not). */
int hkv_prepare_done(hkv_prepare_job *j);

/*
 * Wait up to timeout_ns (< 0: forever) and take the batch.  HKV_EBUSY if it
 * is not done in time (the job stays valid), else the allocation's status;
 * the batch is handed over once (a second wait fails with HKV_ESTATE).
 */
hkv_status hkv_prepare_wait(hkv_prepare_job *j, int64_t timeout_ns, hkv_batch **out);

/* Give the job back; a batch nobody took is freed (after the job ran). */
void hkv_prepare_free(hkv_prepare_job *j);

#endif /* HKV_ASYNC_QUEUE_H */
