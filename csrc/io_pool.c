/*
 * io_pool.c - I/O worker threads around one FIFO ring.
 *
 * Locking: one mutex guards the ring and the stop flag; it is never held
 * while a job runs.  Cancelled jobs are handed to the cancel function
 * outside the lock too, so the owner may take its own locks there.
 */
#define _POSIX_C_SOURCE 200809L
#include "io_pool.h"

#include <pthread.h>
#include <stdlib.h>

struct hkv_io_pool {
    pthread_mutex_t lock;
    pthread_cond_t work;     /* a job was queued, or stop               */
    void **ring;
    int capacity;
    int head, count;         /* ring[head] is the oldest job            */
    int stop;                /* 1: drain then exit, 2: exit now         */
    int threads;             /* started                                  */
    pthread_t *tids;
    hkv_io_run_fn run;
    hkv_io_cancel_fn cancel;
    void *ctx;
};

struct worker_arg {
    hkv_io_pool *p;
    int index;
};

static void *worker_main(void *arg)
{
    struct worker_arg *wa = arg;
    hkv_io_pool *p = wa->p;
    int index = wa->index;
    free(wa);
    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (p->stop == 0 && p->count == 0)
            pthread_cond_wait(&p->work, &p->lock);
        if (p->stop == 2 || p->count == 0)
            break;  /* cancel-stop, or drain-stop with nothing left */
        void *job = p->ring[p->head];
        p->head = (p->head + 1) % p->capacity;
        p->count--;
        pthread_mutex_unlock(&p->lock);
        p->run(p->ctx, job, index);
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

static void pool_free(hkv_io_pool *p)
{
    free(p->ring);
    free(p->tids);
    pthread_cond_destroy(&p->work);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

hkv_status hkv_io_pool_start(int threads, int capacity, hkv_io_run_fn run,
                             hkv_io_cancel_fn cancel, void *ctx, hkv_io_pool **out)
{
    *out = NULL;
    if (threads <= 0 || capacity <= 0)
        return hkv_error(HKV_EINVAL, "an I/O pool needs at least one thread and one "
                         "queue slot (got %d threads, %d slots)", threads, capacity);
    hkv_io_pool *p = calloc(1, sizeof *p);
    if (p == NULL)
        return hkv_error(HKV_ENOMEM, "out of host memory");
    if (pthread_mutex_init(&p->lock, NULL) != 0) {
        free(p);
        return hkv_error(HKV_ENOMEM, "cannot create a mutex");
    }
    pthread_cond_init(&p->work, NULL);
    p->ring = calloc((size_t)capacity, sizeof *p->ring);
    p->tids = calloc((size_t)threads, sizeof *p->tids);
    if (p->ring == NULL || p->tids == NULL) {
        pool_free(p);
        return hkv_error(HKV_ENOMEM, "out of host memory");
    }
    p->capacity = capacity;
    p->run = run;
    p->cancel = cancel;
    p->ctx = ctx;
    for (int i = 0; i < threads; i++) {
        struct worker_arg *wa = malloc(sizeof *wa);
        if (wa != NULL) {
            wa->p = p;
            wa->index = i;
        }
        int err = wa == NULL ? -1 : pthread_create(&p->tids[i], NULL, worker_main, wa);
        if (err != 0) {
            free(wa);
            hkv_io_pool_stop(p, 0);
            return hkv_error(HKV_ENOMEM, "cannot start I/O thread %d (error %d)", i, err);
        }
        p->threads++;
    }
    *out = p;
    return HKV_OK;
}

hkv_status hkv_io_pool_submit(hkv_io_pool *p, void *job)
{
    pthread_mutex_lock(&p->lock);
    if (p->stop) {
        pthread_mutex_unlock(&p->lock);
        return hkv_error(HKV_ESTATE, "the I/O pool is stopping");
    }
    if (p->count == p->capacity) {
        pthread_mutex_unlock(&p->lock);
        return hkv_error(HKV_EBUSY, "the I/O queue is full (%d jobs)", p->capacity);
    }
    p->ring[(p->head + p->count) % p->capacity] = job;
    p->count++;
    pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->lock);
    return HKV_OK;
}

void hkv_io_pool_stop(hkv_io_pool *p, int drain)
{
    if (p == NULL)
        return;
    pthread_mutex_lock(&p->lock);
    p->stop = drain ? 1 : 2;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->threads; i++)
        pthread_join(p->tids[i], NULL);
    /* threads are gone: what is left never ran */
    while (p->count > 0) {
        void *job = p->ring[p->head];
        p->head = (p->head + 1) % p->capacity;
        p->count--;
        if (p->cancel != NULL)
            p->cancel(p->ctx, job);
    }
    pool_free(p);
}
