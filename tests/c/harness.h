/*
 * harness.h - the smallest test harness that does the job.
 *
 * A test is a `static void test_xxx(void)`.  CHECK-style macros record the
 * first failure of the running test (file, line, expression, values) and
 * return from the test function at once: continuing after a broken
 * invariant only produces a cascade of confusing messages, or a crash that
 * hides the real cause.  Helpers that check things return an int (0 = ok)
 * so a test can write CHECK(helper(...) == 0) and the helper's own failure
 * message is kept (only the first message of a test is printed in full).
 *
 * Nothing here needs a library beyond libc, so the suite builds on any
 * machine with gcc.  Every file of the suite includes this header; the
 * counters and the runner live in test_main.c.
 */
#ifndef HKV_TEST_HARNESS_H
#define HKV_TEST_HARNESS_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "status.h"

/* Set by test_fail(); reset by the runner before each test. */
extern int hkv_test_failed;

/* Record a failure (prints it; only the first one per test in full). */
void test_fail(const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* Run one test function under `name` if it passes the command-line filter. */
void test_run(const char *name, void (*fn)(void));
#define RUN(fn) test_run(#fn, fn)

#define CHECK(cond)                                                        \
    do {                                                                   \
        if (!(cond)) {                                                     \
            test_fail(__FILE__, __LINE__, "CHECK(%s)", #cond);             \
            return;                                                        \
        }                                                                  \
    } while (0)

/* Integers of any width are compared as long long, which holds them all
 * in this suite (uint64 counters stay far below 2^63). */
#define CHECK_EQ(a, b)                                                     \
    do {                                                                   \
        long long a_ = (long long)(a), b_ = (long long)(b);                \
        if (a_ != b_) {                                                    \
            test_fail(__FILE__, __LINE__, "CHECK_EQ(%s, %s): %lld != %lld", \
                      #a, #b, a_, b_);                                     \
            return;                                                        \
        }                                                                  \
    } while (0)

/* A status: on mismatch say both names and the core's message, which is
 * usually what explains the failure. */
#define CHECK_ST(expr, want)                                               \
    do {                                                                   \
        hkv_status got_ = (expr);                                          \
        hkv_status want_ = (want);                                         \
        if (got_ != want_) {                                               \
            test_fail(__FILE__, __LINE__, "%s: got %s, want %s (%s)", #expr, \
                      hkv_status_name(got_), hkv_status_name(want_),       \
                      hkv_last_error());                                   \
            return;                                                        \
        }                                                                  \
    } while (0)

#define CHECK_OK(expr) CHECK_ST(expr, HKV_OK)

/* For helpers returning int: the same checks, returning 1 on failure. */
#define HCHECK(cond)                                                       \
    do {                                                                   \
        if (!(cond)) {                                                     \
            test_fail(__FILE__, __LINE__, "HCHECK(%s)", #cond);            \
            return 1;                                                      \
        }                                                                  \
    } while (0)

#define HCHECK_EQ(a, b)                                                    \
    do {                                                                   \
        long long a_ = (long long)(a), b_ = (long long)(b);                \
        if (a_ != b_) {                                                    \
            test_fail(__FILE__, __LINE__, "HCHECK_EQ(%s, %s): %lld != %lld", \
                      #a, #b, a_, b_);                                     \
            return 1;                                                      \
        }                                                                  \
    } while (0)

#define HCHECK_ST(expr, want)                                              \
    do {                                                                   \
        hkv_status got_ = (expr);                                          \
        hkv_status want_ = (want);                                         \
        if (got_ != want_) {                                               \
            test_fail(__FILE__, __LINE__, "%s: got %s, want %s (%s)", #expr, \
                      hkv_status_name(got_), hkv_status_name(want_),       \
                      hkv_last_error());                                   \
            return 1;                                                      \
        }                                                                  \
    } while (0)

/* ---- deterministic pseudo-random numbers ------------------------------
 * splitmix64: tiny, good enough for test data, and the same sequence on
 * every platform, so a failure reproduces from its seed. */
typedef struct test_rng {
    uint64_t s;
} test_rng;

static inline uint64_t rng_next(test_rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Uniform in [0, n); n > 0.  The modulo bias is irrelevant for tests. */
static inline int64_t rng_below(test_rng *r, int64_t n)
{
    return (int64_t)(rng_next(r) % (uint64_t)n);
}

/* Uniform in [lo, hi]. */
static inline int64_t rng_range(test_rng *r, int64_t lo, int64_t hi)
{
    return lo + rng_below(r, hi - lo + 1);
}

/* 1 with probability num/den. */
static inline int rng_chance(test_rng *r, int num, int den)
{
    return rng_below(r, den) < num;
}

/* A stateless 64-bit mix, for values derived from several integers. */
static inline uint64_t test_mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* Test groups, one per file. */
void run_pool_index_tests(void);
void run_filter_tests(void);
void run_cache_tests(void);
void run_strip_tests(void);
void run_soak_tests(void);
void run_async_tests(void);
void run_events_tests(void);
void run_disk_tests(void);

/* Seed of the soak (command line --seed=N); fixed by default. */
extern uint64_t hkv_test_seed;
/* Soak length multiplier (--long); 1 by default. */
extern int hkv_test_scale;

#endif /* HKV_TEST_HARNESS_H */
