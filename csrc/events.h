/*
 * events.h - a bounded ring of cache events, for routers and debugging.
 *
 * Each record says that a run of consecutive pages of one user's history
 * changed on one tier.  Page indices are positions in the user's history
 * (page i holds tokens [i * page_size, (i + 1) * page_size)), not physical
 * page ids, so a consumer can keep "which prefix of which user lives on
 * which tier" without knowing the cache's memory layout.
 *
 * Kinds (the smallest set that lets a consumer track residency per tier):
 *   STORED     new K/V were committed into pages of `tier` (the device tier;
 *              a batch's pages when its last layer was appended).  A page
 *              that gains tokens (a partial tail page) is stored again.
 *   REMOVED    the pages left `tier`: eviction, explicit evict, a rewritten
 *              (truncated) history.  A consumer may see REMOVED for pages it
 *              never saw added (a failed onboard); it ignores them.
 *   ONBOARDED  the pages were copied from `from_tier` (host) to `tier` (GPU);
 *              the host copy stays.
 *   OFFLOADED  the pages were copied from `from_tier` (GPU) to `tier` (host),
 *              eagerly or as a write-back before an eviction; the GPU copy
 *              stays until a REMOVED says otherwise.
 * Residency rule: STORED, ONBOARDED and OFFLOADED add the pages to `tier`,
 * REMOVED takes them off `tier`.  Copies are reported when they are queued;
 * the cache's ordering rules make the data usable from then on.
 *
 * Overflow: the ring keeps the NEWEST records.  A full ring overwrites its
 * oldest record and counts it in `dropped`; emission never blocks and never
 * allocates (the ring is sized once, at cache creation).  Sequence numbers
 * count every record ever made, so a consumer sees a gap where records were
 * dropped and can resynchronise (e.g. by forgetting what it knew).
 *
 * A record that continues the previous one (same kind, tiers and user, the
 * next page up or down) extends it instead of taking a new slot, so evicting
 * a user page by page costs one record.
 *
 * Locking: none here.  The cache emits while holding its mutex and drains
 * under it (hkv_cache_drain_events).
 */
#ifndef HKV_EVENTS_H
#define HKV_EVENTS_H

#include <stdint.h>

#include "status.h"

enum {
    HKV_EVENT_STORED = 0,
    HKV_EVENT_REMOVED = 1,
    HKV_EVENT_ONBOARDED = 2,
    HKV_EVENT_OFFLOADED = 3,
    HKV_EVENT_NUM_KINDS
};

/* Tiers, with the values of HKV_TIER_* of cache.h.  The disk tier is only
 * ever the source of an onboarding (its own records are the store's). */
enum { HKV_EVENT_TIER_GPU = 1, HKV_EVENT_TIER_HOST = 2, HKV_EVENT_TIER_DISK = 4 };

/* Largest capacity accepted (records of 48 bytes: 768 MiB). */
#define HKV_EVENTS_MAX_CAPACITY (1 << 24)

typedef struct hkv_event {
    uint64_t seq;           /* 0, 1, 2, ... over every record made        */
    int64_t user_id;
    int64_t page_index;     /* first page of the run, in the user's history */
    int64_t timestamp_ns;   /* CLOCK_MONOTONIC when the run started       */
    int32_t kind;           /* HKV_EVENT_*                                */
    int32_t tier;           /* tier the pages are on (or left)            */
    int32_t from_tier;      /* source of a copy; == tier otherwise        */
    int32_t num_pages;      /* run length, >= 1                           */
} hkv_event;

typedef struct hkv_event_ring {
    hkv_event *buf;         /* NULL when disabled (capacity 0)            */
    int64_t capacity;
    int64_t head;           /* index of the oldest record                 */
    int64_t count;          /* records held                               */
    uint64_t next_seq;
    uint64_t dropped;       /* records overwritten before a drain         */
} hkv_event_ring;

/* capacity 0 disables the ring: emission is one branch, drains return 0. */
hkv_status hkv_events_init(hkv_event_ring *r, int64_t capacity);
void hkv_events_free(hkv_event_ring *r);

/* Out of line: use hkv_events_emit. */
void hkv_events_push(hkv_event_ring *r, int32_t kind, int32_t tier, int32_t from_tier,
                     int64_t user_id, int64_t page_index, int64_t num_pages);

/* Record that pages [page_index, page_index + num_pages) of a user changed
 * (num_pages <= 0: nothing).  A no-op when the ring is disabled. */
static inline void hkv_events_emit(hkv_event_ring *r, int32_t kind, int32_t tier,
                                   int32_t from_tier, int64_t user_id,
                                   int64_t page_index, int64_t num_pages)
{
    if (r->capacity > 0 && num_pages > 0)
        hkv_events_push(r, kind, tier, from_tier, user_id, page_index, num_pages);
}

/* Move up to `max` of the oldest records into out (oldest first); returns
 * how many. */
int64_t hkv_events_drain(hkv_event_ring *r, hkv_event *out, int64_t max);

/* Short name of a kind ("stored", ...) or "unknown". */
const char *hkv_event_kind_name(int32_t kind);

#endif /* HKV_EVENTS_H */
