/*
 * events.c - the event ring (events.h).
 */
#include "events.h"

#include <stdlib.h>
#include <string.h>

#include "metrics.h"

hkv_status hkv_events_init(hkv_event_ring *r, int64_t capacity)
{
    memset(r, 0, sizeof *r);
    if (capacity < 0 || capacity > HKV_EVENTS_MAX_CAPACITY)
        return hkv_error(HKV_EINVAL, "event_capacity must be in 0..%d, got %lld",
                         HKV_EVENTS_MAX_CAPACITY, (long long)capacity);
    if (capacity == 0)
        return HKV_OK;
    r->buf = malloc((size_t)capacity * sizeof *r->buf);
    if (r->buf == NULL)
        return hkv_error(HKV_ENOMEM, "out of host memory for %lld event records",
                         (long long)capacity);
    r->capacity = capacity;
    return HKV_OK;
}

void hkv_events_free(hkv_event_ring *r)
{
    free(r->buf);
    memset(r, 0, sizeof *r);
}

static hkv_event *at(hkv_event_ring *r, int64_t i)
{
    return &r->buf[(r->head + i) % r->capacity];
}

void hkv_events_push(hkv_event_ring *r, int32_t kind, int32_t tier, int32_t from_tier,
                     int64_t user_id, int64_t page_index, int64_t num_pages)
{
    if (r->count > 0) {
        /* extend the newest record when this continues its run */
        hkv_event *last = at(r, r->count - 1);
        if (last->kind == kind && last->tier == tier && last->from_tier == from_tier &&
            last->user_id == user_id &&
            (int64_t)last->num_pages + num_pages <= INT32_MAX) {
            if (page_index == last->page_index + last->num_pages) {
                last->num_pages += (int32_t)num_pages;
                return;
            }
            if (page_index + num_pages == last->page_index) {
                last->page_index = page_index;
                last->num_pages += (int32_t)num_pages;
                return;
            }
        }
    }
    while (num_pages > 0) {
        int32_t n = num_pages > INT32_MAX ? INT32_MAX : (int32_t)num_pages;
        hkv_event *e;
        if (r->count == r->capacity) {
            /* full: the oldest record makes room */
            e = &r->buf[r->head];
            r->head = (r->head + 1) % r->capacity;
            r->dropped++;
        } else {
            e = at(r, r->count);
            r->count++;
        }
        e->seq = r->next_seq++;
        e->kind = kind;
        e->tier = tier;
        e->from_tier = from_tier;
        e->user_id = user_id;
        e->page_index = page_index;
        e->num_pages = n;
        e->timestamp_ns = (int64_t)hkv_now_ns();
        page_index += n;
        num_pages -= n;
    }
}

int64_t hkv_events_drain(hkv_event_ring *r, hkv_event *out, int64_t max)
{
    int64_t n = max < r->count ? max : r->count;
    if (n <= 0)
        return 0;
    /* at most two pieces: up to the end of the buffer, then from its start */
    int64_t first = r->capacity - r->head < n ? r->capacity - r->head : n;
    memcpy(out, &r->buf[r->head], (size_t)first * sizeof *out);
    if (n > first)
        memcpy(out + first, r->buf, (size_t)(n - first) * sizeof *out);
    r->head = (r->head + n) % r->capacity;
    r->count -= n;
    return n;
}

const char *hkv_event_kind_name(int32_t kind)
{
    switch (kind) {
    case HKV_EVENT_STORED: return "stored";
    case HKV_EVENT_REMOVED: return "removed";
    case HKV_EVENT_ONBOARDED: return "onboarded";
    case HKV_EVENT_OFFLOADED: return "offloaded";
    default: return "unknown";
    }
}
