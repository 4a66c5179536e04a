/*
 * cache.h - the KV cache: configuration, lookup, allocation of a batch,
 * append/read of K/V, eviction and counters.
 *
 * One hkv_cache owns a page table (GPU or host memory), its page pool, the
 * per-user index and the token filter.  Every entry point takes the cache's
 * mutex, so callers may use it from several threads.
 *
 * A batch goes through:
 *   lookup   -> per user, how many leading history tokens are cached;
 *   allocate -> pins the batch's users, gives pages to the new tokens and
 *               builds the metadata a paged attention kernel reads;
 *   append   -> once per layer, writes the new tokens' K/V into the pages;
 *               when every layer is written the batch commits: its tokens
 *               count as cached from then on;
 *   close    -> unpins the users (an uncommitted batch is rolled back);
 *   free     -> the metadata block goes back to the cache once nothing
 *               (host or stream) uses it any more.
 */
#ifndef HKV_CACHE_H
#define HKV_CACHE_H

#include <stdint.h>

#include "events.h"
#include "kernels.h"
#include "memory.h"
#include "metrics.h"
#include "status.h"

typedef enum hkv_device_kind {
    HKV_DEVICE_CPU = 0,
    HKV_DEVICE_CUDA = 1
} hkv_device_kind;

typedef struct hkv_config {
    int32_t num_layers;        /* 1..1024                                  */
    int32_t num_heads;
    int32_t head_dim;
    int32_t page_size;         /* power of two, 2..256                     */
    int32_t num_pages;         /* pages of the GPU (or CPU) tier           */
    int32_t dtype_code;        /* DLPack code: 2 float, 4 bfloat           */
    int32_t dtype_bits;        /* 16 or 32 (bfloat: 16)                     */
    int32_t device_kind;       /* hkv_device_kind                          */
    int32_t device_index;
    int32_t max_batch_size;
    int64_t max_seq_len;       /* longest history accepted                 */
    int64_t max_batch_tokens;  /* new tokens per batch; 0: batch * seq_len */
    int32_t verify_tokens;     /* 1: verified mode, 0: trust mode          */
    int32_t max_open_batches;  /* metadata blocks; 0: default (8)          */
    int32_t host_pages;        /* pages of the host tier; 0: no host tier  */
    int32_t offload_mode;      /* HKV_OFFLOAD_LAZY or HKV_OFFLOAD_EAGER    */
    int64_t max_offload_bytes; /* offload bytes in flight; 0: default     */
    int32_t event_capacity;    /* records of the event ring (events.h);
                                  0: no events, no cost                    */
    int32_t kernel_copies;     /* 1: transfers never use the copy engines
                                  (transfer.h); 0: DMA for page runs       */
    const char *disk_dir;      /* directory of the disk tier; NULL: none.
                                  Read at create only.                    */
    int64_t disk_capacity_bytes;
    int32_t disk_persist;      /* 1: records survive close and reopen     */
    int32_t disk_admit_after;  /* requests of a user before its pages are
                                  written to disk; 0: at once             */
    int32_t disk_io_threads;   /* I/O threads of the disk tier; 0: 2      */
    int32_t disk_gds;          /* GPUDirect Storage for disk -> GPU reads:
                                  0 off (staged through the host tier),
                                  1 where cuFile works, 2 required (create
                                  fails when it does not)                 */
    int32_t early_reuse;       /* 1: a batch may read and continue a user's
                                  tokens that a batch in flight is still
                                  appending; 0: such a user is busy       */
} hkv_config;

/* When pages go to the host tier: at eviction (write-back, "lazy") or as
 * soon as a batch commits (write-through, "eager"). */
enum { HKV_OFFLOAD_LAZY = 0, HKV_OFFLOAD_EAGER = 1 };

typedef struct hkv_stats {
    /* counters */
    uint64_t lookups;            /* lookup calls                            */
    uint64_t lookup_users;       /* users looked up                         */
    uint64_t hit_tokens;         /* history tokens found cached             */
    uint64_t missed_tokens;      /* history tokens that must be computed    */
    uint64_t batches_allocated;
    uint64_t batches_committed;
    uint64_t batches_aborted;    /* closed before every layer was appended  */
    uint64_t pages_allocated;
    uint64_t pages_evicted;      /* taken from LRU users to make room       */
    uint64_t pages_dropped;      /* freed by explicit evict or truncation   */
    uint64_t users_evicted;      /* users that lost their last page         */
    uint64_t tokens_appended;    /* per layer group appended                */
    uint64_t onboard_pages;      /* host -> GPU page copies (all layers)    */
    uint64_t onboard_bytes;
    uint64_t offload_pages;      /* GPU -> host page copies (all layers)    */
    uint64_t offload_bytes;
    uint64_t writeback_pages;    /* offloaded because of an eviction        */
    uint64_t host_pages_evicted; /* host pages taken from LRU users         */
    uint64_t transfers;
    uint64_t transfers_failed;   /* transfers that could not be queued      */
    uint64_t offloads_deferred;  /* eager offloads left to eviction time
                                    because the offload budget was full     */
    uint64_t offload_backpressure_waits; /* write-backs that waited for room */
    uint64_t dma_bytes;          /* transfer bytes moved by DMA             */
    uint64_t kernel_bytes;       /* transfer bytes moved by the copy kernel */
    uint64_t prefetch_users;     /* users whose prefetch started            */
    uint64_t prefetch_pages;     /* pages onboarded by prefetch             */
    uint64_t prefetch_dropped;   /* users a prefetch skipped: no room, or
                                    too many prefetches in flight           */
    uint64_t onboard_ns;         /* time of onboard transfers (see below)   */
    uint64_t offload_ns;         /* time of offload transfers               */
    uint64_t events_dropped;     /* event records overwritten undrained     */
    uint64_t disk_writes;        /* pages written to the disk tier          */
    uint64_t disk_write_failures;/* not admitted, no space, I/O error       */
    uint64_t disk_reads;         /* pages read back (disk -> host)          */
    uint64_t disk_read_misses;   /* reads that found no valid record        */
    uint64_t checksum_failures;  /* records dropped by a failed check       */
    uint64_t disk_io_errors;
    uint64_t disk_gds_reads;     /* of disk_reads: straight into GPU pages  */
    uint64_t disk_gds_fallbacks; /* users read through the host instead:
                                    host chain longer than the GPU's, or
                                    no GPU page free                        */
    /* gauges */
    int64_t pages_total;
    int64_t pages_free;
    int64_t pages_used;
    int64_t pages_pinned;        /* pages of users in open batches          */
    int64_t users_cached;
    int64_t open_batches;
    int64_t host_pages_total;
    int64_t host_pages_free;
    int64_t host_pages_used;
    int64_t transfers_in_flight;
    int64_t offload_queued_bytes; /* offload bytes queued, not yet done     */
    int64_t events_pending;      /* event records waiting for a drain       */
    int64_t disk_records;        /* pages on the disk tier                  */
    int64_t disk_bytes_used;
    int64_t disk_bytes_capacity;
    int64_t disk_in_flight;      /* disk reads and writes not yet done      */
    int64_t disk_gds_active;     /* 1 when disk reads go straight to GPU    */
    /* latency of the host-side calls */
    hkv_histogram lookup_latency;
    hkv_histogram allocate_latency;
    /* Transfer times: the copy itself on the CPU path; on CUDA from queueing
     * to the moment the core saw the copy complete (an upper bound: the
     * core looks at allocate, stats and sync_transfers). */
    hkv_histogram onboard_latency;
    hkv_histogram offload_latency;
} hkv_stats;

/* A strided tensor as the binding sees it (from DLPack), with strides in
 * elements.  The core checks it against what an operation needs. */
typedef struct hkv_tensor {
    void *data;
    int32_t device_kind;   /* hkv_device_kind, or -1 for other devices      */
    int32_t device_index;
    int32_t dtype_code;    /* DLPack type code: 0 int, 1 uint, 2 float, 4 bfloat */
    int32_t dtype_bits;
    int32_t ndim;
    int64_t shape[6];
    int64_t strides[6];
} hkv_tensor;

/* Offsets (in int32 elements) of the metadata fields inside a batch's
 * metadata block.  Sized for max_batch_size users; the same for every batch
 * of a cache. */
enum {
    HKV_META_KV_INDPTR,
    HKV_META_KV_LAST_PAGE_LEN,
    HKV_META_TOTAL_LENGTHS,
    HKV_META_TOTAL_OFFSETS,
    HKV_META_CACHED_LENGTHS,
    HKV_META_NEW_LENGTHS,
    HKV_META_NEW_OFFSETS,
    HKV_META_ROW_OFFSETS,
    HKV_META_ZEROS,
    HKV_META_KV_INDICES,
    HKV_META_BATCH_INDICES,
    HKV_META_POSITIONS,
    HKV_META_NUM_FIELDS
};

typedef struct hkv_cache hkv_cache;
typedef struct hkv_batch hkv_batch;

/* Summary of one batch, for the binding to slice the metadata block. */
typedef struct hkv_batch_info {
    int32_t batch_size;
    int64_t total_pages;      /* entries of kv_indices                     */
    int64_t total_tokens;     /* history tokens, cached + new              */
    int64_t new_tokens;       /* new history tokens (nnz)                  */
    int64_t num_rows;         /* rows append expects with candidates       */
    int32_t committed;
    int32_t closed;
    hkv_buffer *host_meta;    /* int32 block; borrowed                     */
    hkv_buffer *device_meta;  /* CUDA: device copy; CPU: same as host      */
} hkv_batch_info;

hkv_status hkv_cache_create(const hkv_config *cfg, hkv_cache **out);
/* Frees everything not exported; open batches must be freed first or are
 * abandoned (their memory lives until their last reference). */
void hkv_cache_destroy(hkv_cache *c);

const hkv_config *hkv_cache_config(const hkv_cache *c);
/* The whole table, one reference added (caller unrefs). */
hkv_buffer *hkv_cache_table(hkv_cache *c);
/* Offsets of the metadata fields, HKV_META_NUM_FIELDS entries. */
const int64_t *hkv_cache_meta_offsets(const hkv_cache *c);

/*
 * lookup: for each of `batch` users, the number of leading history tokens
 * whose K/V are cached.  token_keys (verified mode only, NULL in trust
 * mode) holds every history token's key, users one after another
 * (sum(history_lengths) keys).  epochs receive stamps that allocate checks.
 */
hkv_status hkv_cache_lookup(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                            const int64_t *history_lengths,
                            const int64_t *token_keys, int64_t num_keys,
                            int64_t *cached_lengths, uint64_t *epochs);

/*
 * allocate: reserve pages for tokens cached_lengths[b] .. history_lengths[b]
 * of each user and build the batch metadata.  cached_lengths and epochs
 * come from lookup; if the cache changed under them the call fails with
 * HKV_ESTALE and changes nothing.  num_candidates (may be NULL) tells append
 * that the caller's K/V rows hold, after each user's new history tokens,
 * that many candidate rows to skip.  On CUDA the metadata is uploaded on
 * `stream` (a cudaStream_t).  On any error the cache is unchanged.
 */
hkv_status hkv_cache_allocate(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                              const int64_t *history_lengths,
                              const int64_t *cached_lengths, const uint64_t *epochs,
                              const int64_t *token_keys, int64_t num_keys,
                              const int64_t *num_candidates, void *stream,
                              hkv_batch **out);

/* allocate, with the transfers ordered after `ready` (an event the caller
 * recorded on its stream earlier) rather than after everything queued on
 * `stream` so far.  The prepare worker's entry point; ready may be NULL. */
hkv_status hkv_cache_allocate_after(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                                    const int64_t *history_lengths,
                                    const int64_t *cached_lengths, const uint64_t *epochs,
                                    const int64_t *token_keys, int64_t num_keys,
                                    const int64_t *num_candidates, void *stream,
                                    void *ready, hkv_batch **out);

void hkv_batch_get_info(hkv_batch *b, hkv_batch_info *info);

/*
 * The same allocation, run on the cache's worker thread (started on first
 * use): returns at once with a job to wait for (async_queue.h).
 */
struct hkv_prepare_job;
hkv_status hkv_cache_prepare_async(hkv_cache *c, int32_t batch, const int64_t *user_ids,
                                   const int64_t *history_lengths,
                                   const int64_t *cached_lengths, const uint64_t *epochs,
                                   const int64_t *token_keys, int64_t num_keys,
                                   const int64_t *num_candidates, void *stream,
                                   struct hkv_prepare_job **out);

/*
 * append: write layer(s) [first_layer, first_layer + num_layers) of the new
 * tokens' K and V.  k and v are [rows, H, D] (or [rows, H*D]) for one layer,
 * [num_layers, rows, H, D] for several; rows is the batch's new_tokens, or
 * num_rows when the batch was allocated with candidates.
 */
hkv_status hkv_batch_append(hkv_batch *b, int32_t first_layer, int32_t num_layers,
                            const hkv_tensor *k, const hkv_tensor *v, void *stream);

/*
 * read: copy every history token (cached and new) of the batch, layer
 * `layer`, into k and v ([total_tokens, H, D], jagged by total offsets).
 * batch_indices and positions are int32 scratch tensors of total_tokens
 * entries on the cache's device.
 */
hkv_status hkv_batch_read(hkv_batch *b, int32_t layer, const hkv_tensor *k,
                          const hkv_tensor *v, const hkv_tensor *batch_indices,
                          const hkv_tensor *positions, void *stream);

/*
 * Page transfer between the table and a staging tensor (kernels.h,
 * hkv_pages_args): gather (to_staging = 1) copies pages out, scatter copies
 * them in.  page_ids: int32 [n] on the cache's device; staging: contiguous,
 * [num_layers, n, 2, page_size, H, D] in the cache's dtype and on its device.
 * The building block of offload and onboard; exposed for tests and
 * benchmarks.
 */
hkv_status hkv_cache_copy_pages(hkv_cache *c, int to_staging, int32_t first_layer,
                                int32_t num_layers, const hkv_tensor *page_ids,
                                const hkv_tensor *staging, void *stream);

/* Make `stream` wait (without blocking the host) until layer `layer` of the
 * pages this batch onboarded from the host tier has arrived.  append and
 * read do this themselves; a paged attention kernel reading the table
 * directly calls it first.  A no-op when nothing was onboarded. */
hkv_status hkv_batch_wait_layer(hkv_batch *b, int32_t layer, void *stream);

/* Unpin the batch's users; rolls back an uncommitted batch.  Idempotent. */
void hkv_batch_close(hkv_batch *b);
/* Close if needed and give the metadata block back; `stream` work that
 * reads the metadata may still run: the block is reused only after it. */
void hkv_batch_free(hkv_batch *b);

/* Cached tokens of one user (0 if unknown) and its K/V for `layer` into
 * k and v ([capacity, H, D] on the cache's device).  *length receives the
 * number of tokens copied. */
hkv_status hkv_cache_user_length(hkv_cache *c, int64_t user_id, int64_t *length);
hkv_status hkv_cache_read_user(hkv_cache *c, int64_t user_id, int32_t layer,
                               const hkv_tensor *k, const hkv_tensor *v,
                               void *stream, int64_t *length);

/* Which tiers an eviction empties. */
enum { HKV_TIER_GPU = 1, HKV_TIER_HOST = 2, HKV_TIER_DISK = 4, HKV_TIER_ALL = 7 };

/* Drop users' cached pages from the given tiers (HKV_TIER_*).  Users in open
 * batches fail with HKV_EBUSY (checked for all before any is dropped).
 * Unknown users are ignored.  Dropping the GPU tier of a user whose pages
 * are not on the host loses them, unless `offload` asks to write them back
 * first (lazy write-back, ordered on `stream`). */
hkv_status hkv_cache_evict(hkv_cache *c, int32_t count, const int64_t *user_ids,
                           int32_t tiers, int32_t offload, void *stream);
/* The same for every user not in an open batch; returns the users touched. */
int64_t hkv_cache_evict_all(hkv_cache *c, int32_t tiers, int32_t offload, void *stream);

/*
 * Prefetch: start onboarding the host-resident pages of up to
 * max_batch_size users to the GPU tier, ahead of their requests.  A hint:
 * it never blocks, takes only free GPU pages or pages that already have a
 * host copy (never a write-back, never a user in an open batch), and drops
 * users it has no room for.  Users stay pinned until their copy is in; a
 * batch that uses them waits for it per layer like for its own onboard.
 * Unknown users, users in open batches and users with nothing on the host
 * are skipped.  *started receives the users whose pages are coming.
 */
hkv_status hkv_cache_prefetch(hkv_cache *c, int32_t count, const int64_t *user_ids,
                              void *stream, int32_t *started);

/* Tokens of a user cached on the GPU tier, the host tier and (as far as
 * the cache knows) the disk tier; each tier holds a prefix. */
void hkv_cache_user_tiers(hkv_cache *c, int64_t user_id, int64_t *gpu_tokens,
                          int64_t *host_tokens, int64_t *disk_tokens);

/* Wait for every transfer in flight (blocking) and release their pins. */
hkv_status hkv_cache_sync_transfers(hkv_cache *c);

void hkv_cache_stats(hkv_cache *c, hkv_stats *out);
/* How disk reads reach the GPU: "off" (no disk tier, or GDS not asked
 * for), "direct" / "compat" (GPUDirect Storage, see gds.h), or
 * "unavailable: <why>" (asked for where it does not work: staged). */
const char *hkv_cache_gds_status(const hkv_cache *c);

/* Move up to `max` of the oldest event records into out (oldest first);
 * *count receives how many.  Holds the cache lock only to copy. */
hkv_status hkv_cache_drain_events(hkv_cache *c, hkv_event *out, int64_t max,
                                  int64_t *count);
/* Records waiting for a drain (0 when events are disabled). */
int64_t hkv_cache_events_pending(hkv_cache *c);

/*
 * Invariant check for tests: page ownership, chains, counts, LRU list and
 * hash table agree.  HKV_OK or HKV_ESTATE with a description.
 */
hkv_status hkv_cache_check(hkv_cache *c);

/* Strip cached tokens from a jagged tensor (kernels.h, hkv_strip_args) on
 * the given device. */
hkv_status hkv_strip(int32_t device_kind, int32_t device_index,
                     const hkv_strip_args *a, void *stream);

#endif /* HKV_CACHE_H */
