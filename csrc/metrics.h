/*
 * metrics.h - latency histograms for the core's counters.
 *
 * Fixed bucket bounds (Prometheus style, cumulative on export) so a
 * histogram is a small array that needs no allocation and can be copied
 * under the cache lock in one go.
 */
#ifndef HKV_METRICS_H
#define HKV_METRICS_H

#include <stdint.h>

#define HKV_HIST_BUCKETS 18

/* Upper bounds in nanoseconds of the finite buckets; the last bucket is +Inf. */
extern const uint64_t hkv_hist_bounds_ns[HKV_HIST_BUCKETS - 1];

typedef struct hkv_histogram {
    uint64_t counts[HKV_HIST_BUCKETS];   /* per bucket, not cumulative */
    uint64_t count;
    uint64_t sum_ns;
} hkv_histogram;

void hkv_histogram_observe(hkv_histogram *h, uint64_t ns);

/* Monotonic clock in nanoseconds. */
uint64_t hkv_now_ns(void);

#endif /* HKV_METRICS_H */
