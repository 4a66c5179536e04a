/*
 * cache.c - the cache object: validation, lookup, allocation with
 * eviction, batch lifecycle, append/read dispatch and counters.
 *
 * Locking: one mutex per cache guards every structure below; entry points
 * take it, static helpers assume it is held.
 *
 * Error discipline: every entry point that changes state validates and
 * reserves everything it needs first (pages, a metadata block) and only
 * then mutates, so a failed call leaves the cache exactly as it was.
 */
#include "cache.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "async_queue.h"
#include "disk_tier.h"
#include "gds.h"
#include "cuda_rt.h"
#include "host_tier.h"
#include "page_pool.h"
#include "token_filter.h"
#include "transfer.h"
#include "user_index.h"

#define DEFAULT_OPEN_BATCHES 8
#define MAX_OPEN_BATCHES 1024
/* iovecs of one disk record: one piece per layer */
#define HKV_MAX_DISK_LAYERS 256
/* Offload bytes in flight before eager offloads are deferred and
 * write-backs wait: about 40 ms of PCIe, two batches of 8 x 4096 tokens of
 * the standard model, so onboards queued behind never wait long. */
#define DEFAULT_MAX_OFFLOAD_BYTES (2LL << 30)

enum { BATCH_OPEN = 1, BATCH_COMMITTED = 2, BATCH_CLOSED = 3 };

/* Prefetches in flight at once; one more is dropped (it is only a hint). */
#define PREFETCH_SETS 8

/* One prefetch call's copy: its per-layer events and the users it pins
 * until the last layer is in. */
typedef struct prefetch_set {
    uint64_t seq;            /* 0: free                                   */
    void **layer_events;     /* [num_layers], created on first use        */
    int32_t *slots;          /* [max_batch_size]                          */
    int32_t num_slots;
} prefetch_set;

struct hkv_batch {
    hkv_cache *cache;
    hkv_buffer *host;        /* int32 metadata fields (pinned on CUDA)     */
    hkv_buffer *device;      /* device copy on CUDA, NULL on CPU           */
    int32_t *host_dev;       /* CUDA: the device's address of host         */
    void *event;             /* CUDA: recorded when the batch is freed     */
    int device_index;        /* of the event and buffers                   */
    int32_t num_layers;
    void *stream;            /* stream the batch's work was queued on      */
    int32_t *user_slots;     /* [max_batch_size]; -1 for an empty history  */
    uint8_t *fills;          /* [max_batch_size]; 1 if this batch writes    */
    uint8_t *layer_done;     /* [num_layers]                               */
    int32_t layers_left;
    int32_t batch_size;
    int64_t total_pages;
    int64_t total_tokens;
    int64_t new_tokens;
    int64_t num_rows;
    int32_t has_candidates;
    int32_t onboarded;       /* layer_events were recorded                 */
    void **layer_events;     /* CUDA: [num_layers], onboard per layer      */
    uint64_t dep_seq;        /* a prefetch this batch's pages come from    */
    int32_t dep_set;
    /* early reuse: per user, the tokens this batch fills and the earlier
     * batch in flight whose tokens it reads (with that block's gen) */
    int64_t *fill_from;      /* [max_batch_size]                           */
    int64_t *fill_to;
    hkv_batch **dep;
    uint32_t *dep_gen;
    uint8_t *dep_pin;        /* 1: dep was in flight, counted in its
                                dependents                                */
    uint32_t gen;            /* bumped each time the block is handed out   */
    int32_t aborted;         /* closed before every layer was appended     */
    int32_t dependents;      /* open batches reading this one's tokens: the
                                block is not handed out again before they
                                close, so they can see how it ended      */
    void **append_events;    /* CUDA: [num_layers], after each layer's append */
    int32_t state;
    int32_t in_use;          /* handed out and not yet freed               */
    int32_t event_pending;   /* event recorded at free, not yet seen done   */
};

struct hkv_cache {
    hkv_config cfg;
    pthread_mutex_t lock;
    hkv_table_desc table;
    hkv_buffer *table_buf;
    hkv_page_pool pool;
    hkv_user_index users;
    hkv_token_filter filter;
    hkv_host_tier host;              /* num_pages == 0: no host tier       */
    hkv_xfer xfer;
    hkv_event_ring events;           /* capacity 0: disabled (events.h)    */
    hkv_worker *worker;              /* prepare thread, started on demand   */
    int32_t *xfer_a;                 /* page id scratch of one transfer    */
    int32_t *xfer_b;
    int skip_waits;                  /* fault injection (transfer.h)      */
    int32_t reuse_wait;              /* a page still read by a copy was
                                        reallocated in this call          */
    hkv_stats stats;
    prefetch_set prefetch[PREFETCH_SETS];
    uint64_t prefetch_seq;
    int64_t pinned_pages;            /* pages of users with pins > 0       */
    int64_t meta_offsets[HKV_META_NUM_FIELDS];
    int64_t meta_words;              /* int32 words of one metadata block  */
    int64_t max_batch_pages;
    hkv_batch **blocks;
    int32_t num_blocks;
    int32_t max_blocks;
    /* per-call scratch, sized for max_batch_size */
    int64_t *dup_ids;
    uint32_t *dup_stamp;
    uint32_t dup_mask;
    uint32_t stamp;
    int32_t *scratch_slot;
    int64_t *scratch_keep;
    int64_t *scratch_need;
    int64_t *scratch_onb;            /* end of the pages to onboard        */
    uint8_t *scratch_trunc;
    int32_t *onb_host;               /* onboard pairs of one allocate      */
    int32_t *onb_gpu;
    /* disk tier (NULL: none): see the "disk tier" section */
    hkv_disk *disk;
    int32_t *host_ix;                /* page index of each host page      */
    int32_t *dq_page;                /* host pages waiting to be written:  */
    int64_t *dq_user;                /* a ring of (page, user, index)      */
    int32_t *dq_ix;
    int32_t dq_head, dq_count, dq_cap;
    int32_t *dt_page;                /* per disk ticket index: host page  */
    int64_t *dt_user;
    int32_t *dt_ix;
    int8_t *dt_kind;                 /* 0 free, 1 write, 2 read (into a
                                        host page, or a GPU page for GDS) */
    /* reads completed and not yet taken by the stage-in (ticket indexes
     * are reused once polled, so completions move here) */
    int32_t *rd_page;
    int64_t *rd_user;
    int32_t *rd_ix;
    int8_t *rd_result;
    int32_t rd_count;
    uint64_t *disk_fps;              /* fingerprints of one user's pages  */
    pthread_mutex_t stage_lock;      /* one disk stage-in at a time       */
    int32_t *si_slot;                /* stage-in scratch, per batch entry */
    int64_t *si_next, *si_need, *si_koff, *si_first;
    uint8_t *si_miss;
    uint8_t *si_gds;                 /* 1: this user's reads go to the GPU */
    hkv_gds *gds;                    /* GPUDirect Storage reader, or NULL  */
    void *gds_event;                 /* orders direct reads after the caller */
    char gds_status[512];
};

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static int is_cuda(const hkv_cache *c)
{
    return c->cfg.device_kind == HKV_DEVICE_CUDA;
}

static int32_t *meta_field(const hkv_cache *c, int32_t *base, int field)
{
    return base + c->meta_offsets[field];
}

/* Pages a user keeps for `tokens` tokens. */
static int64_t pages_for(const hkv_cache *c, int64_t tokens)
{
    return hkv_div_up(tokens, c->cfg.page_size);
}

static int has_host(const hkv_cache *c)
{
    return c->host.num_pages > 0;
}

/*
 * After a tier lost pages: the cached tokens are what the tiers still cover
 * (each tier holds a prefix of the user's pages, host pages are full).
 */
static void fix_length(hkv_cache *c, hkv_user *u)
{
    int64_t pages = u->num_pages > u->host_pages ? u->num_pages : u->host_pages;
    if (u->disk_pages > pages)
        pages = u->disk_pages;
    int64_t cover = pages * c->cfg.page_size;
    if (u->length > cover) {
        u->length = cover;
        hkv_user_new_epoch(&c->users, u);
    }
    if (!u->filling)
        u->reserved = u->length;
    else if (u->reserved > cover)
        u->reserved = cover;
}

/* Drop the user's GPU tail page.  A page still read by a copy keeps its
 * pin count; whoever gets it next waits for the copies (reuse_wait). */
static void drop_gpu_tail(hkv_cache *c, hkv_user *u)
{
    int32_t page = hkv_user_pop_page(&c->pool, u);
    hkv_page_release(&c->pool, page);
    if ((int64_t)u->num_pages * c->cfg.page_size < u->length)  /* held cached tokens */
        hkv_events_emit(&c->events, HKV_EVENT_REMOVED, HKV_TIER_GPU, HKV_TIER_GPU,
                        u->id, u->num_pages, 1);
    if (u->pins > 0)
        c->pinned_pages--;
}

/* Free the user's GPU tail pages until `keep` remain; returns how many
 * went. */
static uint64_t drop_tail_pages(hkv_cache *c, hkv_user *u, int64_t keep)
{
    uint64_t n = 0;
    for (; u->num_pages > keep; n++)
        drop_gpu_tail(c, u);
    return n;
}

static void drop_host_tail(hkv_cache *c, hkv_user *u)
{
    hkv_host_release(&c->host, hkv_host_pop(&c->host, u));
    hkv_events_emit(&c->events, HKV_EVENT_REMOVED, HKV_TIER_HOST, HKV_TIER_HOST,
                    u->id, u->host_pages, 1);
}

/* Remove a user that no tier holds any more (and no batch pins). */
static void maybe_remove(hkv_cache *c, int32_t slot)
{
    hkv_user *u = &c->users.users[slot];
    if (u->num_pages == 0 && u->host_pages == 0 && u->pins == 0) {
        hkv_user_remove(&c->users, slot);
        c->stats.users_evicted++;
    }
}

static void reap_prefetch(hkv_cache *c, int all);
static hkv_status finish_prefetch(hkv_cache *c, const hkv_user *u);
static void disk_enqueue(hkv_cache *c, const hkv_user *u, int32_t page, int32_t index);
static void disk_drop_from(hkv_cache *c, hkv_user *u, int64_t from);
static void disk_pump(hkv_cache *c);
static const uint64_t *request_fingerprints(hkv_cache *c, const int64_t *keys, int64_t n);
static int32_t disk_lookup_new_user(hkv_cache *c, int64_t user_id, int64_t length);
static hkv_status disk_stage_in(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                                const int64_t *cached_lengths, const uint64_t *epochs,
                                const int64_t *token_keys, const int64_t *history_lengths,
                                void *stream, void *ready);

/* Batches and prefetches pin their users: never evicted, pages counted in
 * pinned_pages. */
static void pin_user(hkv_cache *c, hkv_user *u)
{
    if (u->pins++ == 0)
        c->pinned_pages += u->num_pages;
}

static void unpin_user(hkv_cache *c, int32_t slot)
{
    hkv_user *u = &c->users.users[slot];
    if (--u->pins == 0) {
        c->pinned_pages -= u->num_pages;
        if (u->num_pages == 0 && u->host_pages == 0)
            hkv_user_remove(&c->users, slot);
    }
}

/* Take the least recently used host tail page of a user that is not
 * pinned (and not `exclude`), unless a copy reads it.  0 if none. */
static int evict_one_host_page(hkv_cache *c, int32_t exclude)
{
    hkv_user_index *ix = &c->users;
    /* first pass: tails the disk tier holds too (nothing is lost) */
    for (int pass = c->disk != NULL ? 0 : 1; pass < 2; pass++)
        for (int32_t slot = ix->lru_head; slot != HKV_NO_USER;
             slot = ix->users[slot].lru_next) {
            hkv_user *u = &ix->users[slot];
            if (slot == exclude || u->pins > 0 || u->host_pages == 0 ||
                c->host.pages[u->host_tail].pins > 0 ||
                (pass == 0 && u->host_pages > u->disk_pages))
                continue;
            drop_host_tail(c, u);
            fix_length(c, u);
            c->stats.host_pages_evicted++;
            maybe_remove(c, slot);
            return 1;
        }
    return 0;
}

/*
 * Copy the user's full GPU pages that have no host copy yet to the host
 * tier (evicting other users' host pages as needed), as one transfer.
 * Stops early when the host tier cannot make room.  Returns the pages
 * copied.  The caller has marked its stream (hkv_xfer_begin).
 *
 * Offload bytes in flight are bounded by max_offload_bytes: a write-back
 * (`must`, the page is about to be evicted) waits for older transfers
 * (backpressure); an eager write-through is deferred instead (the pages
 * are written back at eviction time).
 */
static int64_t offload_user(hkv_cache *c, int32_t slot, int must, hkv_status *st)
{
    hkv_user *u = &c->users.users[slot];
    const int32_t ps = c->cfg.page_size;
    int64_t full = (u->length < (int64_t)u->num_pages * ps ? u->length
                                                            : (int64_t)u->num_pages * ps) / ps;
    int64_t n = 0;
    *st = HKV_OK;
    if (!has_host(c) || full <= u->host_pages)
        return 0;
    int fits = 1;
    *st = hkv_xfer_offload_room(&c->xfer, c->pool.pages, &c->host,
                                (full - u->host_pages) * hkv_page_bytes(&c->table) *
                                    c->cfg.num_layers,
                                c->cfg.max_offload_bytes, must, &fits);
    if (*st != HKV_OK)
        return 0;
    if (!fits) {
        c->stats.offloads_deferred++;
        return 0;
    }
    int32_t page = u->head_page;
    for (int64_t i = 0; i < u->host_pages; i++)
        page = c->pool.pages[page].next;
    for (int64_t i = u->host_pages; i < full; i++, page = c->pool.pages[page].next) {
        int32_t hp = hkv_host_alloc(&c->host, slot);
        if (hp == HKV_NO_PAGE) {
            /* finished copies may have left dropped pages to free */
            (void)hkv_xfer_reap(&c->xfer, c->pool.pages, &c->host);
            hp = hkv_host_alloc(&c->host, slot);
        }
        while (hp == HKV_NO_PAGE && evict_one_host_page(c, slot))
            hp = hkv_host_alloc(&c->host, slot);
        if (hp == HKV_NO_PAGE)
            break;
        c->xfer_a[n] = page;
        c->xfer_b[n] = hp;
        hkv_filter_copy_page(&c->filter, page, &c->host.keys, hp);
        n++;
    }
    if (n == 0)
        return 0;
    *st = hkv_xfer_offload(&c->xfer, c->pool.pages, &c->table, &c->host, c->xfer_a,
                           c->xfer_b, n, 1, NULL);
    if (*st != HKV_OK) {
        for (int64_t i = 0; i < n; i++)
            hkv_host_release(&c->host, c->xfer_b[i]);
        return 0;
    }
    for (int64_t i = 0; i < n; i++) {
        hkv_host_push(&c->host, u, c->xfer_b[i]);
        disk_enqueue(c, u, c->xfer_b[i], u->host_pages - 1);
    }
    hkv_events_emit(&c->events, HKV_EVENT_OFFLOADED, HKV_TIER_HOST, HKV_TIER_GPU,
                    u->id, u->host_pages - n, n);
    return n;
}

/*
 * Free one GPU page, taken from the least recently used user that is not
 * pinned, tail first so the user keeps a usable prefix.  Preferred: a tail
 * page that already has a host copy (nothing is lost, nothing to copy).
 * Else the user's full pages are written back to the host tier first (when
 * there is one).  Returns 0 if nothing can be evicted.
 */
static int evict_one_page(hkv_cache *c)
{
    hkv_user_index *ix = &c->users;
    int32_t victim = HKV_NO_USER;
    for (int pass = 0; pass < 2 && victim == HKV_NO_USER; pass++)
        for (int32_t slot = ix->lru_head; slot != HKV_NO_USER;
             slot = ix->users[slot].lru_next) {
            hkv_user *u = &ix->users[slot];
            if (u->pins > 0 || u->num_pages == 0 || u->num_pages > u->host_pages)
                continue;
            /* first pass: tails no copy reads, so no wait for anyone */
            if (pass == 0 && c->pool.pages[u->tail_page].pins > 0)
                continue;
            victim = slot;
            break;
        }
    if (victim == HKV_NO_USER) {
        for (int32_t slot = ix->lru_head; slot != HKV_NO_USER;
             slot = ix->users[slot].lru_next) {
            hkv_user *u = &ix->users[slot];
            if (u->pins > 0 || u->num_pages == 0)
                continue;
            hkv_status st;
            int64_t n = offload_user(c, slot, 1, &st);
            c->stats.writeback_pages += (uint64_t)n;
            c->stats.transfers_failed += st != HKV_OK;
            victim = slot;
            break;
        }
    }
    if (victim == HKV_NO_USER)
        return 0;
    hkv_user *u = &ix->users[victim];
    drop_gpu_tail(c, u);
    c->stats.pages_evicted++;
    fix_length(c, u);
    maybe_remove(c, victim);
    return 1;
}

/*
 * Validate a batch description shared by lookup and allocate: size, lengths,
 * duplicate ids and token keys.
 */
static hkv_status check_batch(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                              const int64_t *lengths, const int64_t *keys,
                              int64_t num_keys)
{
    const hkv_config *cfg = &c->cfg;
    if (batch < 0)
        return hkv_error(HKV_EINVAL, "batch size %d is negative", (int)batch);
    if (batch > cfg->max_batch_size)
        return hkv_error(HKV_EINVAL,
                         "batch of %d users is larger than max_batch_size=%d; "
                         "split the batch or raise max_batch_size",
                         (int)batch, (int)cfg->max_batch_size);
    int64_t total = 0;
    for (int32_t b = 0; b < batch; b++) {
        if (lengths[b] < 0)
            return hkv_error(HKV_EINVAL, "history length of user %lld (index %d) "
                             "is negative: %lld", (long long)user_ids[b], (int)b,
                             (long long)lengths[b]);
        if (lengths[b] > cfg->max_seq_len)
            return hkv_error(HKV_EINVAL, "history length %lld of user %lld (index "
                             "%d) exceeds max_seq_len=%lld", (long long)lengths[b],
                             (long long)user_ids[b], (int)b,
                             (long long)cfg->max_seq_len);
        total += lengths[b];
    }
    /* offsets of the batch's tokens are int32 */
    if (total > INT32_MAX)
        return hkv_error(HKV_EINVAL, "the batch holds %lld history tokens, more than "
                         "2^31-1; split it", (long long)total);
    /* duplicates: an open-addressing set stamped per call, no clearing */
    if (++c->stamp == 0) {
        memset(c->dup_stamp, 0, (size_t)(c->dup_mask + 1) * sizeof *c->dup_stamp);
        c->stamp = 1;
    }
    for (int32_t b = 0; b < batch; b++) {
        uint64_t h = (uint64_t)user_ids[b] * 0x9e3779b97f4a7c15ULL;
        uint32_t i = (uint32_t)(h >> 32) & c->dup_mask;
        while (c->dup_stamp[i] == c->stamp) {
            if (c->dup_ids[i] == user_ids[b])
                return hkv_error(HKV_EINVAL, "user id %lld appears more than once "
                                 "in the batch; each user may appear once",
                                 (long long)user_ids[b]);
            i = (i + 1) & c->dup_mask;
        }
        c->dup_stamp[i] = c->stamp;
        c->dup_ids[i] = user_ids[b];
    }
    if (cfg->verify_tokens) {
        if (keys == NULL)
            return hkv_error(HKV_EINVAL, "the cache is in verified mode: pass "
                             "token_keys, one key per history token");
        if (num_keys != total)
            return hkv_error(HKV_EINVAL, "token_keys has %lld keys but the "
                             "histories hold %lld tokens", (long long)num_keys,
                             (long long)total);
    } else if (keys != NULL) {
        return hkv_error(HKV_EINVAL, "token_keys were given but the cache is in "
                         "trust mode; create it with verify_tokens=True to use them");
    }
    return HKV_OK;
}

/* ------------------------------------------------------------------ */
/* metadata blocks                                                     */

static void block_destroy(hkv_batch *b)
{
    for (int32_t l = 0; b->layer_events != NULL && l < b->num_layers; l++)
        if (b->layer_events[l] != NULL)
            (void)hkv_cuda_event_destroy(b->device_index, b->layer_events[l]);
    free(b->layer_events);
    for (int32_t l = 0; b->append_events != NULL && l < b->num_layers; l++)
        if (b->append_events[l] != NULL)
            (void)hkv_cuda_event_destroy(b->device_index, b->append_events[l]);
    free(b->append_events);
    free(b->fill_from);
    free(b->fill_to);
    free(b->dep);
    free(b->dep_gen);
    free(b->dep_pin);
    if (b->event != NULL) {
        if (b->event_pending)
            (void)hkv_cuda_event_sync(b->device_index, b->event);
        (void)hkv_cuda_event_destroy(b->device_index, b->event);
    }
    hkv_buffer_unref(b->host);
    hkv_buffer_unref(b->device);
    free(b->user_slots);
    free(b->fills);
    free(b->layer_done);
    free(b);
}

static hkv_status block_create(hkv_cache *c, hkv_batch **out)
{
    const hkv_config *cfg = &c->cfg;
    hkv_batch *b = calloc(1, sizeof *b);
    if (b == NULL)
        return hkv_error(HKV_ENOMEM, "out of host memory");
    b->cache = c;
    b->device_index = cfg->device_index;
    b->num_layers = cfg->num_layers;
    b->user_slots = malloc((size_t)cfg->max_batch_size * sizeof *b->user_slots + 1);
    b->fills = malloc((size_t)cfg->max_batch_size + 1);
    b->layer_done = malloc((size_t)cfg->num_layers);
    size_t nb = (size_t)cfg->max_batch_size + 1;
    b->fill_from = malloc(nb * sizeof *b->fill_from);
    b->fill_to = malloc(nb * sizeof *b->fill_to);
    b->dep = malloc(nb * sizeof *b->dep);
    b->dep_gen = malloc(nb * sizeof *b->dep_gen);
    b->dep_pin = malloc(nb);
    if (b->user_slots == NULL || b->fills == NULL || b->layer_done == NULL ||
        b->fill_from == NULL || b->fill_to == NULL || b->dep == NULL || b->dep_gen == NULL ||
        b->dep_pin == NULL) {
        block_destroy(b);
        return hkv_error(HKV_ENOMEM, "out of host memory");
    }
    size_t bytes = (size_t)c->meta_words * sizeof(int32_t);
    hkv_status st = hkv_buffer_new(is_cuda(c) ? HKV_MEM_PINNED : HKV_MEM_HOST,
                                   cfg->device_index, bytes, &b->host);
    if (st == HKV_OK && is_cuda(c))
        st = hkv_buffer_new(HKV_MEM_DEVICE, cfg->device_index, bytes, &b->device);
    if (st == HKV_OK && is_cuda(c))
        st = hkv_cuda_host_device_pointer(b->host->ptr, (void **)&b->host_dev);
    if (st == HKV_OK && is_cuda(c))
        st = hkv_cuda_event_create(cfg->device_index, &b->event);
    if (st == HKV_OK && is_cuda(c)) {
        b->append_events = calloc((size_t)cfg->num_layers, sizeof *b->append_events);
        if (b->append_events == NULL)
            st = hkv_error(HKV_ENOMEM, "out of host memory");
        for (int32_t l = 0; st == HKV_OK && l < cfg->num_layers; l++)
            st = hkv_cuda_event_create(cfg->device_index, &b->append_events[l]);
    }
    if (st == HKV_OK && is_cuda(c) && has_host(c)) {
        b->layer_events = calloc((size_t)cfg->num_layers, sizeof *b->layer_events);
        if (b->layer_events == NULL)
            st = hkv_error(HKV_ENOMEM, "out of host memory");
        for (int32_t l = 0; st == HKV_OK && l < cfg->num_layers; l++)
            st = hkv_cuda_event_create(cfg->device_index, &b->layer_events[l]);
    }
    if (st != HKV_OK) {
        block_destroy(b);
        return st;
    }
    /* The zeros field never changes. */
    int32_t *m = b->host->ptr;
    memset(meta_field(c, m, HKV_META_ZEROS), 0,
           (size_t)cfg->max_batch_size * sizeof(int32_t));
    *out = b;
    return HKV_OK;
}

/*
 * A free block whose last stream work has finished; a new one while under
 * the limit; else wait for the oldest pending one.  HKV_EBUSY when every
 * block belongs to a batch that was not freed.
 */
static hkv_status block_acquire(hkv_cache *c, hkv_batch **out)
{
    hkv_batch *pending = NULL;
    for (int32_t i = 0; i < c->num_blocks; i++) {
        hkv_batch *b = c->blocks[i];
        if (b->in_use || b->dependents > 0)
            continue;
        /* Exported metadata tensors still view this block: keep it. */
        if (atomic_load(&b->host->refs) > 1 ||
            (b->device != NULL && atomic_load(&b->device->refs) > 1))
            continue;
        if (b->event_pending) {
            int done = 0;
            hkv_status st = hkv_cuda_event_query(c->cfg.device_index, b->event, &done);
            if (st != HKV_OK)
                return st;
            if (!done) {
                if (pending == NULL)
                    pending = b;
                continue;
            }
            b->event_pending = 0;
        }
        *out = b;
        return HKV_OK;
    }
    if (c->num_blocks < c->max_blocks) {
        hkv_batch *b = NULL;
        hkv_status st = block_create(c, &b);
        if (st != HKV_OK)
            return st;
        c->blocks[c->num_blocks++] = b;
        *out = b;
        return HKV_OK;
    }
    if (pending != NULL) {
        hkv_status st = hkv_cuda_event_sync(c->cfg.device_index, pending->event);
        if (st != HKV_OK)
            return st;
        pending->event_pending = 0;
        *out = pending;
        return HKV_OK;
    }
    return hkv_error(HKV_EBUSY, "all %d batch slots belong to batches that are "
                     "still referenced (the batch or its metadata tensors); "
                     "drop finished batches or raise max_open_batches",
                     (int)c->max_blocks);
}

/* ------------------------------------------------------------------ */
/* create / destroy                                                    */

/* The disk tier below the host tier, and its bookkeeping. */
static hkv_status disk_open(hkv_cache *c, const hkv_config *cfg)
{
    hkv_disk_config dc;
    hkv_disk_config_default(&dc);
    dc.dir = cfg->disk_dir;
    dc.capacity_bytes = (uint64_t)cfg->disk_capacity_bytes;
    dc.page_bytes = (uint64_t)hkv_page_bytes(&c->table) * (uint64_t)cfg->num_layers;
    dc.admit_after = cfg->disk_admit_after;
    dc.persist = cfg->disk_persist;
    if (cfg->disk_io_threads > 0)
        dc.io_threads = cfg->disk_io_threads;
    hkv_status st = hkv_disk_open(&dc, &c->disk);
    if (st != HKV_OK)
        return st;
    size_t hp = (size_t)cfg->host_pages, tc = (size_t)hkv_disk_ticket_capacity(c->disk);
    size_t bsz = (size_t)cfg->max_batch_size;
    c->dq_cap = cfg->host_pages;
    c->host_ix = calloc(hp, sizeof *c->host_ix);
    c->dq_page = malloc(hp * sizeof *c->dq_page);
    c->dq_user = malloc(hp * sizeof *c->dq_user);
    c->dq_ix = malloc(hp * sizeof *c->dq_ix);
    c->dt_page = malloc(tc * sizeof *c->dt_page);
    c->dt_user = malloc(tc * sizeof *c->dt_user);
    c->dt_ix = malloc(tc * sizeof *c->dt_ix);
    c->dt_kind = calloc(tc, 1);
    size_t most = (size_t)c->max_batch_pages + 1;
    c->rd_page = malloc(most * sizeof *c->rd_page);
    c->rd_user = malloc(most * sizeof *c->rd_user);
    c->rd_ix = malloc(most * sizeof *c->rd_ix);
    c->rd_result = malloc(most);
    c->disk_fps = malloc((size_t)hkv_div_up(cfg->max_seq_len, cfg->page_size) *
                         sizeof *c->disk_fps);
    c->si_slot = malloc(bsz * sizeof *c->si_slot);
    c->si_next = malloc(bsz * sizeof *c->si_next);
    c->si_need = malloc(bsz * sizeof *c->si_need);
    c->si_koff = malloc(bsz * sizeof *c->si_koff);
    c->si_miss = malloc(bsz);
    c->si_first = malloc(bsz * sizeof *c->si_first);
    c->si_gds = calloc(bsz, 1);
    if (!c->host_ix || !c->dq_page || !c->dq_user || !c->dq_ix || !c->dt_page ||
        !c->dt_user || !c->dt_ix || !c->dt_kind || !c->rd_page || !c->rd_user ||
        !c->rd_ix || !c->rd_result || !c->disk_fps || !c->si_slot || !c->si_next ||
        !c->si_need || !c->si_koff || !c->si_miss || !c->si_first || !c->si_gds)
        return hkv_error(HKV_ENOMEM, "out of host memory");
    return HKV_OK;
}

/*
 * GPUDirect Storage below the GPU table, when asked for: disk reads of
 * users the GPU tier continues go straight into GPU pages (see
 * disk_stage_in).  Where it does not work, "auto" keeps the staged path
 * and says why in the status; "on" fails the create.
 */
static hkv_status gds_open(hkv_cache *c)
{
    const hkv_config *cfg = &c->cfg;
    if (cfg->disk_gds == 0 || c->disk == NULL) {
        snprintf(c->gds_status, sizeof c->gds_status, "off");
        return HKV_OK;
    }
    hkv_status st = is_cuda(c)
        ? hkv_gds_open(cfg->device_index, hkv_disk_fd(c->disk),
                       hkv_disk_io_threads(c->disk), cfg->num_layers,
                       hkv_page_bytes(&c->table), &c->gds)
        : hkv_error(HKV_ENODEV, "GPUDirect Storage needs a CUDA device (the cache "
                    "is on the CPU)");
    if (st == HKV_OK)
        st = hkv_cuda_event_create(cfg->device_index, &c->gds_event);
    if (st != HKV_OK) {
        snprintf(c->gds_status, sizeof c->gds_status, "unavailable: %s", hkv_last_error());
        hkv_gds_close(c->gds);
        c->gds = NULL;
        return cfg->disk_gds == 2 ? st : HKV_OK;
    }
    hkv_disk_set_device_reader(c->disk, hkv_gds_reader(c->gds));
    snprintf(c->gds_status, sizeof c->gds_status, "%s", hkv_gds_mode(c->gds));
    return HKV_OK;
}

static void disk_free(hkv_cache *c)
{
    if (c->gds != NULL) {
        /* no direct read may run while the reader goes */
        hkv_disk_drain(c->disk);
        hkv_disk_set_device_reader(c->disk, NULL);
        hkv_gds_close(c->gds);
        c->gds = NULL;
    }
    if (c->gds_event != NULL)
        (void)hkv_cuda_event_destroy(c->cfg.device_index, c->gds_event);
    c->gds_event = NULL;
    /* cancels queued I/O and waits for the running one: no host page is
     * referenced by the store after this */
    hkv_disk_close(c->disk);
    c->disk = NULL;
    free(c->host_ix);
    free(c->dq_page);
    free(c->dq_user);
    free(c->dq_ix);
    free(c->dt_page);
    free(c->dt_user);
    free(c->dt_ix);
    free(c->dt_kind);
    free(c->rd_page);
    free(c->rd_user);
    free(c->rd_ix);
    free(c->rd_result);
    free(c->disk_fps);
    free(c->si_slot);
    free(c->si_next);
    free(c->si_need);
    free(c->si_koff);
    free(c->si_miss);
    free(c->si_first);
    free(c->si_gds);
}

static hkv_status check_config(const hkv_config *cfg)
{
    if (cfg->num_layers < 1 || cfg->num_layers > 1024)
        return hkv_error(HKV_EINVAL, "num_layers must be in 1..1024, got %d",
                         (int)cfg->num_layers);
    if (cfg->num_heads < 1 || cfg->head_dim < 1)
        return hkv_error(HKV_EINVAL, "num_heads and head_dim must be positive");
    if (cfg->page_size < 2 || cfg->page_size > 256 ||
        (cfg->page_size & (cfg->page_size - 1)) != 0)
        return hkv_error(HKV_EINVAL, "page_size must be a power of two in 2..256, "
                         "got %d", (int)cfg->page_size);
    if (cfg->num_pages < 1)
        return hkv_error(HKV_EINVAL, "num_pages must be positive, got %d",
                         (int)cfg->num_pages);
    int ok_dtype = (cfg->dtype_code == 2 && (cfg->dtype_bits == 16 ||
                                             cfg->dtype_bits == 32)) ||
                   (cfg->dtype_code == 4 && cfg->dtype_bits == 16);
    if (!ok_dtype)
        return hkv_error(HKV_EINVAL, "dtype must be float32, float16 or bfloat16");
    if (cfg->device_kind != HKV_DEVICE_CPU && cfg->device_kind != HKV_DEVICE_CUDA)
        return hkv_error(HKV_EINVAL, "device must be cpu or cuda");
    if (cfg->max_batch_size < 1 || cfg->max_batch_size > (1 << 20))
        return hkv_error(HKV_EINVAL, "max_batch_size must be in 1..1048576, got %d",
                         (int)cfg->max_batch_size);
    if (cfg->max_seq_len < 1 || cfg->max_seq_len > (1LL << 30))
        return hkv_error(HKV_EINVAL, "max_seq_len must be in 1..2^30, got %lld",
                         (long long)cfg->max_seq_len);
    if (cfg->max_batch_tokens < 0)
        return hkv_error(HKV_EINVAL, "max_batch_tokens must not be negative");
    if (cfg->max_open_batches < 0 || cfg->max_open_batches > MAX_OPEN_BATCHES)
        return hkv_error(HKV_EINVAL, "max_open_batches must be in 0..%d",
                         MAX_OPEN_BATCHES);
    /* Sizes must not overflow: a wrapped table size would allocate a tiny
     * table that every append then overruns. */
    if (cfg->host_pages < 0)
        return hkv_error(HKV_EINVAL, "host_pages must not be negative");
    if (cfg->event_capacity < 0 || cfg->event_capacity > HKV_EVENTS_MAX_CAPACITY)
        return hkv_error(HKV_EINVAL, "event_capacity must be in 0..%d, got %d",
                         HKV_EVENTS_MAX_CAPACITY, (int)cfg->event_capacity);
    if (cfg->offload_mode != HKV_OFFLOAD_LAZY && cfg->offload_mode != HKV_OFFLOAD_EAGER)
        return hkv_error(HKV_EINVAL, "offload_mode must be lazy (0) or eager (1)");
    if (cfg->kernel_copies != 0 && cfg->kernel_copies != 1)
        return hkv_error(HKV_EINVAL, "kernel_copies must be 0 or 1");
    if (cfg->early_reuse != 0 && cfg->early_reuse != 1)
        return hkv_error(HKV_EINVAL, "early_reuse must be 0 or 1");
    if (cfg->disk_dir != NULL && cfg->host_pages <= 0)
        return hkv_error(HKV_EINVAL, "the disk tier sits below the host tier: give the "
                         "cache a host tier too");
    if (cfg->disk_dir != NULL && cfg->disk_capacity_bytes <= 0)
        return hkv_error(HKV_EINVAL, "disk_capacity_bytes must be positive");
    if (cfg->disk_io_threads < 0 || cfg->disk_io_threads > 64)
        return hkv_error(HKV_EINVAL, "disk_io_threads must be in 0..64 (0: the default)");
    if (cfg->disk_gds < 0 || cfg->disk_gds > 2)
        return hkv_error(HKV_EINVAL, "disk_gds must be 0 (off), 1 (auto) or 2 (on)");
    if (cfg->disk_gds != 0 && cfg->disk_dir == NULL)
        return hkv_error(HKV_EINVAL, "disk_gds reads the disk tier: give disk_dir too");
    if (cfg->disk_admit_after < 0)
        return hkv_error(HKV_EINVAL, "disk_admit_after must not be negative");
    if (cfg->disk_dir != NULL && cfg->num_layers > HKV_MAX_DISK_LAYERS)
        return hkv_error(HKV_EINVAL, "the disk tier takes at most %d layers",
                         HKV_MAX_DISK_LAYERS);
    if (cfg->max_offload_bytes < 0)
        return hkv_error(HKV_EINVAL, "max_offload_bytes must not be negative");
    if ((int64_t)cfg->num_pages + cfg->host_pages + cfg->max_batch_size > (1LL << 29))
        return hkv_error(HKV_EINVAL, "num_pages + host_pages + max_batch_size must "
                         "not exceed 2^29, got %d + %d + %d", (int)cfg->num_pages,
                         (int)cfg->host_pages, (int)cfg->max_batch_size);
    uint64_t row, page, layer, table;
    if (__builtin_mul_overflow((uint64_t)cfg->num_heads, (uint64_t)cfg->head_dim, &row) ||
        __builtin_mul_overflow(row, (uint64_t)cfg->dtype_bits / 8, &row) ||
        __builtin_mul_overflow(row, 2ull * (uint64_t)cfg->page_size, &page) ||
        __builtin_mul_overflow(page, (uint64_t)cfg->num_pages, &layer) ||
        __builtin_mul_overflow(layer, (uint64_t)cfg->num_layers, &table) ||
        table > ((uint64_t)1 << 62) ||
        __builtin_mul_overflow(page, (uint64_t)cfg->host_pages, &layer) ||
        __builtin_mul_overflow(layer, (uint64_t)cfg->num_layers, &table) ||
        table > ((uint64_t)1 << 62))
        return hkv_error(HKV_EINVAL, "the page table would not fit in memory: "
                         "num_layers x num_pages x 2 x page_size x num_heads x "
                         "head_dim x element size overflows");
    return HKV_OK;
}

hkv_status hkv_cache_create(const hkv_config *cfg_in, hkv_cache **out)
{
    *out = NULL;
    hkv_status st = check_config(cfg_in);
    if (st != HKV_OK)
        return st;
    hkv_config cfg = *cfg_in;
    if (cfg.max_open_batches == 0)
        cfg.max_open_batches = DEFAULT_OPEN_BATCHES;
    if (cfg.max_offload_bytes == 0)
        cfg.max_offload_bytes = DEFAULT_MAX_OFFLOAD_BYTES;
    int64_t max_tokens = (int64_t)cfg.max_batch_size * cfg.max_seq_len;
    if (cfg.max_batch_tokens == 0 || cfg.max_batch_tokens > max_tokens)
        cfg.max_batch_tokens = max_tokens;
    int64_t max_pages = (int64_t)cfg.max_batch_size *
                        hkv_div_up(cfg.max_seq_len, cfg.page_size);
    if (cfg.max_batch_tokens > INT32_MAX / 2 || max_pages > INT32_MAX / 2)
        return hkv_error(HKV_EINVAL, "max_batch_size x max_seq_len is too large "
                         "for int32 metadata; set max_batch_tokens lower");
    if (cfg.device_kind == HKV_DEVICE_CUDA) {
        int count = 0;
        st = hkv_cuda_device_count(&count);
        if (st != HKV_OK)
            return st;
        if (!hkv_cuda_built())
            return hkv_error(HKV_ENODEV, "this build of hstu_kvcache has no CUDA "
                             "support; use device='cpu' or reinstall with nvcc");
        if (cfg.device_index < 0 || cfg.device_index >= count)
            return hkv_error(HKV_ENODEV, "CUDA device %d not available (%d "
                             "device(s) found); use device='cpu' on this machine",
                             (int)cfg.device_index, count);
    }

    hkv_cache *c = calloc(1, sizeof *c);
    if (c == NULL)
        return hkv_error(HKV_ENOMEM, "out of host memory");
    c->cfg = cfg;
    c->max_batch_pages = max_pages;
    c->max_blocks = cfg.max_open_batches;
    if (pthread_mutex_init(&c->lock, NULL) != 0) {
        free(c);
        return hkv_error(HKV_ENOMEM, "cannot create a mutex");
    }
    if (pthread_mutex_init(&c->stage_lock, NULL) != 0) {
        pthread_mutex_destroy(&c->lock);
        free(c);
        return hkv_error(HKV_ENOMEM, "cannot create a mutex");
    }

    /* Metadata block layout: small per-user fields first, so one upload
     * of a prefix carries them and kv_indices; each field 16-byte aligned. */
    int64_t bsz = cfg.max_batch_size;
    int64_t sizes[HKV_META_NUM_FIELDS] = {
        [HKV_META_KV_INDPTR] = bsz + 1,
        [HKV_META_KV_LAST_PAGE_LEN] = bsz,
        [HKV_META_TOTAL_LENGTHS] = bsz,
        [HKV_META_TOTAL_OFFSETS] = bsz + 1,
        [HKV_META_CACHED_LENGTHS] = bsz,
        [HKV_META_NEW_LENGTHS] = bsz,
        [HKV_META_NEW_OFFSETS] = bsz + 1,
        [HKV_META_ROW_OFFSETS] = bsz + 1,
        [HKV_META_ZEROS] = bsz,
        [HKV_META_KV_INDICES] = max_pages,
        [HKV_META_BATCH_INDICES] = cfg.max_batch_tokens,
        [HKV_META_POSITIONS] = cfg.max_batch_tokens,
    };
    int64_t off = 0;
    for (int f = 0; f < HKV_META_NUM_FIELDS; f++) {
        c->meta_offsets[f] = off;
        off += (sizes[f] + 3) / 4 * 4;
    }
    c->meta_words = off;

    c->table.num_layers = cfg.num_layers;
    c->table.num_pages = cfg.num_pages;
    c->table.page_size = cfg.page_size;
    c->table.row_bytes = (int64_t)cfg.num_heads * cfg.head_dim * (cfg.dtype_bits / 8);
    size_t table_bytes = (size_t)cfg.num_layers * (size_t)hkv_layer_bytes(&c->table);

    uint32_t dup_size = 16;
    while (dup_size < 2u * (uint32_t)cfg.max_batch_size)
        dup_size <<= 1;
    c->dup_mask = dup_size - 1;
    c->dup_ids = malloc(dup_size * sizeof *c->dup_ids);
    c->dup_stamp = calloc(dup_size, sizeof *c->dup_stamp);
    c->scratch_slot = malloc((size_t)bsz * sizeof *c->scratch_slot);
    c->scratch_keep = malloc((size_t)bsz * sizeof *c->scratch_keep);
    c->scratch_need = malloc((size_t)bsz * sizeof *c->scratch_need);
    c->scratch_trunc = malloc((size_t)bsz);
    c->scratch_onb = malloc((size_t)bsz * sizeof *c->scratch_onb);
    c->onb_host = malloc((size_t)max_pages * sizeof *c->onb_host);
    c->onb_gpu = malloc((size_t)max_pages * sizeof *c->onb_gpu);
    c->blocks = calloc((size_t)c->max_blocks, sizeof *c->blocks);
    if (c->dup_ids == NULL || c->dup_stamp == NULL || c->scratch_slot == NULL ||
        c->scratch_keep == NULL || c->scratch_need == NULL ||
        c->scratch_trunc == NULL || c->blocks == NULL || c->scratch_onb == NULL ||
        c->onb_host == NULL || c->onb_gpu == NULL) {
        st = hkv_error(HKV_ENOMEM, "out of host memory");
        goto fail;
    }
    st = hkv_page_pool_init(&c->pool, cfg.num_pages);
    if (st == HKV_OK)
        st = hkv_user_index_init(&c->users, cfg.num_pages + cfg.host_pages +
                                            cfg.max_batch_size);
    if (st == HKV_OK)
        st = hkv_token_filter_init(&c->filter, cfg.num_pages, cfg.page_size,
                                   cfg.verify_tokens);
    if (st == HKV_OK)
        st = hkv_buffer_new(is_cuda(c) ? HKV_MEM_DEVICE : HKV_MEM_HOST,
                            cfg.device_index, table_bytes, &c->table_buf);
    if (st == HKV_OK)
        st = hkv_host_tier_init(&c->host, cfg.host_pages,
                                (size_t)cfg.host_pages * (size_t)hkv_page_bytes(&c->table) *
                                    (size_t)cfg.num_layers,
                                is_cuda(c) ? HKV_MEM_PINNED : HKV_MEM_HOST,
                                cfg.device_index, cfg.page_size, cfg.verify_tokens);
    if (st == HKV_OK && cfg.host_pages > 0) {
        /* one transfer moves at most a batch's or a whole user's pages */
        int64_t per_user = hkv_div_up(cfg.max_seq_len, cfg.page_size);
        int64_t most = max_pages > per_user ? max_pages : per_user;
        c->xfer_a = malloc((size_t)most * sizeof *c->xfer_a);
        c->xfer_b = malloc((size_t)most * sizeof *c->xfer_b);
        if (c->xfer_a == NULL || c->xfer_b == NULL)
            st = hkv_error(HKV_ENOMEM, "out of host memory");
        if (st == HKV_OK)
            st = hkv_xfer_init(&c->xfer, is_cuda(c), cfg.device_index, 4 * most + 64,
                               !cfg.kernel_copies);
    }
    /* fault injection: the ordering tests must fail without the waits */
    const char *skip = getenv("HSTU_KVCACHE_DEBUG_SKIP_WAITS");
    c->skip_waits = skip != NULL && atoi(skip) != 0;
    c->xfer.skip_waits = c->skip_waits;
    if (st == HKV_OK)
        st = hkv_events_init(&c->events, cfg.event_capacity);
    if (st == HKV_OK && cfg.disk_dir != NULL)
        st = disk_open(c, &cfg);
    c->cfg.disk_dir = NULL;  /* the caller's string: not kept */
    if (st != HKV_OK)
        goto fail;
    c->table.base = c->table_buf->ptr;
    st = gds_open(c);
    if (st != HKV_OK)
        goto fail;
    c->stats.pages_total = cfg.num_pages;
    c->stats.host_pages_total = cfg.host_pages;
    *out = c;
    return HKV_OK;

fail:
    hkv_cache_destroy(c);
    return st;
}

void hkv_cache_destroy(hkv_cache *c)
{
    if (c == NULL)
        return;
    /* first: queued prepares are cancelled, a running one finishes */
    hkv_worker_stop(c->worker);
    for (int32_t i = 0; i < c->num_blocks; i++) {
        hkv_batch *b = c->blocks[i];
        if (b->in_use) {
            b->cache = NULL;  /* abandoned: hkv_batch_free releases it alone */
            continue;
        }
        block_destroy(b);
    }
    free(c->blocks);
    /* Transfers may still read or write both tables: wait for them first. */
    hkv_xfer_destroy(&c->xfer);
    for (int32_t i = 0; i < PREFETCH_SETS; i++) {
        prefetch_set *ps = &c->prefetch[i];
        for (int32_t l = 0; ps->layer_events != NULL && l < c->cfg.num_layers; l++)
            if (ps->layer_events[l] != NULL)
                (void)hkv_cuda_event_destroy(c->cfg.device_index, ps->layer_events[l]);
        free(ps->layer_events);
        free(ps->slots);
    }
    disk_free(c);
    hkv_host_tier_free_all(&c->host);
    free(c->xfer_a);
    free(c->xfer_b);
    hkv_buffer_unref(c->table_buf);
    hkv_token_filter_free_all(&c->filter);
    hkv_user_index_free_all(&c->users);
    hkv_page_pool_free_all(&c->pool);
    free(c->dup_ids);
    free(c->dup_stamp);
    free(c->scratch_slot);
    free(c->scratch_keep);
    free(c->scratch_need);
    free(c->scratch_trunc);
    free(c->scratch_onb);
    free(c->onb_host);
    free(c->onb_gpu);
    hkv_events_free(&c->events);
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->stage_lock);
    free(c);
}

const hkv_config *hkv_cache_config(const hkv_cache *c)
{
    return &c->cfg;
}

hkv_buffer *hkv_cache_table(hkv_cache *c)
{
    hkv_buffer_ref(c->table_buf);
    return c->table_buf;
}

const int64_t *hkv_cache_meta_offsets(const hkv_cache *c)
{
    return c->meta_offsets;
}

/* ------------------------------------------------------------------ */
/* lookup                                                              */

/* Tokens of a user a new batch may count as cached: the committed ones,
 * and (early reuse) those a batch in flight is filling, unless that chain
 * already lost a batch. */
static int64_t reusable_length(const hkv_cache *c, const hkv_user *u)
{
    return c->cfg.early_reuse && u->filling && !u->broken ? u->reserved : u->length;
}

/* Cached prefix of one user: reusable tokens, limited by the request's
 * history and, in verified mode, by the keys. */
static int64_t cached_prefix(hkv_cache *c, const hkv_user *u, int64_t length,
                             const int64_t *keys)
{
    int64_t reusable = reusable_length(c, u);
    int64_t n = reusable < length ? reusable : length;
    if (c->cfg.verify_tokens && n > 0) {
        /* each tier holds a prefix: the longer matching one counts */
        const int64_t ps = c->cfg.page_size;
        int64_t g = (int64_t)u->num_pages * ps < n ? (int64_t)u->num_pages * ps : n;
        int64_t h = (int64_t)u->host_pages * ps < n ? (int64_t)u->host_pages * ps : n;
        g = hkv_filter_match(&c->filter, c->pool.pages, u->head_page, keys, g);
        if (h > g)
            h = hkv_filter_match(&c->host.keys, c->host.pages, u->host_head, keys, h);
        int64_t m = g > h ? g : h;
        /* pages only the disk holds: their records carry the chained
         * fingerprint of the keys, checked page by page */
        int64_t top = u->num_pages > u->host_pages ? u->num_pages : u->host_pages;
        if (c->disk != NULL && m == top * ps && u->disk_pages > top && n > m) {
            int64_t full = n / ps;
            const uint64_t *fps = request_fingerprints(c, keys, full);
            m += ps * hkv_disk_count_run(c->disk, u->id, top, fps + top, full - top);
        }
        n = m < n ? m : n;
    }
    return n;
}

hkv_status hkv_cache_lookup(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                            const int64_t *history_lengths,
                            const int64_t *token_keys, int64_t num_keys,
                            int64_t *cached_lengths, uint64_t *epochs)
{
    uint64_t t0 = hkv_now_ns();
    pthread_mutex_lock(&c->lock);
    hkv_status st = check_batch(c, batch, user_ids, history_lengths, token_keys,
                                num_keys);
    if (st != HKV_OK)
        goto out;
    int64_t key_off = 0;
    uint64_t hit = 0, missed = 0;
    for (int32_t b = 0; b < batch; b++) {
        int32_t slot = hkv_user_find(&c->users, user_ids[b]);
        if (slot == HKV_NO_USER)
            slot = disk_lookup_new_user(c, user_ids[b], history_lengths[b]);
        int64_t cached = 0;
        uint64_t epoch = 0;
        if (slot != HKV_NO_USER) {
            const hkv_user *u = &c->users.users[slot];
            cached = cached_prefix(c, u, history_lengths[b],
                                   token_keys ? token_keys + key_off : NULL);
            epoch = u->epoch;
        }
        cached_lengths[b] = cached;
        if (epochs != NULL)
            epochs[b] = epoch;
        hit += (uint64_t)cached;
        missed += (uint64_t)(history_lengths[b] - cached);
        key_off += history_lengths[b];
    }
    c->stats.lookups++;
    c->stats.lookup_users += (uint64_t)batch;
    c->stats.hit_tokens += hit;
    c->stats.missed_tokens += missed;
    hkv_histogram_observe(&c->stats.lookup_latency, hkv_now_ns() - t0);
out:
    pthread_mutex_unlock(&c->lock);
    return st;
}

/* ------------------------------------------------------------------ */
/* allocate                                                            */

/* Fill the host metadata of batch b (users already hold their pages). */
static void build_metadata(hkv_cache *c, hkv_batch *bt, const int64_t *lengths,
                           const int64_t *cached, const int64_t *num_candidates)
{
    int32_t *m = bt->host->ptr;
    int32_t *indptr = meta_field(c, m, HKV_META_KV_INDPTR);
    int32_t *last_len = meta_field(c, m, HKV_META_KV_LAST_PAGE_LEN);
    int32_t *tot_len = meta_field(c, m, HKV_META_TOTAL_LENGTHS);
    int32_t *tot_off = meta_field(c, m, HKV_META_TOTAL_OFFSETS);
    int32_t *cached_len = meta_field(c, m, HKV_META_CACHED_LENGTHS);
    int32_t *new_len = meta_field(c, m, HKV_META_NEW_LENGTHS);
    int32_t *new_off = meta_field(c, m, HKV_META_NEW_OFFSETS);
    int32_t *row_off = meta_field(c, m, HKV_META_ROW_OFFSETS);
    int32_t *indices = meta_field(c, m, HKV_META_KV_INDICES);
    const int32_t ps = c->cfg.page_size;

    indptr[0] = tot_off[0] = new_off[0] = row_off[0] = 0;
    int32_t np = 0;
    for (int32_t b = 0; b < bt->batch_size; b++) {
        int32_t len = (int32_t)lengths[b];
        int32_t cl = (int32_t)cached[b];
        int32_t pages = (int32_t)pages_for(c, len);
        int32_t slot = bt->user_slots[b];
        int32_t page = slot == HKV_NO_USER ? HKV_NO_PAGE
                                           : c->users.users[slot].head_page;
        for (int32_t i = 0; i < pages; i++) {
            indices[np++] = page;
            page = c->pool.pages[page].next;
        }
        indptr[b + 1] = np;
        last_len[b] = len == 0 ? 0 : len - (pages - 1) * ps;
        tot_len[b] = len;
        tot_off[b + 1] = tot_off[b] + len;
        cached_len[b] = cl;
        new_len[b] = len - cl;
        new_off[b + 1] = new_off[b] + (len - cl);
        row_off[b + 1] = row_off[b] + (len - cl) +
                         (num_candidates ? (int32_t)num_candidates[b] : 0);
    }
    bt->total_pages = np;
    bt->total_tokens = tot_off[bt->batch_size];
    bt->new_tokens = new_off[bt->batch_size];
    bt->num_rows = row_off[bt->batch_size];
}

/* Upload the metadata (CUDA) and compute per-token fields where they are
 * read: on the host for the CPU path, by a kernel on the GPU. */
static hkv_status publish_metadata(hkv_cache *c, hkv_batch *bt, void *stream)
{
    int32_t *host = bt->host->ptr;
    int32_t *meta = is_cuda(c) ? bt->device->ptr : host;
    if (is_cuda(c)) {
        size_t words = (size_t)(c->meta_offsets[HKV_META_KV_INDICES] + bt->total_pages);
        hkv_status st = hkv_cuda_upload_words(meta, bt->host_dev, (int64_t)words,
                                              c->cfg.device_index, stream);
        if (st != HKV_OK)
            return st;
    }
    hkv_token_meta_args tm = {
        .new_offsets = meta_field(c, meta, HKV_META_NEW_OFFSETS),
        .cached_lengths = meta_field(c, meta, HKV_META_CACHED_LENGTHS),
        .batch = bt->batch_size,
        .nnz = bt->new_tokens,
        .batch_indices = meta_field(c, meta, HKV_META_BATCH_INDICES),
        .positions = meta_field(c, meta, HKV_META_POSITIONS),
    };
    if (!is_cuda(c)) {
        hkv_cpu_token_meta(&tm);
        return HKV_OK;
    }
    return hkv_cuda_token_meta(&tm, c->cfg.device_index, stream);
}

/* Drop a user's reserved tokens beyond the committed ones (no batch fills
 * it any more).  With early reuse lookups may have counted them: a new
 * epoch makes those lookups stale. */
static void rollback_user(hkv_cache *c, hkv_user *u)
{
    c->stats.pages_dropped += drop_tail_pages(c, u, pages_for(c, u->length));
    if (c->cfg.early_reuse && u->reserved > u->length)
        hkv_user_new_epoch(&c->users, u);
    u->reserved = u->length;
    u->broken = 0;
}

/* Batch bt stops filling user u (entry b) without its tokens becoming
 * cached: it was released unfinished, or its allocation failed. */
static void unfill(hkv_cache *c, hkv_batch *bt, int32_t b, hkv_user *u)
{
    int later = u->reserved > bt->fill_to[b];
    u->filling--;
    bt->fills[b] = 0;
    if (u->fill_batch == bt) {
        /* the batch before this one (if any, and not released unfinished
         * itself) is the last writer again */
        hkv_batch *d = bt->dep[b];
        u->fill_batch = d != NULL && !d->aborted ? d : NULL;
        u->fill_gen = bt->dep_gen[b];
    }
    if (later) {
        /* A later batch continues this one: its tokens cannot be kept, and
         * its reads of this batch's tokens fail (wait_onboard). */
        u->broken = 1;
    }
    if (u->filling == 0) {
        rollback_user(c, u);
    } else if (!later) {
        /* an earlier batch still fills: keep its tokens, drop this one's */
        c->stats.pages_dropped += drop_tail_pages(c, u, pages_for(c, bt->fill_from[b]));
        hkv_user_new_epoch(&c->users, u);
        u->reserved = bt->fill_from[b];
    }
}

/*
 * Every layer was written: the batch's tokens count as cached.  In eager
 * mode their full pages are copied to the host tier right away (after the
 * appends queued on `stream`), so a later eviction drops them for free.
 * An offload that cannot be queued is counted, never fatal: the pages stay
 * on the GPU and are written back at eviction instead.
 */
static void commit_batch(hkv_cache *c, hkv_batch *bt, void *stream)
{
    int eager = has_host(c) && c->cfg.offload_mode == HKV_OFFLOAD_EAGER &&
                hkv_xfer_begin(&c->xfer, stream) == HKV_OK;
    for (int32_t b = 0; b < bt->batch_size; b++) {
        if (!bt->fills[b])
            continue;
        hkv_user *u = &c->users.users[bt->user_slots[b]];
        u->filling--;
        bt->fills[b] = 0;
        if (u->broken) {
            /* an earlier batch of this chain was released unfinished */
            if (u->filling == 0)
                rollback_user(c, u);
            continue;
        }
        /* An earlier batch this one continues has committed already: every
         * read of its tokens (append included) waited for its layers. */
        hkv_events_emit(&c->events, HKV_EVENT_STORED, HKV_TIER_GPU, HKV_TIER_GPU,
                        u->id, u->length / c->cfg.page_size,
                        pages_for(c, bt->fill_to[b]) - u->length / c->cfg.page_size);
        u->length = bt->fill_to[b];
        if (eager) {
            hkv_status st;
            offload_user(c, bt->user_slots[b], 0, &st);
            if (st != HKV_OK)
                c->stats.transfers_failed++;
        }
    }
    bt->state = BATCH_COMMITTED;
    c->stats.batches_committed++;
}

/*
 * An allocation failed after it changed the cache (a CUDA call failed):
 * treat the half-made batch as open and roll it back like a close.  Called
 * with the lock held; returns with it released.
 */
static hkv_status fail_new_batch(hkv_cache *c, hkv_batch *bt, hkv_status st)
{
    bt->in_use = 1;
    bt->state = BATCH_OPEN;
    c->stats.open_batches++;
    pthread_mutex_unlock(&c->lock);
    hkv_batch_free(bt);
    return st;
}

hkv_status hkv_cache_allocate(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                              const int64_t *history_lengths,
                              const int64_t *cached_lengths, const uint64_t *epochs,
                              const int64_t *token_keys, int64_t num_keys,
                              const int64_t *num_candidates, void *stream,
                              hkv_batch **out)
{
    return hkv_cache_allocate_after(c, batch, user_ids, history_lengths, cached_lengths,
                                    epochs, token_keys, num_keys, num_candidates, stream,
                                    NULL, out);
}

hkv_status hkv_cache_allocate_after(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                                    const int64_t *history_lengths,
                                    const int64_t *cached_lengths, const uint64_t *epochs,
                                    const int64_t *token_keys, int64_t num_keys,
                                    const int64_t *num_candidates, void *stream,
                                    void *ready, hkv_batch **out)
{
    *out = NULL;
    if (cached_lengths == NULL || epochs == NULL)
        return hkv_error(HKV_EINVAL, "allocate needs the cached lengths and "
                         "epochs of a lookup");
    uint64_t t0 = hkv_now_ns();
    hkv_status st = HKV_OK;
    if (c->disk != NULL) {
        pthread_mutex_lock(&c->lock);
        st = check_batch(c, batch, user_ids, history_lengths, token_keys, num_keys);
        pthread_mutex_unlock(&c->lock);
        if (st == HKV_OK)
            st = disk_stage_in(c, batch, user_ids, cached_lengths, epochs, token_keys,
                               history_lengths, stream, ready);
        if (st != HKV_OK)
            return st;
    }
    pthread_mutex_lock(&c->lock);
    st = check_batch(c, batch, user_ids, history_lengths, token_keys, num_keys);
    if (st == HKV_OK && has_host(c))
        st = hkv_xfer_reap(&c->xfer, c->pool.pages, &c->host);
    if (st != HKV_OK)
        goto out;
    if (is_cuda(c))
        reap_prefetch(c, 0);
    disk_pump(c);

    /* Pass 1: check every user and count pages, changing nothing. */
    int64_t need = 0, freed = 0, unpinned_kept = 0, new_tokens = 0, rows = 0;
    for (int32_t b = 0; b < batch; b++) {
        int64_t len = history_lengths[b], cl = cached_lengths[b];
        if (cl < 0 || cl > len) {
            st = hkv_error(HKV_EINVAL, "cached length %lld of user %lld is outside "
                           "0..%lld", (long long)cl, (long long)user_ids[b],
                           (long long)len);
            goto out;
        }
        if (num_candidates != NULL && (num_candidates[b] < 0 ||
                                       num_candidates[b] > c->cfg.max_seq_len)) {
            st = hkv_error(HKV_EINVAL, "num_candidates of user %lld is %lld; it must "
                           "be in 0..max_seq_len", (long long)user_ids[b],
                           (long long)num_candidates[b]);
            goto out;
        }
        int32_t slot = hkv_user_find(&c->users, user_ids[b]);
        hkv_user *u = slot == HKV_NO_USER ? NULL : &c->users.users[slot];
        uint64_t epoch = u ? u->epoch : 0;
        if (epoch != epochs[b]) {
            st = hkv_error(HKV_ESTALE, "the cache entry of user %lld changed since "
                           "the lookup (evicted or rewritten); look the batch up "
                           "again", (long long)user_ids[b]);
            goto out;
        }
        if (cl > (u ? reusable_length(c, u) : 0)) {
            st = hkv_error(HKV_EINVAL, "cached length %lld of user %lld is more "
                           "than the %lld tokens the cache holds",
                           (long long)cl, (long long)user_ids[b],
                           (long long)(u ? reusable_length(c, u) : 0));
            goto out;
        }
        int64_t n = len - cl;
        int truncate = u != NULL && n > 0 && u->reserved > cl;
        if (u != NULL && u->filling && !c->cfg.early_reuse) {
            st = hkv_error(HKV_EBUSY, "user %lld is in another batch whose K/V are "
                           "still being appended; finish that batch first (or "
                           "enable early_reuse)", (long long)user_ids[b]);
            goto out;
        }
        if (u != NULL && u->filling) {
            /* Early reuse: a batch in flight fills this user.  A new batch
             * may read its tokens, or continue exactly where it ends. */
            if (u->broken || (n > 0 && u->filling >= 2)) {
                st = hkv_error(HKV_EBUSY, "user %lld is in %s; finish or release "
                               "those batches first", (long long)user_ids[b],
                               u->broken ? "a batch that continues a released one"
                                         : "two batches still being appended");
                goto out;
            }
            if (truncate) {
                st = hkv_error(HKV_EBUSY, "user %lld: this batch would rewrite tokens "
                               "that another batch is still appending (its history "
                               "differs from that batch's); finish that batch first",
                               (long long)user_ids[b]);
                goto out;
            }
        } else if (u != NULL && u->pins > 0 && truncate) {
            st = hkv_error(HKV_EBUSY, "user %lld: this batch would rewrite tokens that "
                           "another open batch (or a prefetch in flight) reads; release "
                           "that batch first", (long long)user_ids[b]);
            goto out;
        }
        /* GPU pages: keep a prefix, onboard what only the host holds of the
         * cached part, add pages for the new tokens. */
        int64_t old_pages = u ? u->num_pages : 0;
        int64_t keep, target, onb;
        if (n > 0) {
            keep = truncate && pages_for(c, cl) < old_pages ? pages_for(c, cl) : old_pages;
            target = pages_for(c, len);
            onb = pages_for(c, cl);
        } else {
            keep = old_pages;
            onb = pages_for(c, len);
            target = onb > old_pages ? onb : old_pages;
        }
        if (onb < keep)
            onb = keep;
        if (onb > keep && u != NULL && onb > u->host_pages && u->disk_pages >= onb) {
            st = u->pins > 0
                ? hkv_error(HKV_EBUSY, "user %lld: its cached pages are on the disk tier "
                            "while another batch holds the user; finish that batch first",
                            (long long)user_ids[b])
                : hkv_error(HKV_EFULL, "user %lld: the host tier has no room to bring its "
                            "cached pages back from the disk tier (pages held by open "
                            "batches or copies in flight); raise host_capacity_bytes or "
                            "split the batch", (long long)user_ids[b]);
            goto out;
        }
        if (onb > keep && (u == NULL || onb > u->host_pages)) {
            st = hkv_error(HKV_ESTATE, "internal: user %lld has %lld cached tokens but "
                           "neither tier holds page %lld", (long long)user_ids[b],
                           (long long)cl, (long long)keep);
            goto out;
        }
        c->scratch_slot[b] = slot;
        c->scratch_keep[b] = keep;
        c->scratch_onb[b] = onb;
        c->scratch_need[b] = target - keep;
        c->scratch_trunc[b] = (uint8_t)truncate;
        need += target - keep;
        freed += old_pages - keep;
        if (u != NULL && u->pins == 0)
            unpinned_kept += keep;
        new_tokens += n;
        rows += n + (num_candidates ? num_candidates[b] : 0);
    }
    if (new_tokens > c->cfg.max_batch_tokens) {
        st = hkv_error(HKV_EINVAL, "the batch has %lld new tokens, more than "
                       "max_batch_tokens=%lld", (long long)new_tokens,
                       (long long)c->cfg.max_batch_tokens);
        goto out;
    }
    if (rows > INT32_MAX) {
        st = hkv_error(HKV_EINVAL, "the batch has more than 2^31 rows");
        goto out;
    }
    int64_t evictable = hkv_page_pool_used(&c->pool) - c->pinned_pages -
                        unpinned_kept - freed;
    int64_t available = c->pool.num_free + freed + evictable;
    if (need > available) {
        st = hkv_error(HKV_EFULL, "the batch needs %lld new pages but only %lld "
                       "can be freed (pool of %d pages, %lld held by open "
                       "batches); raise num_pages or split the batch",
                       (long long)need, (long long)available,
                       (int)c->cfg.num_pages, (long long)c->pinned_pages);
        goto out;
    }
    hkv_batch *bt = NULL;
    st = block_acquire(c, &bt);
    if (st == HKV_OK) {
        bt->gen++;
        bt->aborted = 0;
    }
    if (st == HKV_OK && has_host(c))  /* order copies after the caller */
        st = ready != NULL ? hkv_xfer_begin_after(&c->xfer, ready)
                           : hkv_xfer_begin(&c->xfer, stream);
    if (st != HKV_OK)
        goto out;

    bt->dep_seq = 0;
    /* Pass 2: pin every user first, so evicting for one user never takes
     * pages of another user of the same batch; drop rewritten tails. */
    for (int32_t b = 0; b < batch; b++) {
        int32_t slot = c->scratch_slot[b];
        if (slot == HKV_NO_USER) {
            if (history_lengths[b] == 0) {
                bt->user_slots[b] = HKV_NO_USER;
                continue;
            }
            slot = hkv_user_find_or_add(&c->users, user_ids[b]);
            /* capacity is num_pages + max_batch_size slots: cannot fail */
        }
        hkv_user *u = &c->users.users[slot];
        bt->user_slots[b] = slot;
        pin_user(c, u);
        hkv_user_touch(&c->users, slot);
        if (c->disk != NULL && !u->disk_admitted) {
            u->disk_admitted = c->cfg.disk_admit_after == 0 ||
                               hkv_disk_offer(c->disk, u->id) >= c->cfg.disk_admit_after;
            /* admitted now: the pages already on the host go to disk too */
            int32_t ix = 0;
            for (int32_t p = u->host_head; u->disk_admitted && p != HKV_NO_PAGE;
                 p = c->host.pages[p].next, ix++)
                if (ix >= u->disk_pages)
                    disk_enqueue(c, u, p, ix);
        }
        if (u->prefetch > bt->dep_seq) {
            /* its pages are still coming in: wait for that copy too */
            bt->dep_seq = u->prefetch;
            bt->dep_set = (int32_t)(u->prefetch % PREFETCH_SETS);
        }
        if (c->scratch_trunc[b]) {
            c->stats.pages_dropped += drop_tail_pages(c, u, c->scratch_keep[b]);
            if (u->length > cached_lengths[b])
                hkv_user_new_epoch(&c->users, u);
            u->length = u->reserved = cached_lengths[b];
            /* records past the rewritten token hold the old history */
            disk_drop_from(c, u, cached_lengths[b] / c->cfg.page_size);
        }
    }
    /* Pass 3: GPU pages for what is onboarded and for the new tokens.
     * Evict everything needed first, then allocate: pages freed together
     * (an evicted user's tail run) come back in address order as a run,
     * which keeps transfers of the new owner one DMA per run. */
    int64_t key_off = 0, onb_count = 0;
    c->reuse_wait = 0;
    while (c->pool.num_free < need && evict_one_page(c))
        ;
    for (int32_t b = 0; b < batch; b++) {
        int32_t slot = bt->user_slots[b];
        int64_t n = history_lengths[b] - cached_lengths[b];
        bt->fills[b] = 0;
        bt->dep[b] = NULL;
        if (slot == HKV_NO_USER) {
            key_off += history_lengths[b];
            continue;
        }
        hkv_user *u = &c->users.users[slot];
        int32_t host_page = c->scratch_onb[b] > c->scratch_keep[b]
                                ? hkv_host_page_at(&c->host, u, c->scratch_keep[b])
                                : HKV_NO_PAGE;
        for (int64_t i = 0; i < c->scratch_need[b]; i++) {
            int32_t page = hkv_page_alloc(&c->pool, slot);
            if (page == HKV_NO_PAGE) {
                evict_one_page(c);
                page = hkv_page_alloc(&c->pool, slot);
            }
            if (c->pool.pages[page].pins > 0)
                c->reuse_wait = 1;  /* a copy still reads its old content */
            hkv_user_push_page(&c->pool, u, page);
            c->pinned_pages++;
            c->stats.pages_allocated++;
            if (c->scratch_keep[b] + i < c->scratch_onb[b]) {
                c->onb_host[onb_count] = host_page;
                c->onb_gpu[onb_count++] = page;
                hkv_filter_copy_page(&c->host.keys, host_page, &c->filter, page);
                host_page = c->host.pages[host_page].next;
            }
        }
        hkv_events_emit(&c->events, HKV_EVENT_ONBOARDED, HKV_TIER_GPU, HKV_TIER_HOST,
                        u->id, c->scratch_keep[b], c->scratch_onb[b] - c->scratch_keep[b]);
        /* The batch that last filled this user may still be writing (a
         * batch in flight, or one committed on another stream): reads of
         * its tokens wait for its appends, per layer.  A batch still
         * appending matters only if this one reads past its committed
         * tokens. */
        hkv_batch *prev = u->fill_batch;
        if (prev != NULL && prev != bt && prev->gen == u->fill_gen &&
            (prev->state != BATCH_OPEN || history_lengths[b] > u->length)) {
            bt->dep[b] = prev;
            bt->dep_gen[b] = u->fill_gen;
            bt->dep_pin[b] = prev->state == BATCH_OPEN;
            prev->dependents += bt->dep_pin[b];
        }
        if (n > 0) {
            bt->fill_from[b] = cached_lengths[b];
            bt->fill_to[b] = history_lengths[b];
            u->reserved = history_lengths[b];
            u->filling++;
            u->fill_batch = bt;
            u->fill_gen = bt->gen;
            bt->fills[b] = 1;
            if (c->cfg.verify_tokens)
                hkv_filter_store(&c->filter, &c->pool, u, token_keys + key_off,
                                 cached_lengths[b], history_lengths[b]);
        }
        key_off += history_lengths[b];
    }
    /* Pass 4: onboard, layer by layer; then drop rewritten host tails (a
     * page the onboard still reads stays until the copy is done). */
    bt->onboarded = 0;
    bt->batch_size = batch;
    if (onb_count > 0) {
        st = hkv_xfer_onboard(&c->xfer, c->pool.pages, &c->table, &c->host, c->onb_host,
                              c->onb_gpu, onb_count, bt->layer_events);
        if (st != HKV_OK) {
            c->stats.transfers_failed++;
            /* The pages meant for the copy hold nothing valid: drop them. */
            for (int32_t b = 0; b < batch; b++) {
                int32_t slot = bt->user_slots[b];
                if (slot == HKV_NO_USER)
                    continue;
                hkv_user *u = &c->users.users[slot];
                drop_tail_pages(c, u, c->scratch_keep[b]);
                if (bt->fills[b])
                    unfill(c, bt, b, u);
                fix_length(c, u);
            }
            return fail_new_batch(c, bt, st);
        }
        bt->onboarded = is_cuda(c);
    }
    for (int32_t b = 0; b < batch; b++) {
        int32_t slot = bt->user_slots[b];
        if (slot == HKV_NO_USER || !c->scratch_trunc[b])
            continue;
        hkv_user *u = &c->users.users[slot];
        while ((int64_t)u->host_pages * c->cfg.page_size > cached_lengths[b])
            drop_host_tail(c, u);
    }
    if (c->reuse_wait && is_cuda(c) && !c->skip_waits) {
        /* The caller's writes into reused pages wait for the copies that
         * still read them (the onboard stream waits for them by itself). */
        st = hkv_cuda_stream_wait_event(c->cfg.device_index, stream,
                                        c->xfer.offload_done);
        c->reuse_wait = 0;
        if (st != HKV_OK)
            return fail_new_batch(c, bt, st);
    }
    bt->stream = stream;
    bt->has_candidates = num_candidates != NULL;
    bt->in_use = 1;
    bt->state = BATCH_OPEN;
    bt->layers_left = c->cfg.num_layers;
    memset(bt->layer_done, 0, (size_t)c->cfg.num_layers);
    build_metadata(c, bt, history_lengths, cached_lengths, num_candidates);
    c->stats.batches_allocated++;
    c->stats.open_batches++;
    st = publish_metadata(c, bt, stream);
    if (st != HKV_OK) {
        /* Only an asynchronous CUDA failure gets here; the pages are
         * reserved consistently, so roll the batch back like a close. */
        pthread_mutex_unlock(&c->lock);
        hkv_batch_free(bt);
        return st;
    }
    if (bt->new_tokens == 0)
        commit_batch(c, bt, stream);
    hkv_histogram_observe(&c->stats.allocate_latency, hkv_now_ns() - t0);
    *out = bt;
out:
    pthread_mutex_unlock(&c->lock);
    return st;
}

hkv_status hkv_cache_prepare_async(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                                   const int64_t *history_lengths,
                                   const int64_t *cached_lengths, const uint64_t *epochs,
                                   const int64_t *token_keys, int64_t num_keys,
                                   const int64_t *num_candidates, void *stream,
                                   struct hkv_prepare_job **out)
{
    *out = NULL;
    if (cached_lengths == NULL || epochs == NULL)
        return hkv_error(HKV_EINVAL, "allocate needs the cached lengths and "
                         "epochs of a lookup");
    pthread_mutex_lock(&c->lock);
    hkv_status st = HKV_OK;
    if (c->worker == NULL)
        st = hkv_worker_start(c, c->max_blocks, c->cfg.max_batch_size, &c->worker);
    hkv_worker *w = c->worker;
    pthread_mutex_unlock(&c->lock);
    if (st != HKV_OK)
        return st;
    return hkv_prepare_submit(w, batch, user_ids, history_lengths, cached_lengths, epochs,
                              token_keys, num_keys, num_candidates, stream, out);
}

void hkv_batch_get_info(hkv_batch *b, hkv_batch_info *info)
{
    info->batch_size = b->batch_size;
    info->total_pages = b->total_pages;
    info->total_tokens = b->total_tokens;
    info->new_tokens = b->new_tokens;
    info->num_rows = b->has_candidates ? b->num_rows : b->new_tokens;
    info->committed = b->state == BATCH_COMMITTED;
    info->closed = b->state == BATCH_CLOSED;
    info->host_meta = b->host;
    info->device_meta = b->device != NULL ? b->device : b->host;
}

/* ------------------------------------------------------------------ */
/* append / read                                                       */

static const char *device_name(int32_t kind)
{
    return kind == HKV_DEVICE_CPU ? "cpu" : kind == HKV_DEVICE_CUDA ? "cuda"
                                                                    : "another device";
}

static hkv_status check_device(const hkv_cache *c, const hkv_tensor *t,
                               const char *name)
{
    if (t->device_kind != c->cfg.device_kind ||
        (is_cuda(c) && t->device_index != c->cfg.device_index))
        return hkv_error(HKV_EINVAL, "%s is on %s:%d but the cache is on %s:%d",
                         name, device_name(t->device_kind), (int)t->device_index,
                         device_name(c->cfg.device_kind),
                         (int)c->cfg.device_index);
    return HKV_OK;
}

/*
 * Check a K or V tensor: [layers, rows, H, D], [rows, H, D] or [rows, H*D]
 * in the cache's dtype and device with contiguous rows; returns its row and
 * layer strides in bytes.
 */
static hkv_status check_rows(const hkv_cache *c, const hkv_tensor *t,
                             const char *name, int32_t layers, int64_t rows,
                             int64_t *row_stride, int64_t *layer_stride)
{
    const hkv_config *cfg = &c->cfg;
    hkv_status st = check_device(c, t, name);
    if (st != HKV_OK)
        return st;
    if (t->dtype_code != cfg->dtype_code || t->dtype_bits != cfg->dtype_bits)
        return hkv_error(HKV_EINVAL, "%s has dtype (code %d, %d bits) but the "
                         "cache stores %s", name, (int)t->dtype_code,
                         (int)t->dtype_bits,
                         cfg->dtype_code == 4 ? "bfloat16"
                         : cfg->dtype_bits == 16 ? "float16" : "float32");
    int64_t es = cfg->dtype_bits / 8;
    int64_t hd = (int64_t)cfg->num_heads * cfg->head_dim;
    int lead = t->ndim == 4 ? 1 : 0;
    int ok;
    if (t->ndim == 4)
        ok = t->shape[0] == layers && t->shape[2] == cfg->num_heads &&
             t->shape[3] == cfg->head_dim && t->strides[3] == 1 &&
             (t->shape[2] == 1 || t->strides[2] == cfg->head_dim);
    else if (t->ndim == 3)
        ok = layers == 1 && t->shape[1] == cfg->num_heads &&
             t->shape[2] == cfg->head_dim && t->strides[2] == 1 &&
             (t->shape[1] == 1 || t->strides[1] == cfg->head_dim);
    else if (t->ndim == 2)
        ok = layers == 1 && t->shape[1] == hd && t->strides[1] == 1;
    else
        ok = 0;
    if (!ok)
        return hkv_error(HKV_EINVAL, "%s must be [rows, %d, %d] (or [rows, %lld]) "
                         "for one layer, [%d, rows, %d, %d] for %d layers, with "
                         "contiguous heads and head_dim",
                         name, (int)cfg->num_heads, (int)cfg->head_dim,
                         (long long)hd, (int)layers, (int)cfg->num_heads,
                         (int)cfg->head_dim, (int)layers);
    if (t->shape[lead] != rows)
        return hkv_error(HKV_EINVAL, "%s has %lld rows, expected %lld", name,
                         (long long)t->shape[lead], (long long)rows);
    if (rows > 1 && t->strides[lead] < hd)
        return hkv_error(HKV_EINVAL, "%s rows overlap (row stride %lld < %lld)",
                         name, (long long)t->strides[lead], (long long)hd);
    *row_stride = t->strides[lead] * es;
    *layer_stride = lead ? t->strides[0] * es : 0;
    return HKV_OK;
}

static void fill_rows_args(const hkv_cache *c, hkv_rows_args *a, int32_t *meta)
{
    a->table = c->table;
    a->kv_indptr = meta_field(c, meta, HKV_META_KV_INDPTR);
    a->kv_indices = meta_field(c, meta, HKV_META_KV_INDICES);
}

static hkv_status check_layers(const hkv_cache *c, int32_t first, int32_t count)
{
    if (count < 1 || first < 0 || first + count > c->cfg.num_layers)
        return hkv_error(HKV_EINVAL, "layers %d..%d are outside 0..%d", (int)first,
                         (int)(first + count - 1), (int)c->cfg.num_layers - 1);
    return HKV_OK;
}

/* Lock the batch's cache for an operation on an open batch.  On HKV_OK the
 * caller holds the lock and must unlock it. */
static hkv_status batch_enter(hkv_batch *bt)
{
    hkv_cache *c = bt->cache;
    if (c == NULL)
        return hkv_error(HKV_ESTATE, "the cache of this batch was closed");
    pthread_mutex_lock(&c->lock);
    if (bt->state == BATCH_CLOSED) {
        pthread_mutex_unlock(&c->lock);
        return hkv_error(HKV_ESTATE, "the batch was released; allocate a new one");
    }
    return HKV_OK;
}

/* The caller's stream waits for the onboarding of these layers. */
static hkv_status wait_onboard(hkv_cache *c, hkv_batch *bt, int32_t first, int32_t count,
                               void *stream)
{
    /* Early reuse: tokens of an earlier batch this one reads must have been
     * appended (queued) for the layer, by a batch that was not released
     * unfinished; then the stream waits for that append.  (A block handed
     * out again means its batch's work completed long ago.) */
    const hkv_batch *last = NULL;
    for (int32_t b = 0; b < bt->batch_size; b++) {
        const hkv_batch *d = bt->dep[b];
        if (d == NULL || d == last || d->gen != bt->dep_gen[b])
            continue;
        last = d;
        if (d->aborted)
            return hkv_error(HKV_ESTALE, "this batch continues a batch that was released "
                             "before all its layers were appended: the K/V it reads "
                             "were never written; prepare the batch again");
        for (int32_t l = first; l < first + count; l++) {
            if (d->state == BATCH_OPEN && !d->layer_done[l])
                return hkv_error(HKV_EBUSY, "layer %d: this batch reads tokens of an "
                                 "earlier batch that has not appended that layer yet; "
                                 "run the earlier batch's layer first", (int)l);
            if (is_cuda(c) && !c->skip_waits) {
                hkv_status st = hkv_cuda_stream_wait_event(c->cfg.device_index, stream,
                                                           d->append_events[l]);
                if (st != HKV_OK)
                    return st;
            }
        }
    }
    if (c->skip_waits)
        return HKV_OK;  /* fault injection: the ordering tests must fail */
    /* a prefetch still copying some of the batch's pages (a set reused
     * since holds a later seq: that copy had completed) */
    const prefetch_set *ps = bt->dep_seq != 0 && c->prefetch[bt->dep_set].seq == bt->dep_seq
                                 ? &c->prefetch[bt->dep_set]
                                 : NULL;
    for (int32_t l = first; l < first + count; l++) {
        hkv_status st = HKV_OK;
        if (ps != NULL)
            st = hkv_cuda_stream_wait_event(c->cfg.device_index, stream,
                                            ps->layer_events[l]);
        if (st == HKV_OK && bt->onboarded)
            st = hkv_cuda_stream_wait_event(c->cfg.device_index, stream,
                                            bt->layer_events[l]);
        if (st != HKV_OK)
            return st;
    }
    return HKV_OK;
}

hkv_status hkv_batch_wait_layer(hkv_batch *bt, int32_t layer, void *stream)
{
    hkv_status st = batch_enter(bt);
    if (st != HKV_OK)
        return st;
    hkv_cache *c = bt->cache;
    st = check_layers(c, layer, 1);
    if (st == HKV_OK)
        st = wait_onboard(c, bt, layer, 1, stream);
    pthread_mutex_unlock(&c->lock);
    return st;
}

hkv_status hkv_batch_append(hkv_batch *bt, int32_t first_layer, int32_t num_layers,
                            const hkv_tensor *k, const hkv_tensor *v, void *stream)
{
    hkv_status st = batch_enter(bt);
    if (st != HKV_OK)
        return st;
    hkv_cache *c = bt->cache;
    st = check_layers(c, first_layer, num_layers);
    if (st != HKV_OK)
        goto out;
    /* A batch without new tokens committed at allocation; appending its
     * (empty) layers stays valid so callers need no special case. */
    for (int32_t l = first_layer; bt->new_tokens > 0 && l < first_layer + num_layers;
         l++)
        if (bt->layer_done[l] || bt->state == BATCH_COMMITTED) {
            st = hkv_error(HKV_ESTATE, "layer %d of this batch was already "
                           "appended", (int)l);
            goto out;
        }
    int use_rows = bt->has_candidates && k->ndim > 0 &&
                   k->shape[k->ndim == 4 ? 1 : 0] == bt->num_rows &&
                   bt->num_rows != bt->new_tokens;
    int64_t rows = use_rows ? bt->num_rows : bt->new_tokens;
    hkv_rows_args a;
    st = check_rows(c, k, "k", num_layers, rows, &a.k_row_stride, &a.k_layer_stride);
    if (st == HKV_OK)
        st = check_rows(c, v, "v", num_layers, rows, &a.v_row_stride,
                        &a.v_layer_stride);
    if (st != HKV_OK) {
        if (bt->has_candidates && bt->num_rows != bt->new_tokens) {
            char msg[400];
            snprintf(msg, sizeof msg, "%s", hkv_last_error());
            st = hkv_error(st, "%s (this batch takes %lld rows of new history "
                           "tokens, or %lld rows with the candidates)",
                           msg, (long long)bt->new_tokens,
                           (long long)bt->num_rows);
        }
        goto out;
    }
    if (bt->new_tokens > 0) {
        int32_t *meta = is_cuda(c) ? bt->device->ptr : bt->host->ptr;
        /* a partial page written here may have been onboarded */
        st = wait_onboard(c, bt, first_layer, num_layers, stream);
        if (st != HKV_OK)
            goto out;
        fill_rows_args(c, &a, meta);
        a.first_layer = first_layer;
        a.num_layers = num_layers;
        a.k = k->data;
        a.v = v->data;
        a.batch_indices = meta_field(c, meta, HKV_META_BATCH_INDICES);
        a.positions = meta_field(c, meta, HKV_META_POSITIONS);
        a.token_offsets = meta_field(c, meta, HKV_META_NEW_OFFSETS);
        a.row_offsets = meta_field(c, meta, use_rows ? HKV_META_ROW_OFFSETS
                                                     : HKV_META_NEW_OFFSETS);
        a.nnz = bt->new_tokens;
        if (is_cuda(c)) {
            st = hkv_cuda_append(&a, c->cfg.device_index, stream);
            /* later batches reading these tokens wait for this (early reuse) */
            for (int32_t l = first_layer; st == HKV_OK && l < first_layer + num_layers; l++)
                st = hkv_cuda_event_record(c->cfg.device_index, bt->append_events[l], stream);
            if (st != HKV_OK)
                goto out;
            bt->stream = stream;
        } else {
            hkv_cpu_append(&a);
        }
    }
    if (bt->new_tokens > 0) {
        for (int32_t l = first_layer; l < first_layer + num_layers; l++)
            bt->layer_done[l] = 1;
        bt->layers_left -= num_layers;
        c->stats.tokens_appended += (uint64_t)bt->new_tokens * (uint64_t)num_layers;
        if (bt->layers_left == 0)
            commit_batch(c, bt, stream);
    }
out:
    pthread_mutex_unlock(&c->lock);
    return st;
}

static hkv_status check_index_tensor(const hkv_cache *c, const hkv_tensor *t,
                                     const char *name, int64_t n)
{
    hkv_status st = check_device(c, t, name);
    if (st != HKV_OK)
        return st;
    if (t->dtype_code != 0 || t->dtype_bits != 32 || t->ndim != 1 ||
        t->shape[0] < n || (n > 1 && t->strides[0] != 1))
        return hkv_error(HKV_EINVAL, "%s must be a contiguous int32 vector of at "
                         "least %lld entries", name, (long long)n);
    return HKV_OK;
}

hkv_status hkv_batch_read(hkv_batch *bt, int32_t layer, const hkv_tensor *k,
                          const hkv_tensor *v, const hkv_tensor *batch_indices,
                          const hkv_tensor *positions, void *stream)
{
    hkv_status st = batch_enter(bt);
    if (st != HKV_OK)
        return st;
    hkv_cache *c = bt->cache;
    st = check_layers(c, layer, 1);
    if (st != HKV_OK)
        goto out;
    hkv_rows_args a;
    int64_t n = bt->total_tokens;
    st = check_rows(c, k, "k", 1, n, &a.k_row_stride, &a.k_layer_stride);
    if (st == HKV_OK)
        st = check_rows(c, v, "v", 1, n, &a.v_row_stride, &a.v_layer_stride);
    if (st == HKV_OK)
        st = check_index_tensor(c, batch_indices, "batch_indices", n);
    if (st == HKV_OK)
        st = check_index_tensor(c, positions, "positions", n);
    if (st != HKV_OK || n == 0)
        goto out;
    int32_t *meta = is_cuda(c) ? bt->device->ptr : bt->host->ptr;
    hkv_token_meta_args tm = {
        .new_offsets = meta_field(c, meta, HKV_META_TOTAL_OFFSETS),
        .cached_lengths = meta_field(c, meta, HKV_META_ZEROS),
        .batch = bt->batch_size,
        .nnz = n,
        .batch_indices = batch_indices->data,
        .positions = positions->data,
    };
    fill_rows_args(c, &a, meta);
    a.first_layer = layer;
    a.num_layers = 1;
    a.k = k->data;
    a.v = v->data;
    a.batch_indices = batch_indices->data;
    a.positions = positions->data;
    a.token_offsets = tm.new_offsets;
    a.row_offsets = tm.new_offsets;
    a.nnz = n;
    st = wait_onboard(c, bt, layer, 1, stream);
    if (st != HKV_OK)
        goto out;
    if (is_cuda(c)) {
        st = hkv_cuda_token_meta(&tm, c->cfg.device_index, stream);
        if (st == HKV_OK)
            st = hkv_cuda_read(&a, c->cfg.device_index, stream);
        if (st == HKV_OK)
            bt->stream = stream;
    } else {
        hkv_cpu_token_meta(&tm);
        hkv_cpu_read(&a);
    }
out:
    pthread_mutex_unlock(&c->lock);
    return st;
}

hkv_status hkv_cache_copy_pages(hkv_cache *c, int to_staging, int32_t first_layer,
                                int32_t num_layers, const hkv_tensor *page_ids,
                                const hkv_tensor *staging, void *stream)
{
    const hkv_config *cfg = &c->cfg;
    hkv_status st = check_layers(c, first_layer, num_layers);
    if (st != HKV_OK)
        return st;
    int64_t n = page_ids->ndim == 1 ? page_ids->shape[0] : -1;
    st = check_index_tensor(c, page_ids, "page_ids", n < 0 ? 0 : n);
    if (st != HKV_OK)
        return st;
    int64_t want[6] = {num_layers, n, 2, cfg->page_size, cfg->num_heads, cfg->head_dim};
    int ok = staging->ndim == 6 && staging->dtype_code == cfg->dtype_code &&
             staging->dtype_bits == cfg->dtype_bits;
    int64_t stride = 1;
    for (int i = 5; ok && i >= 0; i--) {
        /* strides of an empty tensor carry no meaning */
        ok = staging->shape[i] == want[i] &&
             (staging->shape[i] == 1 || n == 0 || staging->strides[i] == stride);
        stride *= want[i];
    }
    if (!ok)
        return hkv_error(HKV_EINVAL, "staging must be a contiguous [%d, %lld, 2, %d, %d, "
                         "%d] tensor of the cache's dtype", (int)num_layers,
                         (long long)n, (int)cfg->page_size, (int)cfg->num_heads,
                         (int)cfg->head_dim);
    st = check_device(c, staging, "staging");
    if (st != HKV_OK)
        return st;
    if (!is_cuda(c)) {
        const int32_t *ids = page_ids->data;
        for (int64_t i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= cfg->num_pages)
                return hkv_error(HKV_EINVAL, "page id %d is outside 0..%d", (int)ids[i],
                                 (int)cfg->num_pages - 1);
    }
    hkv_pages_args a = {
        .table = c->table,
        .first_layer = first_layer,
        .num_layers = num_layers,
        .page_ids = page_ids->data,
        .n = n,
        .staging = staging->data,
    };
    if (n == 0)
        return HKV_OK;
    if (!is_cuda(c)) {
        if (to_staging)
            hkv_cpu_gather_pages(&a);
        else
            hkv_cpu_scatter_pages(&a);
        return HKV_OK;
    }
    return to_staging ? hkv_cuda_gather_pages(&a, cfg->device_index, stream)
                      : hkv_cuda_scatter_pages(&a, cfg->device_index, stream);
}

/* ------------------------------------------------------------------ */
/* close / free                                                        */

static void close_locked(hkv_cache *c, hkv_batch *bt)
{
    if (bt->state == BATCH_CLOSED)
        return;
    int aborted = bt->state == BATCH_OPEN;
    for (int32_t b = 0; b < bt->batch_size; b++) {
        int32_t slot = bt->user_slots[b];
        if (slot == HKV_NO_USER)
            continue;
        hkv_user *u = &c->users.users[slot];
        if (bt->fills[b])  /* roll back: the tokens were never completely written */
            unfill(c, bt, b, u);
        if (bt->dep[b] != NULL) {
            bt->dep[b]->dependents -= bt->dep_pin[b];
            bt->dep[b] = NULL;
        }
        unpin_user(c, slot);
    }
    bt->aborted = aborted;
    if (aborted)
        c->stats.batches_aborted++;
    bt->state = BATCH_CLOSED;
    c->stats.open_batches--;
}

void hkv_batch_close(hkv_batch *bt)
{
    hkv_cache *c = bt->cache;
    if (c == NULL)
        return;
    pthread_mutex_lock(&c->lock);
    close_locked(c, bt);
    pthread_mutex_unlock(&c->lock);
}

void hkv_batch_free(hkv_batch *bt)
{
    hkv_cache *c = bt->cache;
    if (c == NULL) {
        /* The cache is gone; this block was left to us. */
        block_destroy(bt);
        return;
    }
    pthread_mutex_lock(&c->lock);
    close_locked(c, bt);
    if (is_cuda(c)) {
        /* Work queued on the batch's stream may still read the metadata:
         * the block is reused only once this event has completed. */
        if (hkv_cuda_event_record(c->cfg.device_index, bt->event, bt->stream)
                == HKV_OK)
            bt->event_pending = 1;
        else
            (void)hkv_cuda_stream_sync(c->cfg.device_index, bt->stream);
    }
    bt->in_use = 0;
    pthread_mutex_unlock(&c->lock);
}

/* ------------------------------------------------------------------ */
/* users: read, evict                                                  */

hkv_status hkv_cache_user_length(hkv_cache *c, int64_t user_id, int64_t *length)
{
    pthread_mutex_lock(&c->lock);
    int32_t slot = hkv_user_find(&c->users, user_id);
    *length = slot == HKV_NO_USER ? 0 : c->users.users[slot].length;
    pthread_mutex_unlock(&c->lock);
    return HKV_OK;
}

hkv_status hkv_cache_read_user(hkv_cache *c, int64_t user_id, int32_t layer,
                               const hkv_tensor *k, const hkv_tensor *v,
                               void *stream, int64_t *length)
{
    *length = 0;
    pthread_mutex_lock(&c->lock);
    hkv_status st = HKV_OK;
    if (layer < 0 || layer >= c->cfg.num_layers) {
        st = hkv_error(HKV_EINVAL, "layer %d is outside 0..%d", (int)layer,
                       (int)c->cfg.num_layers - 1);
        goto out;
    }
    int32_t slot = hkv_user_find(&c->users, user_id);
    int64_t len = slot == HKV_NO_USER ? 0 : c->users.users[slot].length;
    int64_t ks, vs, kl, vl;
    int64_t cap = k->ndim > 0 ? k->shape[0] : 0;
    st = check_rows(c, k, "k", 1, cap, &ks, &kl);
    if (st == HKV_OK)
        st = check_rows(c, v, "v", 1, cap, &vs, &vl);
    if (st != HKV_OK)
        goto out;
    int64_t rb = c->table.row_bytes;
    if (v->shape[0] != cap || (cap > 1 && (ks != rb || vs != rb))) {
        st = hkv_error(HKV_EINVAL, "k and v must be contiguous with the same rows");
        goto out;
    }
    if (cap < len) {
        st = hkv_error(HKV_EINVAL, "k and v hold %lld rows but user %lld has %lld "
                       "cached tokens", (long long)cap, (long long)user_id,
                       (long long)len);
        goto out;
    }
    const int64_t ps = c->cfg.page_size;
    const int64_t pb = hkv_page_bytes(&c->table);
    char *layer_base = (char *)c->table.base + layer * hkv_layer_bytes(&c->table);
    const hkv_user *u = slot == HKV_NO_USER ? NULL : &c->users.users[slot];
    int32_t page = u ? u->head_page : HKV_NO_PAGE;
    int32_t host_page = HKV_NO_PAGE;
    if (is_cuda(c) && has_host(c)) {
        /* a debugging read: let copies into either tier finish first */
        st = hkv_cuda_stream_sync(c->cfg.device_index, c->xfer.offload_stream);
        if (st == HKV_OK)
            st = hkv_cuda_stream_sync(c->cfg.device_index, c->xfer.onboard_stream);
        if (st != HKV_OK)
            goto out;
    }
    if (u != NULL && (int64_t)u->num_pages * ps < len)
        host_page = hkv_host_page_at(&c->host, u, u->num_pages);
    char *host_base = has_host(c) ? (char *)c->host.table->ptr +
                                         layer * (int64_t)c->host.num_pages * pb
                                   : NULL;
    for (int64_t done = 0, ix = 0; done < len; ix++) {
        int64_t n = len - done < ps ? len - done : ps;
        const char *src;
        if (ix < u->num_pages) {
            src = layer_base + (int64_t)page * pb;
            page = c->pool.pages[page].next;
        } else {
            src = host_base + (int64_t)host_page * pb;
            host_page = c->host.pages[host_page].next;
        }
        const char *srcs[2] = {src, src + ps * rb};
        char *dsts[2] = {(char *)k->data + done * rb, (char *)v->data + done * rb};
        for (int i = 0; i < 2; i++) {
            if (is_cuda(c)) {
                st = hkv_cuda_memcpy_async(c->cfg.device_index, dsts[i], srcs[i],
                                           (size_t)(n * rb), stream);
                if (st != HKV_OK)
                    goto out;
            } else {
                memcpy(dsts[i], srcs[i], (size_t)(n * rb));
            }
        }
        done += n;
    }
    *length = len;
out:
    pthread_mutex_unlock(&c->lock);
    return st;
}

/* Empty the given tiers of one (unpinned) user. */
static void evict_user(hkv_cache *c, int32_t slot, int32_t tiers, int32_t offload)
{
    hkv_user *u = &c->users.users[slot];
    if (tiers & HKV_TIER_GPU) {
        if (offload && has_host(c)) {
            hkv_status st;
            c->stats.writeback_pages += (uint64_t)offload_user(c, slot, 1, &st);
            if (st != HKV_OK)
                c->stats.transfers_failed++;
        }
        c->stats.pages_dropped += drop_tail_pages(c, u, 0);
    }
    if ((tiers & HKV_TIER_HOST) && has_host(c))
        while (u->host_pages > 0)
            drop_host_tail(c, u);
    if (tiers & HKV_TIER_DISK)
        disk_drop_from(c, u, 0);
    fix_length(c, u);
    maybe_remove(c, slot);
}

hkv_status hkv_cache_evict(hkv_cache *c, int32_t count, const int64_t *user_ids,
                           int32_t tiers, int32_t offload, void *stream)
{
    pthread_mutex_lock(&c->lock);
    hkv_status st = HKV_OK;
    if (tiers < 1 || tiers > HKV_TIER_ALL) {
        st = hkv_error(HKV_EINVAL, "tiers must name the GPU tier, the host tier or both");
        goto out;
    }
    for (int32_t i = 0; i < count && st == HKV_OK; i++) {
        int32_t slot = hkv_user_find(&c->users, user_ids[i]);
        if (slot != HKV_NO_USER)
            st = finish_prefetch(c, &c->users.users[slot]);
    }
    if (st != HKV_OK)
        goto out;
    for (int32_t i = 0; i < count; i++) {
        int32_t slot = hkv_user_find(&c->users, user_ids[i]);
        if (slot != HKV_NO_USER && c->users.users[slot].pins > 0) {
            st = hkv_error(HKV_EBUSY, "user %lld is in an open batch; release the "
                           "batch before evicting it", (long long)user_ids[i]);
            goto out;
        }
    }
    if (offload && has_host(c)) {
        st = hkv_xfer_begin(&c->xfer, stream);
        if (st != HKV_OK)
            goto out;
    }
    for (int32_t i = 0; i < count; i++) {
        int32_t slot = hkv_user_find(&c->users, user_ids[i]);
        if (slot != HKV_NO_USER)
            evict_user(c, slot, tiers, offload);
        else if ((tiers & HKV_TIER_DISK) && c->disk != NULL)
            hkv_disk_drop_user(c->disk, user_ids[i], 0);  /* only on disk */
    }
out:
    pthread_mutex_unlock(&c->lock);
    return st;
}

int64_t hkv_cache_evict_all(hkv_cache *c, int32_t tiers, int32_t offload, void *stream)
{
    pthread_mutex_lock(&c->lock);
    int64_t n = 0;
    if (is_cuda(c))
        reap_prefetch(c, 0);
    if (offload && has_host(c) && hkv_xfer_begin(&c->xfer, stream) != HKV_OK)
        offload = 0;  /* cannot order a write-back: drop instead */
    int32_t slot = c->users.lru_head;
    while (slot != HKV_NO_USER) {
        int32_t next = c->users.users[slot].lru_next;
        if (c->users.users[slot].pins == 0) {
            evict_user(c, slot, tiers, offload);
            n++;
        }
        slot = next;
    }
    pthread_mutex_unlock(&c->lock);
    return n;
}

/* ------------------------------------------------------------------ */
/* disk tier                                                           */

/*
 * The disk tier (disk_tier.h) sits below the host tier and, like the other
 * tiers, holds a prefix of a user's pages (u->disk_pages of them, as far as
 * the cache knows; the store's answer on a read is the truth).
 *
 * Writes are write-through: once a page of an admitted user lands on the
 * host tier and its offload copy has completed, it is queued to the
 * store's I/O threads, its host page pinned until the write is done.  So
 * host eviction (which prefers pages the disk holds) never waits for I/O.
 * Reads happen when an allocation needs pages only the disk holds: they
 * land in fresh host pages, then the usual host -> GPU onboarding follows.
 * A read that fails its check drops the user's records from that page on
 * and makes the allocation stale: the caller looks up again and recomputes
 * those tokens.  Users that no tier above the disk holds leave the index;
 * lookup finds them on disk again.
 */

static void disk_enqueue(hkv_cache *c, const hkv_user *u, int32_t page, int32_t index)
{
    if (c->disk == NULL)
        return;
    c->host_ix[page] = index;
    if (!u->disk_admitted || index < u->disk_pages ||
        c->dq_count == c->dq_cap)
        return;
    int32_t at = (c->dq_head + c->dq_count++) % c->dq_cap;
    c->dq_page[at] = page;
    c->dq_user[at] = u->id;
    c->dq_ix[at] = index;
}

/* Drop the user's disk records from page `from` on: its history changed
 * there, a record failed its check, or the user is evicted. */
static void disk_drop_from(hkv_cache *c, hkv_user *u, int64_t from)
{
    if (c->disk == NULL)
        return;
    hkv_disk_drop_user(c->disk, u->id, from);
    if (u->disk_pages > from)
        u->disk_pages = (int32_t)from;
}

/* The user slot that still holds host page `page` as its page `index`. */
static int32_t host_page_holder(hkv_cache *c, int32_t page, int64_t user_id, int32_t index)
{
    int32_t owner = c->host.pages[page].owner;
    if (owner < 0 || c->host_ix[page] != index)
        return HKV_NO_USER;
    const hkv_user *u = &c->users.users[owner];
    return u->in_use && u->id == user_id && u->host_pages > index ? owner : HKV_NO_USER;
}

/* The per-layer pieces of page `page` of a layer-major table of
 * `num_pages` pages at `base` (a record's data, in order). */
static void page_iov(const hkv_cache *c, void *base, int32_t num_pages, int32_t page,
                     struct iovec *iov)
{
    const int64_t pb = hkv_page_bytes(&c->table);
    for (int32_t l = 0; l < c->cfg.num_layers; l++) {
        iov[l].iov_base = (char *)base + ((int64_t)l * num_pages + page) * pb;
        iov[l].iov_len = (size_t)pb;
    }
}

/* Host page `page`, as the store reads and writes it. */
static void disk_iov(hkv_cache *c, int32_t page, struct iovec *iov)
{
    page_iov(c, c->host.table->ptr, c->host.num_pages, page, iov);
}

/* A page's fingerprint for the store: the chained fingerprint of its keys
 * in verified mode (a record then also proves the history before it),
 * 0 in trust mode. */
static uint64_t host_page_fingerprint(const hkv_cache *c, int32_t page)
{
    return c->cfg.verify_tokens ? c->host.keys.fingerprints[page] : 0;
}

/*
 * Collect finished disk I/O without blocking (writes: unpin the host page,
 * extend the user's disk prefix; reads: note the result for the
 * allocation waiting for it), then queue the writes whose host pages are
 * complete.
 */
static void disk_pump(hkv_cache *c)
{
    if (c->disk == NULL)
        return;
    uint64_t tickets[64];
    hkv_disk_result results[64];
    int n;
    while ((n = hkv_disk_poll(c->disk, tickets, results, 64)) > 0)
        for (int i = 0; i < n; i++) {
            int32_t t = hkv_disk_ticket_index(tickets[i]);
            if (c->dt_kind[t] == 2) {
                c->dt_kind[t] = 0;
                c->rd_page[c->rd_count] = c->dt_page[t];
                c->rd_user[c->rd_count] = c->dt_user[t];
                c->rd_ix[c->rd_count] = c->dt_ix[t];
                c->rd_result[c->rd_count++] = (int8_t)results[i];
                continue;
            }
            if (c->dt_kind[t] != 1)
                continue;
            c->dt_kind[t] = 0;
            hkv_host_unpin(&c->host, c->dt_page[t]);
            if (results[i] != HKV_DISK_DONE) {
                c->stats.disk_write_failures++;
                continue;
            }
            c->stats.disk_writes++;
            int32_t slot = hkv_user_find(&c->users, c->dt_user[t]);
            if (slot == HKV_NO_USER)
                continue;
            hkv_user *u = &c->users.users[slot];
            if (c->dt_ix[t] == u->disk_pages)
                u->disk_pages += (int32_t)hkv_disk_count_run(
                    c->disk, u->id, u->disk_pages, NULL,
                    hkv_div_up(c->cfg.max_seq_len, c->cfg.page_size));
        }
    /* queued pages whose offload copy is done go to the I/O threads */
    struct iovec iov[HKV_MAX_DISK_LAYERS];
    while (c->dq_count > 0) {
        int32_t at = c->dq_head;
        int32_t page = c->dq_page[at], index = c->dq_ix[at];
        int64_t user_id = c->dq_user[at];
        if (host_page_holder(c, page, user_id, index) != HKV_NO_USER) {
            if (c->host.writes[page] > 0)
                break;  /* its copy from the GPU is still in flight */
            uint64_t ticket;
            disk_iov(c, page, iov);
            hkv_status st = hkv_disk_write(c->disk, user_id, index,
                                           host_page_fingerprint(c, page),
                                           (uint32_t)c->cfg.page_size, iov,
                                           c->cfg.num_layers, &ticket);
            if (st == HKV_EBUSY)
                break;  /* the store is busy: later */
            if (st == HKV_OK) {
                int32_t t = hkv_disk_ticket_index(ticket);
                c->host.pages[page].pins++;
                c->dt_kind[t] = 1;
                c->dt_page[t] = page;
                c->dt_user[t] = user_id;
                c->dt_ix[t] = index;
            } else {
                c->stats.disk_write_failures++;
            }
        }
        c->dq_head = (c->dq_head + 1) % c->dq_cap;
        c->dq_count--;
    }
}

/* Fingerprints of pages 0..n-1 of a request's history (verified mode). */
static const uint64_t *request_fingerprints(hkv_cache *c, const int64_t *keys, int64_t n)
{
    if (keys == NULL)
        return NULL;
    uint64_t fp = 0;
    for (int64_t i = 0; i < n; i++) {
        fp = hkv_fingerprint(fp, keys + i * c->cfg.page_size, c->cfg.page_size);
        c->disk_fps[i] = fp;
    }
    return c->disk_fps;
}

/*
 * Lookup of a user the index does not hold: its pages may be on disk (it
 * left the upper tiers, or the cache was reopened with persist).  Adds it
 * to the index when they are, so the allocation that follows finds it.
 */
static int32_t disk_lookup_new_user(hkv_cache *c, int64_t user_id, int64_t length)
{
    if (c->disk == NULL || length < c->cfg.page_size)
        return HKV_NO_USER;
    /* what the disk holds (the request's keys are matched afterwards,
     * like for any user, by cached_prefix) */
    int64_t d = hkv_disk_count_run(c->disk, user_id, 0, NULL,
                                   hkv_div_up(c->cfg.max_seq_len, c->cfg.page_size));
    if (d <= 0)
        return HKV_NO_USER;
    int32_t slot = hkv_user_find_or_add(&c->users, user_id);
    if (slot == HKV_NO_USER)
        return HKV_NO_USER;  /* the index is full: a miss, never wrong */
    hkv_user *u = &c->users.users[slot];
    u->disk_pages = (int32_t)d;
    u->length = u->reserved = d * c->cfg.page_size;
    u->disk_admitted = 1;
    return slot;
}

/* Take the completed read of the user's page `index` (or of any of its
 * pages when index < 0): 1 and its host page and result, or 0. */
static int take_read(hkv_cache *c, int64_t user_id, int64_t index, int32_t *page,
                     int *result)
{
    for (int32_t k = 0; k < c->rd_count; k++)
        if (c->rd_user[k] == user_id && (index < 0 || c->rd_ix[k] == index)) {
            *page = c->rd_page[k];
            *result = c->rd_result[k];
            int32_t last = --c->rd_count;
            c->rd_page[k] = c->rd_page[last];
            c->rd_user[k] = c->rd_user[last];
            c->rd_ix[k] = c->rd_ix[last];
            c->rd_result[k] = c->rd_result[last];
            return 1;
        }
    return 0;
}

/*
 * Direct reads (GPUDirect Storage) write GPU pages from the host side,
 * outside every stream.  A page taken now may have been freed while work
 * queued before this call still reads or writes it (a released batch's
 * kernels), or while a copy still reads it: wait for the caller's stream
 * as of the call, once, before the first read.  Called with the lock held;
 * drops it while waiting.
 */
static hkv_status gds_order(hkv_cache *c, void *stream, void *ready)
{
    if (c->skip_waits)
        return HKV_OK;  /* fault injection: the ordering test's control */
    pthread_mutex_unlock(&c->lock);
    hkv_status st = ready != NULL
        ? hkv_cuda_event_sync(c->cfg.device_index, ready)
        : hkv_cuda_event_record(c->cfg.device_index, c->gds_event, stream);
    if (st == HKV_OK && ready == NULL)
        st = hkv_cuda_event_sync(c->cfg.device_index, c->gds_event);
    pthread_mutex_lock(&c->lock);
    return st;
}

/* A free GPU page for a direct read of the user in `slot` (evicting, and
 * writing back, as an allocation would), or HKV_NO_PAGE. */
static int32_t gds_page(hkv_cache *c, int32_t slot, hkv_status *st)
{
    *st = HKV_OK;
    int32_t page = hkv_page_alloc(&c->pool, slot);
    while (page == HKV_NO_PAGE && evict_one_page(c))
        page = hkv_page_alloc(&c->pool, slot);
    if (page != HKV_NO_PAGE && c->pool.pages[page].pins > 0 && !c->skip_waits) {
        /* a copy still reads its old content: the read must not overtake it */
        *st = hkv_cuda_event_sync(c->cfg.device_index, c->xfer.offload_done);
        if (*st != HKV_OK) {
            hkv_page_release(&c->pool, page);
            page = HKV_NO_PAGE;
        }
    }
    return page;
}

/* Give back a page a read was meant for but that joins no chain. */
static void stage_release(hkv_cache *c, int gds, int32_t page)
{
    if (gds)
        hkv_page_release(&c->pool, page);
    else
        hkv_host_release(&c->host, page);
}

/*
 * Before an allocation: bring the pages of its cached prefixes that only
 * the disk holds up a tier.  Staged (the default): into host pages, then
 * the allocation onboards them like any host page.  With GPUDirect
 * Storage, for users whose host chain does not go past their GPU chain
 * (the pages follow the GPU chain directly): straight into GPU pages,
 * which join the GPU chain once verified, so the allocation finds them
 * there.  A user GDS cannot serve (no GPU page free) finishes staged.
 *
 * Reads run on the store's threads while the cache is unlocked (the
 * batch's users are pinned meanwhile), at most the store's max_in_flight
 * at a time; pages join their chain in order.  A read that misses drops
 * the user's records from that page on and shortens its cached length
 * (new epoch): the allocation then fails as stale and the caller
 * recomputes those tokens.
 */
static hkv_status disk_stage_in(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                                const int64_t *cached_lengths, const uint64_t *epochs,
                                const int64_t *token_keys, const int64_t *history_lengths,
                                void *stream, void *ready)
{
    if (c->disk == NULL)
        return HKV_OK;
    const int32_t ps = c->cfg.page_size;
    struct iovec iov[HKV_MAX_DISK_LAYERS];
    /* One stage-in at a time (its scratch arrays; the cache lock is
     * released while reads run).  Lock order: stage_lock, then lock. */
    pthread_mutex_lock(&c->stage_lock);
    pthread_mutex_lock(&c->lock);
    disk_pump(c);
    /* finished copies may have left dropped host pages to free (a failed
     * query frees nothing now; the allocation reports it) */
    (void)hkv_xfer_reap(&c->xfer, c->pool.pages, &c->host);
    /* per user: slot (pinned here), next page to submit, pages needed,
     * key offset, whether a read missed, the path */
    int users = 0, direct = 0;
    int64_t key_off = 0;
    for (int32_t b = 0; b < batch; b++) {
        int64_t koff = key_off;
        key_off += history_lengths[b];
        c->si_slot[b] = HKV_NO_USER;
        int32_t slot = hkv_user_find(&c->users, user_ids[b]);
        if (slot == HKV_NO_USER)
            continue;
        hkv_user *u = &c->users.users[slot];
        int64_t need = cached_lengths[b] > 0 ? hkv_div_up(cached_lengths[b], ps) : 0;
        if (cached_lengths[b] <= 0 || u->epoch != epochs[b] || need <= u->num_pages ||
            need <= u->host_pages || u->pins > 0 || need > u->disk_pages) {
            /* nothing to read here (allocate sorts out the rest); users
             * with pages stay pinned, so reading for the others never
             * evicts them */
            if (u->num_pages > 0 || u->host_pages > 0) {
                pin_user(c, u);
                c->si_slot[b] = slot;
                c->si_need[b] = -1;
            }
            continue;
        }
        pin_user(c, u);
        c->si_slot[b] = slot;
        c->si_gds[b] = c->gds != NULL && u->host_pages <= u->num_pages;
        c->si_next[b] = c->si_gds[b] ? u->num_pages : u->host_pages;
        c->si_first[b] = c->si_next[b];
        c->si_need[b] = need;
        c->si_koff[b] = koff;
        c->si_miss[b] = 0;   /* 1 once a read missed, 2: no host room, 3: no GPU room */
        if (c->gds != NULL && !c->si_gds[b])
            c->stats.disk_gds_fallbacks++;
        direct += c->si_gds[b];
        users++;
    }
    hkv_status st = HKV_OK;
    if (direct > 0) {
        /* write-backs of evictions follow the caller's appends; direct
         * reads follow everything the caller queued */
        st = ready != NULL ? hkv_xfer_begin_after(&c->xfer, ready)
                           : hkv_xfer_begin(&c->xfer, stream);
        if (st == HKV_OK)
            st = gds_order(c, stream, ready);
        for (int32_t b = 0; st != HKV_OK && b < batch; b++)
            if (c->si_slot[b] != HKV_NO_USER && c->si_need[b] >= 0 && c->si_gds[b]) {
                /* staged, as if GDS were off */
                hkv_user *u = &c->users.users[c->si_slot[b]];
                c->si_gds[b] = 0;
                c->si_next[b] = c->si_first[b] = u->host_pages;
            }
        st = HKV_OK;
    }
    int64_t missed_user = -1, missed_page = -1;
    while (users > 0) {
        for (int32_t b = 0; b < batch; b++) {
            int32_t slot = c->si_slot[b];
            if (slot == HKV_NO_USER || c->si_need[b] < 0)
                continue;
            hkv_user *u = &c->users.users[slot];
            const int gds = c->si_gds[b];
            const uint64_t *fps = token_keys != NULL
                ? request_fingerprints(c, token_keys + c->si_koff[b], c->si_need[b])
                : NULL;
            /* submit what the store takes */
            while (!c->si_miss[b] && c->si_next[b] < c->si_need[b]) {
                int64_t i = c->si_next[b];
                int32_t page;
                if (gds) {
                    page = gds_page(c, slot, &st);
                    if (page == HKV_NO_PAGE) {
                        c->si_miss[b] = 3;   /* no GPU room: the rest staged */
                        break;
                    }
                    page_iov(c, c->table.base, c->table.num_pages, page, iov);
                } else {
                    page = hkv_host_alloc(&c->host, slot);
                    while (page == HKV_NO_PAGE && evict_one_host_page(c, slot))
                        page = hkv_host_alloc(&c->host, slot);
                    if (page == HKV_NO_PAGE) {
                        c->si_miss[b] = 2;   /* no host room: stop (allocate says so) */
                        break;
                    }
                    disk_iov(c, page, iov);
                }
                uint64_t ticket;
                hkv_status rs = gds
                    ? hkv_disk_read_device(c->disk, u->id, i, fps ? fps[i] : 0, iov,
                                           c->cfg.num_layers, &ticket)
                    : hkv_disk_read(c->disk, u->id, i, fps ? fps[i] : 0, iov,
                                    c->cfg.num_layers, &ticket);
                if (rs != HKV_OK) {
                    stage_release(c, gds, page);
                    if (rs != HKV_EBUSY)
                        c->si_miss[b] = 1;
                    break;
                }
                if (fps != NULL && !gds) {
                    memcpy(c->host.keys.keys + (int64_t)page * ps,
                           token_keys + c->si_koff[b] + i * ps, (size_t)ps * sizeof(int64_t));
                    c->host.keys.fingerprints[page] = fps[i];
                }
                int32_t t = hkv_disk_ticket_index(ticket);
                c->dt_kind[t] = 2;
                c->dt_page[t] = page;
                c->dt_user[t] = u->id;
                c->dt_ix[t] = (int32_t)i;
                c->si_next[b] = i + 1;
            }
            /* take finished reads in page order; after a miss, drop */
            int32_t page;
            int res;
            while (!c->si_miss[b] &&
                   take_read(c, u->id, gds ? u->num_pages : u->host_pages, &page, &res)) {
                if (res != HKV_DISK_DONE) {
                    stage_release(c, gds, page);
                    c->si_miss[b] = 1;
                } else if (gds) {
                    hkv_user_push_page(&c->pool, u, page);
                    c->pinned_pages++;  /* the user is pinned */
                    if (token_keys != NULL)
                        hkv_filter_store(&c->filter, &c->pool, u, token_keys + c->si_koff[b],
                                         (int64_t)(u->num_pages - 1) * ps,
                                         (int64_t)u->num_pages * ps);
                    c->stats.disk_reads++;
                    c->stats.disk_gds_reads++;
                } else {
                    hkv_host_push(&c->host, u, page);
                    c->host_ix[page] = u->host_pages - 1;
                    c->stats.disk_reads++;
                }
            }
            while (c->si_miss[b] && take_read(c, u->id, -1, &page, &res))
                stage_release(c, gds, page);
            int have = gds ? u->num_pages : u->host_pages;
            int done = c->si_miss[b] || have >= c->si_need[b];
            int mine = 0;
            for (int32_t t = 0; t < hkv_disk_ticket_capacity(c->disk); t++)
                mine += c->dt_kind[t] == 2 && c->dt_user[t] == u->id;
            for (int32_t k = 0; k < c->rd_count; k++)
                mine += c->rd_user[k] == u->id;
            if (!done || mine > 0)
                continue;
            if (have > c->si_first[b])
                hkv_events_emit(&c->events, HKV_EVENT_ONBOARDED,
                                gds ? HKV_TIER_GPU : HKV_TIER_HOST, HKV_TIER_DISK, u->id,
                                c->si_first[b], have - c->si_first[b]);
            if (c->si_miss[b] == 3) {
                /* no GPU page for a direct read: the rest through the host */
                c->si_gds[b] = 0;
                c->si_miss[b] = 0;
                c->si_next[b] = c->si_first[b] = u->host_pages;
                c->stats.disk_gds_fallbacks++;
                continue;
            }
            if (c->si_miss[b] == 1) {
                /* the record of the first page not taken failed its check
                 * (or could not be read): drop it and the rest */
                int64_t miss = have;
                c->stats.disk_read_misses++;
                disk_drop_from(c, u, miss);
                fix_length(c, u);
                missed_user = u->id;
                missed_page = miss;
            }
            c->si_need[b] = -1;  /* finished; stays pinned until the end */
            users--;
        }
        if (users == 0)
            break;
        pthread_mutex_unlock(&c->lock);
        hkv_disk_wait_any(c->disk, 1000000);  /* a completion, or 1 ms */
        pthread_mutex_lock(&c->lock);
        disk_pump(c);
    }
    /* Users stay pinned until every one is staged, so staging one never
     * evicts the pages just read for another. */
    for (int32_t b = 0; b < batch; b++)
        if (c->si_slot[b] != HKV_NO_USER)
            unpin_user(c, c->si_slot[b]);
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_unlock(&c->stage_lock);
    if (missed_user >= 0)
        return hkv_error(HKV_ESTALE, "a disk record of user %lld (page %lld) failed its "
                         "check or could not be read and was dropped; look the batch up "
                         "again", (long long)missed_user, (long long)missed_page);
    return HKV_OK;
}

/* ------------------------------------------------------------------ */
/* prefetch                                                            */

/* Release the users of every prefetch whose copy has completed (or all,
 * after a full synchronisation). */
static void reap_prefetch(hkv_cache *c, int all)
{
    for (int32_t i = 0; i < PREFETCH_SETS; i++) {
        prefetch_set *ps = &c->prefetch[i];
        if (ps->seq == 0)
            continue;
        int done = all;
        if (!done && hkv_cuda_event_query(c->cfg.device_index,
                                          ps->layer_events[c->cfg.num_layers - 1],
                                          &done) != HKV_OK)
            done = 0;  /* a failed query: keep the pins, ask again later */
        if (!done)
            continue;
        for (int32_t k = 0; k < ps->num_slots; k++) {
            hkv_user *u = &c->users.users[ps->slots[k]];
            if (u->prefetch == ps->seq)
                u->prefetch = 0;
            unpin_user(c, ps->slots[k]);
        }
        ps->num_slots = 0;
        ps->seq = 0;
    }
}

/* Free one GPU page that costs nothing to drop: the least recently used
 * unpinned user's tail page that has a host copy and no copy reading it.
 * 0 if there is none (a prefetch then stops: it never writes back). */
static int evict_one_copied_page(hkv_cache *c)
{
    hkv_user_index *ix = &c->users;
    for (int32_t slot = ix->lru_head; slot != HKV_NO_USER;
         slot = ix->users[slot].lru_next) {
        hkv_user *u = &ix->users[slot];
        if (u->pins > 0 || u->num_pages == 0 || u->num_pages > u->host_pages ||
            c->pool.pages[u->tail_page].pins > 0)
            continue;
        drop_gpu_tail(c, u);
        c->stats.pages_evicted++;
        fix_length(c, u);
        maybe_remove(c, slot);
        return 1;
    }
    return 0;
}

/* Wait (blocking) for the prefetch copying into the user's pages, if any,
 * and release its users: for explicit evictions. */
static hkv_status finish_prefetch(hkv_cache *c, const hkv_user *u)
{
    if (u->prefetch == 0)
        return HKV_OK;
    const prefetch_set *ps = &c->prefetch[u->prefetch % PREFETCH_SETS];
    hkv_status st = hkv_cuda_event_sync(c->cfg.device_index,
                                        ps->layer_events[c->cfg.num_layers - 1]);
    if (st == HKV_OK)
        reap_prefetch(c, 0);
    return st;
}

static hkv_status prefetch_set_ready(hkv_cache *c, prefetch_set *ps)
{
    if (ps->slots == NULL) {
        ps->slots = malloc((size_t)c->cfg.max_batch_size * sizeof *ps->slots);
        ps->layer_events = calloc((size_t)c->cfg.num_layers, sizeof *ps->layer_events);
        if (ps->slots == NULL || ps->layer_events == NULL) {
            free(ps->slots);
            free(ps->layer_events);
            ps->slots = NULL;
            ps->layer_events = NULL;
            return hkv_error(HKV_ENOMEM, "out of host memory");
        }
    }
    for (int32_t l = 0; l < c->cfg.num_layers; l++)
        if (ps->layer_events[l] == NULL) {
            hkv_status st = hkv_cuda_event_create(c->cfg.device_index, &ps->layer_events[l]);
            if (st != HKV_OK)
                return st;
        }
    return HKV_OK;
}

hkv_status hkv_cache_prefetch(hkv_cache *c, int32_t count, const int64_t *user_ids,
                              void *stream, int32_t *started)
{
    *started = 0;
    if (count < 0 || count > c->cfg.max_batch_size)
        return hkv_error(HKV_EINVAL, "prefetch of %d users; at most max_batch_size=%d "
                         "at a time", (int)count, (int)c->cfg.max_batch_size);
    pthread_mutex_lock(&c->lock);
    hkv_status st = HKV_OK;
    if (!has_host(c) || count == 0)
        goto out;  /* nothing below the GPU tier to bring up */
    st = hkv_xfer_reap(&c->xfer, c->pool.pages, &c->host);
    if (st != HKV_OK)
        goto out;
    prefetch_set *ps = NULL;
    uint64_t seq = c->prefetch_seq + 1;
    if (is_cuda(c)) {
        reap_prefetch(c, 0);
        ps = &c->prefetch[seq % PREFETCH_SETS];
        if (ps->seq != 0) {
            /* too many in flight: a hint is dropped, never waited for */
            c->stats.prefetch_dropped += (uint64_t)count;
            goto out;
        }
        st = prefetch_set_ready(c, ps);
        if (st != HKV_OK)
            goto out;
    }
    st = hkv_xfer_begin(&c->xfer, stream);
    if (st != HKV_OK)
        goto out;
    /* Pin the users first, so room made for one never takes another's. */
    int32_t n_users = 0;
    for (int32_t i = 0; i < count; i++) {
        int32_t slot = hkv_user_find(&c->users, user_ids[i]);
        if (slot == HKV_NO_USER)
            continue;
        hkv_user *u = &c->users.users[slot];
        if (u->pins > 0 || u->host_pages <= u->num_pages)
            continue;  /* busy (or a duplicate), or nothing on the host only */
        pin_user(c, u);
        hkv_user_touch(&c->users, slot);
        c->scratch_slot[n_users] = slot;
        c->scratch_keep[n_users++] = u->num_pages;
    }
    int64_t n = 0;
    for (int32_t k = 0; k < n_users; k++) {
        hkv_user *u = &c->users.users[c->scratch_slot[k]];
        int32_t host_page = hkv_host_page_at(&c->host, u, u->num_pages);
        while (u->num_pages < u->host_pages) {
            int32_t page = hkv_page_alloc(&c->pool, c->scratch_slot[k]);
            if (page == HKV_NO_PAGE && evict_one_copied_page(c))
                page = hkv_page_alloc(&c->pool, c->scratch_slot[k]);
            if (page == HKV_NO_PAGE)
                break;
            hkv_user_push_page(&c->pool, u, page);
            c->pinned_pages++;
            hkv_filter_copy_page(&c->host.keys, host_page, &c->filter, page);
            c->onb_host[n] = host_page;
            c->onb_gpu[n++] = page;
            host_page = c->host.pages[host_page].next;
        }
    }
    if (n > 0)
        st = hkv_xfer_onboard(&c->xfer, c->pool.pages, &c->table, &c->host, c->onb_host,
                              c->onb_gpu, n, ps != NULL ? ps->layer_events : NULL);
    int32_t got = 0;
    for (int32_t k = 0; k < n_users; k++) {
        int32_t slot = c->scratch_slot[k];
        hkv_user *u = &c->users.users[slot];
        int moved = u->num_pages > c->scratch_keep[k];
        if (st != HKV_OK && moved)
            drop_tail_pages(c, u, c->scratch_keep[k]);  /* nothing valid in them */
        if (st != HKV_OK || !moved) {
            if (st == HKV_OK)
                c->stats.prefetch_dropped++;
            unpin_user(c, slot);
            continue;
        }
        got++;
        c->stats.prefetch_pages += (uint64_t)(u->num_pages - c->scratch_keep[k]);
        hkv_events_emit(&c->events, HKV_EVENT_ONBOARDED, HKV_TIER_GPU, HKV_TIER_HOST, u->id,
                        c->scratch_keep[k], u->num_pages - c->scratch_keep[k]);
        if (ps == NULL) {
            unpin_user(c, slot);  /* CPU path: the copy is done */
        } else {
            u->prefetch = seq;
            ps->slots[ps->num_slots++] = slot;
        }
    }
    if (ps != NULL && ps->num_slots > 0) {
        ps->seq = seq;
        c->prefetch_seq = seq;
    }
    c->stats.prefetch_users += (uint64_t)got;
    *started = got;
out:
    pthread_mutex_unlock(&c->lock);
    return st;
}

void hkv_cache_user_tiers(hkv_cache *c, int64_t user_id, int64_t *gpu_tokens,
                          int64_t *host_tokens, int64_t *disk_tokens)
{
    pthread_mutex_lock(&c->lock);
    disk_pump(c);
    int32_t slot = hkv_user_find(&c->users, user_id);
    *gpu_tokens = *host_tokens = *disk_tokens = 0;
    if (slot != HKV_NO_USER) {
        const hkv_user *u = &c->users.users[slot];
        int64_t g = (int64_t)u->num_pages * c->cfg.page_size;
        *gpu_tokens = u->length < g ? u->length : g;
        *host_tokens = (int64_t)u->host_pages * c->cfg.page_size;
        *disk_tokens = (int64_t)u->disk_pages * c->cfg.page_size;
    } else if (c->disk != NULL) {
        *disk_tokens = c->cfg.page_size *
                       hkv_disk_count_run(c->disk, user_id, 0, NULL,
                                          hkv_div_up(c->cfg.max_seq_len, c->cfg.page_size));
    }
    pthread_mutex_unlock(&c->lock);
}

hkv_status hkv_cache_sync_transfers(hkv_cache *c)
{
    pthread_mutex_lock(&c->lock);
    hkv_status st = HKV_OK;
    while (st == HKV_OK && has_host(c) && c->xfer.rec_count > 0) {
        st = hkv_cuda_event_sync(c->cfg.device_index,
                                 c->xfer.records[c->xfer.rec_head].event);
        if (st == HKV_OK)
            st = hkv_xfer_reap(&c->xfer, c->pool.pages, &c->host);
    }
    if (st == HKV_OK && is_cuda(c))
        reap_prefetch(c, 1);  /* their copies were records too: all done */
    if (st == HKV_OK && c->disk != NULL) {
        /* pages whose copies just finished go to disk (max_in_flight at a
         * time); wait for all of them */
        int32_t queued;
        do {
            queued = c->dq_count;
            disk_pump(c);
            hkv_disk_drain(c->disk);
            disk_pump(c);
        } while (c->dq_count > 0 && c->dq_count < queued);
        hkv_disk_drain(c->disk);  /* the last ones queued above */
        disk_pump(c);
    }
    pthread_mutex_unlock(&c->lock);
    return st;
}

const char *hkv_cache_gds_status(const hkv_cache *c)
{
    return c->gds_status[0] != '\0' ? c->gds_status : "off";
}

void hkv_cache_stats(hkv_cache *c, hkv_stats *out)
{
    pthread_mutex_lock(&c->lock);
    c->stats.pages_free = c->pool.num_free;
    c->stats.pages_used = hkv_page_pool_used(&c->pool);
    c->stats.pages_pinned = c->pinned_pages;
    c->stats.users_cached = c->users.count;
    if (has_host(c)) {
        (void)hkv_xfer_reap(&c->xfer, c->pool.pages, &c->host);
        if (is_cuda(c))
            reap_prefetch(c, 0);
        c->stats.host_pages_free = c->host.num_free;
        c->stats.host_pages_used = c->host.num_pages - c->host.num_free;
        c->stats.onboard_pages = c->xfer.onboard_pages;
        c->stats.onboard_bytes = c->xfer.onboard_bytes;
        c->stats.offload_pages = c->xfer.offload_pages;
        c->stats.offload_bytes = c->xfer.offload_bytes;
        c->stats.transfers = c->xfer.transfers;
        c->stats.transfers_in_flight = c->xfer.rec_count;
        c->stats.offload_queued_bytes = c->xfer.offload_queued_bytes;
        c->stats.offload_backpressure_waits = c->xfer.backpressure_waits;
        c->stats.dma_bytes = c->xfer.dma_bytes;
        c->stats.kernel_bytes = c->xfer.kernel_bytes;
        if (c->disk != NULL) {
            disk_pump(c);
            hkv_disk_stats ds;
            hkv_disk_get_stats(c->disk, &ds);
            c->stats.disk_records = ds.records;
            c->stats.disk_bytes_used = (int64_t)ds.bytes_used;
            c->stats.disk_bytes_capacity = (int64_t)ds.capacity_bytes;
            c->stats.disk_in_flight = ds.in_flight;
            c->stats.checksum_failures = ds.checksum_failures;
            c->stats.disk_io_errors = ds.io_errors;
            c->stats.disk_gds_active = c->gds != NULL;
        }
        c->stats.onboard_ns = c->xfer.onboard_ns;
        c->stats.offload_ns = c->xfer.offload_ns;
        c->stats.onboard_latency = c->xfer.onboard_latency;
        c->stats.offload_latency = c->xfer.offload_latency;
    }
    c->stats.events_dropped = c->events.dropped;
    c->stats.events_pending = c->events.count;
    *out = c->stats;
    pthread_mutex_unlock(&c->lock);
}

hkv_status hkv_cache_drain_events(hkv_cache *c, hkv_event *out, int64_t max,
                                  int64_t *count)
{
    *count = 0;
    if (max < 0)
        return hkv_error(HKV_EINVAL, "max_events must not be negative, got %lld",
                         (long long)max);
    if (max > 0 && out == NULL)
        return hkv_error(HKV_EINVAL, "no buffer for %lld events", (long long)max);
    pthread_mutex_lock(&c->lock);
    *count = hkv_events_drain(&c->events, out, max);
    pthread_mutex_unlock(&c->lock);
    return HKV_OK;
}

int64_t hkv_cache_events_pending(hkv_cache *c)
{
    pthread_mutex_lock(&c->lock);
    int64_t n = c->events.count;
    pthread_mutex_unlock(&c->lock);
    return n;
}

/* ------------------------------------------------------------------ */
/* invariants                                                          */

static hkv_status check_locked(hkv_cache *c)
{
    const hkv_page_pool *pool = &c->pool;
    const hkv_user_index *ix = &c->users;
    int64_t free_count = 0;
    for (int32_t p = 0; p < pool->num_pages; p++) {
        if (!hkv_page_is_free(pool, p))
            continue;
        if (pool->pages[p].owner != -1)
            return hkv_error(HKV_ESTATE, "free page %d has owner %d", (int)p,
                             (int)pool->pages[p].owner);
        free_count++;
    }
    if (free_count != pool->num_free)
        return hkv_error(HKV_ESTATE, "the free map holds %lld pages, counter says %d",
                         (long long)free_count, (int)pool->num_free);
    int64_t owned = 0, pinned = 0, users = 0, lru = 0, host_owned = 0;
    for (int32_t s = 0; s < ix->capacity; s++) {
        const hkv_user *u = &ix->users[s];
        if (!u->in_use)
            continue;
        users++;
        if (hkv_user_find(ix, u->id) != s)
            return hkv_error(HKV_ESTATE, "user %lld not found at its slot",
                             (long long)u->id);
        int32_t prev = HKV_NO_PAGE, n = 0;
        for (int32_t p = u->head_page; p != HKV_NO_PAGE; p = pool->pages[p].next) {
            if (pool->pages[p].owner != s)
                return hkv_error(HKV_ESTATE, "page %d of user %lld is owned by "
                                 "slot %d", (int)p, (long long)u->id,
                                 (int)pool->pages[p].owner);
            if (pool->pages[p].prev != prev)
                return hkv_error(HKV_ESTATE, "page chain of user %lld broken",
                                 (long long)u->id);
            prev = p;
            if (++n > pool->num_pages)
                return hkv_error(HKV_ESTATE, "page chain of user %lld has a cycle",
                                 (long long)u->id);
        }
        if (prev != u->tail_page || n != u->num_pages)
            return hkv_error(HKV_ESTATE, "user %lld: %d pages chained, %d counted",
                             (long long)u->id, (int)n, (int)u->num_pages);
        /* GPU pages: exactly the reserved tokens while a batch fills them,
         * else a prefix of the cached tokens whose rest the host holds. */
        const int64_t ps = c->cfg.page_size;
        int gpu_ok = u->filling ? u->num_pages == pages_for(c, u->reserved)
                                : u->num_pages <= pages_for(c, u->length) &&
                                      (u->num_pages == pages_for(c, u->length) ||
                                       (int64_t)u->host_pages * ps == u->length ||
                                       (int64_t)u->disk_pages * ps >= u->length);
        if (u->length > u->reserved || !gpu_ok ||
            (int64_t)u->host_pages * ps > u->length)
            return hkv_error(HKV_ESTATE, "user %lld: length %lld, reserved %lld, "
                             "%d GPU pages, %d host pages", (long long)u->id,
                             (long long)u->length, (long long)u->reserved,
                             (int)u->num_pages, (int)u->host_pages);
        if (u->reserved != u->length && !u->filling)
            return hkv_error(HKV_ESTATE, "user %lld has reserved tokens but no "
                             "batch fills them", (long long)u->id);
        if (u->num_pages == 0 && u->host_pages == 0 && u->pins == 0)
            return hkv_error(HKV_ESTATE, "user %lld has no pages and no pins",
                             (long long)u->id);
        int32_t hprev = HKV_NO_PAGE, hn = 0;
        for (int32_t p = u->host_head; p != HKV_NO_PAGE; p = c->host.pages[p].next) {
            if (c->host.pages[p].owner != s || c->host.pages[p].prev != hprev)
                return hkv_error(HKV_ESTATE, "host chain of user %lld broken at page %d",
                                 (long long)u->id, (int)p);
            hprev = p;
            if (++hn > c->host.num_pages)
                return hkv_error(HKV_ESTATE, "host chain of user %lld has a cycle",
                                 (long long)u->id);
        }
        if (hprev != u->host_tail || hn != u->host_pages)
            return hkv_error(HKV_ESTATE, "user %lld: %d host pages chained, %d counted",
                             (long long)u->id, (int)hn, (int)u->host_pages);
        host_owned += hn;
        owned += n;
        if (u->pins > 0)
            pinned += n;
    }
    if (owned != hkv_page_pool_used(pool))
        return hkv_error(HKV_ESTATE, "users own %lld pages, %d are in use",
                         (long long)owned, (int)hkv_page_pool_used(pool));
    int64_t zombies = 0, host_free = 0;
    for (int32_t p = 0; p < c->host.num_pages; p++) {
        int is_free = (c->host.free_bits[p / 64] >> (p % 64)) & 1;
        host_free += is_free;
        zombies += c->host.pages[p].owner == HKV_ZOMBIE;
        if (is_free != (c->host.pages[p].owner == -1))
            return hkv_error(HKV_ESTATE, "host page %d: free bit and owner disagree",
                             (int)p);
    }
    if (host_free != c->host.num_free ||
        host_owned + zombies + host_free != c->host.num_pages)
        return hkv_error(HKV_ESTATE, "host tier: %lld owned, %lld zombies, %lld free "
                         "(counter %d) of %d pages", (long long)host_owned,
                         (long long)zombies, (long long)host_free, (int)c->host.num_free,
                         (int)c->host.num_pages);
    if (pinned != c->pinned_pages)
        return hkv_error(HKV_ESTATE, "pinned pages %lld, counter says %lld",
                         (long long)pinned, (long long)c->pinned_pages);
    if (users != ix->count)
        return hkv_error(HKV_ESTATE, "%lld users in slots, counter says %d",
                         (long long)users, (int)ix->count);
    int32_t prev = HKV_NO_USER;
    for (int32_t s = ix->lru_head; s != HKV_NO_USER; s = ix->users[s].lru_next) {
        if (ix->users[s].lru_prev != prev || !ix->users[s].in_use)
            return hkv_error(HKV_ESTATE, "LRU list broken at slot %d", (int)s);
        prev = s;
        if (++lru > users)
            return hkv_error(HKV_ESTATE, "LRU list has a cycle");
    }
    if (lru != users || prev != ix->lru_tail)
        return hkv_error(HKV_ESTATE, "LRU list holds %lld of %lld users",
                         (long long)lru, (long long)users);
    return HKV_OK;
}

hkv_status hkv_cache_check(hkv_cache *c)
{
    pthread_mutex_lock(&c->lock);
    hkv_status st = check_locked(c);
    pthread_mutex_unlock(&c->lock);
    return st;
}

hkv_status hkv_strip(int32_t device_kind, int32_t device_index,
                     const hkv_strip_args *a, void *stream)
{
    if (device_kind == HKV_DEVICE_CUDA)
        return hkv_cuda_strip(a, device_index, stream);
    hkv_cpu_strip(a);
    return HKV_OK;
}
