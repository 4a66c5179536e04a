/*
 * disk_tier.h - the disk tier: a checksummed store of page records in one
 * preallocated file, below the host tier.
 *
 * A record is one page of one user: key (user_id, page_index), the
 * caller's chained fingerprint of the page, its token count, and the
 * page's bytes of all layers.  Records live in fixed-size slots of one
 * file (record_bytes = a 4 KiB header block + the page bytes rounded up to
 * 4 KiB, so the data is aligned for O_DIRECT).  The file format and the
 * durability argument are in docs/disk-tier-design.md.
 *
 * What the store promises:
 *
 *   - A miss is always better than wrong data.  A record is visible to
 *     lookups only once its data and CRC-32C are written (and, with
 *     persist, fdatasync'ed).  Every read checks magic, key, fingerprint,
 *     sequence number, length and CRC; any mismatch, a short read or an
 *     I/O error completes as a miss (a result code, never HKV_OK data),
 *     drops the record and bumps a counter.
 *   - The caller's thread never waits for the disk.  Writes and reads are
 *     queued to I/O threads; completions are collected without blocking
 *     by hkv_disk_poll (or waited for, by ticket, in tests and tools).
 *     A submit that finds every in-flight slot taken fails at once with
 *     HKV_EBUSY (nothing queued; the caller still owns its buffers).
 *   - A full store evicts its least recently used records; ENOSPC, EFBIG
 *     or EIO on a write evicts one older record and retries once in its
 *     slot, else gives that page up (result code); nothing crashes.
 *
 * Threads: every function may be called from any thread.  One mutex
 * guards the index; the I/O threads do pread/pwrite without it.
 *
 * Integration (see the design notes): the host tier offers a full page it
 * evicts with hkv_disk_write, passing the page's per-layer pieces as
 * iovecs and keeping the host page pinned until hkv_disk_poll returns its
 * ticket; lookup extends a user's cached prefix by hkv_disk_count_run;
 * onboarding reads records into free host pages with hkv_disk_read.
 */
#ifndef HKV_DISK_TIER_H
#define HKV_DISK_TIER_H

#include <stdint.h>
#include <sys/uio.h>

#include "status.h"

#define HKV_DISK_HEADER_BYTES 4096  /* header block in front of each record */

typedef struct hkv_disk hkv_disk;

typedef struct hkv_disk_config {
    const char *dir;          /* existing directory; the store is dir/hkv_disk.dat */
    uint64_t capacity_bytes;  /* file size cap; slots = capacity / record_bytes    */
    uint64_t page_bytes;      /* largest data length of one record                 */
    int32_t admit_after;      /* offers of a user (hkv_disk_offer) before its pages
                                 are admitted; 0 admits every write               */
    int32_t admit_table;      /* users the admission filter remembers (power of 2) */
    int32_t io_threads;       /* I/O threads                                       */
    int32_t max_in_flight;    /* writes + reads submitted and not yet polled       */
    int32_t max_iov;          /* most iovecs of one write or read (<= 1000)        */
    int persist;              /* 1: keep and re-index the file across opens, and
                                 fdatasync each record before it is visible;
                                 0: start empty, no fdatasync                      */
    int direct_io;            /* 1: try O_DIRECT (fall back to buffered I/O)       */
} hkv_disk_config;

/* Defaults: admit_after 2, admit_table 4096, io_threads 2,
 * max_in_flight 64, max_iov 256, persist 0, direct_io 1; dir, capacity and
 * page_bytes are left 0 for the caller. */
void hkv_disk_config_default(hkv_disk_config *cfg);

/* How a queued write or read ended.  Everything but HKV_DISK_DONE means
 * "nothing was stored" (write) or "treat as a miss" (read). */
typedef enum hkv_disk_result {
    HKV_DISK_DONE = 0,         /* written and visible / read and verified     */
    HKV_DISK_MISS = 1,         /* read: no such record, or another fingerprint */
    HKV_DISK_CORRUPT = 2,      /* read: bad CRC, header or short read; dropped */
    HKV_DISK_IO_ERROR = 3,     /* the system call failed (after a retry)       */
    HKV_DISK_NOT_ADMITTED = 4, /* write: the user was not offered often enough */
    HKV_DISK_NO_SPACE = 5,     /* write: no slot could be freed, or ENOSPC/EFBIG
                                  after the retry                              */
    HKV_DISK_CANCELLED = 6     /* the store closed, or the user's pages were
                                  dropped, before the write became visible    */
} hkv_disk_result;

const char *hkv_disk_result_name(hkv_disk_result r);

typedef struct hkv_disk_stats {
    int64_t records;            /* visible records                           */
    int64_t slots;              /* record slots in the file                  */
    int64_t in_flight;          /* submitted and not yet polled              */
    uint64_t record_bytes;      /* slot size (header block + data)           */
    uint64_t bytes_used;        /* records * record_bytes                    */
    uint64_t capacity_bytes;    /* slots * record_bytes                      */
    uint64_t writes_queued, writes_done, writes_failed;
    uint64_t reads_queued, reads_done, reads_failed;  /* failed: any miss    */
    uint64_t checksum_failures; /* records dropped by a failed check         */
    uint64_t io_errors;         /* failed pread / pwrite / fdatasync calls   */
    uint64_t not_admitted;
    uint64_t evicted;           /* records dropped to make room              */
    uint64_t dropped;           /* records dropped by hkv_disk_drop_user     */
    uint64_t bytes_written, bytes_read;  /* record bytes moved by the store  */
    uint64_t device_reads;      /* reads verified through the device reader  */
    uint64_t recovered;         /* records re-indexed at open (persist)      */
    uint64_t recovery_skipped;  /* written slots rejected at open            */
    int direct_io;              /* 1 if the file is open with O_DIRECT       */
    int preallocated;           /* 1 if posix_fallocate reserved the blocks  */
    int persist;
    int crc_hw;                 /* 1 if CRC-32C runs on the CPU instruction  */
} hkv_disk_stats;

/* Open (create) the store.  HKV_EBUSY if another store has the file open
 * (it is flock'ed); HKV_EINVAL for a bad configuration or an unusable
 * directory. */
hkv_status hkv_disk_open(const hkv_disk_config *cfg, hkv_disk **out);

/* Cancel what is still queued (its completions are dropped: the caller's
 * buffers are no longer referenced once this returns), wait for the I/O
 * running now, join the threads, close the file.  NULL is a no-op. */
void hkv_disk_close(hkv_disk *d);

/* Admission: note one sighting of the user (the cache calls it once per
 * request of the user, or once per eviction round of its pages, not once
 * per page).  Returns the user's offer count so far (saturating).  A user
 * is admitted once the count reaches admit_after, and stays admitted
 * while it has records on disk.  The table is small and lossy: a
 * collision forgets a user, which only delays its admission. */
int32_t hkv_disk_offer(hkv_disk *d, int64_t user_id);

/*
 * Queue the write of one record whose data is gathered from iov[0..iovcnt)
 * (total at most page_bytes).  The bytes must stay alive and unchanged
 * until the ticket completes (the iovec array itself is copied).  A
 * record of the same key becomes the visible one when the write
 * completes (the newest submitted wins).  A user not admitted completes
 * at once with HKV_DISK_NOT_ADMITTED.  Returns HKV_EBUSY (nothing queued)
 * when max_in_flight tickets are outstanding, HKV_EINVAL for bad sizes.
 */
hkv_status hkv_disk_write(hkv_disk *d, int64_t user_id, int64_t page_index,
                          uint64_t fingerprint, uint32_t token_count,
                          const struct iovec *iov, int iovcnt, uint64_t *ticket);

/*
 * Queue the read of record (user_id, page_index) with this fingerprint
 * into iov[0..iovcnt) (total at least the record's data length).  Pieces
 * the kernel can take as they are (4 KiB aligned address and length under
 * O_DIRECT; any with buffered I/O) are read into directly and checked
 * there; others through a staging buffer.  Either way the caller sees
 * verified data only: after a miss its bytes are untouched or zeroed.  A record
 * absent at submit completes at once with HKV_DISK_MISS.  HKV_EBUSY as
 * for writes.
 */
hkv_status hkv_disk_read(hkv_disk *d, int64_t user_id, int64_t page_index,
                         uint64_t fingerprint, const struct iovec *iov, int iovcnt,
                         uint64_t *ticket);

/*
 * Reads into memory the store's threads cannot address, GPU pages for
 * GPUDirect Storage (gds.c).  The store reads and checks the header block
 * itself, then hands the data to `read`: the n pieces lie back to back
 * in the file from offset `off`; it sets *crc_out to the CRC-32C of all of
 * them continuing from `crc` (crc32c.h's convention) and, if that equals
 * `expect`, puts their bytes at pieces[k].iov_base (a reader may also write
 * them there before it knows).  It returns 0, ENODATA for a short read
 * (the record is truncated), or another errno value (an I/O error).
 * Called on the I/O threads, several at a time; `worker` is the calling
 * thread's index (0 .. hkv_disk_io_threads - 1), so per-thread state of
 * the reader needs no lock.
 */
typedef struct hkv_disk_device_reader {
    int (*read)(void *ctx, int worker, int fd, int64_t off, const struct iovec *pieces,
                int n, uint32_t crc, uint32_t expect, uint32_t *crc_out);
    void *ctx;
} hkv_disk_device_reader;

/* Install (or, with NULL, remove) the device reader.  Only while no device
 * read is in flight (hkv_disk_drain first).  The reader is copied. */
void hkv_disk_set_device_reader(hkv_disk *d, const hkv_disk_device_reader *reader);

/* The store's file descriptor (to register it with cuFile).  It stays open
 * until hkv_disk_close. */
int hkv_disk_fd(const hkv_disk *d);
/* Its I/O threads (as many reads can run at once). */
int hkv_disk_io_threads(const hkv_disk *d);

/*
 * hkv_disk_read through the device reader: the same checks, the same
 * results, but the iov bases are device addresses the store never
 * touches itself.  After anything but HKV_DISK_DONE the destination bytes
 * are unspecified (partly written, unverified): the caller must not use
 * them.  HKV_ESTATE if no device reader is installed.
 */
hkv_status hkv_disk_read_device(hkv_disk *d, int64_t user_id, int64_t page_index,
                                uint64_t fingerprint, const struct iovec *iov,
                                int iovcnt, uint64_t *ticket);

/* Take up to `max` completions, oldest first, never blocking.  Returns how
 * many were written to tickets[] / results[] (results may be NULL).  Each
 * ticket completes exactly once, through poll or through wait. */
int hkv_disk_poll(hkv_disk *d, uint64_t *tickets, hkv_disk_result *results, int max);

/* A small index of an outstanding ticket, unique among the outstanding
 * ones and below hkv_disk_ticket_capacity(d): the cache keeps what a
 * ticket pins (the host page of a write, the target of a read) in a flat
 * array indexed by it, instead of a map. */
int32_t hkv_disk_ticket_index(uint64_t ticket);
int32_t hkv_disk_ticket_capacity(const hkv_disk *d);

/* Block until a completion is ready to poll, or timeout_ns passes (< 0:
 * forever).  Returns how many are ready (0: timeout, or nothing is in
 * flight).  For a thread of the cache's that has nothing else to do
 * (an onboarding worker); the inference thread polls. */
int hkv_disk_wait_any(hkv_disk *d, int64_t timeout_ns);

/* Wait up to timeout_ns (< 0: forever) for one ticket and take its
 * completion.  HKV_EBUSY on timeout (the ticket stays pending),
 * HKV_EINVAL for a ticket that is not outstanding. */
hkv_status hkv_disk_wait(hkv_disk *d, uint64_t ticket, int64_t timeout_ns,
                         hkv_disk_result *result);

/* Wait until nothing is queued or running (completions stay to be polled). */
void hkv_disk_drain(hkv_disk *d);

/* Synchronous conveniences for tests and tools: submit, then wait. */
hkv_status hkv_disk_write_sync(hkv_disk *d, int64_t user_id, int64_t page_index,
                               uint64_t fingerprint, uint32_t token_count,
                               const struct iovec *iov, int iovcnt, hkv_disk_result *result);
hkv_status hkv_disk_read_sync(hkv_disk *d, int64_t user_id, int64_t page_index,
                              uint64_t fingerprint, const struct iovec *iov, int iovcnt,
                              hkv_disk_result *result);

/* 1 if a visible record of this key has this fingerprint.  A hit can still
 * read as a miss later (eviction, a failed check): onboarding must treat
 * the read's result as the truth. */
int hkv_disk_contains(hkv_disk *d, int64_t user_id, int64_t page_index, uint64_t fingerprint);

/* The visible record of a key: 1 and its fingerprint, token count and
 * data length (any pointer may be NULL), or 0. */
int hkv_disk_find(hkv_disk *d, int64_t user_id, int64_t page_index, uint64_t *fingerprint,
                  uint32_t *token_count, uint64_t *data_len);

/* How many consecutive pages from_page, from_page+1, ... the user has on
 * disk (at most max_pages); with fingerprints != NULL page from_page+i
 * must also have fingerprints[i].  Touches them in the LRU order. */
int64_t hkv_disk_count_run(hkv_disk *d, int64_t user_id, int64_t from_page,
                           const uint64_t *fingerprints, int64_t max_pages);

/* Drop the user's records with page_index >= from_page (0: all of them):
 * a rewritten history, or the cache dropping the user.  Writes of those
 * pages still in flight complete as HKV_DISK_CANCELLED; reads in flight
 * finish with the data they verified.  Returns the records dropped. */
int64_t hkv_disk_drop_user(hkv_disk *d, int64_t user_id, int64_t from_page);

void hkv_disk_get_stats(hkv_disk *d, hkv_disk_stats *out);

/* Consistency check of the index, LRU list, user chains and free list
 * (tests): HKV_ESTATE with a message on the first broken invariant. */
hkv_status hkv_disk_check(hkv_disk *d);

/*
 * Fault injection (tests): the next `count` system calls of that kind
 * fail as if the kernel said so, on the I/O threads.  The environment
 * variable HSTU_KVCACHE_DISK_FAULTS ("write_eio=2,read_short=1,...", the
 * names below without the prefix, lower case) sets them at open.
 * DELAY_US is not a count: every I/O first sleeps that many microseconds.
 * TORN_EXIT = n: the n-th write from now puts down only part of its
 * record (odd seq: the header block and the first half of the data; even:
 * the second half of the data) and then ends the process with _exit(86),
 * which is what a power cut in the middle of the write leaves behind.
 * DIRECT_EINVAL (environment only, it acts in hkv_disk_open): the O_DIRECT
 * probe read fails as on a filesystem that takes the flag but not the I/O.
 */
typedef enum hkv_disk_fault {
    HKV_DISK_FAULT_WRITE_EIO = 0,
    HKV_DISK_FAULT_WRITE_ENOSPC,
    HKV_DISK_FAULT_READ_EIO,
    HKV_DISK_FAULT_READ_SHORT,
    HKV_DISK_FAULT_DELAY_US,
    HKV_DISK_FAULT_TORN_EXIT,
    HKV_DISK_FAULT_DIRECT_EINVAL,
    HKV_DISK_NUM_FAULTS
} hkv_disk_fault;

hkv_status hkv_disk_inject(hkv_disk *d, hkv_disk_fault fault, int32_t count);

/* The store's file (for tests that corrupt it). */
const char *hkv_disk_path(const hkv_disk *d);
/* Byte offset of the slot holding the visible record of a key, or -1. */
int64_t hkv_disk_record_offset(hkv_disk *d, int64_t user_id, int64_t page_index);

#endif /* HKV_DISK_TIER_H */
