/*
 * io_pool.h - a pool of POSIX threads that run blocking I/O jobs.
 *
 * The disk tier must never do a pread/pwrite/fdatasync on the caller's
 * thread (inference must not wait for an SSD), so its I/O goes through
 * this pool.  A job is an opaque pointer handed to the pool's run
 * function together with the worker's number, so the owner can give each
 * worker its own scratch (an aligned staging buffer) without a lock.
 *
 * The queue is a fixed ring (capacity given at start): submitting never
 * allocates and never blocks; a full ring is reported (HKV_EBUSY) and the
 * caller decides (the disk tier keeps at most `capacity` jobs in flight,
 * so for it the ring is never full).
 *
 * Shutdown: hkv_io_pool_stop either runs what is queued (drain) or hands
 * each queued job to the cancel function instead; in both cases the jobs
 * already running finish, and the threads are joined before it returns.
 */
#ifndef HKV_IO_POOL_H
#define HKV_IO_POOL_H

#include "status.h"

typedef struct hkv_io_pool hkv_io_pool;

/* Runs a job on worker `worker` (0 .. threads-1), no pool lock held. */
typedef void (*hkv_io_run_fn)(void *ctx, void *job, int worker);
/* Called (on the stopping thread) for each queued job that will not run. */
typedef void (*hkv_io_cancel_fn)(void *ctx, void *job);

hkv_status hkv_io_pool_start(int threads, int capacity, hkv_io_run_fn run,
                             hkv_io_cancel_fn cancel, void *ctx, hkv_io_pool **out);

/* Queue a job: HKV_EBUSY when the ring is full, HKV_ESTATE once stopping. */
hkv_status hkv_io_pool_submit(hkv_io_pool *p, void *job);

/* Stop: drain != 0 runs the queued jobs first, else cancels them; joins
 * the threads and frees the pool.  NULL is a no-op. */
void hkv_io_pool_stop(hkv_io_pool *p, int drain);

#endif /* HKV_IO_POOL_H */
