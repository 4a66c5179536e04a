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
 *   - an onboard also waits for the offloads in flight when one of them
 *     writes a host page it reads (host_tier.writes) or reads a GPU page
 *     it overwrites (page pins); otherwise the two directions overlap;
 *   - the caller's stream waits for what it depends on with
 *     cudaStreamWaitEvent: the host never blocks.
 * Pages a transfer reads stay pinned (never evicted, never reused) until its
 * event has completed; hkv_xfer_reap releases them.
 *
 * How bytes move (measured on an H100, docs/host-tier-design.md): a DMA
 * (cudaMemcpyAsync) reaches 97 %+ of the PCIe link only with pieces of
 * several MiB, a small kernel reading or writing mapped pinned memory
 * moves scattered pages at about 90 %.  So a transfer is split into runs
 * of pages consecutive on both sides (the pools hand out pages in address
 * order, so a user's pages mostly are): runs of at least dma_min_bytes per
 * layer go by DMA, one copy per run and layer (onboard) or one 2-D copy
 * per run covering every layer (offload), and the remaining pages by the
 * kernel.  Both run on the transfer's stream, in order.
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
    const int32_t *host_writes; /* host pages an offload writes            */
    int64_t n_host_writes;
    int64_t offload_bytes;      /* counted in offload_queued_bytes         */
    uint64_t bytes;             /* of the copy, all layers                 */
    uint64_t t0_ns;             /* when it was queued                      */
    int offload;                /* 1: GPU -> host, 0: host -> GPU          */
} hkv_xfer_record;

/* A run of n pages consecutive in both tables. */
typedef struct hkv_xfer_run {
    int32_t src;
    int32_t dst;
    int32_t n;
} hkv_xfer_run;

typedef struct hkv_xfer {
    int cuda;
    int device;
    void *onboard_stream;
    void *onboard_kernel_stream; /* second onboard stream: the kernel's pages
                                    and every other DMA run              */
    void *offload_stream;
    void *caller_ready;      /* the caller's stream, at hkv_xfer_begin     */
    void *ready;             /* what transfers wait for: caller_ready or
                                the event given to hkv_xfer_begin_after   */
    void *offload_done;      /* after the last offload                     */
    void *kernel_layer_done; /* the second stream's share of a layer      */
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
    hkv_xfer_run *runs;      /* scratch of one transfer                    */
    int64_t dma_min_bytes;   /* shortest piece worth a DMA; 0: kernel only */
    int64_t offload_queued_bytes;
    /* fault injection (tests): HSTU_KVCACHE_DEBUG_COPY_DELAY_US delays
     * every copy on its stream; skip_waits (set by the cache from
     * HSTU_KVCACHE_DEBUG_SKIP_WAITS=1) drops the waits between transfers
     * (the ordering tests must then fail) */
    int delay_us;
    int skip_waits;
    int fail_skip;           /* HSTU_KVCACHE_DEBUG_FAIL_TRANSFERS="S:N": after
                                S transfers, N fail at launch (tests)     */
    int fail_next;
    /* counters */
    uint64_t onboard_pages, offload_pages, onboard_bytes, offload_bytes;
    uint64_t transfers;
    uint64_t dma_bytes, kernel_bytes;  /* bytes moved by each mechanism   */
    uint64_t backpressure_waits;       /* offloads that waited for room   */
    uint64_t onboard_ns, offload_ns;  /* copy time (CUDA: queued to seen done) */
    hkv_histogram onboard_latency, offload_latency;
} hkv_xfer;

/* copy_engines 0: every page by the copy kernel, the GPU's copy engines
 * stay free for the caller's own copies (HSTU_KVCACHE_DMA_MIN_BYTES, when
 * set, overrides either way). */
hkv_status hkv_xfer_init(hkv_xfer *x, int cuda, int device, int64_t ring_cap,
                         int copy_engines);
/* Waits for every transfer, then frees streams, events and the ring. */
void hkv_xfer_destroy(hkv_xfer *x);

/* Mark the caller's stream: transfers queued after this wait for its work. */
hkv_status hkv_xfer_begin(hkv_xfer *x, void *caller_stream);
/* The same with an event the caller recorded earlier (kept, not copied:
 * it must stay valid until the transfers are queued). */
hkv_status hkv_xfer_begin_after(hkv_xfer *x, void *ready);

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

/*
 * Room for an offload of `bytes` within `budget` queued offload bytes.
 * Finished transfers are reaped first; then, if `block`, the oldest
 * transfers are waited for (backpressure) until it fits or nothing is in
 * flight.  *fits tells the result; an offload larger than the whole budget
 * fits once the queue is empty.
 */
hkv_status hkv_xfer_offload_room(hkv_xfer *x, hkv_page *gpu_pages, hkv_host_tier *host,
                                 int64_t bytes, int64_t budget, int block, int *fits);

/*
 * Split n page pairs src[i] -> dst[i] into runs of consecutive ids on both
 * sides that are at least min_pages long (written to runs, returned count)
 * and the other pairs.  The pairs are rewritten into src_out / dst_out
 * (n each): the other pairs first (*n_rest of them), then the runs' pairs.
 * min_pages <= 0: no runs.  Exposed for tests.
 */
int64_t hkv_xfer_split_runs(const int32_t *src, const int32_t *dst, int64_t n,
                            int64_t min_pages, hkv_xfer_run *runs, int32_t *src_out,
                            int32_t *dst_out, int64_t *n_rest);

#endif /* HKV_TRANSFER_H */
