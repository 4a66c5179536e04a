/*
 * async_queue.c - the prepare worker: one thread per cache, a FIFO of jobs.
 *
 * Locking: the worker's mutex guards the queue and every job's state; it is
 * never held while hkv_cache_allocate runs.  Where both are needed (freeing
 * a batch nobody took) the order is worker mutex, then the cache's.
 *
 * Lifetime: a job belongs to the caller from submit to hkv_prepare_free.
 * The worker struct outlives hkv_worker_stop while callers still hold jobs;
 * the last hkv_prepare_free releases it.
 */
#define _POSIX_C_SOURCE 200809L
#include "async_queue.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_rt.h"

enum { JOB_FREE = 0, JOB_QUEUED, JOB_RUNNING, JOB_DONE };

struct hkv_prepare_job {
    hkv_worker *w;
    int state;
    int abandoned;             /* freed by the caller before it was done   */
    int taken;                 /* the batch was handed to the caller       */
    int32_t batch;
    int has_candidates;
    int64_t *user_ids;         /* [max_batch] each                         */
    int64_t *lengths;
    int64_t *cached;
    int64_t *candidates;
    uint64_t *epochs;
    int64_t *keys;             /* malloc'd copy (verified mode) or NULL    */
    int64_t num_keys;
    void *stream;
    void *ready;               /* CUDA: recorded on stream at submit       */
    hkv_status status;
    char message[512];
    hkv_batch *result;
    hkv_prepare_job *next;     /* queue link                               */
};

struct hkv_worker {
    hkv_cache *cache;
    pthread_t thread;
    int thread_started;
    pthread_mutex_t lock;
    pthread_cond_t work;       /* a job was queued, or stop               */
    pthread_cond_t done;       /* a job finished                          */
    int stop;
    int stopped;               /* thread joined; cache may be gone        */
    int32_t held;              /* jobs the callers hold                   */
    int32_t max_batch;
    int32_t num_jobs;
    hkv_prepare_job *jobs;
    hkv_prepare_job *head, *tail;
};

static void job_release(hkv_prepare_job *j)
{
    free(j->keys);
    j->keys = NULL;
    j->result = NULL;
    j->state = JOB_FREE;
}

static void worker_free(hkv_worker *w)
{
    for (int32_t i = 0; w->jobs != NULL && i < w->num_jobs; i++) {
        hkv_prepare_job *j = &w->jobs[i];
        free(j->user_ids);
        free(j->lengths);
        free(j->cached);
        free(j->candidates);
        free(j->epochs);
        free(j->keys);
    }
    free(w->jobs);
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->done);
    pthread_mutex_destroy(&w->lock);
    free(w);
}

/* Finish a job (lock held): hand its result over, or free it when the
 * caller already gave the job up. */
static void job_finish(hkv_worker *w, hkv_prepare_job *j, hkv_status st, hkv_batch *bt)
{
    j->status = st;
    j->result = bt;
    j->state = JOB_DONE;
    if (j->abandoned) {
        if (bt != NULL)
            hkv_batch_free(bt);
        job_release(j);
    }
    pthread_cond_broadcast(&w->done);
}

static void *worker_main(void *arg)
{
    hkv_worker *w = arg;
    pthread_mutex_lock(&w->lock);
    for (;;) {
        while (!w->stop && w->head == NULL)
            pthread_cond_wait(&w->work, &w->lock);
        if (w->stop)
            break;
        hkv_prepare_job *j = w->head;
        w->head = j->next;
        if (w->head == NULL)
            w->tail = NULL;
        j->state = JOB_RUNNING;
        pthread_mutex_unlock(&w->lock);

        hkv_batch *bt = NULL;
        hkv_status st = hkv_cache_allocate_after(w->cache, j->batch, j->user_ids,
                                                 j->lengths, j->cached, j->epochs, j->keys,
                                                 j->num_keys,
                                                 j->has_candidates ? j->candidates : NULL,
                                                 j->stream, j->ready, &bt);
        pthread_mutex_lock(&w->lock);
        if (st != HKV_OK)
            snprintf(j->message, sizeof j->message, "%s", hkv_last_error());
        job_finish(w, j, st, st == HKV_OK ? bt : NULL);
    }
    /* stopping: what is still queued never runs */
    while (w->head != NULL) {
        hkv_prepare_job *j = w->head;
        w->head = j->next;
        snprintf(j->message, sizeof j->message,
                 "the cache was closed before this prepare ran");
        job_finish(w, j, HKV_ESTATE, NULL);
    }
    w->tail = NULL;
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

hkv_status hkv_worker_start(hkv_cache *c, int32_t max_jobs, int32_t max_batch,
                            hkv_worker **out)
{
    *out = NULL;
    hkv_worker *w = calloc(1, sizeof *w);
    if (w == NULL)
        return hkv_error(HKV_ENOMEM, "out of host memory");
    w->cache = c;
    w->max_batch = max_batch;
    w->num_jobs = max_jobs;
    if (pthread_mutex_init(&w->lock, NULL) != 0) {
        free(w);
        return hkv_error(HKV_ENOMEM, "cannot create a mutex");
    }
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->done, NULL);
    w->jobs = calloc((size_t)max_jobs, sizeof *w->jobs);
    if (w->jobs == NULL) {
        worker_free(w);
        return hkv_error(HKV_ENOMEM, "out of host memory");
    }
    size_t n = (size_t)max_batch;
    for (int32_t i = 0; i < max_jobs; i++) {
        hkv_prepare_job *j = &w->jobs[i];
        j->w = w;
        j->user_ids = malloc(n * sizeof *j->user_ids);
        j->lengths = malloc(n * sizeof *j->lengths);
        j->cached = malloc(n * sizeof *j->cached);
        j->candidates = malloc(n * sizeof *j->candidates);
        j->epochs = malloc(n * sizeof *j->epochs);
        if (!j->user_ids || !j->lengths || !j->cached || !j->candidates || !j->epochs) {
            worker_free(w);
            return hkv_error(HKV_ENOMEM, "out of host memory");
        }
    }
    int err = pthread_create(&w->thread, NULL, worker_main, w);
    if (err != 0) {
        worker_free(w);
        return hkv_error(HKV_ENOMEM, "cannot start the prepare worker thread (error %d)",
                         err);
    }
    w->thread_started = 1;
    *out = w;
    return HKV_OK;
}

void hkv_worker_stop(hkv_worker *w)
{
    if (w == NULL)
        return;
    pthread_mutex_lock(&w->lock);
    w->stop = 1;
    pthread_cond_broadcast(&w->work);
    pthread_mutex_unlock(&w->lock);
    if (w->thread_started)
        pthread_join(w->thread, NULL);
    pthread_mutex_lock(&w->lock);
    /* every job is done now: their events are not waited on any more */
    const hkv_config *cfg = hkv_cache_config(w->cache);
    for (int32_t i = 0; i < w->num_jobs; i++)
        if (w->jobs[i].ready != NULL) {
            (void)hkv_cuda_event_destroy(cfg->device_index, w->jobs[i].ready);
            w->jobs[i].ready = NULL;
        }
    w->stopped = 1;
    w->cache = NULL;
    int last = w->held == 0;
    pthread_mutex_unlock(&w->lock);
    if (last)
        worker_free(w);
}

hkv_status hkv_prepare_submit(hkv_worker *w, int32_t batch, const int64_t *user_ids,
                              const int64_t *history_lengths, const int64_t *cached_lengths,
                              const uint64_t *epochs, const int64_t *token_keys,
                              int64_t num_keys, const int64_t *num_candidates,
                              void *stream, hkv_prepare_job **out)
{
    *out = NULL;
    if (batch < 0 || batch > w->max_batch)
        return hkv_error(HKV_EINVAL, "batch of %d users is larger than max_batch_size=%d",
                         (int)batch, (int)w->max_batch);
    /* verified mode: the keys are copied (never NULL, even with no token) */
    int64_t *keys = NULL;
    if (token_keys != NULL) {
        keys = malloc((size_t)(num_keys > 0 ? num_keys : 1) * sizeof *keys);
        if (keys == NULL)
            return hkv_error(HKV_ENOMEM, "cannot copy %lld token keys", (long long)num_keys);
        memcpy(keys, token_keys, (size_t)num_keys * sizeof *keys);
    }
    pthread_mutex_lock(&w->lock);
    hkv_prepare_job *j = NULL;
    for (;;) {
        int dropped_in_flight = 0;
        for (int32_t i = 0; i < w->num_jobs && j == NULL; i++) {
            if (w->jobs[i].state == JOB_FREE)
                j = &w->jobs[i];
            else if (w->jobs[i].abandoned)
                dropped_in_flight = 1;
        }
        /* A slot whose caller already let go comes back as soon as the
         * worker is through with it: wait for that rather than fail. */
        if (j != NULL || w->stop || !dropped_in_flight)
            break;
        pthread_cond_wait(&w->done, &w->lock);
    }
    if (w->stop || j == NULL) {
        int stopping = w->stop;
        pthread_mutex_unlock(&w->lock);
        free(keys);
        return stopping ? hkv_error(HKV_ESTATE, "the cache is closing")
                        : hkv_error(HKV_EBUSY, "all %d prepare slots are in use; wait for "
                                    "or drop earlier prepares, or raise max_open_batches",
                                    (int)w->num_jobs);
    }
    /* Mark the caller's stream now, on the caller's thread: the transfers
     * wait for the work queued before this call, not for what the caller
     * queues while the worker runs (its embedding lookup, say). */
    const hkv_config *cfg = hkv_cache_config(w->cache);
    if (cfg->device_kind == HKV_DEVICE_CUDA) {
        hkv_status st = HKV_OK;
        if (j->ready == NULL)
            st = hkv_cuda_event_create(cfg->device_index, &j->ready);
        if (st == HKV_OK)
            st = hkv_cuda_event_record(cfg->device_index, j->ready, stream);
        if (st != HKV_OK) {
            pthread_mutex_unlock(&w->lock);
            free(keys);
            return st;
        }
    }
    size_t n = (size_t)batch;
    memcpy(j->user_ids, user_ids, n * sizeof *j->user_ids);
    memcpy(j->lengths, history_lengths, n * sizeof *j->lengths);
    memcpy(j->cached, cached_lengths, n * sizeof *j->cached);
    memcpy(j->epochs, epochs, n * sizeof *j->epochs);
    j->has_candidates = num_candidates != NULL;
    if (num_candidates != NULL)
        memcpy(j->candidates, num_candidates, n * sizeof *j->candidates);
    j->keys = keys;
    j->num_keys = keys != NULL ? num_keys : 0;
    j->batch = batch;
    j->stream = stream;
    j->abandoned = j->taken = 0;
    j->status = HKV_OK;
    j->message[0] = '\0';
    j->result = NULL;
    j->next = NULL;
    j->state = JOB_QUEUED;
    if (w->tail != NULL)
        w->tail->next = j;
    else
        w->head = j;
    w->tail = j;
    w->held++;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->lock);
    *out = j;
    return HKV_OK;
}

int hkv_prepare_done(hkv_prepare_job *j)
{
    pthread_mutex_lock(&j->w->lock);
    int done = j->state == JOB_DONE;
    pthread_mutex_unlock(&j->w->lock);
    return done;
}

hkv_status hkv_prepare_wait(hkv_prepare_job *j, int64_t timeout_ns, hkv_batch **out)
{
    hkv_worker *w = j->w;
    *out = NULL;
    pthread_mutex_lock(&w->lock);
    if (timeout_ns >= 0) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += timeout_ns / 1000000000;
        deadline.tv_nsec += timeout_ns % 1000000000;
        if (deadline.tv_nsec >= 1000000000) {
            deadline.tv_sec++;
            deadline.tv_nsec -= 1000000000;
        }
        while (j->state != JOB_DONE)
            if (pthread_cond_timedwait(&w->done, &w->lock, &deadline) == ETIMEDOUT &&
                j->state != JOB_DONE) {
                pthread_mutex_unlock(&w->lock);
                return hkv_error(HKV_EBUSY, "the prepare is not done yet");
            }
    } else {
        while (j->state != JOB_DONE)
            pthread_cond_wait(&w->done, &w->lock);
    }
    hkv_status st;
    if (j->taken)
        st = hkv_error(HKV_ESTATE, "the batch of this prepare was already taken");
    else if (j->status != HKV_OK)
        st = hkv_error(j->status, "%s", j->message);
    else {
        *out = j->result;
        j->taken = 1;
        st = HKV_OK;
    }
    pthread_mutex_unlock(&w->lock);
    return st;
}

void hkv_prepare_free(hkv_prepare_job *j)
{
    hkv_worker *w = j->w;
    pthread_mutex_lock(&w->lock);
    if (j->state == JOB_DONE) {
        if (!j->taken && j->result != NULL)
            hkv_batch_free(j->result);
        job_release(j);
    } else {
        j->abandoned = 1;  /* the worker frees it when it is done */
    }
    w->held--;
    int last = w->stopped && w->held == 0;
    pthread_mutex_unlock(&w->lock);
    if (last)
        worker_free(w);
}
