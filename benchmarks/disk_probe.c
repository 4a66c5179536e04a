/*
 * disk_probe.c - throughput of the disk store (csrc/disk_tier.c) against
 * the raw file underneath it, and the read-back time of one long user.
 *
 * Build and run from the repository root (C only, no Python, no CUDA):
 *
 *   mkdir -p build && gcc -std=c11 -O2 -Wall -Wextra -Icsrc \
 *       benchmarks/disk_probe.c csrc/disk_tier.c csrc/io_pool.c \
 *       csrc/crc32c.c csrc/status.c -o build/disk_probe -pthread
 *   ./build/disk_probe [--dir=DIR] [--pages=N] [--threads=T] [--depth=Q]
 *                      [--persist-pages=N] [--repeat=R] [--machine=NAME]
 *
 * The page is the standard workload's: 8 layers x K,V x 32 tokens x 4
 * heads x 256 dims x bf16 = 8 pieces of 128 KiB = 1 MiB, handed to the
 * store as 8 iovecs (one per layer, as the host tier holds a page), from
 * a pool of 64 aligned host pages.
 *
 * Measured in one run, on one directory, raw and store passes alternating
 * (best of --repeat, default 3, for each):
 *   raw write    T threads pwrite record-sized (1 MiB + 4 KiB) chunks,
 *                sequentially over a preallocated file, with the flags
 *                the store ended up with (O_DIRECT or not)
 *   store write  N records through hkv_disk_write, Q in flight, polled
 *   raw read     the same chunks back with pread
 *   raw *v       the same, with pwritev/preadv of the store's 9 pieces (a
 *                4 KiB header block + 8 layer pieces of the host pages):
 *                separates the cost of the layout from the store's own
 *   store read   the N records back through hkv_disk_read (CRC checked)
 *   user read    one 4096-token user (128 pages) read back at once:
 *                submit of 128 reads to the last completion (median of 5)
 *   persist      (optional) records with persist=1: fdatasync per record
 * GB/s count page data bytes (1 MiB per page), 1 GB = 1e9 bytes; the raw
 * rows move the same number of record bytes as the store.
 *
 * Output: a table on stdout and benchmarks/results/disk_probe_<machine>.json
 * (machine = --machine or the host name).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "disk_tier.h"

#define LAYERS 8
#define PIECE (2 * 32 * 4 * 256 * 2) /* K,V x tokens x heads x dims x bf16 */
#define PAGE (LAYERS * PIECE)
#define HOST_PAGES 64
#define USER_PAGES 128               /* 4096 tokens / 32 */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void die(const char *what)
{
    fprintf(stderr, "disk_probe: %s: %s\n", what, hkv_last_error()[0] ? hkv_last_error()
                                                                         : strerror(errno));
    exit(1);
}

static unsigned char *host[HOST_PAGES];

static void page_iov(int h, struct iovec *iov)
{
    for (int l = 0; l < LAYERS; l++) {
        iov[l].iov_base = host[h] + (size_t)l * PIECE;
        iov[l].iov_len = PIECE;
    }
}

/* ---- raw file I/O ------------------------------------------------------ */

typedef struct raw_job {
    int fd, write, vec, index, threads;
    int64_t chunks;
    size_t chunk;
    int failed;
} raw_job;

static void *raw_main(void *p)
{
    raw_job *j = p;
    unsigned char *buf;
    if (posix_memalign((void **)&buf, 4096, j->chunk) != 0) {
        j->failed = ENOMEM;
        return NULL;
    }
    memset(buf, 0x3C, j->chunk);
    for (int64_t c = j->index; c < j->chunks; c += j->threads) {
        off_t off = (off_t)c * (off_t)j->chunk;
        ssize_t n;
        if (j->vec) {
            /* the store's layout: a 4 KiB header block + the 8 layer pieces */
            struct iovec iov[LAYERS + 1] = {{buf, 4096}};
            page_iov((int)(c % HOST_PAGES), iov + 1);
            n = j->write ? pwritev(j->fd, iov, LAYERS + 1, off) : preadv(j->fd, iov, LAYERS + 1, off);
        } else {
            n = j->write ? pwrite(j->fd, buf, j->chunk, off) : pread(j->fd, buf, j->chunk, off);
        }
        if (n != (ssize_t)j->chunk) {
            j->failed = n < 0 ? errno : EIO;
            break;
        }
    }
    free(buf);
    return NULL;
}

static double raw_pass(int fd, int write, int vec, int threads, int64_t chunks, size_t chunk)
{
    pthread_t th[64];
    raw_job jobs[64];
    double t0 = now();
    for (int i = 0; i < threads; i++) {
        jobs[i] = (raw_job){fd, write, vec, i, threads, chunks, chunk, 0};
        pthread_create(&th[i], NULL, raw_main, &jobs[i]);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        if (jobs[i].failed) {
            errno = jobs[i].failed;
            die(write ? "raw pwrite" : "raw pread");
        }
    }
    return now() - t0;
}

/* ---- through the store ------------------------------------------------- */

/* Wait for `outstanding` completions; count failures. */
static int64_t reap(hkv_disk *d, int64_t *outstanding, int64_t down_to)
{
    int64_t bad = 0;
    uint64_t t[64];
    hkv_disk_result r[64];
    while (*outstanding > down_to) {
        int n = hkv_disk_poll(d, t, r, 64);
        for (int i = 0; i < n; i++)
            bad += r[i] != HKV_DISK_DONE;
        *outstanding -= n;
        if (n == 0)
            hkv_disk_wait_any(d, -1);  /* a spinning poller steals a small box's CPU */
    }
    return bad;
}

/* Write (or read) pages [0, n) of `users` users of n/users pages each,
 * keeping `depth` in flight.  Returns seconds. */
static double store_pass(hkv_disk *d, int write, int64_t n, int depth, int64_t *failed)
{
    int64_t outstanding = 0;
    *failed = 0;
    double t0 = now();
    for (int64_t k = 0; k < n; k++) {
        int64_t user = k / USER_PAGES, page = k % USER_PAGES;
        struct iovec iov[LAYERS];
        page_iov((int)(k % HOST_PAGES), iov);
        if (outstanding >= depth)
            *failed += reap(d, &outstanding, depth - 1);
        uint64_t ticket;
        hkv_status st = write ? hkv_disk_write(d, user, page, (uint64_t)k, 32, iov, LAYERS, &ticket)
                              : hkv_disk_read(d, user, page, (uint64_t)k, iov, LAYERS, &ticket);
        if (st != HKV_OK)
            die(write ? "hkv_disk_write" : "hkv_disk_read");
        outstanding++;
    }
    *failed += reap(d, &outstanding, 0);
    return now() - t0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static const char *fs_name(const char *dir)
{
    struct statfs sf;
    if (statfs(dir, &sf) != 0)
        return "unknown";
    switch ((unsigned long)sf.f_type) {
    case 0xEF53: return "ext4";
    case 0x58465342: return "xfs";
    case 0x9123683E: return "btrfs";
    case 0x01021994: return "tmpfs";
    case 0x794C7630: return "overlayfs";
    case 0x2FC12FC1: return "zfs";
    }
    return "other";
}

static void cpu_model(char *out, size_t n)
{
    snprintf(out, n, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f == NULL)
        return;
    char line[512];
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "model name", 10) == 0) {
            char *c = strchr(line, ':');
            if (c != NULL) {
                c += 2;
                c[strcspn(c, "\n")] = '\0';
                snprintf(out, n, "%s", c);
            }
            break;
        }
    fclose(f);
}

int main(int argc, char **argv)
{
    const char *dir = "benchmarks/results/.disk_probe_tmp";
    char machine[256] = "";
    int64_t pages = 1024;
    int threads = 2, depth = 32, repeat = 3;
    int64_t persist_pages = 128;
    for (int i = 1; i < argc; i++) {
        if (strncmp(argv[i], "--dir=", 6) == 0)
            dir = argv[i] + 6;
        else if (strncmp(argv[i], "--pages=", 8) == 0)
            pages = atoll(argv[i] + 8);
        else if (strncmp(argv[i], "--threads=", 10) == 0)
            threads = atoi(argv[i] + 10);
        else if (strncmp(argv[i], "--depth=", 8) == 0)
            depth = atoi(argv[i] + 8);
        else if (strncmp(argv[i], "--persist-pages=", 16) == 0)
            persist_pages = atoll(argv[i] + 16);
        else if (strncmp(argv[i], "--repeat=", 9) == 0)
            repeat = atoi(argv[i] + 9);
        else if (strncmp(argv[i], "--machine=", 10) == 0)
            snprintf(machine, sizeof machine, "%s", argv[i] + 10);
        else {
            fprintf(stderr, "usage: %s [--dir=DIR] [--pages=N] [--threads=T] [--depth=Q] "
                    "[--persist-pages=N] [--repeat=R] [--machine=NAME]\n", argv[0]);
            return 2;
        }
    }
    if (pages < USER_PAGES || repeat < 1 || threads < 1 || threads > 64 || depth < 1 || depth > 1024) {
        fprintf(stderr, "disk_probe: need pages >= %d, 1 <= threads <= 64, 1 <= depth <= 1024\n",
                USER_PAGES);
        return 2;
    }
    struct utsname un;
    uname(&un);
    if (machine[0] == '\0')
        snprintf(machine, sizeof machine, "%s", un.nodename);
    mkdir(dir, 0755);

    for (int h = 0; h < HOST_PAGES; h++) {
        if (posix_memalign((void **)&host[h], 4096, PAGE) != 0)
            die("host pages");
        uint64_t x = 0x9e3779b97f4a7c15ull * (uint64_t)(h + 1);
        for (size_t i = 0; i < PAGE; i += 8) {
            x ^= x << 13, x ^= x >> 7, x ^= x << 17;
            memcpy(host[h] + i, &x, 8);
        }
    }

    hkv_disk_config cfg;
    hkv_disk_config_default(&cfg);
    cfg.dir = dir;
    cfg.page_bytes = PAGE;
    /* room for a second version of every page in flight: rewrites never evict */
    cfg.capacity_bytes = (uint64_t)(pages + depth + 8) * (PAGE + HKV_DISK_HEADER_BYTES);
    cfg.admit_after = 0;
    cfg.io_threads = threads;
    cfg.max_in_flight = depth > USER_PAGES ? depth : USER_PAGES;
    hkv_disk *d = NULL;
    if (hkv_disk_open(&cfg, &d) != HKV_OK)
        die("hkv_disk_open");
    hkv_disk_stats st;
    hkv_disk_get_stats(d, &st);
    size_t chunk = st.record_bytes;

    /* the raw file: same directory, same flags, same size */
    char raw_path[4200];
    snprintf(raw_path, sizeof raw_path, "%s/raw_probe.dat", dir);
    int rfd = open(raw_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | (st.direct_io ? O_DIRECT : 0),
                   0644);
    if (rfd < 0)
        die("open raw file");
    if (posix_fallocate(rfd, 0, (off_t)(chunk * (size_t)pages)) != 0 &&
        ftruncate(rfd, (off_t)(chunk * (size_t)pages)) != 0)
        die("size raw file");

    /* Alternating passes, best of `repeat` each: a virtual disk's
     * throughput drifts (host caches flushing), and alternation keeps the
     * raw and store figures from landing on different phases of it. */
    double data = (double)pages * PAGE;
    int64_t wfail = 0, rfail = 0, fail;
    double t_raw_w = 1e30, t_store_w = 1e30, t_raw_r = 1e30, t_store_r = 1e30, t;
    double t_vec_w = 1e30, t_vec_r = 1e30;
    for (int rep = 0; rep < repeat; rep++) {
        t = raw_pass(rfd, 1, 0, threads, pages, chunk);
        t_raw_w = t < t_raw_w ? t : t_raw_w;
        t = raw_pass(rfd, 1, 1, threads, pages, chunk);
        t_vec_w = t < t_vec_w ? t : t_vec_w;
        t = store_pass(d, 1, pages, depth, &fail);
        t_store_w = t < t_store_w ? t : t_store_w;
        wfail += fail;
    }
    for (int rep = 0; rep < repeat; rep++) {
        t = raw_pass(rfd, 0, 0, threads, pages, chunk);
        t_raw_r = t < t_raw_r ? t : t_raw_r;
        t = raw_pass(rfd, 0, 1, threads, pages, chunk);
        t_vec_r = t < t_vec_r ? t : t_vec_r;
        t = store_pass(d, 0, pages, depth, &fail);
        t_store_r = t < t_store_r ? t : t_store_r;
        rfail += fail;
    }
    if (wfail || rfail) {
        fprintf(stderr, "disk_probe: %lld writes and %lld reads failed\n", (long long)wfail,
                (long long)rfail);
        return 1;
    }

    /* one 4096-token user: user 1's 128 pages, all submitted at once */
    double user_ms[5];
    int64_t run = 0;
    double t_lookup = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = now();
        run = hkv_disk_count_run(d, 1, 0, NULL, USER_PAGES);
        double t1 = now();
        t_lookup = t1 - t0;
        if (run != USER_PAGES)
            die("user 1 is not on disk");
        uint64_t tk[USER_PAGES];
        for (int p = 0; p < USER_PAGES; p++) {
            struct iovec iov[LAYERS];
            page_iov(p % HOST_PAGES, iov);
            if (hkv_disk_read(d, 1, p, (uint64_t)(USER_PAGES + p), iov, LAYERS, &tk[p]) != HKV_OK)
                die("hkv_disk_read");
        }
        int64_t outstanding = USER_PAGES;
        if (reap(d, &outstanding, 0) != 0)
            die("user read-back");
        user_ms[rep] = (now() - t1) * 1e3;
    }
    qsort(user_ms, 5, sizeof user_ms[0], cmp_double);
    hkv_disk_get_stats(d, &st);
    hkv_disk_close(d);
    close(rfd);
    unlink(raw_path);

    /* persist: fdatasync after every record (the durability price) */
    double t_persist = 0, t_raw_sync = 0;
    if (persist_pages > 0) {
        cfg.persist = 1;
        cfg.capacity_bytes = (uint64_t)(persist_pages + 8) * chunk;
        char pfile[4200];
        snprintf(pfile, sizeof pfile, "%s/hkv_disk.dat", dir);
        unlink(pfile);
        if (hkv_disk_open(&cfg, &d) != HKV_OK)
            die("hkv_disk_open (persist)");
        t_persist = store_pass(d, 1, persist_pages, depth, &wfail);
        hkv_disk_close(d);
        unlink(pfile);
        /* raw with the same price: pwrite + fdatasync per chunk, T threads */
        rfd = open(raw_path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC | (st.direct_io ? O_DIRECT : 0),
                   0644);
        if (rfd < 0 || posix_fallocate(rfd, 0, (off_t)(chunk * (size_t)persist_pages)) != 0)
            die("raw persist file");
        unsigned char *buf;
        if (posix_memalign((void **)&buf, 4096, chunk) != 0)
            die("buffer");
        memset(buf, 1, chunk);
        double t0 = now();
        for (int64_t c = 0; c < persist_pages; c++)
            if (pwrite(rfd, buf, chunk, (off_t)(c * (int64_t)chunk)) != (ssize_t)chunk ||
                fdatasync(rfd) != 0)
                die("raw pwrite+fdatasync");
        t_raw_sync = now() - t0;
        free(buf);
        close(rfd);
        unlink(raw_path);
    }
    char pfile[4200];
    snprintf(pfile, sizeof pfile, "%s/hkv_disk.dat", dir);
    unlink(pfile);
    rmdir(dir);

    double gb = 1e9;
    printf("disk_probe on %s (%s, %s, O_DIRECT %s, CRC-32C %s), %lld pages of %d KiB as %d "
           "iovecs, %d I/O threads, %d in flight\n\n",
           machine, fs_name("."), un.release, st.direct_io ? "on" : "off",
           hkv_crc32c_hw() ? "SSE4.2" : "software", (long long)pages, PAGE / 1024, LAYERS,
           threads, depth);
    printf("%-34s %10s %10s %8s %8s\n", "path", "seconds", "GB/s", "of raw", "of raw v");
    printf("%-34s %10.3f %10.3f %8s\n", "raw write (same flags, T threads)", t_raw_w,
           data / t_raw_w / gb, "");
    printf("%-34s %10.3f %10.3f %8s\n", "raw pwritev, the store's 9 pieces", t_vec_w,
           data / t_vec_w / gb, "");
    printf("%-34s %10.3f %10.3f %7.0f%% %7.0f%%\n", "store write", t_store_w,
           data / t_store_w / gb, 100.0 * t_raw_w / t_store_w, 100.0 * t_vec_w / t_store_w);
    printf("%-34s %10.3f %10.3f %8s\n", "raw read (same flags, T threads)", t_raw_r,
           data / t_raw_r / gb, "");
    printf("%-34s %10.3f %10.3f %8s\n", "raw preadv, the store's 9 pieces", t_vec_r,
           data / t_vec_r / gb, "");
    printf("%-34s %10.3f %10.3f %7.0f%% %7.0f%%\n", "store read (verified)", t_store_r,
           data / t_store_r / gb, 100.0 * t_raw_r / t_store_r, 100.0 * t_vec_r / t_store_r);
    if (persist_pages > 0) {
        double pdata = (double)persist_pages * PAGE;
        printf("%-34s %10.3f %10.3f %8s\n", "raw write + fdatasync each, 1 thr", t_raw_sync,
               pdata / t_raw_sync / gb, "");
        printf("%-34s %10.3f %10.3f %7.0f%%\n", "store write, persist=1", t_persist,
               pdata / t_persist / gb, 100.0 * t_raw_sync / t_persist);
    }
    printf("\n4096-token user (128 pages, 128 MiB) read back: median %.1f ms, min %.1f, max "
           "%.1f (%.2f GB/s); count_run lookup %.1f us\n",
           user_ms[2], user_ms[0], user_ms[4], USER_PAGES * (double)PAGE / (user_ms[2] * 1e-3) / gb,
           t_lookup * 1e6);

    char cpu[256];
    cpu_model(cpu, sizeof cpu);
    char out[4400];
    mkdir("benchmarks/results", 0755);
    snprintf(out, sizeof out, "benchmarks/results/disk_probe_%s.json", machine);
    FILE *f = fopen(out, "w");
    if (f == NULL)
        die(out);
    char date[64];
    time_t tt = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&tt));
    fprintf(f, "{\n  \"benchmark\": \"disk_probe\",\n  \"date\": \"%s\",\n  \"command\": \"", date);
    for (int i = 0; i < argc; i++)
        fprintf(f, "%s%s", i ? " " : "", argv[i]);
    fprintf(f, "\",\n  \"machine\": {\"hostname\": \"%s\", \"kernel\": \"%s\", \"cpu\": \"%s\", "
            "\"cpu_count\": %ld, \"filesystem\": \"%s\", \"direct_io\": %s, "
            "\"crc32c\": \"%s\"},\n",
            un.nodename, un.release, cpu, sysconf(_SC_NPROCESSORS_ONLN), fs_name("."),
            st.direct_io ? "true" : "false", hkv_crc32c_hw() ? "sse4.2" : "software");
    fprintf(f, "  \"workload\": {\"page_data_bytes\": %d, \"record_bytes\": %zu, \"iovecs_per_page\": "
            "%d, \"pages\": %lld, \"io_threads\": %d, \"in_flight\": %d, \"persist_pages\": %lld, "
            "\"repeat_best_of\": %d},\n",
            PAGE, chunk, LAYERS, (long long)pages, threads, depth, (long long)persist_pages, repeat);
    fprintf(f, "  \"results\": {\n");
    fprintf(f, "    \"raw_write_gbps\": %.4f,\n    \"store_write_gbps\": %.4f,\n", data / t_raw_w / gb,
            data / t_store_w / gb);
    fprintf(f, "    \"raw_read_gbps\": %.4f,\n    \"store_read_gbps\": %.4f,\n", data / t_raw_r / gb,
            data / t_store_r / gb);
    fprintf(f, "    \"raw_pwritev_9_pieces_gbps\": %.4f,\n    \"raw_preadv_9_pieces_gbps\": %.4f,\n",
            data / t_vec_w / gb, data / t_vec_r / gb);
    fprintf(f, "    \"store_write_of_raw\": %.3f,\n    \"store_read_of_raw\": %.3f,\n",
            t_raw_w / t_store_w, t_raw_r / t_store_r);
    fprintf(f, "    \"store_write_of_raw_9_pieces\": %.3f,\n    \"store_read_of_raw_9_pieces\": %.3f,\n",
            t_vec_w / t_store_w, t_vec_r / t_store_r);
    if (persist_pages > 0)
        fprintf(f, "    \"raw_write_fdatasync_each_gbps\": %.4f,\n    \"store_write_persist_gbps\": %.4f,\n",
                (double)persist_pages * PAGE / t_raw_sync / gb,
                (double)persist_pages * PAGE / t_persist / gb);
    fprintf(f, "    \"user_4096_tokens_read_ms\": {\"median\": %.3f, \"min\": %.3f, \"max\": %.3f},\n",
            user_ms[2], user_ms[0], user_ms[4]);
    fprintf(f, "    \"count_run_us\": %.3f,\n", t_lookup * 1e6);
    fprintf(f, "    \"store_stats\": {\"records\": %lld, \"checksum_failures\": %llu, \"io_errors\": %llu, "
            "\"bytes_written\": %llu, \"bytes_read\": %llu}\n  }\n}\n",
            (long long)st.records, (unsigned long long)st.checksum_failures,
            (unsigned long long)st.io_errors, (unsigned long long)st.bytes_written,
            (unsigned long long)st.bytes_read);
    fclose(f);
    printf("wrote %s\n", out);
    return 0;
}
