/*
 * test_disk.c - the disk store (disk_tier.h), its CRC (crc32c.h) and its
 * I/O threads, against a real file in a fresh directory under $TMPDIR.
 *
 * Record contents are derived from (user, page, fingerprint), so any
 * record read back, after any fault, can be checked byte for byte: the
 * store's promise is "a miss, never wrong data", and these tests hold it
 * to that.  Faults come from three places: the store's injection API
 * (EIO, ENOSPC, short reads), bytes changed in the file behind the
 * store's back (flipped bits, truncation, a record copied to the wrong
 * slot, a torn record), and real processes (a child killed with SIGKILL
 * mid-write; a child under a file-size limit).
 *
 * Tests whose name contains "threads" also run under ThreadSanitizer
 * (make tsan); the ones that fork do not (TSan and fork do not mix).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cache.h"
#include "cache_util.h"
#include "crc32c.h"
#include "disk_tier.h"
#include "harness.h"

/* Geometry of the test pages: 4 "layers" of 3000 bytes (deliberately not
 * 4 KiB multiples, so the gather/scatter and padding paths run). */
#define LAYERS 4
#define PIECE 3000
#define PAGE_BYTES (LAYERS * PIECE)
#define RECORD_BYTES (HKV_DISK_HEADER_BYTES + 12288)

typedef struct page_buf {
    unsigned char bytes[LAYERS][PIECE];
    struct iovec iov[LAYERS];
} page_buf;

static void page_init(page_buf *p)
{
    for (int l = 0; l < LAYERS; l++) {
        p->iov[l].iov_base = p->bytes[l];
        p->iov[l].iov_len = PIECE;
    }
}

/* The content of record (user, page, fp). */
static void page_fill(page_buf *p, int64_t user, int64_t page, uint64_t fp)
{
    page_init(p);
    uint64_t seed = test_mix((uint64_t)user * 1000003u + (uint64_t)page) ^ fp;
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < PIECE; i += 8) {
            uint64_t v = test_mix(seed + (uint64_t)(l * PIECE + i));
            memcpy(&p->bytes[l][i], &v, PIECE - i < 8 ? (size_t)(PIECE - i) : 8);
        }
}

static int page_matches(const page_buf *got, int64_t user, int64_t page, uint64_t fp)
{
    page_buf want;
    page_fill(&want, user, page, fp);
    for (int l = 0; l < LAYERS; l++)
        if (memcmp(got->bytes[l], want.bytes[l], PIECE) != 0) {
            test_fail(__FILE__, __LINE__, "record (%lld, %lld) layer %d differs",
                      (long long)user, (long long)page, l);
            return 1;
        }
    return 0;
}

static uint64_t fp_of(int64_t user, int64_t page, int version)
{
    return test_mix((uint64_t)user * 7919u + (uint64_t)page * 104729u + (uint64_t)version);
}

/* A fresh directory; rm_dir removes it (and the store's file). */
static void make_dir(char *dir, size_t n)
{
    const char *base = getenv("TMPDIR");
    snprintf(dir, n, "%s/hkv_disk_test.XXXXXX", base != NULL ? base : "/tmp");
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        abort();
    }
}

static void rm_dir(const char *dir)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/hkv_disk.dat", dir);
    unlink(path);
    rmdir(dir);
}

/* 1: the stores try O_DIRECT (the default); test_disk_buffered_io runs
 * tests again with 0, where every read and write is zero-copy. */
static int test_direct = 1;

static hkv_disk_config cfg_for(const char *dir, int slots)
{
    hkv_disk_config cfg;
    hkv_disk_config_default(&cfg);
    cfg.direct_io = test_direct;
    cfg.dir = dir;
    cfg.page_bytes = PAGE_BYTES;
    cfg.capacity_bytes = (uint64_t)slots * RECORD_BYTES;
    cfg.admit_after = 0;
    return cfg;
}

static int write_page(hkv_disk *d, int64_t user, int64_t page, uint64_t fp,
                      hkv_disk_result want)
{
    page_buf p;
    page_fill(&p, user, page, fp);
    hkv_disk_result r = HKV_DISK_DONE;
    HCHECK_ST(hkv_disk_write_sync(d, user, page, fp, 32, p.iov, LAYERS, &r), HKV_OK);
    if (r != want) {
        test_fail(__FILE__, __LINE__, "write (%lld, %lld): %s, want %s", (long long)user,
                  (long long)page, hkv_disk_result_name(r), hkv_disk_result_name(want));
        return 1;
    }
    return 0;
}

/* Read and, when it completes DONE, check every byte. */
static int read_page(hkv_disk *d, int64_t user, int64_t page, uint64_t fp,
                     hkv_disk_result want)
{
    page_buf p;
    page_init(&p);
    memset(p.bytes, 0xA5, sizeof p.bytes);
    hkv_disk_result r = HKV_DISK_DONE;
    HCHECK_ST(hkv_disk_read_sync(d, user, page, fp, p.iov, LAYERS, &r), HKV_OK);
    if (r != want) {
        test_fail(__FILE__, __LINE__, "read (%lld, %lld): %s, want %s", (long long)user,
                  (long long)page, hkv_disk_result_name(r), hkv_disk_result_name(want));
        return 1;
    }
    if (r == HKV_DISK_DONE)
        return page_matches(&p, user, page, fp);
    /* a miss leaves no unverified byte: the caller's buffers are untouched
     * (staged read) or zeroed (zero-copy read) */
    int untouched = p.bytes[0][0] == 0xA5;
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < PIECE; i++)
            HCHECK_EQ(p.bytes[l][i], untouched ? 0xA5 : 0);
    return 0;
}

/* Change bytes of the store's file behind its back. */
static int poke(hkv_disk *d, int64_t offset, const void *bytes, size_t n)
{
    int fd = open(hkv_disk_path(d), O_WRONLY);
    HCHECK(fd >= 0);
    HCHECK_EQ(pwrite(fd, bytes, n, offset), (long long)n);
    fsync(fd);
    close(fd);
    return 0;
}

static int flip_bit(hkv_disk *d, int64_t offset, int bit)
{
    int fd = open(hkv_disk_path(d), O_RDWR);
    HCHECK(fd >= 0);
    unsigned char b;
    HCHECK_EQ(pread(fd, &b, 1, offset), 1);
    b ^= (unsigned char)(1u << bit);
    HCHECK_EQ(pwrite(fd, &b, 1, offset), 1);
    fsync(fd);
    close(fd);
    return 0;
}

/* ------------------------------------------------------------------ */

static void test_disk_crc32c(void)
{
    CHECK_EQ(hkv_crc32c(0, "123456789", 9), 0xE3069283u);
    CHECK_EQ(hkv_crc32c_sw(0, "123456789", 9), 0xE3069283u);
    unsigned char zeros[32] = {0};
    CHECK_EQ(hkv_crc32c(0, zeros, 32), 0x8A9136AAu);   /* RFC 3720 B.4 */
    unsigned char ones[32];
    memset(ones, 0xFF, sizeof ones);
    CHECK_EQ(hkv_crc32c(0, ones, 32), 0x62A8AB43u);
    CHECK_EQ(hkv_crc32c(0, NULL, 0), 0);
    /* hardware and software agree at every length and alignment, and a
     * checksum continues across pieces */
    static unsigned char buf[4096 + 16];
    test_rng r = {7};
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)rng_next(&r);
    for (int t = 0; t < 300; t++) {
        size_t off = (size_t)rng_below(&r, 16), len = (size_t)rng_below(&r, 4096);
        uint32_t a = hkv_crc32c(0, buf + off, len);
        CHECK_EQ(a, hkv_crc32c_sw(0, buf + off, len));
        size_t cut = len == 0 ? 0 : (size_t)rng_below(&r, (int64_t)len);
        CHECK_EQ(a, hkv_crc32c(hkv_crc32c(0, buf + off, cut), buf + off + cut, len - cut));
    }
    /* long buffers take the three-stream path (3 x 8 KiB blocks and a
     * tail): it must agree with the one-stream software CRC */
    size_t big_len = 200000;
    unsigned char *big = malloc(big_len + 8);
    CHECK(big != NULL);
    for (size_t i = 0; i < big_len + 8; i++)
        big[i] = (unsigned char)rng_next(&r);
    size_t lens[] = {3 * 8192 - 1, 3 * 8192, 3 * 8192 + 1, 6 * 8192 + 13, 100000, big_len};
    for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++)
        for (size_t off = 0; off < 3; off++) {
            uint32_t hw = hkv_crc32c(0x12345678u, big + off, lens[k]);
            uint32_t sw = hkv_crc32c_sw(0x12345678u, big + off, lens[k]);
            if (hw != sw) {
                free(big);
                CHECK_EQ(hw, sw);
            }
        }
    free(big);
}

static void test_disk_round_trip(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 64);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.slots, 64);
    CHECK_EQ(st.record_bytes, RECORD_BYTES);
    CHECK_EQ(st.records, 0);

    /* 3 users x 8 pages, queued asynchronously, completions polled */
    static page_buf pages[24];
    uint64_t tickets[24];
    for (int k = 0; k < 24; k++) {
        page_fill(&pages[k], k / 8, k % 8, fp_of(k / 8, k % 8, 0));
        CHECK_OK(hkv_disk_write(d, k / 8, k % 8, fp_of(k / 8, k % 8, 0), 32, pages[k].iov,
                                LAYERS, &tickets[k]));
        CHECK(tickets[k] != 0);
    }
    int seen = 0;
    int seen_ticket[24] = {0};
    for (int spins = 0; seen < 24 && spins < 100000; spins++) {
        uint64_t t[8];
        hkv_disk_result res[8];
        int n = hkv_disk_poll(d, t, res, 8);
        for (int j = 0; j < n; j++) {
            CHECK_EQ(res[j], HKV_DISK_DONE);
            int k = 0;
            while (k < 24 && tickets[k] != t[j])
                k++;
            CHECK(k < 24 && !seen_ticket[k]);
            seen_ticket[k] = 1;
            seen++;
        }
        if (n == 0)
            usleep(100);
    }
    CHECK_EQ(seen, 24);
    uint64_t t0;
    CHECK_EQ(hkv_disk_poll(d, &t0, NULL, 1), 0);
    CHECK_ST(hkv_disk_wait(d, tickets[0], 0, NULL), HKV_EINVAL);  /* already polled */

    for (int k = 0; k < 24; k++) {
        CHECK(hkv_disk_contains(d, k / 8, k % 8, fp_of(k / 8, k % 8, 0)));
        CHECK(!hkv_disk_contains(d, k / 8, k % 8, fp_of(k / 8, k % 8, 1)));
        CHECK(read_page(d, k / 8, k % 8, fp_of(k / 8, k % 8, 0), HKV_DISK_DONE) == 0);
    }
    uint64_t fp;
    uint32_t tokens;
    uint64_t len;
    CHECK(hkv_disk_find(d, 2, 5, &fp, &tokens, &len));
    CHECK_EQ(fp, fp_of(2, 5, 0));
    CHECK_EQ(tokens, 32);
    CHECK_EQ(len, PAGE_BYTES);
    CHECK(!hkv_disk_contains(d, 3, 0, fp_of(3, 0, 0)));
    CHECK(read_page(d, 3, 0, fp_of(3, 0, 0), HKV_DISK_MISS) == 0);

    /* a record shorter than a page, and one with no data */
    page_buf p;
    page_fill(&p, 9, 0, 1);
    CHECK_OK(hkv_disk_write_sync(d, 9, 0, 1, 5, p.iov, 2, NULL));
    CHECK_OK(hkv_disk_write_sync(d, 9, 1, 2, 0, NULL, 0, NULL));
    page_buf q;
    page_init(&q);
    hkv_disk_result r;
    CHECK_OK(hkv_disk_read_sync(d, 9, 0, 1, q.iov, LAYERS, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    CHECK(memcmp(q.bytes, p.bytes, 2 * PIECE) == 0);
    CHECK_OK(hkv_disk_read_sync(d, 9, 1, 2, NULL, 0, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    /* bad sizes are refused at submit */
    page_buf big[2];
    struct iovec iov[LAYERS * 2];
    page_init(&big[0]);
    page_init(&big[1]);
    for (int l = 0; l < LAYERS; l++)
        iov[l] = big[0].iov[l], iov[LAYERS + l] = big[1].iov[l];
    uint64_t t;
    CHECK_ST(hkv_disk_write(d, 9, 2, 0, 0, iov, LAYERS + 1, &t), HKV_EINVAL);
    CHECK_ST(hkv_disk_read(d, 9, 0, 1, p.iov, 1, &t), HKV_EINVAL);  /* 3000 < 6000 bytes */

    /* the contiguous run from a page, with and without fingerprints */
    CHECK_EQ(hkv_disk_count_run(d, 1, 0, NULL, 100), 8);
    CHECK_EQ(hkv_disk_count_run(d, 1, 3, NULL, 100), 5);
    CHECK_EQ(hkv_disk_count_run(d, 1, 3, NULL, 2), 2);
    uint64_t fps[8];
    for (int i = 0; i < 8; i++)
        fps[i] = fp_of(1, i, 0);
    CHECK_EQ(hkv_disk_count_run(d, 1, 0, fps, 8), 8);
    fps[4] ^= 1;
    CHECK_EQ(hkv_disk_count_run(d, 1, 0, fps, 8), 4);
    CHECK_EQ(hkv_disk_count_run(d, 7, 0, NULL, 8), 0);

    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.records, 26);
    CHECK_EQ(st.writes_done, 26);
    CHECK_EQ(st.writes_failed, 0);
    CHECK_EQ(st.reads_done, 26);
    CHECK_EQ(st.reads_failed, 1);
    CHECK_EQ(st.checksum_failures, 0);
    CHECK_EQ(st.bytes_used, 26ull * RECORD_BYTES);
    /* staged writes put whole slots down (O_DIRECT, unaligned pieces);
     * zero-copy ones header + data (the empty record always, everything
     * with buffered I/O) */
    CHECK_EQ(st.bytes_written,
             test_direct ? 25ull * RECORD_BYTES + HKV_DISK_HEADER_BYTES
                         : 24ull * (HKV_DISK_HEADER_BYTES + PAGE_BYTES) +
                               (HKV_DISK_HEADER_BYTES + 2 * PIECE) + HKV_DISK_HEADER_BYTES);
    CHECK_EQ(st.in_flight, 0);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_rewrite_newest_wins(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    CHECK(write_page(d, 1, 0, fp_of(1, 0, 0), HKV_DISK_DONE) == 0);
    /* two writes of the key in flight: the later submitted one wins,
     * whichever finishes first */
    page_buf a, b;
    page_fill(&a, 1, 0, fp_of(1, 0, 1));
    page_fill(&b, 1, 0, fp_of(1, 0, 2));
    uint64_t ta, tb;
    CHECK_OK(hkv_disk_write(d, 1, 0, fp_of(1, 0, 1), 32, a.iov, LAYERS, &ta));
    CHECK_OK(hkv_disk_write(d, 1, 0, fp_of(1, 0, 2), 32, b.iov, LAYERS, &tb));
    CHECK_OK(hkv_disk_wait(d, tb, -1, NULL));
    CHECK_OK(hkv_disk_wait(d, ta, -1, NULL));
    CHECK(read_page(d, 1, 0, fp_of(1, 0, 2), HKV_DISK_DONE) == 0);
    CHECK(read_page(d, 1, 0, fp_of(1, 0, 1), HKV_DISK_MISS) == 0);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.records, 1);
    CHECK_OK(hkv_disk_check(d));
    /* superseded slots came back: 8 more writes fit without eviction */
    for (int i = 1; i < 8; i++)
        CHECK(write_page(d, 2, i, 5, HKV_DISK_DONE) == 0);
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.evicted, 0);
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_admission(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 16);
    cfg.admit_after = 2;
    cfg.admit_table = 1;  /* one entry: any other user's offer forgets */
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    CHECK(write_page(d, 1, 0, 1, HKV_DISK_NOT_ADMITTED) == 0);
    CHECK_EQ(hkv_disk_offer(d, 1), 1);
    CHECK(write_page(d, 1, 0, 1, HKV_DISK_NOT_ADMITTED) == 0);
    CHECK_EQ(hkv_disk_offer(d, 1), 2);
    CHECK(write_page(d, 1, 0, 1, HKV_DISK_DONE) == 0);
    CHECK(write_page(d, 1, 1, 1, HKV_DISK_DONE) == 0);
    CHECK(write_page(d, 2, 0, 1, HKV_DISK_NOT_ADMITTED) == 0);
    /* user 2's offers push user 1 out of the table; user 1 stays admitted
     * because it has pages on disk */
    CHECK_EQ(hkv_disk_offer(d, 2), 1);
    CHECK_EQ(hkv_disk_offer(d, 2), 2);
    CHECK(write_page(d, 2, 0, 1, HKV_DISK_DONE) == 0);
    CHECK(write_page(d, 1, 2, 1, HKV_DISK_DONE) == 0);
    /* ... until they are gone */
    CHECK_EQ(hkv_disk_drop_user(d, 1, 0), 3);
    CHECK(write_page(d, 1, 0, 1, HKV_DISK_NOT_ADMITTED) == 0);
    CHECK_EQ(hkv_disk_offer(d, 1), 1);  /* forgotten: counts from 1 again */
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.not_admitted, 4);
    CHECK_EQ(st.writes_failed, 4);
    CHECK_EQ(st.records, 1);
    CHECK_EQ(st.bytes_written, 4ull * RECORD_BYTES);  /* rejected writes cost no I/O */
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_flipped_bits(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 16);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    for (int p = 0; p < 8; p++)
        CHECK(write_page(d, 5, p, fp_of(5, p, 0), HKV_DISK_DONE) == 0);
    /* one bit in the data (first, middle and last byte), in each header
     * field that is checked, and in the crc itself */
    int64_t data_at[3] = {0, PAGE_BYTES / 2, PAGE_BYTES - 1};
    for (int k = 0; k < 3; k++)
        CHECK(flip_bit(d, hkv_disk_record_offset(d, 5, k) + HKV_DISK_HEADER_BYTES +
                              data_at[k], k) == 0);
    int header_at[5] = {0 /* magic */, 8 /* crc */, 12 /* tokens */, 32 /* fingerprint */,
                        48 /* seq */};
    for (int k = 0; k < 5; k++)
        CHECK(flip_bit(d, hkv_disk_record_offset(d, 5, 3 + k) + header_at[k], 6) == 0);
    for (int p = 0; p < 8; p++) {
        CHECK(hkv_disk_contains(d, 5, p, fp_of(5, p, 0)));  /* not yet read */
        CHECK(read_page(d, 5, p, fp_of(5, p, 0), HKV_DISK_CORRUPT) == 0);
        CHECK(!hkv_disk_contains(d, 5, p, fp_of(5, p, 0)));  /* dropped */
        CHECK(read_page(d, 5, p, fp_of(5, p, 0), HKV_DISK_MISS) == 0);
    }
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.checksum_failures, 8);
    CHECK_EQ(st.records, 0);
    CHECK_EQ(st.io_errors, 0);
    /* the store goes on: the key can be written and read again */
    CHECK(write_page(d, 5, 0, fp_of(5, 0, 0), HKV_DISK_DONE) == 0);
    CHECK(read_page(d, 5, 0, fp_of(5, 0, 0), HKV_DISK_DONE) == 0);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    rm_dir(dir);
}

/* A whole, valid record in a slot where the index expects another key
 * (a misdirected write): its CRC holds, its key does not. */
static void test_disk_record_in_wrong_slot(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    CHECK(write_page(d, 1, 0, 11, HKV_DISK_DONE) == 0);
    CHECK(write_page(d, 2, 0, 22, HKV_DISK_DONE) == 0);
    int fd = open(hkv_disk_path(d), O_RDONLY);
    CHECK(fd >= 0);
    static unsigned char rec[RECORD_BYTES];
    CHECK_EQ(pread(fd, rec, RECORD_BYTES, hkv_disk_record_offset(d, 1, 0)), RECORD_BYTES);
    close(fd);
    CHECK(poke(d, hkv_disk_record_offset(d, 2, 0), rec, RECORD_BYTES) == 0);
    CHECK(read_page(d, 2, 0, 22, HKV_DISK_CORRUPT) == 0);
    CHECK(read_page(d, 1, 0, 11, HKV_DISK_DONE) == 0);
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_truncated_file(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    for (int p = 0; p < 4; p++)
        CHECK(write_page(d, 1, p, 7, HKV_DISK_DONE) == 0);
    /* cut the file in the middle of the last record's data */
    int64_t last = hkv_disk_record_offset(d, 1, 3);
    CHECK(last == 3 * RECORD_BYTES);
    CHECK_EQ(truncate(hkv_disk_path(d), last + HKV_DISK_HEADER_BYTES + 5000), 0);
    CHECK(read_page(d, 1, 3, 7, HKV_DISK_CORRUPT) == 0);
    CHECK(!hkv_disk_contains(d, 1, 3, 7));
    for (int p = 0; p < 3; p++)
        CHECK(read_page(d, 1, p, 7, HKV_DISK_DONE) == 0);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.checksum_failures, 1);
    /* writes past the end just extend the file again */
    CHECK(write_page(d, 2, 0, 7, HKV_DISK_DONE) == 0);
    CHECK(read_page(d, 2, 0, 7, HKV_DISK_DONE) == 0);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_wrong_fingerprint(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    CHECK(write_page(d, 1, 0, 100, HKV_DISK_DONE) == 0);
    CHECK(!hkv_disk_contains(d, 1, 0, 101));
    CHECK(read_page(d, 1, 0, 101, HKV_DISK_MISS) == 0);
    /* a miss by fingerprint is not corruption: the record stays */
    CHECK(read_page(d, 1, 0, 100, HKV_DISK_DONE) == 0);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.checksum_failures, 0);
    CHECK_EQ(st.records, 1);
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_eio_injection(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    /* one EIO: retried in another slot */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_WRITE_EIO, 1));
    CHECK(write_page(d, 1, 0, 1, HKV_DISK_DONE) == 0);
    CHECK(read_page(d, 1, 0, 1, HKV_DISK_DONE) == 0);
    /* two: given up, nothing visible */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_WRITE_EIO, 2));
    CHECK(write_page(d, 1, 1, 1, HKV_DISK_IO_ERROR) == 0);
    CHECK(!hkv_disk_contains(d, 1, 1, 1));
    /* a failed rewrite keeps the old record */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_WRITE_EIO, 2));
    CHECK(write_page(d, 1, 0, 2, HKV_DISK_IO_ERROR) == 0);
    CHECK(read_page(d, 1, 0, 1, HKV_DISK_DONE) == 0);
    /* a read error drops the record */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_READ_EIO, 1));
    CHECK(read_page(d, 1, 0, 1, HKV_DISK_IO_ERROR) == 0);
    CHECK(!hkv_disk_contains(d, 1, 0, 1));
    /* a short read is a failed check */
    CHECK(write_page(d, 2, 0, 1, HKV_DISK_DONE) == 0);
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_READ_SHORT, 1));
    CHECK(read_page(d, 2, 0, 1, HKV_DISK_CORRUPT) == 0);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.io_errors, 1 + 2 + 2 + 1);
    CHECK_EQ(st.checksum_failures, 1);
    CHECK_EQ(st.writes_failed, 2);
    CHECK_EQ(st.records, 0);
    /* still usable: every slot can be filled and read */
    for (int p = 0; p < 8; p++)
        CHECK(write_page(d, 3, p, 9, HKV_DISK_DONE) == 0);
    for (int p = 0; p < 8; p++)
        CHECK(read_page(d, 3, p, 9, HKV_DISK_DONE) == 0);
    CHECK_ST(hkv_disk_inject(d, HKV_DISK_NUM_FAULTS, 1), HKV_EINVAL);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_enospc_injection(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 4);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    for (int p = 0; p < 3; p++)
        CHECK(write_page(d, 1, p, 1, HKV_DISK_DONE) == 0);
    /* ENOSPC evicts the oldest record (not the free slot) and retries */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_WRITE_ENOSPC, 1));
    CHECK(write_page(d, 2, 0, 1, HKV_DISK_DONE) == 0);
    CHECK(!hkv_disk_contains(d, 1, 0, 1));
    CHECK(read_page(d, 2, 0, 1, HKV_DISK_DONE) == 0);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.evicted, 1);
    CHECK_EQ(st.records, 3);
    /* twice: the page is given up */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_WRITE_ENOSPC, 2));
    CHECK(write_page(d, 2, 1, 1, HKV_DISK_NO_SPACE) == 0);
    CHECK(!hkv_disk_contains(d, 2, 1, 1));
    CHECK(read_page(d, 2, 0, 1, HKV_DISK_DONE) == 0);
    CHECK(write_page(d, 2, 1, 1, HKV_DISK_DONE) == 0);
    CHECK(read_page(d, 2, 1, 1, HKV_DISK_DONE) == 0);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    rm_dir(dir);
}

/* A real EFBIG: a child under RLIMIT_FSIZE (SIGXFSZ ignored) writes more
 * records than the limit lets the file hold.  Exit status 0 = all good,
 * else the line of the failed check. */
static int rlimit_child(const char *dir)
{
#define EXPECT(c)                                                          \
    do {                                                                   \
        if (!(c))                                                          \
            return __LINE__ % 250 + 1;                                     \
    } while (0)
    hkv_disk_config cfg = cfg_for(dir, 8);
    hkv_disk *d = NULL;
    EXPECT(hkv_disk_open(&cfg, &d) == HKV_OK);
    signal(SIGXFSZ, SIG_IGN);
    struct rlimit rl = {4 * RECORD_BYTES, 4 * RECORD_BYTES};
    EXPECT(setrlimit(RLIMIT_FSIZE, &rl) == 0);
    for (int p = 0; p < 8; p++) {
        page_buf b;
        page_fill(&b, 1, p, 3);
        hkv_disk_result r;
        EXPECT(hkv_disk_write_sync(d, 1, p, 3, 32, b.iov, LAYERS, &r) == HKV_OK);
        EXPECT(r == HKV_DISK_DONE);  /* pages 4..7 by evicting 0..3 */
        EXPECT(hkv_disk_record_offset(d, 1, p) < 4 * RECORD_BYTES);
    }
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    EXPECT(st.records == 4 && st.evicted == 4 && st.io_errors == 4);
    for (int p = 0; p < 8; p++) {
        page_buf b, want;
        page_init(&b);
        page_fill(&want, 1, p, 3);
        hkv_disk_result r;
        EXPECT(hkv_disk_read_sync(d, 1, p, 3, b.iov, LAYERS, &r) == HKV_OK);
        EXPECT(r == (p < 4 ? HKV_DISK_MISS : HKV_DISK_DONE));
        EXPECT(r != HKV_DISK_DONE || memcmp(b.bytes, want.bytes, sizeof b.bytes) == 0);
    }
    EXPECT(hkv_disk_check(d) == HKV_OK);
    hkv_disk_close(d);
    return 0;
#undef EXPECT
}

static void test_disk_file_size_limit(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    fflush(stdout);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0)
        _exit(rlimit_child(dir));
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    rm_dir(dir);
}

static void test_disk_lru_eviction(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    for (int p = 0; p < 8; p++)
        CHECK(write_page(d, 1, p, 1, HKV_DISK_DONE) == 0);
    CHECK(read_page(d, 1, 0, 1, HKV_DISK_DONE) == 0);   /* 0 is now the newest */
    CHECK_EQ(hkv_disk_count_run(d, 1, 1, NULL, 1), 1);  /* and so is 1 */
    for (int p = 0; p < 3; p++)
        CHECK(write_page(d, 2, p, 1, HKV_DISK_DONE) == 0);
    /* evicted: 2, 3, 4, the least recently used */
    for (int p = 0; p < 8; p++)
        CHECK_EQ(hkv_disk_contains(d, 1, p, 1), p < 2 || p > 4);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.evicted, 3);
    CHECK_EQ(st.records, 8);
    CHECK_EQ(st.bytes_used, st.capacity_bytes);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_drop_user(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 16);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    for (int p = 0; p < 6; p++)
        CHECK(write_page(d, 1, p, 1, HKV_DISK_DONE) == 0);
    for (int p = 0; p < 3; p++)
        CHECK(write_page(d, 2, p, 1, HKV_DISK_DONE) == 0);
    CHECK_EQ(hkv_disk_drop_user(d, 1, 3), 3);
    for (int p = 0; p < 6; p++)
        CHECK_EQ(hkv_disk_contains(d, 1, p, 1), p < 3);
    CHECK_EQ(hkv_disk_count_run(d, 1, 0, NULL, 10), 3);
    CHECK_EQ(hkv_disk_count_run(d, 2, 0, NULL, 10), 3);
    CHECK_EQ(hkv_disk_drop_user(d, 1, 0), 3);
    CHECK_EQ(hkv_disk_drop_user(d, 1, 0), 0);
    CHECK_EQ(hkv_disk_drop_user(d, 99, 0), 0);
    CHECK_OK(hkv_disk_check(d));

    /* a write in flight when its user is dropped never becomes visible */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_DELAY_US, 20000));
    page_buf b;
    page_fill(&b, 3, 0, 1);
    uint64_t t;
    CHECK_OK(hkv_disk_write(d, 3, 0, 1, 32, b.iov, LAYERS, &t));
    CHECK_EQ(hkv_disk_drop_user(d, 3, 0), 0);
    hkv_disk_result r;
    CHECK_OK(hkv_disk_wait(d, t, -1, &r));
    CHECK_EQ(r, HKV_DISK_CANCELLED);
    CHECK(!hkv_disk_contains(d, 3, 0, 1));
    /* a read in flight when its record is dropped still gets verified data,
     * and the slot is reused only after it */
    CHECK_OK(hkv_disk_read(d, 2, 1, 1, b.iov, LAYERS, &t));
    CHECK_EQ(hkv_disk_drop_user(d, 2, 0), 3);
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_DELAY_US, 0));
    for (int p = 0; p < 16; p++)
        CHECK(write_page(d, 4, p, 1, HKV_DISK_DONE) == 0);
    CHECK_OK(hkv_disk_wait(d, t, -1, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    CHECK(page_matches(&b, 2, 1, 1) == 0);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.dropped, 9);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_busy_and_tickets(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 16);
    cfg.max_in_flight = 4;
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    page_buf b;
    page_fill(&b, 1, 0, 1);
    uint64_t t[5];
    for (int i = 0; i < 4; i++)
        CHECK_OK(hkv_disk_write(d, 1, i, 1, 32, b.iov, LAYERS, &t[i]));
    /* completed but not polled still counts: the caller must poll */
    hkv_disk_drain(d);
    /* outstanding tickets have distinct small indexes */
    for (int i = 0; i < 4; i++) {
        CHECK(hkv_disk_ticket_index(t[i]) >= 0 &&
              hkv_disk_ticket_index(t[i]) < hkv_disk_ticket_capacity(d));
        for (int j = 0; j < i; j++)
            CHECK(hkv_disk_ticket_index(t[i]) != hkv_disk_ticket_index(t[j]));
    }
    CHECK_ST(hkv_disk_write(d, 1, 4, 1, 32, b.iov, LAYERS, &t[4]), HKV_EBUSY);
    CHECK_EQ(t[4], 0);
    CHECK_ST(hkv_disk_wait(d, t[0], 0, NULL), HKV_OK);
    CHECK_OK(hkv_disk_write(d, 1, 4, 1, 32, b.iov, LAYERS, &t[4]));
    CHECK_ST(hkv_disk_wait(d, 12345, 0, NULL), HKV_EINVAL);
    CHECK_ST(hkv_disk_wait(d, 0, 0, NULL), HKV_EINVAL);
    hkv_disk_drain(d);
    uint64_t got[8];
    hkv_disk_result res[8];
    CHECK_EQ(hkv_disk_poll(d, got, res, 8), 4);
    for (int i = 0; i < 4; i++) {  /* in completion order: any order here */
        int k = 1;
        while (k < 5 && got[i] != t[k])
            k++;
        CHECK(k < 5);
        t[k] = 0;
        CHECK_EQ(res[i], HKV_DISK_DONE);
    }
    /* wait_any: nothing in flight returns at once; else blocks for one */
    CHECK_EQ(hkv_disk_wait_any(d, -1), 0);
    CHECK_OK(hkv_disk_write(d, 1, 6, 1, 32, b.iov, LAYERS, &t[0]));
    CHECK_EQ(hkv_disk_wait_any(d, -1), 1);
    CHECK_EQ(hkv_disk_wait_any(d, 0), 1);
    CHECK_EQ(hkv_disk_poll(d, got, res, 8), 1);
    CHECK_EQ(got[0], t[0]);
    /* a wait that times out leaves the ticket pending */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_DELAY_US, 50000));
    uint64_t slow;
    CHECK_OK(hkv_disk_write(d, 1, 5, 1, 32, b.iov, LAYERS, &slow));
    CHECK_ST(hkv_disk_wait(d, slow, 1000000, NULL), HKV_EBUSY);
    CHECK_EQ(hkv_disk_wait_any(d, 1000000), 0);  /* times out */
    CHECK_OK(hkv_disk_wait(d, slow, -1, NULL));
    hkv_disk_close(d);
    rm_dir(dir);

    /* bad configurations */
    hkv_disk_config bad = cfg_for("/nonexistent/dir", 4);
    CHECK_ST(hkv_disk_open(&bad, &d), HKV_EINVAL);
    bad = cfg_for(dir, 4);
    bad.capacity_bytes = RECORD_BYTES - 1;
    CHECK_ST(hkv_disk_open(&bad, &d), HKV_EINVAL);
    bad = cfg_for(dir, 4);
    bad.admit_table = 3;
    CHECK_ST(hkv_disk_open(&bad, &d), HKV_EINVAL);
    CHECK(d == NULL);
}

static void test_disk_persist_reopen(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 32);
    cfg.persist = 1;
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    /* a second store on the same file is refused */
    hkv_disk *other = NULL;
    CHECK_ST(hkv_disk_open(&cfg, &other), HKV_EBUSY);
    for (int u = 1; u <= 3; u++)
        for (int p = 0; p < 5; p++)
            CHECK(write_page(d, u, p, fp_of(u, p, 0), HKV_DISK_DONE) == 0);
    CHECK(write_page(d, 1, 2, fp_of(1, 2, 1), HKV_DISK_DONE) == 0);  /* rewritten */
    CHECK_EQ(hkv_disk_drop_user(d, 2, 3), 2);
    CHECK_EQ(hkv_disk_drop_user(d, 3, 0), 5);
    hkv_disk_close(d);

    d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.recovered, 8);
    CHECK_EQ(st.records, 8);
    CHECK_EQ(st.persist, 1);
    for (int p = 0; p < 5; p++) {
        uint64_t fp = fp_of(1, p, p == 2 ? 1 : 0);
        CHECK(read_page(d, 1, p, fp, HKV_DISK_DONE) == 0);
        CHECK_EQ(hkv_disk_contains(d, 2, p, fp_of(2, p, 0)), p < 3);
        CHECK(!hkv_disk_contains(d, 3, p, fp_of(3, p, 0)));
    }
    CHECK(!hkv_disk_contains(d, 1, 2, fp_of(1, 2, 0)));
    /* writes after a reopen get newer sequence numbers than the old ones */
    CHECK(write_page(d, 2, 0, fp_of(2, 0, 5), HKV_DISK_DONE) == 0);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    CHECK(read_page(d, 2, 0, fp_of(2, 0, 5), HKV_DISK_DONE) == 0);
    CHECK(!hkv_disk_contains(d, 2, 0, fp_of(2, 0, 0)));
    hkv_disk_close(d);

    /* without persist the store starts empty */
    cfg.persist = 0;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.records, 0);
    CHECK(!hkv_disk_contains(d, 1, 0, fp_of(1, 0, 0)));
    hkv_disk_close(d);
    rm_dir(dir);
}

/* Torn records, made by hand: the states a power cut in the middle of a
 * record's write can leave.  Recovery must take none of them. */
static void test_disk_persist_torn_records(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    cfg.persist = 1;
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    CHECK(write_page(d, 1, 0, 1, HKV_DISK_DONE) == 0);
    CHECK(write_page(d, 1, 1, 2, HKV_DISK_DONE) == 0);
    CHECK(write_page(d, 1, 2, 3, HKV_DISK_DONE) == 0);
    int64_t off0 = hkv_disk_record_offset(d, 1, 0);
    int64_t off1 = hkv_disk_record_offset(d, 1, 1);
    int64_t off2 = hkv_disk_record_offset(d, 1, 2);
    CHECK(off0 >= 0 && off1 >= 0 && off2 >= 0);
    hkv_disk_close(d);

    char path[4200];
    snprintf(path, sizeof path, "%s/hkv_disk.dat", dir);
    int fd = open(path, O_RDWR);
    CHECK(fd >= 0);
    static unsigned char rec[RECORD_BYTES], junk[RECORD_BYTES];
    memset(junk, 0x5C, sizeof junk);
    /* slot of (1,0): new header, old data (the data blocks did not land) */
    CHECK_EQ(pread(fd, rec, RECORD_BYTES, off0), RECORD_BYTES);
    CHECK_EQ(pwrite(fd, junk, RECORD_BYTES - HKV_DISK_HEADER_BYTES,
                    off0 + HKV_DISK_HEADER_BYTES), RECORD_BYTES - HKV_DISK_HEADER_BYTES);
    /* slot of (1,1): data landed, only half of it */
    CHECK_EQ(pwrite(fd, junk, 4096, off1 + HKV_DISK_HEADER_BYTES + 4096), 4096);
    /* a free slot: the first half of a copy of record (1,2)'s bytes */
    CHECK_EQ(pread(fd, rec, RECORD_BYTES, off2), RECORD_BYTES);
    CHECK_EQ(pwrite(fd, rec, RECORD_BYTES / 2, 7 * RECORD_BYTES), RECORD_BYTES / 2);
    close(fd);

    CHECK_OK(hkv_disk_open(&cfg, &d));
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.recovered, 1);
    CHECK_EQ(st.recovery_skipped, 3);
    CHECK(!hkv_disk_contains(d, 1, 0, 1));
    CHECK(!hkv_disk_contains(d, 1, 1, 2));
    CHECK(read_page(d, 1, 2, 3, HKV_DISK_DONE) == 0);
    CHECK_OK(hkv_disk_check(d));
    /* the torn slots are reusable */
    for (int p = 0; p < 7; p++)
        CHECK(write_page(d, 2, p, 4, HKV_DISK_DONE) == 0);
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.evicted, 0);
    hkv_disk_close(d);
    rm_dir(dir);
}

/* ---- crash consistency: SIGKILL a writer at random points --------------
 *
 * The child writes batches of 4 records of distinct keys (4 users x 6
 * pages), each a new version with content derived from (user, page, fp),
 * and logs "S key fp" before each submit and "D key fp" after its
 * completion to a pipe (write(2) of one small struct is atomic).  The
 * parent kills it after a random delay, reopens the store with persist and
 * checks, for every key: the visible record (if any) reads back intact;
 * its fingerprint is the last completed one or one submitted after it;
 * a key with a completed write is visible. */

typedef struct crash_log {
    uint8_t done;
    uint8_t user, page;
    uint8_t pad;
    uint32_t version;
} crash_log;

#define CRASH_USERS 4
#define CRASH_PAGES 6

static void crash_child(const char *dir, int logfd, uint64_t seed, int torn)
{
    hkv_disk_config cfg = cfg_for(dir, 64);
    cfg.persist = 1;
    hkv_disk *d = NULL;
    if (hkv_disk_open(&cfg, &d) != HKV_OK)
        _exit(3);
    test_rng r = {seed};
    if (torn && hkv_disk_inject(d, HKV_DISK_FAULT_TORN_EXIT, (int32_t)rng_range(&r, 5, 300)) != HKV_OK)
        _exit(7);
    uint32_t version[CRASH_USERS][CRASH_PAGES] = {{0}};
    for (;;) {
        page_buf b[4];
        uint64_t t[4];
        crash_log lg[4];
        int keys[4];
        for (int i = 0; i < 4; i++) {
            int k;
            int again;
            do {
                k = (int)rng_below(&r, CRASH_USERS * CRASH_PAGES);
                again = 0;
                for (int j = 0; j < i; j++)
                    again |= keys[j] == k;
            } while (again);
            keys[i] = k;
            int u = k / CRASH_PAGES, p = k % CRASH_PAGES;
            uint32_t v = ++version[u][p];
            lg[i] = (crash_log){0, (uint8_t)u, (uint8_t)p, 0, v};
            if (write(logfd, &lg[i], sizeof lg[i]) != sizeof lg[i])
                _exit(4);
            page_fill(&b[i], u, p, fp_of(u, p, (int)v));
            if (hkv_disk_write(d, u, p, fp_of(u, p, (int)v), 32, b[i].iov, LAYERS, &t[i]) !=
                HKV_OK)
                _exit(5);
        }
        for (int i = 0; i < 4; i++) {
            hkv_disk_result res;
            if (hkv_disk_wait(d, t[i], -1, &res) != HKV_OK || res != HKV_DISK_DONE)
                _exit(6);
            lg[i].done = 1;
            if (write(logfd, &lg[i], sizeof lg[i]) != sizeof lg[i])
                _exit(4);
        }
    }
}

/* torn = 0: SIGKILL after a random delay; 1: the store itself stops the
 * child in the middle of a record's write (fault TORN_EXIT). */
static int crash_round(uint64_t seed, int torn)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    int fds[2];
    HCHECK_EQ(pipe(fds), 0);
    fflush(stdout);
    pid_t pid = fork();
    HCHECK(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        crash_child(dir, fds[1], seed, torn);
        _exit(0);
    }
    close(fds[1]);
    int status;
    if (torn) {
        HCHECK_EQ(waitpid(pid, &status, 0), pid);
        HCHECK(WIFEXITED(status) && WEXITSTATUS(status) == 86);
    } else {
        test_rng r = {seed * 31 + 1};
        struct timespec ts = {0, (long)rng_range(&r, 20, 250) * 1000000L};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        HCHECK_EQ(waitpid(pid, &status, 0), pid);
        HCHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    }

    /* the log: last completed version, and versions submitted after it */
    uint32_t done_v[CRASH_USERS][CRASH_PAGES] = {{0}};
    uint32_t sub_v[CRASH_USERS][CRASH_PAGES] = {{0}};
    crash_log lg;
    int entries = 0;
    while (read(fds[0], &lg, sizeof lg) == (ssize_t)sizeof lg) {
        HCHECK(lg.user < CRASH_USERS && lg.page < CRASH_PAGES);
        if (lg.done)
            done_v[lg.user][lg.page] = lg.version;
        else
            sub_v[lg.user][lg.page] = lg.version;
        entries++;
    }
    close(fds[0]);

    hkv_disk_config cfg = cfg_for(dir, 64);
    cfg.persist = 1;
    hkv_disk *d = NULL;
    HCHECK_ST(hkv_disk_open(&cfg, &d), HKV_OK);
    HCHECK_ST(hkv_disk_check(d), HKV_OK);
    int visible = 0;
    for (int u = 0; u < CRASH_USERS; u++)
        for (int p = 0; p < CRASH_PAGES; p++) {
            uint64_t fp;
            if (!hkv_disk_find(d, u, p, &fp, NULL, NULL)) {
                HCHECK_EQ(done_v[u][p], 0);  /* completed => durable */
                continue;
            }
            visible++;
            int v = -1;
            for (uint32_t c = done_v[u][p]; c <= sub_v[u][p] && v < 0; c++)
                if (c > 0 && fp_of(u, p, (int)c) == fp)
                    v = (int)c;
            if (v < 0) {
                test_fail(__FILE__, __LINE__, "seed %llu: key (%d,%d) shows a version "
                          "outside [%u, %u]", (unsigned long long)seed, u, p,
                          done_v[u][p], sub_v[u][p]);
                hkv_disk_close(d);
                return 1;
            }
            if (read_page(d, u, p, fp, HKV_DISK_DONE) != 0) {
                hkv_disk_close(d);
                return 1;
            }
        }
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    HCHECK_EQ(st.records, visible);
    HCHECK_EQ(st.checksum_failures, 0);
    hkv_disk_close(d);
    rm_dir(dir);
    HCHECK(entries >= 4);  /* the child got to write before the kill */
    return 0;
}

static void test_disk_crash_consistency(void)
{
    for (uint64_t s = 0; s < 6; s++)
        CHECK(crash_round(hkv_test_seed + s, 0) == 0);
}

/* Crash in the middle of a record's write, with both torn shapes (new
 * header + half the data; half the data under an old header), on the
 * staged (O_DIRECT, odd pieces) and the zero-copy (buffered) paths. */
static void test_disk_crash_torn_writes(void)
{
    for (uint64_t s = 0; s < 8; s++) {
        test_direct = (int)(s & 1);
        int bad = crash_round(hkv_test_seed + 100 + s, 1);
        test_direct = 1;
        CHECK(bad == 0);
    }
}

/* ---- threads ---------------------------------------------------------- */

static _Atomic int writers_left;

typedef struct thread_arg {
    hkv_disk *d;
    int id;
    int iters;
    int failed;
    int reads_ok;
} thread_arg;

static void *writer_main(void *p)
{
    thread_arg *a = p;
    test_rng r = {(uint64_t)a->id * 977 + 1};
    for (int i = 0; i < a->iters; i++) {
        int64_t user = a->id, page = rng_below(&r, 6);
        int version = (int)rng_below(&r, 3);
        page_buf b;
        page_fill(&b, user, page, fp_of(user, page, version));
        hkv_disk_result res;
        if (hkv_disk_write_sync(a->d, user, page, fp_of(user, page, version), 32, b.iov,
                                LAYERS, &res) != HKV_OK ||
            (res != HKV_DISK_DONE && res != HKV_DISK_NO_SPACE && res != HKV_DISK_CANCELLED))
            a->failed = 1;
        if (i % 17 == 16)
            hkv_disk_drop_user(a->d, user, rng_below(&r, 6));
    }
    atomic_fetch_sub(&writers_left, 1);
    return NULL;
}

static void *reader_main(void *p)
{
    thread_arg *a = p;
    test_rng r = {(uint64_t)a->id * 31 + 5};
    /* as long as the writers write, and at least `iters` times */
    for (int i = 0; i < a->iters || atomic_load(&writers_left) > 0; i++) {
        int64_t user = rng_below(&r, 4), page = rng_below(&r, 6);
        uint64_t fp;
        if (!hkv_disk_find(a->d, user, page, &fp, NULL, NULL))
            continue;
        page_buf b;
        page_init(&b);
        hkv_disk_result res;
        if (hkv_disk_read_sync(a->d, user, page, fp, b.iov, LAYERS, &res) != HKV_OK) {
            a->failed = 1;
            continue;
        }
        if (res == HKV_DISK_DONE) {
            page_buf want;
            page_fill(&want, user, page, fp);
            if (memcmp(b.bytes, want.bytes, sizeof b.bytes) != 0)
                a->failed = 2;  /* wrong data: the one unforgivable result */
            a->reads_ok++;
        } else if (res != HKV_DISK_MISS) {
            a->failed = 3;  /* evicted/dropped between find and read: MISS only */
        }
        hkv_disk_count_run(a->d, user, 0, NULL, 6);
    }
    return NULL;
}

static void test_disk_threads_readers_writers(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 12);  /* < 4 x 6 keys: evictions */
    cfg.io_threads = 3;
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    pthread_t th[7];
    thread_arg args[7];
    atomic_store(&writers_left, 4);
    for (int i = 0; i < 7; i++) {
        args[i] = (thread_arg){d, i < 4 ? i : i + 100, 120, 0, 0};
        CHECK_EQ(pthread_create(&th[i], NULL, i < 4 ? writer_main : reader_main, &args[i]), 0);
    }
    int reads = 0;
    for (int i = 0; i < 7; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ(args[i].failed, 0);
        reads += args[i].reads_ok;
    }
    CHECK(reads > 0);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.checksum_failures, 0);
    CHECK_EQ(st.in_flight, 0);
    CHECK(st.evicted > 0);
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_threads_close_with_work_queued(void)
{
    for (int persist = 0; persist <= 1; persist++) {
        char dir[256];
        make_dir(dir, sizeof dir);
        hkv_disk_config cfg = cfg_for(dir, 48);  /* 8 + 30 records: no eviction */
        cfg.persist = persist;
        hkv_disk *d = NULL;
        CHECK_OK(hkv_disk_open(&cfg, &d));
        for (int p = 0; p < 8; p++)
            CHECK(write_page(d, 1, p, 1, HKV_DISK_DONE) == 0);
        CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_DELAY_US, 20000));
        static page_buf b[40];
        for (int i = 0; i < 40; i++) {
            uint64_t t;
            page_fill(&b[i], 2, i, 1);
            if (i % 4 == 0) {
                page_init(&b[i]);
                CHECK_OK(hkv_disk_read(d, 1, i / 4 % 4, 1, b[i].iov, LAYERS, &t));
            } else {
                CHECK_OK(hkv_disk_write(d, 2, i, 1, 32, b[i].iov, LAYERS, &t));
            }
        }
        /* 6 stale slots to wipe at close: more than the 4 wipes in flight */
        CHECK_EQ(hkv_disk_drop_user(d, 1, 2), 6);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        hkv_disk_close(d);  /* cancels what is queued: not 40 x 20 ms / 2 threads */
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
        CHECK(ms < 300);  /* the running I/O and the wipes: about 80-100 ms */
        if (persist) {
            CHECK_OK(hkv_disk_open(&cfg, &d));
            CHECK(hkv_disk_contains(d, 1, 0, 1) && hkv_disk_contains(d, 1, 1, 1));
            for (int p = 2; p < 8; p++)
                CHECK(!hkv_disk_contains(d, 1, p, 1));
            for (int i = 0; i < 40; i++) {
                uint64_t fp;
                if (hkv_disk_find(d, 2, i, &fp, NULL, NULL))
                    CHECK(read_page(d, 2, i, fp, HKV_DISK_DONE) == 0);
            }
            hkv_disk_close(d);
        }
        rm_dir(dir);
    }
}

/* Pieces the kernel takes as they are under O_DIRECT (4 KiB aligned):
 * zero-copy writes and reads, mixed with staged ones on the same keys. */
static void test_disk_zero_copy_aligned(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    cfg.page_bytes = 4 * 4096;
    cfg.capacity_bytes = 8 * (HKV_DISK_HEADER_BYTES + 4 * 4096);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    unsigned char *a = NULL, *b = NULL;
    CHECK(posix_memalign((void **)&a, 4096, 5 * 4096) == 0);
    CHECK(posix_memalign((void **)&b, 4096, 5 * 4096) == 0);
    for (int i = 0; i < 4 * 4096; i++)
        a[i] = (unsigned char)(i * 7 + 3);
    struct iovec wa[4], rb[5];
    for (int k = 0; k < 4; k++)
        wa[k] = (struct iovec){a + k * 4096, 4096};
    for (int k = 0; k < 5; k++)
        rb[k] = (struct iovec){b + k * 4096, 4096};  /* one piece more than needed */
    hkv_disk_result r;
    CHECK_OK(hkv_disk_write_sync(d, 1, 0, 9, 32, wa, 4, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    memset(b, 0xEE, 5 * 4096);
    CHECK_OK(hkv_disk_read_sync(d, 1, 0, 9, rb, 5, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    CHECK(memcmp(a, b, 4 * 4096) == 0);
    CHECK_EQ(b[4 * 4096], 0xEE);  /* past the record: untouched */
    /* staged write (odd pieces), zero-copy read; and the reverse */
    struct iovec odd[2] = {{a, 5000}, {a + 5000, 4 * 4096 - 5000}};
    CHECK_OK(hkv_disk_write_sync(d, 1, 1, 9, 32, odd, 2, &r));
    memset(b, 0, 4 * 4096);
    CHECK_OK(hkv_disk_read_sync(d, 1, 1, 9, rb, 4, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    CHECK(memcmp(a, b, 4 * 4096) == 0);
    struct iovec oddr[2] = {{b + 1, 7000}, {b + 1 + 7000, 4 * 4096 - 7000}};
    memset(b, 0, 5 * 4096);
    CHECK_OK(hkv_disk_read_sync(d, 1, 0, 9, oddr, 2, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    CHECK(memcmp(a, b + 1, 4 * 4096) == 0);
    /* a flipped bit, read zero-copy: a miss, and the pieces are zeroed */
    CHECK(flip_bit(d, hkv_disk_record_offset(d, 1, 0) + HKV_DISK_HEADER_BYTES + 9000, 3) == 0);
    memset(b, 0xEE, 5 * 4096);
    CHECK_OK(hkv_disk_read_sync(d, 1, 0, 9, rb, 5, &r));
    CHECK_EQ(r, HKV_DISK_CORRUPT);
    for (int i = 0; i < 4 * 4096; i++)
        CHECK_EQ(b[i], 0);
    /* faults on the zero-copy path */
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_READ_SHORT, 1));
    CHECK_OK(hkv_disk_read_sync(d, 1, 1, 9, rb, 4, &r));
    CHECK_EQ(r, HKV_DISK_CORRUPT);
    CHECK_OK(hkv_disk_write_sync(d, 1, 2, 9, 32, wa, 4, &r));
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_READ_EIO, 1));
    CHECK_OK(hkv_disk_read_sync(d, 1, 2, 9, rb, 4, &r));
    CHECK_EQ(r, HKV_DISK_IO_ERROR);
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_WRITE_EIO, 1));
    CHECK_OK(hkv_disk_write_sync(d, 1, 3, 9, 32, wa, 4, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    CHECK_OK(hkv_disk_read_sync(d, 1, 3, 9, rb, 4, &r));
    CHECK_EQ(r, HKV_DISK_DONE);
    CHECK(memcmp(a, b, 4 * 4096) == 0);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.checksum_failures, 2);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    free(a);
    free(b);
    rm_dir(dir);
}

/* A filesystem that accepts O_DIRECT at open but refuses the I/O (the
 * probe read fails with EINVAL, forced here through the environment, which
 * also tests the variable's parsing): the store falls back to buffered
 * I/O, says so, and works.  The other faults of the variable apply too. */
static void test_disk_direct_io_fallback(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 8);
    cfg.direct_io = 1;
    setenv("HSTU_KVCACHE_DISK_FAULTS", "direct_einval=1,write_eio=2", 1);
    hkv_disk *d = NULL;
    hkv_status st_open = hkv_disk_open(&cfg, &d);
    unsetenv("HSTU_KVCACHE_DISK_FAULTS");
    CHECK_OK(st_open);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.direct_io, 0);
    CHECK(write_page(d, 1, 0, 5, HKV_DISK_IO_ERROR) == 0);  /* write_eio=2 */
    CHECK(write_page(d, 1, 0, 5, HKV_DISK_DONE) == 0);
    CHECK(read_page(d, 1, 0, 5, HKV_DISK_DONE) == 0);
    hkv_disk_close(d);
    /* a store not asked for O_DIRECT never uses it */
    cfg.direct_io = 0;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.direct_io, 0);  /* not asked for */
    hkv_disk_close(d);
    rm_dir(dir);
}

/*
 * The device-read protocol (hkv_disk_read_device) with a reader on host
 * memory that works like gds.c's: each piece read on its own (pread, as
 * cuFileRead), its CRC computed from 0 apart, and the pieces' CRCs chained
 * onto the header's with hkv_crc32c_combine.  `fail` makes it return that
 * errno instead.
 */
typedef struct host_reader {
    _Atomic int calls;
    int fail;
    hkv_disk *disk;
} host_reader;

static int host_reader_read(void *ctx, int worker, int fd, int64_t off,
                            const struct iovec *pieces, int n, uint32_t crc, uint32_t expect,
                            uint32_t *crc_out)
{
    (void)expect;  /* writes before it knows, as the contract allows */
    host_reader *hr = ctx;
    hr->calls++;
    if (worker < 0 || worker >= hkv_disk_io_threads(hr->disk))
        return EINVAL;  /* the worker index is the reader's to rely on */
    if (hr->fail != 0)
        return hr->fail;
    for (int k = 0; k < n; k++) {
        /* through an aligned bounce over whole blocks (the store's fd may
         * be O_DIRECT; pieces of 3000 bytes start anywhere) */
        size_t len = pieces[k].iov_len, skip = (size_t)(off & 4095);
        size_t span = (skip + len + 4095) & ~(size_t)4095;
        unsigned char *bounce = NULL;
        if (posix_memalign((void **)&bounce, 4096, span) != 0)
            return ENOMEM;
        ssize_t got = pread(fd, bounce, span, off - (int64_t)skip);
        if (got < 0) {
            int err = errno;
            free(bounce);
            return err;
        }
        if ((size_t)got < skip + len) {
            free(bounce);
            return ENODATA;
        }
        memcpy(pieces[k].iov_base, bounce + skip, len);
        free(bounce);
        crc = hkv_crc32c_combine(crc, hkv_crc32c(0, pieces[k].iov_base, len), len);
        off += (int64_t)len;
    }
    *crc_out = crc;
    return 0;
}

static int read_page_device(hkv_disk *d, int64_t user, int64_t page, uint64_t fp,
                            hkv_disk_result want)
{
    page_buf p;
    page_init(&p);
    memset(p.bytes, 0xA5, sizeof p.bytes);
    uint64_t ticket;
    hkv_disk_result r = HKV_DISK_DONE;
    HCHECK_ST(hkv_disk_read_device(d, user, page, fp, p.iov, LAYERS, &ticket), HKV_OK);
    HCHECK_ST(hkv_disk_wait(d, ticket, -1, &r), HKV_OK);
    if (r != want) {
        test_fail(__FILE__, __LINE__, "device read (%lld, %lld): %s, want %s",
                  (long long)user, (long long)page, hkv_disk_result_name(r),
                  hkv_disk_result_name(want));
        return 1;
    }
    return r == HKV_DISK_DONE ? page_matches(&p, user, page, fp) : 0;
}

static void test_disk_crc32c_combine(void)
{
    static unsigned char buf[20000];
    test_rng r = {11};
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)rng_next(&r);
    for (int t = 0; t < 200; t++) {
        size_t len = (size_t)rng_below(&r, sizeof buf);
        size_t cut = len == 0 ? 0 : (size_t)rng_below(&r, (int64_t)len + 1);
        CHECK_EQ(hkv_crc32c_combine(hkv_crc32c(0, buf, cut), hkv_crc32c(0, buf + cut, len - cut),
                                    len - cut),
                 hkv_crc32c(0, buf, len));
    }
    CHECK_EQ(hkv_crc32c_combine(0x12345678u, 0, 0), 0x12345678u);
}

static void test_disk_device_reader(void)
{
    char dir[256];
    make_dir(dir, sizeof dir);
    hkv_disk_config cfg = cfg_for(dir, 16);
    hkv_disk *d = NULL;
    CHECK_OK(hkv_disk_open(&cfg, &d));
    for (int p = 0; p < 6; p++)
        CHECK(write_page(d, 3, p, fp_of(3, p, 0), HKV_DISK_DONE) == 0);
    page_buf b;
    page_init(&b);
    uint64_t ticket;
    /* no reader installed: refused, nothing queued */
    CHECK_ST(hkv_disk_read_device(d, 3, 0, fp_of(3, 0, 0), b.iov, LAYERS, &ticket),
             HKV_ESTATE);
    host_reader hr = {0};
    hr.disk = d;
    hkv_disk_device_reader reader = {host_reader_read, &hr};
    hkv_disk_set_device_reader(d, &reader);
    CHECK(hkv_disk_fd(d) >= 0);
    CHECK(read_page_device(d, 3, 0, fp_of(3, 0, 0), HKV_DISK_DONE) == 0);
    CHECK(read_page_device(d, 3, 1, fp_of(3, 1, 0), HKV_DISK_DONE) == 0);
    CHECK_EQ(hr.calls, 2);
    /* absent key / other fingerprint: a miss without a call */
    CHECK(read_page_device(d, 3, 9, 1, HKV_DISK_MISS) == 0);
    CHECK(read_page_device(d, 3, 0, 12345, HKV_DISK_MISS) == 0);
    CHECK_EQ(hr.calls, 2);
    /* a flipped data bit: the reader's CRC disagrees; a flipped header
     * bit: refused before the reader runs */
    CHECK(flip_bit(d, hkv_disk_record_offset(d, 3, 2) + HKV_DISK_HEADER_BYTES + 777, 3) == 0);
    CHECK(read_page_device(d, 3, 2, fp_of(3, 2, 0), HKV_DISK_CORRUPT) == 0);
    CHECK_EQ(hr.calls, 3);
    CHECK(flip_bit(d, hkv_disk_record_offset(d, 3, 3) + 32, 1) == 0);
    CHECK(read_page_device(d, 3, 3, fp_of(3, 3, 0), HKV_DISK_CORRUPT) == 0);
    CHECK_EQ(hr.calls, 3);
    CHECK(!hkv_disk_contains(d, 3, 2, fp_of(3, 2, 0)));
    CHECK(!hkv_disk_contains(d, 3, 3, fp_of(3, 3, 0)));
    /* the reader's I/O error and short read; an injected header EIO */
    hr.fail = EIO;
    CHECK(read_page_device(d, 3, 4, fp_of(3, 4, 0), HKV_DISK_IO_ERROR) == 0);
    CHECK(write_page(d, 3, 4, fp_of(3, 4, 0), HKV_DISK_DONE) == 0);
    hr.fail = ENODATA;
    CHECK(read_page_device(d, 3, 4, fp_of(3, 4, 0), HKV_DISK_CORRUPT) == 0);
    hr.fail = 0;
    CHECK_OK(hkv_disk_inject(d, HKV_DISK_FAULT_READ_EIO, 1));
    CHECK(read_page_device(d, 3, 5, fp_of(3, 5, 0), HKV_DISK_IO_ERROR) == 0);
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    CHECK_EQ(st.device_reads, 2);
    CHECK_EQ(st.checksum_failures, 3);
    CHECK_EQ(st.io_errors, 2);
    /* host reads still work beside it; removing the reader refuses again */
    CHECK(read_page(d, 3, 0, fp_of(3, 0, 0), HKV_DISK_DONE) == 0);
    hkv_disk_set_device_reader(d, NULL);
    CHECK_ST(hkv_disk_read_device(d, 3, 0, fp_of(3, 0, 0), b.iov, LAYERS, &ticket),
             HKV_ESTATE);
    CHECK_OK(hkv_disk_check(d));
    hkv_disk_close(d);
    rm_dir(dir);
}

static void test_disk_round_trip(void);
static void test_disk_flipped_bits(void);
static void test_disk_truncated_file(void);
static void test_disk_eio_injection(void);
static void test_disk_persist_torn_records(void);

/* Buffered I/O (direct_io = 0): every transfer is zero-copy there. */
static void test_disk_buffered_io(void)
{
    test_direct = 0;
    void (*tests[])(void) = {test_disk_round_trip, test_disk_flipped_bits,
                             test_disk_truncated_file, test_disk_eio_injection,
                             test_disk_persist_torn_records, test_disk_zero_copy_aligned,
                             test_disk_device_reader};
    for (size_t i = 0; i < sizeof tests / sizeof tests[0] && !hkv_test_failed; i++)
        tests[i]();
    test_direct = 1;
}

/* The cache with a disk tier below its host tier (CPU path): a user
 * pushed down to disk comes back disk -> host -> GPU exactly; a record
 * that fails its check makes the allocation stale and reads as a miss. */
static void test_disk_in_the_cache(void)
{
    char dir[4096];
    make_dir(dir, sizeof dir);
    hkv_config cfg = cfg_small(2, 4, 12, 4, 64);
    cfg.host_pages = 12;
    cfg.disk_dir = dir;
    cfg.disk_capacity_bytes = 4 << 20;
    cfg.disk_admit_after = 0;
    hkv_cache *c;
    hkv_batch *b;
    hkv_stats st;
    req r;
    int64_t one = 1, g, h, d;
    CREATE(&cfg, &c);
    req_init(&r);
    req_add(&r, 1, 32);
    CHECK(req_round(c, &r) == 0);
    CHECK_OK(hkv_cache_evict(c, 1, &one, HKV_TIER_GPU, 1, NULL));
    CHECK_OK(hkv_cache_sync_transfers(c));            /* writes done */
    CHECK_OK(hkv_cache_evict(c, 1, &one, HKV_TIER_HOST, 0, NULL));
    hkv_cache_user_tiers(c, 1, &g, &h, &d);
    CHECK_EQ(g, 0);
    CHECK_EQ(h, 0);
    CHECK_EQ(d, 32);
    CHECK_CACHE(c);
    req_init(&r);
    req_add(&r, 1, 36);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 32);
    CHECK_OK(req_allocate(c, &r, &b));                /* reads 8 records */
    CHECK_OK(req_append_all(c, b, &r));
    CHECK(req_check_read(c, b, &r, 0) == 0);
    CHECK(req_check_read(c, b, &r, 1) == 0);
    hkv_batch_free(b);
    CHECK(check_user_default(c, 1, 36) == 0);
    hkv_cache_stats(c, &st);
    CHECK_EQ(st.disk_writes, 8);
    CHECK_EQ(st.disk_reads, 8);
    CHECK_CACHE(c);

    /* corrupt every record: the next read-back is a miss, then a recompute */
    CHECK_OK(hkv_cache_evict(c, 1, &one, HKV_TIER_GPU, 1, NULL));
    CHECK_OK(hkv_cache_sync_transfers(c));
    CHECK_OK(hkv_cache_evict(c, 1, &one, HKV_TIER_HOST, 0, NULL));
    char path[4200];
    snprintf(path, sizeof path, "%s/hkv_disk.dat", dir);
    int fd = open(path, O_WRONLY);
    CHECK(fd >= 0);
    struct stat sb;
    CHECK(fstat(fd, &sb) == 0);
    for (off_t off = 0; off < sb.st_size; off += 1024)
        CHECK(pwrite(fd, "\x5a", 1, off) == 1);
    CHECK(fsync(fd) == 0);
    close(fd);
    req_init(&r);
    req_add(&r, 1, 40);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 36);
    CHECK_ST(req_allocate(c, &r, &b), HKV_ESTALE);
    CHECK_CACHE(c);
    CHECK_OK(req_lookup(c, &r));
    CHECK_EQ(r.cached[0], 0);
    CHECK_OK(req_allocate(c, &r, &b));
    CHECK_OK(req_append_all(c, b, &r));
    hkv_batch_free(b);
    CHECK(check_user_default(c, 1, 40) == 0);
    hkv_cache_stats(c, &st);
    CHECK(st.checksum_failures >= 1);
    CHECK_EQ(st.disk_read_misses, 1);
    CHECK_CACHE(c);
    hkv_cache_destroy(c);
    rm_dir(dir);
}

void run_disk_tests(void)
{
    RUN(test_disk_in_the_cache);
    RUN(test_disk_crc32c);
    RUN(test_disk_crc32c_combine);
    RUN(test_disk_device_reader);
    RUN(test_disk_round_trip);
    RUN(test_disk_rewrite_newest_wins);
    RUN(test_disk_admission);
    RUN(test_disk_flipped_bits);
    RUN(test_disk_record_in_wrong_slot);
    RUN(test_disk_truncated_file);
    RUN(test_disk_wrong_fingerprint);
    RUN(test_disk_eio_injection);
    RUN(test_disk_enospc_injection);
    RUN(test_disk_file_size_limit);
    RUN(test_disk_lru_eviction);
    RUN(test_disk_drop_user);
    RUN(test_disk_busy_and_tickets);
    RUN(test_disk_persist_reopen);
    RUN(test_disk_persist_torn_records);
    RUN(test_disk_crash_consistency);
    RUN(test_disk_crash_torn_writes);
    RUN(test_disk_threads_readers_writers);
    RUN(test_disk_threads_close_with_work_queued);
    RUN(test_disk_zero_copy_aligned);
    RUN(test_disk_direct_io_fallback);
    RUN(test_disk_buffered_io);
}
