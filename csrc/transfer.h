/*
 * transfer.h - the transfer engine: page copies between the GPU tier and the
 * host tier, on side CUDA streams, with the events that order them.
 *
 * Onboard (host -> GPU) runs on its own stream, offload (GPU -> host) on
 * another, so the two directions use both copy paths at once and neither
 * waits for the caller's compute stream more than the ordering rules say:
 *   - every transfer first waits for the caller's work queued so far
 *     (hkv_xfer_begin): pages being offloaded are complete, pages being
 *     overwritten by an onboard are no longer read;
 *   - an onboard also waits for every offload queued before it (the host
 *     pages it reads may have been written by one);
 *   - the caller's stream waits for what it depends on with
 *     cudaStreamWaitEvent: the host never blocks.
 * Pages a transfer reads stay pinned (never evicted, never reused) until its
 * event has completed; hkv_xfer_reap releases them.
 *
 * Page ids travel to the kernels in a ring of pinned, device-mapped memory,
 * so launching a transfer needs no upload.  On the CPU path every copy is a
 * synchronous memcpy and nothing stays pinned.
 */
#ifndef HKV_TRANSFER_H
#define HKV_TRANSFER_H

#include <stdint.h>

#include "host_tier.h"
#include "kernels.h"
#include "metrics.h"
#include "page_pool.h"
#include "status.h"

typedef struct hkv_xfer_record {
    void *event;
    int64_t ring_end;        /* ring slot after this transfer's ids        */
    const int32_t *gpu_pins; /* pages pinned until the event (in the ring) */
    int64_t n_gpu_pins;
    const int32_t *host_pins;
    int64_t n_host_pins;
    uint64_t bytes;          /* of the copy, all layers                    */
    uint64_t t0_ns;          /* when it was queued                         */
    int offload;             /* 1: GPU -> host, 0: host -> GPU             */
} hkv_xfer_record;

typedef struct hkv_xfer {
    int cuda;
    int device;
    void *onboard_stream;
    void *offload_stream;
    void *caller_ready;      /* the caller's stream, at hkv_xfer_begin     */
    void *offload_done;      /* after the last offload                     */
    int offload_pending;     /* an offload was queued since creation       */
    int32_t *ring;
    int32_t *ring_dev;       /* the ring's device address (CUDA)           */
    int64_t ring_cap;
    int64_t ring_head;       /* next free slot (monotonic, mod ring_cap)   */
    int64_t ring_tail;       /* oldest slot still used                     */
    hkv_xfer_record *records;
    int32_t rec_cap;
    int32_t rec_head;        /* oldest in flight                           */
    int32_t rec_count;
    void **free_events;
    int32_t num_free_events;
    int32_t events_cap;
    /* fault injection (tests): HSTU_KVCACHE_DEBUG_COPY_DELAY_US delays
     * every copy on its stream, HSTU_KVCACHE_DEBUG_SKIP_WAITS=1 drops the
     * caller's waits (the ordering tests must then fail) */
    int delay_us;
    int skip_waits;
    /* counters */
    uint64_t onboard_pages, offload_pages, onboard_bytes, offload_bytes;
    uint64_t transfers;
    uint64_t onboard_ns, offload_ns;  /* copy time (CUDA: queued to seen done) */
    int64_t offload_queued_bytes;     /* offloads queued, not yet seen done    */
    hkv_histogram onboard_latency, offload_latency;
} hkv_xfer;

hkv_status hkv_xfer_init(hkv_xfer *x, int cuda, int device, int64_t ring_cap);
/* Waits for every transfer, then frees streams, events and the ring. */
void hkv_xfer_destroy(hkv_xfer *x);

/* Mark the caller's stream: transfers queued after this wait for its work. */
hkv_status hkv_xfer_begin(hkv_xfer *x, void *caller_stream);

/*
 * Offload n pages (all layers) from the GPU table to the host table:
 * host[host_ids[i]] = gpu[gpu_ids[i]].  The GPU pages stay pinned until the
 * copy has read them when pin_gpu is set (pages that stay resident); pages
 * freed by eviction are instead protected by *done, which the reuser must
 * wait for.  *done (may be NULL) receives an event completing with the copy
 * (NULL on the CPU path).
 */
hkv_status hkv_xfer_offload(hkv_xfer *x, hkv_page *gpu_pages, const hkv_table_desc *gpu,
                            hkv_host_tier *host, const int32_t *gpu_ids,
                            const int32_t *host_ids, int64_t n, int pin_gpu, void **done);

/*
 * Onboard n pages from the host table to the GPU table, one launch per layer
 * so layer l is usable once layer_events[l] has completed (layer_events has
 * num_layers slots; on the CPU path nothing is recorded).  The host pages
 * stay pinned until the last layer is in.
 */
hkv_status hkv_xfer_onboard(hkv_xfer *x, hkv_page *gpu_pages, const hkv_table_desc *gpu,
                            hkv_host_tier *host, const int32_t *host_ids,
                            const int32_t *gpu_ids, int64_t n, void **layer_events);

/* Release the pins of every transfer whose event has completed. */
hkv_status hkv_xfer_reap(hkv_xfer *x, hkv_page *gpu_pages, hkv_host_tier *host);

#endif /* HKV_TRANSFER_H */
