/*
 * metrics.c - histogram buckets and the clock.
 */
#define _POSIX_C_SOURCE 200809L
#include "metrics.h"

#include <time.h>

/* 1 us .. 1 s, roughly 1-2.5-5 steps: host calls take microseconds,
 * transfers milliseconds. */
const uint64_t hkv_hist_bounds_ns[HKV_HIST_BUCKETS - 1] = {
    1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
    1000000, 2500000, 5000000, 10000000, 25000000, 50000000, 100000000,
    1000000000};

void hkv_histogram_observe(hkv_histogram *h, uint64_t ns)
{
    int i = 0;
    while (i < HKV_HIST_BUCKETS - 1 && ns > hkv_hist_bounds_ns[i])
        i++;
    h->counts[i]++;
    h->count++;
    h->sum_ns += ns;
}

uint64_t hkv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}
