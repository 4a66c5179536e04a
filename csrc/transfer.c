/*
 * transfer.c - streams, events and the pinned id ring of the transfer engine.
 */
#include "transfer.h"

#include <stdlib.h>
#include <string.h>

#include "cuda_rt.h"

#define RECORDS 256
/* Pieces below this go by the kernel: on the H100 a DMA of 1 MiB already
 * moves about 45 GB/s and one of 4 MiB+ over 52 GB/s, while the kernel
 * moves scattered pages at about 50 GB/s (docs/host-tier-design.md). */
#define DEFAULT_DMA_MIN_BYTES (1 << 20)
/* Runs shorter than this on average are spread over two streams. */
#define SPLIT_RUN_BYTES (4 << 20)

hkv_status hkv_xfer_init(hkv_xfer *x, int cuda, int device, int64_t ring_cap,
                         int copy_engines)
{
    memset(x, 0, sizeof *x);
    x->cuda = cuda;
    x->device = device;
    const char *env = getenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US");
    x->delay_us = env ? atoi(env) : 0;
    /* HSTU_KVCACHE_DMA_MIN_BYTES: benchmarks compare the mechanisms (0
     * disables DMA), tests force both paths */
    env = getenv("HSTU_KVCACHE_DEBUG_FAIL_TRANSFERS");
    if (env != NULL) {
        const char *colon = strchr(env, ':');
        x->fail_skip = colon ? atoi(env) : 0;
        x->fail_next = atoi(colon ? colon + 1 : env);
    }
    env = getenv("HSTU_KVCACHE_DMA_MIN_BYTES");
    x->dma_min_bytes = env ? atoll(env) : copy_engines ? DEFAULT_DMA_MIN_BYTES : 0;
    x->ring_cap = ring_cap;
    x->rec_cap = RECORDS;
    x->events_cap = RECORDS + 8;
    x->records = calloc(RECORDS, sizeof *x->records);
    x->free_events = calloc((size_t)x->events_cap, sizeof *x->free_events);
    x->runs = malloc(((size_t)ring_cap / 2 + 1) * sizeof *x->runs);
    if (x->records == NULL || x->free_events == NULL || x->runs == NULL) {
        hkv_xfer_destroy(x);
        return hkv_error(HKV_ENOMEM, "out of host memory");
    }
    hkv_status st = HKV_OK;
    if (!cuda) {
        x->ring = malloc((size_t)ring_cap * sizeof *x->ring);
        if (x->ring == NULL)
            st = hkv_error(HKV_ENOMEM, "out of host memory");
    } else {
        st = hkv_cuda_host_alloc((size_t)ring_cap * sizeof *x->ring, (void **)&x->ring);
        if (st == HKV_OK)
            st = hkv_cuda_host_device_pointer(x->ring, (void **)&x->ring_dev);
        if (st == HKV_OK)
            st = hkv_cuda_stream_create(device, &x->onboard_stream);
        if (st == HKV_OK)
            st = hkv_cuda_stream_create(device, &x->onboard_kernel_stream);
        if (st == HKV_OK)
            st = hkv_cuda_stream_create(device, &x->offload_stream);
        if (st == HKV_OK)
            st = hkv_cuda_event_create(device, &x->kernel_layer_done);
        if (st == HKV_OK)
            st = hkv_cuda_event_create(device, &x->caller_ready);
        if (st == HKV_OK)
            st = hkv_cuda_event_create(device, &x->offload_done);
        x->ready = x->caller_ready;
    }
    if (st != HKV_OK)
        hkv_xfer_destroy(x);
    return st;
}

static hkv_status take_event(hkv_xfer *x, void **ev)
{
    if (x->num_free_events > 0) {
        *ev = x->free_events[--x->num_free_events];
        return HKV_OK;
    }
    return hkv_cuda_event_create(x->device, ev);
}

static void give_event(hkv_xfer *x, void *ev)
{
    if (x->num_free_events < x->events_cap)
        x->free_events[x->num_free_events++] = ev;
    else
        (void)hkv_cuda_event_destroy(x->device, ev);
}

/* Add one transfer's time to its direction's counters. */
static void count_time(hkv_xfer *x, int offload, uint64_t ns)
{
    if (offload) {
        x->offload_ns += ns;
        hkv_histogram_observe(&x->offload_latency, ns);
    } else {
        x->onboard_ns += ns;
        hkv_histogram_observe(&x->onboard_latency, ns);
    }
}

/* Count a queued (CUDA) or finished (CPU) transfer of n pages; on CUDA
 * n_kernel of them went by the copy kernel and the rest by DMA (the CPU
 * path's memcpy is neither).  layer_page_bytes is one page of one layer. */
static void count_transfer(hkv_xfer *x, int offload, int64_t n, int64_t n_kernel,
                           int64_t layer_page_bytes, int32_t layers)
{
    const uint64_t per_page = (uint64_t)layer_page_bytes * (uint64_t)layers;
    if (offload) {
        x->offload_pages += (uint64_t)n;
        x->offload_bytes += (uint64_t)n * per_page;
    } else {
        x->onboard_pages += (uint64_t)n;
        x->onboard_bytes += (uint64_t)n * per_page;
    }
    if (x->cuda) {
        x->kernel_bytes += (uint64_t)n_kernel * per_page;
        x->dma_bytes += (uint64_t)(n - n_kernel) * per_page;
    }
    x->transfers++;
}

/* Retire the oldest record: its copy has completed. */
static void retire(hkv_xfer *x, hkv_page *gpu_pages, hkv_host_tier *host)
{
    hkv_xfer_record *r = &x->records[x->rec_head];
    for (int64_t i = 0; i < r->n_gpu_pins; i++)
        gpu_pages[r->gpu_pins[i]].pins--;
    for (int64_t i = 0; i < r->n_host_pins; i++)
        hkv_host_unpin(host, r->host_pins[i]);
    for (int64_t i = 0; i < r->n_host_writes; i++)
        host->writes[r->host_writes[i]]--;
    x->offload_queued_bytes -= r->offload_bytes;
    count_time(x, r->offload, hkv_now_ns() - r->t0_ns);
    x->ring_tail = r->ring_end;
    give_event(x, r->event);
    x->rec_head = (x->rec_head + 1) % x->rec_cap;
    x->rec_count--;
}

hkv_status hkv_xfer_reap(hkv_xfer *x, hkv_page *gpu_pages, hkv_host_tier *host)
{
    while (x->rec_count > 0) {
        int done = 0;
        hkv_status st = hkv_cuda_event_query(x->device, x->records[x->rec_head].event,
                                             &done);
        if (st != HKV_OK)
            return st;
        if (!done)
            break;
        retire(x, gpu_pages, host);
    }
    return HKV_OK;
}

/* Wait for the oldest transfer and retire it (room in the ring/records). */
static hkv_status retire_oldest(hkv_xfer *x, hkv_page *gpu_pages, hkv_host_tier *host)
{
    hkv_status st = hkv_cuda_event_sync(x->device, x->records[x->rec_head].event);
    if (st == HKV_OK)
        retire(x, gpu_pages, host);
    return st;
}

/* Room for n ids, contiguous in the ring: *slot is the first (a monotonic
 * slot number), *old_head what to restore if the transfer is abandoned. */
static hkv_status ring_take(hkv_xfer *x, int64_t n, hkv_page *gpu_pages,
                            hkv_host_tier *host, int64_t *slot, int64_t *old_head)
{
    if (n > x->ring_cap)
        return hkv_error(HKV_EINVAL, "a transfer of %lld page ids exceeds the id ring "
                         "of %lld", (long long)n, (long long)x->ring_cap);
    for (;;) {
        int64_t off = x->ring_head % x->ring_cap;
        int64_t skip = off + n > x->ring_cap ? x->ring_cap - off : 0;
        if (x->rec_count == 0)
            x->ring_tail = x->ring_head;  /* nothing in flight: all free */
        if (x->ring_head - x->ring_tail + skip + n <= x->ring_cap &&
            x->rec_count < x->rec_cap) {
            *old_head = x->ring_head;
            *slot = x->ring_head + skip;
            x->ring_head = *slot + n;
            return HKV_OK;
        }
        hkv_status st = retire_oldest(x, gpu_pages, host);
        if (st != HKV_OK)
            return st;
    }
}

static int32_t *ring_at(hkv_xfer *x, int64_t slot)
{
    return x->ring + slot % x->ring_cap;
}

int64_t hkv_xfer_split_runs(const int32_t *src, const int32_t *dst, int64_t n,
                            int64_t min_pages, hkv_xfer_run *runs, int32_t *src_out,
                            int32_t *dst_out, int64_t *n_rest)
{
    int64_t nruns = 0, rest = 0, back = n;
    for (int64_t i = 0; i < n;) {
        int64_t j = i + 1;
        while (j < n && src[j] == src[j - 1] + 1 && dst[j] == dst[j - 1] + 1)
            j++;
        if (min_pages > 0 && j - i >= min_pages) {
            runs[nruns].src = src[i];
            runs[nruns].dst = dst[i];
            runs[nruns].n = (int32_t)(j - i);
            nruns++;
            back -= j - i;
            memcpy(src_out + back, src + i, (size_t)(j - i) * sizeof *src);
            memcpy(dst_out + back, dst + i, (size_t)(j - i) * sizeof *dst);
        } else {
            memcpy(src_out + rest, src + i, (size_t)(j - i) * sizeof *src);
            memcpy(dst_out + rest, dst + i, (size_t)(j - i) * sizeof *dst);
            rest += j - i;
        }
        i = j;
    }
    *n_rest = rest;
    return nruns;
}

/*
 * Put a transfer's pairs into the device-visible ring (src ids, then dst
 * ids), split into DMA runs (x->runs) and the pairs the kernel copies,
 * which come first in both lists; point the kernel's arguments at them.
 */
static hkv_status stage_ids(hkv_xfer *x, hkv_copy_pages_args *a, const int32_t *src_ids,
                            const int32_t *dst_ids, int64_t n, hkv_page *gpu_pages,
                            hkv_host_tier *host, int64_t *slot, int64_t *old_head,
                            int64_t *nruns)
{
    hkv_status st = ring_take(x, 2 * n, gpu_pages, host, slot, old_head);
    if (st != HKV_OK)
        return st;
    int32_t *ids = ring_at(x, *slot);
    int64_t min_pages = x->dma_min_bytes > 0
                            ? (x->dma_min_bytes + a->page_bytes - 1) / a->page_bytes
                            : 0;
    if (min_pages == 1)
        min_pages = 2;  /* a single page is never worth a DMA of its own */
    *nruns = hkv_xfer_split_runs(src_ids, dst_ids, n, min_pages, x->runs, ids, ids + n,
                                 &a->n);
    /* the kernel reads them through the device's mapping of the ring */
    int32_t *dev = x->ring_dev + (ids - x->ring);
    a->src_ids = dev;
    a->dst_ids = dev + n;
    return HKV_OK;
}

/* Fault injection: the caller handles a failed launch as it would a CUDA
 * error (pages it was filling read as a miss, nothing else changes). */
static hkv_status injected_failure(hkv_xfer *x, const char *what)
{
    if (x->fail_next <= 0)
        return HKV_OK;
    if (x->fail_skip > 0) {
        x->fail_skip--;
        return HKV_OK;
    }
    x->fail_next--;
    return hkv_error(HKV_ECUDA, "%s failed (injected by HSTU_KVCACHE_DEBUG_FAIL_TRANSFERS)",
                     what);
}

static void push_record(hkv_xfer *x, void *event, int64_t ring_end,
                        const int32_t *gpu_pins, int64_t n_gpu,
                        const int32_t *host_pins, int64_t n_host,
                        const int32_t *host_writes, int64_t n_writes, int64_t offload_bytes,
                        uint64_t bytes, uint64_t t0_ns, int offload)
{
    hkv_xfer_record *r = &x->records[(x->rec_head + x->rec_count) % x->rec_cap];
    r->bytes = bytes;
    r->t0_ns = t0_ns;
    r->offload = offload;
    r->event = event;
    r->ring_end = ring_end;
    r->gpu_pins = gpu_pins;
    r->n_gpu_pins = n_gpu;
    r->host_pins = host_pins;
    r->n_host_pins = n_host;
    r->host_writes = host_writes;
    r->n_host_writes = n_writes;
    r->offload_bytes = offload_bytes;
    x->offload_queued_bytes += offload_bytes;
    x->rec_count++;
}

hkv_status hkv_xfer_offload_room(hkv_xfer *x, hkv_page *gpu_pages, hkv_host_tier *host,
                                 int64_t bytes, int64_t budget, int block, int *fits)
{
    hkv_status st = hkv_xfer_reap(x, gpu_pages, host);
    int waited = 0;
    while (st == HKV_OK && x->offload_queued_bytes > 0 &&
           x->offload_queued_bytes + bytes > budget && block) {
        st = retire_oldest(x, gpu_pages, host);
        waited = 1;
    }
    if (waited)
        x->backpressure_waits++;
    *fits = st == HKV_OK &&
            (x->offload_queued_bytes == 0 || x->offload_queued_bytes + bytes <= budget);
    return st;
}

void hkv_xfer_destroy(hkv_xfer *x)
{
    if (x->cuda) {
        if (x->onboard_stream)
            (void)hkv_cuda_stream_sync(x->device, x->onboard_stream);
        if (x->onboard_kernel_stream)
            (void)hkv_cuda_stream_sync(x->device, x->onboard_kernel_stream);
        if (x->offload_stream)
            (void)hkv_cuda_stream_sync(x->device, x->offload_stream);
        for (int32_t i = 0; i < x->rec_count; i++)
            (void)hkv_cuda_event_destroy(
                x->device, x->records[(x->rec_head + i) % x->rec_cap].event);
        for (int32_t i = 0; i < x->num_free_events; i++)
            (void)hkv_cuda_event_destroy(x->device, x->free_events[i]);
        if (x->caller_ready)
            (void)hkv_cuda_event_destroy(x->device, x->caller_ready);
        if (x->offload_done)
            (void)hkv_cuda_event_destroy(x->device, x->offload_done);
        if (x->kernel_layer_done)
            (void)hkv_cuda_event_destroy(x->device, x->kernel_layer_done);
        if (x->onboard_kernel_stream)
            (void)hkv_cuda_stream_destroy(x->device, x->onboard_kernel_stream);
        if (x->onboard_stream)
            (void)hkv_cuda_stream_destroy(x->device, x->onboard_stream);
        if (x->offload_stream)
            (void)hkv_cuda_stream_destroy(x->device, x->offload_stream);
        if (x->ring)
            (void)hkv_cuda_host_free(x->ring);
    } else {
        free(x->ring);
    }
    free(x->records);
    free(x->free_events);
    free(x->runs);
    memset(x, 0, sizeof *x);
}

hkv_status hkv_xfer_begin(hkv_xfer *x, void *caller_stream)
{
    if (!x->cuda)
        return HKV_OK;
    x->ready = x->caller_ready;
    return hkv_cuda_event_record(x->device, x->caller_ready, caller_stream);
}

hkv_status hkv_xfer_begin_after(hkv_xfer *x, void *ready)
{
    x->ready = ready;
    return HKV_OK;
}

static hkv_copy_pages_args copy_args(const hkv_table_desc *gpu, const hkv_host_tier *host,
                                     int to_host)
{
    hkv_copy_pages_args a;
    memset(&a, 0, sizeof a);
    a.page_bytes = hkv_page_bytes(gpu);
    /* on CUDA the host table is given by its device address (the CPU path
     * uses the same pointer: table_dev == table->ptr there) */
    a.src = to_host ? gpu->base : host->table_dev;
    a.dst = to_host ? host->table_dev : gpu->base;
    a.src_num_pages = to_host ? gpu->num_pages : host->num_pages;
    a.dst_num_pages = to_host ? host->num_pages : gpu->num_pages;
    return a;
}

hkv_status hkv_xfer_offload(hkv_xfer *x, hkv_page *gpu_pages, const hkv_table_desc *gpu,
                            hkv_host_tier *host, const int32_t *gpu_ids,
                            const int32_t *host_ids, int64_t n, int pin_gpu, void **done)
{
    if (done)
        *done = NULL;
    if (n <= 0)
        return HKV_OK;
    hkv_status fail = injected_failure(x, "offload");
    if (fail != HKV_OK)
        return fail;
    hkv_copy_pages_args a = copy_args(gpu, host, 1);
    a.first_layer = 0;
    a.num_layers = gpu->num_layers;
    a.n = n;
    const int64_t bytes = n * a.page_bytes * gpu->num_layers;
    const uint64_t t0 = hkv_now_ns();
    if (!x->cuda) {
        a.src_ids = gpu_ids;
        a.dst_ids = host_ids;
        hkv_cpu_copy_pages(&a);
        count_time(x, 1, hkv_now_ns() - t0);
        count_transfer(x, 1, n, 0, a.page_bytes, gpu->num_layers);
        return HKV_OK;
    }
    int64_t slot, old_head, nruns;
    hkv_status st = stage_ids(x, &a, gpu_ids, host_ids, n, gpu_pages, host, &slot,
                              &old_head, &nruns);
    if (st != HKV_OK)
        return st;
    void *ev = NULL;
    st = hkv_cuda_stream_wait_event(x->device, x->offload_stream, x->ready);
    if (st == HKV_OK && x->delay_us > 0)
        st = hkv_cuda_spin(x->device, x->offload_stream, x->delay_us);
    /* a run, every layer: one 2-D copy, rows a table layer apart */
    char *host_base = host->table->ptr;
    const size_t gpu_pitch = (size_t)gpu->num_pages * (size_t)a.page_bytes;
    const size_t host_pitch = (size_t)host->num_pages * (size_t)a.page_bytes;
    for (int64_t r = 0; st == HKV_OK && r < nruns; r++) {
        const hkv_xfer_run *run = &x->runs[r];
        st = hkv_cuda_memcpy2d_async(
            x->device, host_base + (size_t)run->dst * (size_t)a.page_bytes, host_pitch,
            (const char *)gpu->base + (size_t)run->src * (size_t)a.page_bytes, gpu_pitch,
            (size_t)run->n * (size_t)a.page_bytes, (size_t)gpu->num_layers,
            x->offload_stream);
    }
    if (st == HKV_OK && a.n > 0)
        st = hkv_cuda_copy_pages(&a, x->device, x->offload_stream);
    if (st == HKV_OK)
        st = take_event(x, &ev);
    if (st == HKV_OK)
        st = hkv_cuda_event_record(x->device, ev, x->offload_stream);
    if (st == HKV_OK)
        st = hkv_cuda_event_record(x->device, x->offload_done, x->offload_stream);
    if (st != HKV_OK) {
        /* Copies may be queued: wait for them before reusing the ids. */
        (void)hkv_cuda_stream_sync(x->device, x->offload_stream);
        x->ring_head = old_head;
        if (ev != NULL)
            give_event(x, ev);
        return st;
    }
    count_transfer(x, 1, n, a.n, a.page_bytes, gpu->num_layers);
    const int32_t *ids = ring_at(x, slot);  /* host view of the staged ids */
    if (pin_gpu)
        for (int64_t i = 0; i < n; i++)
            gpu_pages[ids[i]].pins++;
    for (int64_t i = 0; i < n; i++)
        host->writes[ids[n + i]]++;
    push_record(x, ev, slot + 2 * n, pin_gpu ? ids : NULL, pin_gpu ? n : 0, NULL, 0,
                ids + n, n, bytes, (uint64_t)bytes, t0, 1);
    if (done)
        *done = ev;
    return HKV_OK;
}

hkv_status hkv_xfer_onboard(hkv_xfer *x, hkv_page *gpu_pages, const hkv_table_desc *gpu,
                            hkv_host_tier *host, const int32_t *host_ids,
                            const int32_t *gpu_ids, int64_t n, void **layer_events)
{
    if (n <= 0)
        return HKV_OK;
    hkv_status fail = injected_failure(x, "onboard");
    if (fail != HKV_OK)
        return fail;
    hkv_copy_pages_args a = copy_args(gpu, host, 0);
    a.n = n;
    a.num_layers = 1;
    const int64_t bytes = n * a.page_bytes * gpu->num_layers;
    const uint64_t t0 = hkv_now_ns();
    if (!x->cuda) {
        a.src_ids = host_ids;
        a.dst_ids = gpu_ids;
        a.num_layers = gpu->num_layers;
        hkv_cpu_copy_pages(&a);
        count_time(x, 0, hkv_now_ns() - t0);
        count_transfer(x, 0, n, 0, a.page_bytes, gpu->num_layers);
        return HKV_OK;
    }
    /* An offload in flight may still write one of the host pages read here,
     * or read one of the GPU pages overwritten here (a page freed by
     * eviction during its write-back): then wait for the offloads.  Else
     * the two directions stay independent and run at the same time. */
    int after_offloads = 0;
    for (int64_t i = 0; i < n && !after_offloads; i++)
        after_offloads = host->writes[host_ids[i]] > 0 || gpu_pages[gpu_ids[i]].pins > 0;
    int64_t slot, old_head, nruns;
    hkv_status st = stage_ids(x, &a, host_ids, gpu_ids, n, gpu_pages, host, &slot,
                              &old_head, &nruns);
    if (st != HKV_OK)
        return st;
    /* Work is split over two streams when a layer has several short pieces:
     * the kernel's pages and every other DMA run go on the second.  A
     * fragmented host pool gives many runs of 1-2 MiB; two copies in flight
     * (and the kernel's PCIe reads) fill the gaps each DMA leaves between
     * pieces.  Long runs stay on one stream, where they already reach the
     * link's rate.  Each layer's event waits for both streams. */
    const int64_t run_bytes = (n - a.n) * a.page_bytes;
    const int mixed = (nruns > 0 && a.n > 0) ||
                      (nruns >= 2 && run_bytes < nruns * SPLIT_RUN_BYTES);
    void *ks = mixed ? x->onboard_kernel_stream : x->onboard_stream;
    st = hkv_cuda_stream_wait_event(x->device, x->onboard_stream, x->ready);
    if (st == HKV_OK && after_offloads && !x->skip_waits)
        st = hkv_cuda_stream_wait_event(x->device, x->onboard_stream, x->offload_done);
    if (st == HKV_OK && mixed) {
        /* the kernel stream starts where the DMA stream is now */
        st = hkv_cuda_event_record(x->device, x->kernel_layer_done, x->onboard_stream);
        if (st == HKV_OK)
            st = hkv_cuda_stream_wait_event(x->device, ks, x->kernel_layer_done);
    }
    const char *host_base = host->table->ptr;
    const int64_t gpu_layer = hkv_layer_bytes(gpu);
    const int64_t host_layer = (int64_t)host->num_pages * a.page_bytes;
    for (int32_t l = 0; st == HKV_OK && l < gpu->num_layers; l++) {
        a.first_layer = l;
        if (x->delay_us > 0)
            st = hkv_cuda_spin(x->device, x->onboard_stream, x->delay_us);
        if (st == HKV_OK && x->delay_us > 0 && mixed)
            st = hkv_cuda_spin(x->device, ks, x->delay_us);
        if (st == HKV_OK && a.n > 0)
            st = hkv_cuda_copy_pages(&a, x->device, ks);
        for (int64_t r = 0; st == HKV_OK && r < nruns; r++) {
            const hkv_xfer_run *run = &x->runs[r];
            st = hkv_cuda_memcpy_async(
                x->device, (char *)gpu->base + l * gpu_layer + run->dst * a.page_bytes,
                host_base + l * host_layer + run->src * a.page_bytes,
                (size_t)run->n * (size_t)a.page_bytes, r % 2 ? ks : x->onboard_stream);
        }
        /* (the wait captures the record just made, layer l's) */
        if (st == HKV_OK && mixed)
            st = hkv_cuda_event_record(x->device, x->kernel_layer_done, ks);
        if (st == HKV_OK && mixed)
            st = hkv_cuda_stream_wait_event(x->device, x->onboard_stream,
                                            x->kernel_layer_done);
        if (st == HKV_OK)
            st = hkv_cuda_event_record(x->device, layer_events[l], x->onboard_stream);
    }
    void *ev = NULL;
    if (st == HKV_OK)
        st = take_event(x, &ev);
    if (st == HKV_OK)
        st = hkv_cuda_event_record(x->device, ev, x->onboard_stream);
    if (st != HKV_OK) {
        /* Some layers may be queued: wait for them before reusing the ids. */
        (void)hkv_cuda_stream_sync(x->device, x->onboard_kernel_stream);
        (void)hkv_cuda_stream_sync(x->device, x->onboard_stream);
        x->ring_head = old_head;
        if (ev != NULL)
            give_event(x, ev);
        return st;
    }
    count_transfer(x, 0, n, a.n, a.page_bytes, gpu->num_layers);
    const int32_t *ids = ring_at(x, slot);
    for (int64_t i = 0; i < n; i++)
        host->pages[ids[i]].pins++;
    push_record(x, ev, slot + 2 * n, NULL, 0, ids, n, NULL, 0, 0, (uint64_t)bytes, t0, 0);
    return HKV_OK;
}
