/*
 * disk_tier.c - the disk store: slots in one preallocated file, an
 * in-memory index, admission, LRU eviction, verified reads, recovery.
 *
 * Record layout (one slot, record_bytes long, at slot * record_bytes):
 *
 *     [0, 64)        struct rec_header (little-endian, see below)
 *     [64, 4096)     zero
 *     [4096, 4096 + data_len)   the page's bytes, layer after layer
 *     [.., record_bytes)        zero padding to a 4 KiB multiple
 *
 * The CRC-32C covers the 64 header bytes (with the crc field zero) and
 * then the data_len data bytes.  Header and data go to disk in ONE
 * pwritev (header block + the caller's pieces when the kernel can take
 * them as they are, else one pwrite from an aligned staging buffer the
 * pieces were gathered into); with persist an fdatasync follows, and only after it returns is the record put in the index.  A
 * crash can therefore leave a slot torn (some blocks old, some new), but
 * a torn slot fails its CRC, and recovery treats it as free: the state
 * after a crash is the old one for that key, or the new one, never a mix.
 *
 * Slots a record leaves while its bytes are still a valid record on disk
 * (superseded by a newer write of the key, dropped, failed a check) would
 * come back at the next open, so with persist they are STALE until an
 * internal "wipe" I/O zeroed their header block; a write may reuse a
 * stale slot at once (its own header overwrites the old one).
 *
 * Locking: d->lock guards everything below it in struct hkv_disk.  The
 * I/O threads take it only to pick up an op's parameters and to publish
 * its result; pread/pwrite/fdatasync and the CRC run without it.  A slot
 * being read is pinned (readers > 0) so it is never rewritten under a
 * reader; a slot being written is WRITING and in no list.
 */
#define _GNU_SOURCE  /* O_DIRECT */
#include "disk_tier.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "io_pool.h"

#define REC_MAGIC 0x44564B48u  /* "HKVD" read as little-endian bytes */
#define REC_VERSION 1
#define ALIGN 4096
#define FILE_NAME "hkv_disk.dat"
#define NUM_WIPE_OPS 4         /* internal header wipes in flight at most */

/* The on-disk header.  Fixed-width fields, no padding (static assert). */
struct rec_header {
    uint32_t magic;
    uint16_t version;
    uint16_t header_size;      /* sizeof(struct rec_header)               */
    uint32_t crc;              /* CRC-32C of header (crc = 0) + data      */
    uint32_t token_count;
    int64_t user_id;
    int64_t page_index;
    uint64_t fingerprint;
    uint64_t data_len;
    uint64_t seq;              /* store-wide write sequence: newest wins  */
    uint64_t record_bytes;     /* geometry: a slot of another store size
                                  is never taken for a record             */
};
_Static_assert(sizeof(struct rec_header) == 64, "record header must be 64 bytes");

/* Slot states.  DEAD: left the index while reads were in flight on it;
 * the last reader retires it. */
enum { SLOT_FREE, SLOT_WRITING, SLOT_VALID, SLOT_STALE, SLOT_WIPING, SLOT_DEAD };
enum { OP_FREE, OP_QUEUED, OP_RUNNING, OP_DONE };
enum { OP_WRITE, OP_READ, OP_WIPE };

typedef struct slot {
    int64_t user, page;
    uint64_t fingerprint, seq, data_len;
    uint32_t tokens;
    uint8_t state;
    uint8_t ondisk;            /* its bytes may be a valid record (a write
                                  started there, or recovery found one);
                                  only such slots need a wipe             */
    int32_t readers;           /* reads in flight on this slot            */
    int32_t lru_prev, lru_next;   /* VALID: LRU list (head = newest)      */
    int32_t u_prev, u_next;       /* VALID: the user's chain              */
    int32_t next;              /* FREE / STALE stack link                 */
} slot;

typedef struct op {
    uint64_t ticket;
    uint8_t kind, state;
    uint8_t cancelled;         /* write dropped by drop_user before done  */
    uint8_t waited;            /* a hkv_disk_wait owns its completion     */
    uint8_t device;            /* read: iov holds device addresses        */
    hkv_disk_result result;
    int32_t slot;
    int64_t user, page;
    uint64_t fingerprint, seq, data_len;
    uint32_t tokens;
    int iovcnt;
    struct iovec *iov;         /* [max_iov], copy of the caller's array   */
    int32_t next;              /* free stack / done list link             */
} op;

/* Open-addressing hash (a, b) -> int32, linear probing, backward-shift
 * deletion (no tombstones, so probes stay short under churn). */
typedef struct keymap {
    int64_t *a, *b;
    int32_t *val;              /* -1: empty                               */
    uint32_t mask;
} keymap;

typedef struct admit_entry {
    int64_t user;
    int32_t count;             /* 0: empty                                */
} admit_entry;

struct hkv_disk {
    hkv_disk_config cfg;
    char path[4096];
    int fd;
    int direct;
    int preallocated;
    uint64_t record_bytes;
    int32_t num_slots;
    int num_workers;
    unsigned char **staging;   /* [io_threads] aligned record buffers      */
    struct iovec *wiov;        /* [io_threads][max_iov + 1] scratch        */
    unsigned char *zero_block; /* aligned ALIGN zero bytes (wipes)         */
    hkv_io_pool *pool;
    hkv_disk_device_reader dev;  /* reads into GPU memory (gds.c), or none */

    _Atomic int32_t faults[HKV_DISK_NUM_FAULTS];

    pthread_mutex_t lock;
    pthread_cond_t done_cv;    /* an op completed                          */
    slot *slots;
    int32_t free_top, stale_top;
    int32_t lru_head, lru_tail;
    keymap index;              /* (user, page) -> slot, VALID only         */
    keymap users;              /* (user, 0) -> first slot of its chain     */
    admit_entry *admit;
    uint32_t admit_mask;
    op *ops;                   /* [max_in_flight + NUM_WIPE_OPS]           */
    int32_t num_ops;
    int32_t op_free;
    int32_t done_head, done_tail;
    int32_t caller_ops;        /* outstanding caller tickets               */
    int32_t wipes;             /* wipe ops in flight                       */
    int32_t running;           /* ops QUEUED or RUNNING                    */
    uint64_t next_seq;
    uint64_t ticket_gen;
    int closing;
    hkv_disk_stats st;
};

static const int32_t NIL = -1;

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint32_t key_hash(int64_t a, int64_t b)
{
    return (uint32_t)mix64((uint64_t)a * 0x9e3779b97f4a7c15ULL + (uint64_t)b);
}

static hkv_status km_init(keymap *m, int64_t entries)
{
    uint64_t cap = 16;
    while (cap < (uint64_t)entries * 2)
        cap <<= 1;
    m->a = malloc(cap * sizeof *m->a);
    m->b = malloc(cap * sizeof *m->b);
    m->val = malloc(cap * sizeof *m->val);
    m->mask = (uint32_t)(cap - 1);
    if (m->a == NULL || m->b == NULL || m->val == NULL)
        return hkv_error(HKV_ENOMEM, "cannot allocate the disk index");
    for (uint64_t i = 0; i < cap; i++)
        m->val[i] = NIL;
    return HKV_OK;
}

static void km_free(keymap *m)
{
    free(m->a);
    free(m->b);
    free(m->val);
}

static int32_t km_get(const keymap *m, int64_t a, int64_t b)
{
    for (uint32_t i = key_hash(a, b) & m->mask;; i = (i + 1) & m->mask) {
        if (m->val[i] == NIL)
            return NIL;
        if (m->a[i] == a && m->b[i] == b)
            return m->val[i];
    }
}

static void km_put(keymap *m, int64_t a, int64_t b, int32_t v)
{
    uint32_t i = key_hash(a, b) & m->mask;
    while (m->val[i] != NIL && !(m->a[i] == a && m->b[i] == b))
        i = (i + 1) & m->mask;
    m->a[i] = a;
    m->b[i] = b;
    m->val[i] = v;
}

static void km_del(keymap *m, int64_t a, int64_t b)
{
    uint32_t i = key_hash(a, b) & m->mask;
    while (m->val[i] != NIL && !(m->a[i] == a && m->b[i] == b))
        i = (i + 1) & m->mask;
    if (m->val[i] == NIL)
        return;
    /* Backward shift: move later members of the probe run into the hole
     * when their home position does not lie (cyclically) in (hole, j]. */
    uint32_t hole = i;
    for (uint32_t j = (i + 1) & m->mask; m->val[j] != NIL; j = (j + 1) & m->mask) {
        uint32_t home = key_hash(m->a[j], m->b[j]) & m->mask;
        if (((j - home) & m->mask) >= ((j - hole) & m->mask)) {
            m->a[hole] = m->a[j];
            m->b[hole] = m->b[j];
            m->val[hole] = m->val[j];
            hole = j;
        }
    }
    m->val[hole] = NIL;
}

static int32_t fault_take(hkv_disk *d, hkv_disk_fault f)
{
    int32_t n = atomic_load(&d->faults[f]);
    while (n > 0)
        if (atomic_compare_exchange_weak(&d->faults[f], &n, n - 1))
            return 1;
    return 0;
}

/* 1 for the call that counts the fault down from 1 to 0. */
static int fault_countdown(hkv_disk *d, hkv_disk_fault f)
{
    int32_t n = atomic_load(&d->faults[f]);
    while (n > 0)
        if (atomic_compare_exchange_weak(&d->faults[f], &n, n - 1))
            return n == 1;
    return 0;
}

static void fault_delay(hkv_disk *d)
{
    int32_t us = atomic_load(&d->faults[HKV_DISK_FAULT_DELAY_US]);
    if (us > 0) {
        struct timespec ts = {us / 1000000, (long)(us % 1000000) * 1000};
        nanosleep(&ts, NULL);
    }
}

static off_t slot_offset(const hkv_disk *d, int32_t s)
{
    return (off_t)((uint64_t)s * d->record_bytes);
}

/* pwrite all n bytes (a short write is continued); 0 or an errno. */
static int write_full(int fd, const unsigned char *buf, size_t n, off_t off)
{
    while (n > 0) {
        ssize_t w = pwrite(fd, buf, n, off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (w == 0)
            return EIO;
        buf += w;
        n -= (size_t)w;
        off += w;
    }
    return 0;
}

/* pwritev / preadv all the bytes of iov[0..cnt), continuing after a short
 * transfer (iov is consumed).  0, an errno, or for a read that hit the
 * end of the file ENODATA. */
static int rw_full(int fd, int write, struct iovec *iov, int cnt, off_t off)
{
    while (cnt > 0) {
        ssize_t r = write ? pwritev(fd, iov, cnt, off) : preadv(fd, iov, cnt, off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (r == 0)
            return write ? EIO : ENODATA;
        off += r;
        while (cnt > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (unsigned char *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

/* Can the caller's pieces go to the kernel as they are (no staging copy)?
 * Always with buffered I/O; with O_DIRECT only when every piece is 4 KiB
 * aligned in address and length (pinned host pages of the standard
 * geometry are: 128 KiB per layer). */
static int iov_zero_copy(const hkv_disk *d, const struct iovec *iov, int n)
{
    if (!d->direct)
        return 1;
    for (int k = 0; k < n; k++)
        if (((uintptr_t)iov[k].iov_base | iov[k].iov_len) & (ALIGN - 1))
            return 0;
    return 1;
}

/* CRC of header (crc = 0) + the data in pieces. */
static uint32_t record_crc_iov(const struct rec_header *h, const struct iovec *iov, int n)
{
    struct rec_header z = *h;
    z.crc = 0;
    uint32_t c = hkv_crc32c(0, &z, sizeof z);
    for (int k = 0; k < n; k++)
        c = hkv_crc32c(c, iov[k].iov_base, iov[k].iov_len);
    return c;
}

/* pread up to n bytes: the count read (< n at end of file), or -errno. */
static ssize_t read_full(int fd, unsigned char *buf, size_t n, off_t off)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, off + (off_t)got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

static uint32_t record_crc(const struct rec_header *h, const unsigned char *data)
{
    struct rec_header z = *h;
    z.crc = 0;
    uint32_t c = hkv_crc32c(0, &z, sizeof z);
    return hkv_crc32c(c, data, (size_t)h->data_len);
}

/* Header sanity without the data (recovery reads the data only if this
 * passes). */
static int header_plausible(const hkv_disk *d, const struct rec_header *h)
{
    return h->magic == REC_MAGIC && h->version == REC_VERSION &&
           h->header_size == sizeof *h && h->record_bytes == d->record_bytes &&
           h->data_len <= d->record_bytes - HKV_DISK_HEADER_BYTES && h->seq != 0;
}

/* ------------------------------------------------------------------ */
/* slot lists (lock held)                                              */

static void lru_unlink(hkv_disk *d, int32_t s)
{
    slot *x = &d->slots[s];
    if (x->lru_prev != NIL)
        d->slots[x->lru_prev].lru_next = x->lru_next;
    else
        d->lru_head = x->lru_next;
    if (x->lru_next != NIL)
        d->slots[x->lru_next].lru_prev = x->lru_prev;
    else
        d->lru_tail = x->lru_prev;
    x->lru_prev = x->lru_next = NIL;
}

static void lru_push_head(hkv_disk *d, int32_t s)
{
    slot *x = &d->slots[s];
    x->lru_prev = NIL;
    x->lru_next = d->lru_head;
    if (d->lru_head != NIL)
        d->slots[d->lru_head].lru_prev = s;
    else
        d->lru_tail = s;
    d->lru_head = s;
}

static void lru_touch(hkv_disk *d, int32_t s)
{
    if (d->lru_head != s) {
        lru_unlink(d, s);
        lru_push_head(d, s);
    }
}

static void user_link(hkv_disk *d, int32_t s)
{
    slot *x = &d->slots[s];
    int32_t head = km_get(&d->users, x->user, 0);
    x->u_prev = NIL;
    x->u_next = head;
    if (head != NIL)
        d->slots[head].u_prev = s;
    km_put(&d->users, x->user, 0, s);
}

static void user_unlink(hkv_disk *d, int32_t s)
{
    slot *x = &d->slots[s];
    if (x->u_prev != NIL)
        d->slots[x->u_prev].u_next = x->u_next;
    else if (x->u_next != NIL)
        km_put(&d->users, x->user, 0, x->u_next);
    else
        km_del(&d->users, x->user, 0);
    if (x->u_next != NIL)
        d->slots[x->u_next].u_prev = x->u_prev;
    x->u_prev = x->u_next = NIL;
}

static void push_free(hkv_disk *d, int32_t s)
{
    d->slots[s].state = SLOT_FREE;
    d->slots[s].next = d->free_top;
    d->free_top = s;
}

static void kick_wipes(hkv_disk *d);

/* A slot that leaves service: wiped first if persist and its bytes may be
 * a valid record, else freed.  A slot still read is only marked; the last
 * reader retires it. */
static void retire_slot(hkv_disk *d, int32_t s)
{
    slot *x = &d->slots[s];
    if (x->readers > 0) {
        x->state = SLOT_DEAD;  /* in no list until the readers are out */
        return;
    }
    if (!d->cfg.persist || !x->ondisk) {
        push_free(d, s);
        return;
    }
    x->state = SLOT_STALE;
    x->next = d->stale_top;
    d->stale_top = s;
    kick_wipes(d);
}

/* Take a VALID record out of the index, LRU and user chain. */
static void unindex(hkv_disk *d, int32_t s)
{
    slot *x = &d->slots[s];
    km_del(&d->index, x->user, x->page);
    lru_unlink(d, s);
    user_unlink(d, s);
    d->st.records--;
    d->st.bytes_used -= d->record_bytes;
}

static void index_slot(hkv_disk *d, int32_t s)
{
    slot *x = &d->slots[s];
    x->state = SLOT_VALID;
    km_put(&d->index, x->user, x->page, s);
    lru_push_head(d, s);
    user_link(d, s);
    d->st.records++;
    d->st.bytes_used += d->record_bytes;
}

/* Evict the least recently used record nobody reads; its slot, or NIL. */
static int32_t evict_lru(hkv_disk *d)
{
    int32_t s = d->lru_tail;
    while (s != NIL && d->slots[s].readers > 0)
        s = d->slots[s].lru_prev;
    if (s == NIL)
        return NIL;
    unindex(d, s);
    d->st.evicted++;
    d->slots[s].state = SLOT_WRITING;
    return s;
}

/* A slot for a new record: a free one, a stale one (its header is about
 * to be overwritten), else the least recently used record nobody reads.
 * NIL if every slot is being written, wiped or read. */
static int32_t take_slot(hkv_disk *d)
{
    int32_t s = d->free_top;
    if (s != NIL) {
        d->free_top = d->slots[s].next;
    } else if ((s = d->stale_top) != NIL) {
        d->stale_top = d->slots[s].next;
    } else {
        return evict_lru(d);
    }
    d->slots[s].state = SLOT_WRITING;
    return s;
}

/* ------------------------------------------------------------------ */
/* ops and completions (lock held)                                     */

static int32_t op_alloc(hkv_disk *d)
{
    int32_t i = d->op_free;
    if (i == NIL)
        return NIL;
    op *o = &d->ops[i];
    d->op_free = o->next;
    o->next = NIL;
    o->ticket = (++d->ticket_gen << 20) | (uint64_t)i;
    o->cancelled = o->waited = 0;
    o->result = HKV_DISK_DONE;
    o->slot = NIL;
    o->iovcnt = 0;
    return i;
}

static void op_release(hkv_disk *d, int32_t i)
{
    op *o = &d->ops[i];
    o->state = OP_FREE;
    o->ticket = 0;
    o->next = d->op_free;
    d->op_free = i;
}

/* Put a caller op on the done list (its ticket is now pollable). */
static void op_complete(hkv_disk *d, int32_t i, hkv_disk_result r)
{
    op *o = &d->ops[i];
    o->result = r;
    o->state = OP_DONE;
    o->next = NIL;
    if (d->done_tail != NIL)
        d->ops[d->done_tail].next = i;
    else
        d->done_head = i;
    d->done_tail = i;
    if (o->kind == OP_WRITE) {
        if (r == HKV_DISK_DONE)
            d->st.writes_done++;
        else
            d->st.writes_failed++;
    } else {
        if (r == HKV_DISK_DONE)
            d->st.reads_done++;
        else
            d->st.reads_failed++;
    }
    pthread_cond_broadcast(&d->done_cv);
}

static void kick_wipes(hkv_disk *d)
{
    while (d->stale_top != NIL && d->wipes < NUM_WIPE_OPS) {
        int32_t i = op_alloc(d);
        if (i == NIL)
            return;
        int32_t s = d->stale_top;
        d->stale_top = d->slots[s].next;
        d->slots[s].state = SLOT_WIPING;
        op *o = &d->ops[i];
        o->kind = OP_WIPE;
        o->slot = s;
        o->state = OP_QUEUED;
        if (hkv_io_pool_submit(d->pool, o) != HKV_OK) {
            /* cannot happen (the ring holds every op); stay correct anyway */
            d->slots[s].state = SLOT_STALE;
            d->slots[s].next = d->stale_top;
            d->stale_top = s;
            op_release(d, i);
            return;
        }
        d->wipes++;
        d->running++;
    }
}

/* A slot a reader let go of: retire it if it left the index meanwhile. */
static void reader_done(hkv_disk *d, int32_t s)
{
    slot *x = &d->slots[s];
    if (--x->readers == 0 && x->state == SLOT_DEAD)
        retire_slot(d, s);
}

/* ------------------------------------------------------------------ */
/* the I/O threads                                                     */

/* Test fault TORN_EXIT: part of the record, then the process ends. */
static void torn_exit(hkv_disk *d, op *o, unsigned char *buf, int zero_copy, size_t bytes)
{
    if (zero_copy) {  /* gather into the staging buffer (it holds a record) */
        size_t at = HKV_DISK_HEADER_BYTES;
        for (int k = 0; k < o->iovcnt; k++) {
            memcpy(buf + at, o->iov[k].iov_base, o->iov[k].iov_len);
            at += o->iov[k].iov_len;
        }
    }
    off_t off = slot_offset(d, o->slot);
    size_t half = ((bytes - HKV_DISK_HEADER_BYTES) / 2) & ~(size_t)(ALIGN - 1);
    if (o->seq & 1)
        (void)write_full(d->fd, buf, HKV_DISK_HEADER_BYTES + half, off);
    else
        (void)write_full(d->fd, buf + HKV_DISK_HEADER_BYTES + half,
                         bytes - HKV_DISK_HEADER_BYTES - half,
                         off + (off_t)(HKV_DISK_HEADER_BYTES + half));
    _exit(86);
}

static hkv_disk_result io_write(hkv_disk *d, op *o, unsigned char *buf, struct iovec *wiov)
{
    struct rec_header h = {0};
    h.magic = REC_MAGIC;
    h.version = REC_VERSION;
    h.header_size = sizeof h;
    h.token_count = o->tokens;
    h.user_id = o->user;
    h.page_index = o->page;
    h.fingerprint = o->fingerprint;
    h.data_len = o->data_len;
    h.seq = o->seq;
    h.record_bytes = d->record_bytes;
    /* Zero-copy: the header block from the staging buffer, the data from
     * the caller's pieces, one pwritev.  Otherwise the gather: header
     * block, data, zero padding in one aligned buffer (O_DIRECT needs
     * aligned memory and lengths; the caller's pieces need not be). */
    int zero_copy = iov_zero_copy(d, o->iov, o->iovcnt);
    size_t bytes;
    if (zero_copy) {
        h.crc = record_crc_iov(&h, o->iov, o->iovcnt);
        bytes = HKV_DISK_HEADER_BYTES + (size_t)o->data_len;
    } else {
        unsigned char *data = buf + HKV_DISK_HEADER_BYTES;
        size_t at = 0;
        for (int k = 0; k < o->iovcnt; k++) {
            memcpy(data + at, o->iov[k].iov_base, o->iov[k].iov_len);
            at += o->iov[k].iov_len;
        }
        memset(data + at, 0, d->record_bytes - HKV_DISK_HEADER_BYTES - at);
        h.crc = record_crc(&h, data);
        bytes = d->record_bytes;
    }
    memset(buf, 0, HKV_DISK_HEADER_BYTES);
    memcpy(buf, &h, sizeof h);

    for (int attempt = 0;; attempt++) {
        fault_delay(d);
        int err = 0;
        if (fault_countdown(d, HKV_DISK_FAULT_TORN_EXIT))
            torn_exit(d, o, buf, zero_copy, bytes);
        if (fault_take(d, HKV_DISK_FAULT_WRITE_EIO))
            err = EIO;
        else if (fault_take(d, HKV_DISK_FAULT_WRITE_ENOSPC))
            err = ENOSPC;
        else if (!zero_copy)
            err = write_full(d->fd, buf, bytes, slot_offset(d, o->slot));
        else {
            wiov[0].iov_base = buf;
            wiov[0].iov_len = HKV_DISK_HEADER_BYTES;
            memcpy(wiov + 1, o->iov, (size_t)o->iovcnt * sizeof *wiov);
            err = rw_full(d->fd, 1, wiov, o->iovcnt + 1, slot_offset(d, o->slot));
        }
        if (err == 0 && d->cfg.persist && fdatasync(d->fd) != 0)
            err = errno;
        if (err == 0) {
            pthread_mutex_lock(&d->lock);
            d->st.bytes_written += bytes;
            return HKV_DISK_DONE;  /* with the lock held */
        }
        /* Failed: the slot may hold a torn or even a whole record (the
         * pwrite went through and fdatasync failed): never index it,
         * retire it (wiped with persist).  Then, once, evict the oldest
         * record and try its slot: a full disk (ENOSPC, or EFBIG under a
         * file-size limit) has room where an old record was, and an EIO
         * may be a bad block of this slot only. */
        pthread_mutex_lock(&d->lock);
        d->st.io_errors++;
        int32_t failed = o->slot;
        o->slot = NIL;
        int full = err == ENOSPC || err == EFBIG || err == EDQUOT;
        int32_t next = NIL;
        if (attempt == 0 && !o->cancelled) {
            /* a full disk has room only where a record was; an unused slot
             * of a sparse file may be just as full */
            next = full ? evict_lru(d) : NIL;
            if (next == NIL)
                next = take_slot(d);
        }
        retire_slot(d, failed);
        if (next == NIL) {
            return full ? HKV_DISK_NO_SPACE : HKV_DISK_IO_ERROR;
        }
        o->slot = next;
        d->slots[next].ondisk = 1;
        pthread_mutex_unlock(&d->lock);
    }
}

/* Check a record's header against what the index expects. */
static int header_matches(const hkv_disk *d, const struct rec_header *h, const op *o)
{
    return header_plausible(d, h) && h->user_id == o->user && h->page_index == o->page &&
           h->fingerprint == o->fingerprint && h->seq == o->seq &&
           h->data_len == o->data_len && h->token_count == o->tokens;
}

/* Trim the op's pieces to its data length, into `pieces`; their count. */
static int trim_pieces(const op *o, struct iovec *pieces)
{
    int n = 0;
    size_t left = (size_t)o->data_len;
    for (int k = 0; k < o->iovcnt && left > 0; k++, n++) {
        pieces[n] = o->iov[k];
        if (pieces[n].iov_len > left)
            pieces[n].iov_len = left;
        left -= pieces[n].iov_len;
    }
    return n;
}

/* A read through the device reader: the header block into the staging
 * buffer and checked here, the data by the reader, which also returns its
 * CRC (continued from the header's) for the check. */
static hkv_disk_result io_read_device(hkv_disk *d, op *o, int worker, unsigned char *buf,
                                      struct iovec *wiov, int *bad_check)
{
    ssize_t got;
    if (fault_take(d, HKV_DISK_FAULT_READ_EIO))
        got = -EIO;
    else if (fault_take(d, HKV_DISK_FAULT_READ_SHORT))
        got = HKV_DISK_HEADER_BYTES / 2;
    else
        got = read_full(d->fd, buf, HKV_DISK_HEADER_BYTES, slot_offset(d, o->slot));
    if (got < 0)
        return HKV_DISK_IO_ERROR;
    *bad_check = 1;
    struct rec_header h;
    memcpy(&h, buf, sizeof h);
    if (got < HKV_DISK_HEADER_BYTES || !header_matches(d, &h, o))
        return HKV_DISK_CORRUPT;
    struct rec_header z = h;
    z.crc = 0;
    uint32_t crc = 0;
    int n = trim_pieces(o, wiov);
    int err = d->dev.read(d->dev.ctx, worker, d->fd,
                          slot_offset(d, o->slot) + HKV_DISK_HEADER_BYTES, wiov, n,
                          hkv_crc32c(0, &z, sizeof z), h.crc, &crc);
    if (err != 0 && err != ENODATA) {
        *bad_check = 0;
        return HKV_DISK_IO_ERROR;
    }
    if (err == ENODATA || crc != h.crc)
        return HKV_DISK_CORRUPT;
    *bad_check = 0;
    return HKV_DISK_DONE;
}

static hkv_disk_result io_read(hkv_disk *d, op *o, int worker, unsigned char *buf,
                               struct iovec *wiov, int *bad_check)
{
    fault_delay(d);
    *bad_check = 0;
    if (o->device)
        return io_read_device(d, o, worker, buf, wiov, bad_check);
    int zero_copy = iov_zero_copy(d, o->iov, o->iovcnt) &&
                    (!d->direct || (o->data_len & (ALIGN - 1)) == 0);
    if (zero_copy) {
        /* Straight into the caller's pieces (trimmed to the data length):
         * no copy, one CRC pass over the caller's memory.  On a failed
         * check those bytes are zeroed again, so a miss never leaves
         * unverified data behind. */
        struct iovec *pieces = wiov + d->cfg.max_iov + 1;  /* kept: rw_full eats wiov */
        int n = trim_pieces(o, pieces);
        wiov[0].iov_base = buf;
        wiov[0].iov_len = HKV_DISK_HEADER_BYTES;
        memcpy(wiov + 1, pieces, (size_t)n * sizeof *wiov);
        int err;
        if (fault_take(d, HKV_DISK_FAULT_READ_EIO))
            err = EIO;
        else if (fault_take(d, HKV_DISK_FAULT_READ_SHORT))
            err = ENODATA;
        else
            err = rw_full(d->fd, 0, wiov, n + 1, slot_offset(d, o->slot));
        if (err != 0 && err != ENODATA)
            return HKV_DISK_IO_ERROR;
        *bad_check = 1;
        struct rec_header h;
        memcpy(&h, buf, sizeof h);
        if (err == ENODATA || !header_matches(d, &h, o) ||
            record_crc_iov(&h, pieces, n) != h.crc) {
            for (int k = 0; k < n; k++)
                memset(pieces[k].iov_base, 0, pieces[k].iov_len);
            return HKV_DISK_CORRUPT;
        }
        *bad_check = 0;
        return HKV_DISK_DONE;
    }
    /* Whole 4 KiB blocks only (O_DIRECT): header block plus the data
     * rounded up, into the staging buffer. */
    size_t want = HKV_DISK_HEADER_BYTES + (((size_t)o->data_len + ALIGN - 1) & ~(size_t)(ALIGN - 1));
    ssize_t got;
    if (fault_take(d, HKV_DISK_FAULT_READ_EIO))
        got = -EIO;
    else if (fault_take(d, HKV_DISK_FAULT_READ_SHORT))
        got = (ssize_t)want / 2;
    else
        got = read_full(d->fd, buf, want, slot_offset(d, o->slot));
    if (got < 0)
        return HKV_DISK_IO_ERROR;
    *bad_check = 1;
    if ((size_t)got < want)
        return HKV_DISK_CORRUPT;  /* truncated file */
    struct rec_header h;
    memcpy(&h, buf, sizeof h);
    unsigned char *data = buf + HKV_DISK_HEADER_BYTES;
    if (!header_matches(d, &h, o) || record_crc(&h, data) != h.crc)
        return HKV_DISK_CORRUPT;
    /* verified: only now does any byte reach the caller */
    size_t at = 0;
    for (int k = 0; k < o->iovcnt && at < o->data_len; k++) {
        size_t n = o->iov[k].iov_len;
        if (n > o->data_len - at)
            n = (size_t)o->data_len - at;
        memcpy(o->iov[k].iov_base, data + at, n);
        at += n;
    }
    *bad_check = 0;
    return HKV_DISK_DONE;
}

static void io_wipe(hkv_disk *d, op *o)
{
    fault_delay(d);
    int err = write_full(d->fd, d->zero_block, ALIGN, slot_offset(d, o->slot));
    if (err == 0 && fdatasync(d->fd) != 0)
        err = errno;
    pthread_mutex_lock(&d->lock);
    if (err != 0)
        d->st.io_errors++;  /* the slot is reused anyway; its next write
                               overwrites the header */
    else
        d->slots[o->slot].ondisk = 0;
    push_free(d, o->slot);
    d->wipes--;
    d->running--;
    op_release(d, (int32_t)(o - d->ops));
    kick_wipes(d);
    pthread_cond_broadcast(&d->done_cv);
    pthread_mutex_unlock(&d->lock);
}

static void io_run(void *ctx, void *job, int worker)
{
    hkv_disk *d = ctx;
    op *o = job;
    int32_t i = (int32_t)(o - d->ops);
    unsigned char *buf = d->staging[worker];
    struct iovec *wiov = d->wiov + (size_t)worker * 2 * ((size_t)d->cfg.max_iov + 1);

    pthread_mutex_lock(&d->lock);
    o->state = OP_RUNNING;
    int cancelled = o->cancelled;
    if (o->kind == OP_WRITE && !cancelled)
        d->slots[o->slot].ondisk = 1;  /* from now on the slot may hold it */
    pthread_mutex_unlock(&d->lock);

    if (o->kind == OP_WIPE) {
        io_wipe(d, o);
        return;
    }
    if (o->kind == OP_WRITE) {
        hkv_disk_result r;
        if (cancelled) {
            pthread_mutex_lock(&d->lock);
            r = HKV_DISK_CANCELLED;
        } else {
            r = io_write(d, o, buf, wiov);  /* returns with the lock held */
        }
        if (r == HKV_DISK_DONE && o->cancelled)
            r = HKV_DISK_CANCELLED;
        if (r == HKV_DISK_DONE) {
            int32_t old = km_get(&d->index, o->user, o->page);
            if (old != NIL && d->slots[old].seq > o->seq) {
                retire_slot(d, o->slot);  /* a newer write of the key won */
            } else {
                if (old != NIL) {
                    unindex(d, old);
                    retire_slot(d, old);
                }
                slot *x = &d->slots[o->slot];
                x->user = o->user;
                x->page = o->page;
                x->fingerprint = o->fingerprint;
                x->seq = o->seq;
                x->data_len = o->data_len;
                x->tokens = o->tokens;
                index_slot(d, o->slot);
            }
        } else if (o->slot != NIL) {
            retire_slot(d, o->slot);
        }
        o->slot = NIL;
        d->running--;
        op_complete(d, i, r);
        pthread_mutex_unlock(&d->lock);
        return;
    }
    /* read */
    int bad_check = 0;
    hkv_disk_result r = cancelled ? HKV_DISK_CANCELLED : io_read(d, o, worker, buf, wiov, &bad_check);
    pthread_mutex_lock(&d->lock);
    if (r == HKV_DISK_CANCELLED) {
        /* closing: no I/O, the record stays */
    } else if (r == HKV_DISK_DONE) {
        d->st.bytes_read += HKV_DISK_HEADER_BYTES + o->data_len;
        d->st.device_reads += o->device;
    } else {
        if (bad_check)
            d->st.checksum_failures++;
        else
            d->st.io_errors++;
        /* Drop the record: unless it already left the index, or the index
         * now holds a newer record of the key in another slot. */
        slot *x = &d->slots[o->slot];
        if (x->state == SLOT_VALID && x->seq == o->seq &&
            km_get(&d->index, o->user, o->page) == o->slot) {
            unindex(d, o->slot);
            retire_slot(d, o->slot);  /* marked dead: we still read it */
        }
    }
    reader_done(d, o->slot);
    o->slot = NIL;
    d->running--;
    op_complete(d, i, r);
    pthread_mutex_unlock(&d->lock);
}

/* A queued op that will never run (the store is closing). */
static void io_cancel(void *ctx, void *job)
{
    hkv_disk *d = ctx;
    op *o = job;
    pthread_mutex_lock(&d->lock);
    if (o->kind == OP_WIPE) {
        push_free(d, o->slot);
        d->wipes--;
        d->running--;
        op_release(d, (int32_t)(o - d->ops));
    } else {
        if (o->kind == OP_READ)
            reader_done(d, o->slot);
        else
            retire_slot(d, o->slot);
        o->slot = NIL;
        d->running--;
        op_complete(d, (int32_t)(o - d->ops), HKV_DISK_CANCELLED);
    }
    pthread_mutex_unlock(&d->lock);
}

/* ------------------------------------------------------------------ */
/* open / close                                                        */

void hkv_disk_config_default(hkv_disk_config *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    cfg->admit_after = 2;
    cfg->admit_table = 4096;
    cfg->io_threads = 2;
    cfg->max_in_flight = 64;
    cfg->max_iov = 256;
    cfg->direct_io = 1;
}

const char *hkv_disk_result_name(hkv_disk_result r)
{
    switch (r) {
    case HKV_DISK_DONE: return "done";
    case HKV_DISK_MISS: return "miss";
    case HKV_DISK_CORRUPT: return "corrupt";
    case HKV_DISK_IO_ERROR: return "I/O error";
    case HKV_DISK_NOT_ADMITTED: return "not admitted";
    case HKV_DISK_NO_SPACE: return "no space";
    case HKV_DISK_CANCELLED: return "cancelled";
    }
    return "unknown";
}

static void read_env_faults(hkv_disk *d)
{
    static const char *names[HKV_DISK_NUM_FAULTS] = {"write_eio", "write_enospc", "read_eio",
                                                     "read_short", "delay_us", "torn_exit",
                                                     "direct_einval"};
    const char *env = getenv("HSTU_KVCACHE_DISK_FAULTS");
    if (env == NULL)
        return;
    for (int f = 0; f < HKV_DISK_NUM_FAULTS; f++) {
        size_t n = strlen(names[f]);
        for (const char *p = env; (p = strstr(p, names[f])) != NULL; p += n)
            if ((p == env || p[-1] == ',') && p[n] == '=')
                atomic_store(&d->faults[f], (int32_t)strtol(p + n + 1, NULL, 10));
    }
}

static void disk_free(hkv_disk *d)
{
    if (d->fd >= 0)
        close(d->fd);
    for (int w = 0; d->staging != NULL && w < d->num_workers; w++)
        free(d->staging[w]);
    free(d->staging);
    free(d->wiov);
    free(d->zero_block);
    if (d->ops != NULL)
        for (int32_t i = 0; i < d->num_ops; i++)
            free(d->ops[i].iov);
    free(d->ops);
    free(d->slots);
    free(d->admit);
    km_free(&d->index);
    km_free(&d->users);
    pthread_cond_destroy(&d->done_cv);
    pthread_mutex_destroy(&d->lock);
    free(d);
}

/* Open the file, O_DIRECT first when asked; probe that aligned I/O works
 * (some filesystems accept the flag at open and refuse the I/O). */
static hkv_status open_file(hkv_disk *d, uint64_t size)
{
    int flags = O_RDWR | O_CREAT | O_CLOEXEC;
    d->fd = -1;
#ifdef O_DIRECT
    if (d->cfg.direct_io) {
        d->fd = open(d->path, flags | O_DIRECT, 0644);
        d->direct = d->fd >= 0;
    }
#endif
    if (d->fd < 0)
        d->fd = open(d->path, flags, 0644);
    if (d->fd < 0)
        return hkv_error(HKV_EINVAL, "cannot open the disk store %s: %s", d->path,
                         strerror(errno));
    if (flock(d->fd, LOCK_EX | LOCK_NB) != 0)
        return hkv_error(HKV_EBUSY, "the disk store %s is open in another process or "
                         "cache (flock: %s)", d->path, strerror(errno));
    /* Only now, under the lock, may a non-persistent store discard the
     * old contents (truncating first could wipe a live store's file). */
    if (!d->cfg.persist && ftruncate(d->fd, 0) != 0)
        return hkv_error(HKV_EINVAL, "cannot truncate %s: %s", d->path, strerror(errno));
    struct stat sb;
    if (fstat(d->fd, &sb) != 0)
        return hkv_error(HKV_EINVAL, "cannot stat %s: %s", d->path, strerror(errno));
    if ((uint64_t)sb.st_size < size) {
        int err = posix_fallocate(d->fd, (off_t)sb.st_size, (off_t)(size - (uint64_t)sb.st_size));
        d->preallocated = err == 0;
        /* No reservation (a filesystem without fallocate, or not enough
         * free space now): a sparse file still works; writes that find
         * the disk full take the ENOSPC path later. */
        if (err != 0 && ftruncate(d->fd, (off_t)size) != 0)
            return hkv_error(HKV_EINVAL, "cannot size the disk store %s to %llu bytes: %s",
                             d->path, (unsigned long long)size, strerror(errno));
    } else {
        d->preallocated = 1;
    }
    if (d->direct) {
        ssize_t r = pread(d->fd, d->staging[0], ALIGN, 0);
        if ((r < 0 && errno == EINVAL) || fault_take(d, HKV_DISK_FAULT_DIRECT_EINVAL)) {
            close(d->fd);
            d->direct = 0;
            d->fd = open(d->path, flags, 0644);
            if (d->fd < 0 || flock(d->fd, LOCK_EX | LOCK_NB) != 0)
                return hkv_error(HKV_EINVAL, "cannot reopen %s without O_DIRECT: %s",
                                 d->path, strerror(errno));
        }
    }
    if (d->cfg.persist) {
        /* the file's directory entry must be durable too */
        char dir[sizeof d->path];
        memcpy(dir, d->path, sizeof dir);
        *strrchr(dir, '/') = '\0';
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    return HKV_OK;
}

/* persist: rebuild the index from the slots.  A slot is a record if its
 * header is plausible and its CRC holds; of two records of one key the
 * higher sequence number wins (the loser, and every slot with bytes that
 * are not a record, is free; losers are wiped). */
static hkv_status recover(hkv_disk *d)
{
    unsigned char *buf = d->staging[0];
    for (int32_t s = d->num_slots - 1; s >= 0; s--) {
        ssize_t got = read_full(d->fd, buf, HKV_DISK_HEADER_BYTES, slot_offset(d, s));
        struct rec_header h;
        memcpy(&h, buf, sizeof h);
        if (got != HKV_DISK_HEADER_BYTES || h.magic == 0) {
            push_free(d, s);
            continue;
        }
        int ok = header_plausible(d, &h);
        if (ok) {
            size_t want = HKV_DISK_HEADER_BYTES +
                          (((size_t)h.data_len + ALIGN - 1) & ~(size_t)(ALIGN - 1));
            got = read_full(d->fd, buf, want, slot_offset(d, s));
            ok = got == (ssize_t)want && record_crc(&h, buf + HKV_DISK_HEADER_BYTES) == h.crc;
        }
        if (!ok) {
            d->st.recovery_skipped++;
            push_free(d, s);  /* torn: never a record; its next write
                                 overwrites it */
            continue;
        }
        if (h.seq >= d->next_seq)
            d->next_seq = h.seq + 1;
        int32_t old = km_get(&d->index, h.user_id, h.page_index);
        if (old != NIL && d->slots[old].seq > h.seq) {
            d->st.recovery_skipped++;
            d->slots[s].state = SLOT_STALE;
            d->slots[s].ondisk = 1;
            d->slots[s].next = d->stale_top;
            d->stale_top = s;
            continue;
        }
        if (old != NIL) {
            unindex(d, old);
            d->st.recovered--;
            d->st.recovery_skipped++;
            d->slots[old].state = SLOT_STALE;
            d->slots[old].next = d->stale_top;
            d->stale_top = old;
        }
        slot *x = &d->slots[s];
        x->user = h.user_id;
        x->page = h.page_index;
        x->fingerprint = h.fingerprint;
        x->seq = h.seq;
        x->data_len = h.data_len;
        x->tokens = h.token_count;
        x->ondisk = 1;
        index_slot(d, s);
        d->st.recovered++;
    }
    return HKV_OK;
}

hkv_status hkv_disk_open(const hkv_disk_config *cfg, hkv_disk **out)
{
    *out = NULL;
    if (cfg->dir == NULL || cfg->dir[0] == '\0')
        return hkv_error(HKV_EINVAL, "the disk tier needs a directory");
    if (cfg->page_bytes == 0 || cfg->page_bytes > ((uint64_t)1 << 40))
        return hkv_error(HKV_EINVAL, "page_bytes=%llu is out of range",
                         (unsigned long long)cfg->page_bytes);
    if (cfg->io_threads <= 0 || cfg->io_threads > 256 || cfg->max_in_flight <= 0 ||
        cfg->max_in_flight > (1 << 19) || cfg->max_iov <= 0 || cfg->max_iov > 1000 || cfg->admit_table <= 0 ||
        (cfg->admit_table & (cfg->admit_table - 1)) != 0 || cfg->admit_after < 0)
        return hkv_error(HKV_EINVAL, "disk tier: io_threads (%d), max_in_flight (%d), "
                         "max_iov (%d, at most 1000) must be positive, admit_table (%d) a power of "
                         "two, admit_after (%d) >= 0", (int)cfg->io_threads,
                         (int)cfg->max_in_flight, (int)cfg->max_iov,
                         (int)cfg->admit_table, (int)cfg->admit_after);
    uint64_t record_bytes = HKV_DISK_HEADER_BYTES + ((cfg->page_bytes + ALIGN - 1) & ~(uint64_t)(ALIGN - 1));
    uint64_t slots = cfg->capacity_bytes / record_bytes;
    if (slots == 0)
        return hkv_error(HKV_EINVAL, "capacity_bytes=%llu does not hold one record of "
                         "%llu bytes", (unsigned long long)cfg->capacity_bytes,
                         (unsigned long long)record_bytes);
    if (slots > (1u << 30))
        slots = 1u << 30;

    hkv_disk *d = calloc(1, sizeof *d);
    if (d == NULL)
        return hkv_error(HKV_ENOMEM, "out of host memory");
    d->fd = -1;
    d->cfg = *cfg;
    d->cfg.dir = NULL;  /* not kept: the path below is what we need */
    if (pthread_mutex_init(&d->lock, NULL) != 0) {
        free(d);
        return hkv_error(HKV_ENOMEM, "cannot create a mutex");
    }
    pthread_cond_init(&d->done_cv, NULL);
    d->record_bytes = record_bytes;
    d->num_slots = (int32_t)slots;
    d->num_workers = cfg->io_threads;
    d->free_top = d->stale_top = d->lru_head = d->lru_tail = NIL;
    d->done_head = d->done_tail = NIL;
    d->next_seq = 1;
    if (snprintf(d->path, sizeof d->path, "%s/%s", cfg->dir, FILE_NAME) >= (int)sizeof d->path) {
        disk_free(d);
        return hkv_error(HKV_EINVAL, "the disk tier's directory path is too long");
    }

    hkv_status st = HKV_OK;
    d->slots = calloc((size_t)slots, sizeof *d->slots);
    d->admit = calloc((size_t)cfg->admit_table, sizeof *d->admit);
    d->admit_mask = (uint32_t)cfg->admit_table - 1;
    d->num_ops = cfg->max_in_flight + NUM_WIPE_OPS;
    d->ops = calloc((size_t)d->num_ops, sizeof *d->ops);
    d->staging = calloc((size_t)d->num_workers, sizeof *d->staging);
    d->wiov = calloc((size_t)d->num_workers * 2 * ((size_t)cfg->max_iov + 1), sizeof *d->wiov);
    if (d->slots == NULL || d->admit == NULL || d->ops == NULL || d->staging == NULL ||
        d->wiov == NULL ||
        posix_memalign((void **)&d->zero_block, ALIGN, ALIGN) != 0) {
        d->zero_block = NULL;
        st = hkv_error(HKV_ENOMEM, "cannot allocate the disk tier's bookkeeping");
    }
    if (st == HKV_OK)
        memset(d->zero_block, 0, ALIGN);
    for (int w = 0; st == HKV_OK && w < d->num_workers; w++)
        if (posix_memalign((void **)&d->staging[w], ALIGN, record_bytes) != 0) {
            d->staging[w] = NULL;
            st = hkv_error(HKV_ENOMEM, "cannot allocate a %llu-byte I/O buffer",
                           (unsigned long long)record_bytes);
        }
    if (st == HKV_OK) {
        d->op_free = NIL;
        for (int32_t i = d->num_ops - 1; i >= 0; i--) {
            d->ops[i].iov = malloc((size_t)cfg->max_iov * sizeof *d->ops[i].iov);
            if (d->ops[i].iov == NULL) {
                st = hkv_error(HKV_ENOMEM, "out of host memory");
                break;
            }
            d->ops[i].next = d->op_free;
            d->op_free = i;
        }
    }
    if (st == HKV_OK)
        st = km_init(&d->index, (int64_t)slots);
    if (st == HKV_OK)
        st = km_init(&d->users, (int64_t)slots);
    for (int32_t s = 0; st == HKV_OK && s < d->num_slots; s++) {
        slot *x = &d->slots[s];
        x->lru_prev = x->lru_next = x->u_prev = x->u_next = x->next = NIL;
    }
    if (st == HKV_OK)
        read_env_faults(d);  /* before the file: DIRECT_EINVAL acts at open */
    if (st == HKV_OK)
        st = open_file(d, slots * record_bytes);
    if (st == HKV_OK) {
        if (cfg->persist) {
            st = recover(d);
        } else {
            /* low slots first: a fresh store fills the file from the front */
            for (int32_t s = d->num_slots - 1; s >= 0; s--)
                push_free(d, s);
        }
    }
    if (st == HKV_OK)
        st = hkv_io_pool_start(cfg->io_threads, d->num_ops, io_run, io_cancel, d, &d->pool);
    if (st != HKV_OK) {
        disk_free(d);
        return st;
    }
    d->st.slots = d->num_slots;
    d->st.record_bytes = record_bytes;
    d->st.capacity_bytes = slots * record_bytes;
    pthread_mutex_lock(&d->lock);
    kick_wipes(d);  /* stale slots found by recovery */
    pthread_mutex_unlock(&d->lock);
    *out = d;
    return HKV_OK;
}

void hkv_disk_close(hkv_disk *d)
{
    if (d == NULL)
        return;
    /* Queued caller work is cancelled where it sits (it completes without
     * I/O when its turn comes), the I/O running now finishes, and with
     * persist the stale slots are wiped first, so records dropped or
     * superseded before the close do not come back at the next open. */
    pthread_mutex_lock(&d->lock);
    d->closing = 1;
    for (int32_t i = 0; i < d->num_ops; i++)
        if (d->ops[i].state == OP_QUEUED && d->ops[i].kind != OP_WIPE)
            d->ops[i].cancelled = 1;
    while (d->running > 0 || (d->cfg.persist && d->stale_top != NIL)) {
        kick_wipes(d);
        pthread_cond_wait(&d->done_cv, &d->lock);
    }
    pthread_mutex_unlock(&d->lock);
    hkv_io_pool_stop(d->pool, 1);
    disk_free(d);
}

/* ------------------------------------------------------------------ */
/* admission                                                           */

static admit_entry *admit_slot(hkv_disk *d, int64_t user)
{
    return &d->admit[mix64((uint64_t)user) & d->admit_mask];
}

int32_t hkv_disk_offer(hkv_disk *d, int64_t user_id)
{
    pthread_mutex_lock(&d->lock);
    admit_entry *e = admit_slot(d, user_id);
    if (e->count == 0 || e->user != user_id) {
        e->user = user_id;
        e->count = 0;
    }
    if (e->count < INT32_MAX)
        e->count++;
    int32_t n = e->count;
    pthread_mutex_unlock(&d->lock);
    return n;
}

static int admitted(hkv_disk *d, int64_t user)
{
    if (d->cfg.admit_after == 0)
        return 1;
    admit_entry *e = admit_slot(d, user);
    if (e->count > 0 && e->user == user && e->count >= d->cfg.admit_after)
        return 1;
    return km_get(&d->users, user, 0) != NIL;  /* already has pages on disk */
}

/* ------------------------------------------------------------------ */
/* submit                                                              */

static hkv_status check_iov(hkv_disk *d, const struct iovec *iov, int iovcnt, uint64_t *total)
{
    if (iovcnt < 0 || iovcnt > d->cfg.max_iov || (iovcnt > 0 && iov == NULL))
        return hkv_error(HKV_EINVAL, "%d iovecs (the store takes 0 to %d)", iovcnt,
                         (int)d->cfg.max_iov);
    uint64_t n = 0;
    for (int k = 0; k < iovcnt; k++) {
        if (iov[k].iov_len > 0 && iov[k].iov_base == NULL)
            return hkv_error(HKV_EINVAL, "iovec %d has no buffer", k);
        n += iov[k].iov_len;
    }
    *total = n;
    return HKV_OK;
}

/* An op for a caller, or HKV_EBUSY (lock held). */
static hkv_status caller_op(hkv_disk *d, int32_t *out)
{
    *out = NIL;
    if (d->closing)
        return hkv_error(HKV_ESTATE, "the disk store is closing");
    if (d->caller_ops >= d->cfg.max_in_flight || (*out = op_alloc(d)) == NIL)
        return hkv_error(HKV_EBUSY, "%d disk operations are in flight or not yet polled "
                         "(max_in_flight)", (int)d->caller_ops);
    d->caller_ops++;
    return HKV_OK;
}

static hkv_status queue_op(hkv_disk *d, int32_t i)
{
    op *o = &d->ops[i];
    o->state = OP_QUEUED;
    d->running++;
    hkv_status st = hkv_io_pool_submit(d->pool, o);
    if (st != HKV_OK)
        d->running--;  /* cannot happen: the ring holds every op */
    return st;
}

hkv_status hkv_disk_write(hkv_disk *d, int64_t user_id, int64_t page_index,
                          uint64_t fingerprint, uint32_t token_count,
                          const struct iovec *iov, int iovcnt, uint64_t *ticket)
{
    *ticket = 0;
    uint64_t total;
    hkv_status st = check_iov(d, iov, iovcnt, &total);
    if (st != HKV_OK)
        return st;
    if (total > d->cfg.page_bytes)
        return hkv_error(HKV_EINVAL, "a record of %llu bytes is larger than page_bytes=%llu",
                         (unsigned long long)total, (unsigned long long)d->cfg.page_bytes);
    pthread_mutex_lock(&d->lock);
    int32_t i;
    st = caller_op(d, &i);
    if (st != HKV_OK) {
        pthread_mutex_unlock(&d->lock);
        return st;
    }
    op *o = &d->ops[i];
    o->kind = OP_WRITE;
    o->device = 0;
    *ticket = o->ticket;
    d->st.writes_queued++;
    if (!admitted(d, user_id)) {
        d->st.not_admitted++;
        op_complete(d, i, HKV_DISK_NOT_ADMITTED);
        pthread_mutex_unlock(&d->lock);
        return HKV_OK;
    }
    int32_t s = take_slot(d);
    if (s == NIL) {
        op_complete(d, i, HKV_DISK_NO_SPACE);
        pthread_mutex_unlock(&d->lock);
        return HKV_OK;
    }
    o->slot = s;
    o->user = user_id;
    o->page = page_index;
    o->fingerprint = fingerprint;
    o->tokens = token_count;
    o->data_len = total;
    o->seq = d->next_seq++;
    o->iovcnt = iovcnt;
    if (iovcnt > 0)
        memcpy(o->iov, iov, (size_t)iovcnt * sizeof *iov);
    st = queue_op(d, i);
    if (st != HKV_OK) {
        retire_slot(d, s);
        o->slot = NIL;
        op_complete(d, i, HKV_DISK_CANCELLED);
    }
    pthread_mutex_unlock(&d->lock);
    return HKV_OK;
}

static hkv_status submit_read(hkv_disk *d, int64_t user_id, int64_t page_index,
                              uint64_t fingerprint, const struct iovec *iov, int iovcnt,
                              int device, uint64_t *ticket)
{
    *ticket = 0;
    uint64_t total;
    hkv_status st = check_iov(d, iov, iovcnt, &total);
    if (st != HKV_OK)
        return st;
    pthread_mutex_lock(&d->lock);
    if (device && d->dev.read == NULL) {
        pthread_mutex_unlock(&d->lock);
        return hkv_error(HKV_ESTATE, "a device read needs a device reader "
                         "(hkv_disk_set_device_reader)");
    }
    int32_t s = km_get(&d->index, user_id, page_index);
    if (s != NIL && d->slots[s].data_len > total) {
        uint64_t need = d->slots[s].data_len;
        pthread_mutex_unlock(&d->lock);
        return hkv_error(HKV_EINVAL, "the record holds %llu bytes; the iovecs only %llu",
                         (unsigned long long)need, (unsigned long long)total);
    }
    int32_t i;
    st = caller_op(d, &i);
    if (st != HKV_OK) {
        pthread_mutex_unlock(&d->lock);
        return st;
    }
    op *o = &d->ops[i];
    o->kind = OP_READ;
    o->device = (uint8_t)device;
    *ticket = o->ticket;
    d->st.reads_queued++;
    if (s == NIL || d->slots[s].fingerprint != fingerprint) {
        op_complete(d, i, HKV_DISK_MISS);
        pthread_mutex_unlock(&d->lock);
        return HKV_OK;
    }
    slot *x = &d->slots[s];
    x->readers++;
    lru_touch(d, s);
    o->slot = s;
    o->user = user_id;
    o->page = page_index;
    o->fingerprint = fingerprint;
    o->seq = x->seq;
    o->data_len = x->data_len;
    o->tokens = x->tokens;
    o->iovcnt = iovcnt;
    if (iovcnt > 0)
        memcpy(o->iov, iov, (size_t)iovcnt * sizeof *iov);
    st = queue_op(d, i);
    if (st != HKV_OK) {
        reader_done(d, s);
        o->slot = NIL;
        op_complete(d, i, HKV_DISK_CANCELLED);
    }
    pthread_mutex_unlock(&d->lock);
    return HKV_OK;
}

hkv_status hkv_disk_read(hkv_disk *d, int64_t user_id, int64_t page_index,
                         uint64_t fingerprint, const struct iovec *iov, int iovcnt,
                         uint64_t *ticket)
{
    return submit_read(d, user_id, page_index, fingerprint, iov, iovcnt, 0, ticket);
}

hkv_status hkv_disk_read_device(hkv_disk *d, int64_t user_id, int64_t page_index,
                                uint64_t fingerprint, const struct iovec *iov,
                                int iovcnt, uint64_t *ticket)
{
    return submit_read(d, user_id, page_index, fingerprint, iov, iovcnt, 1, ticket);
}

void hkv_disk_set_device_reader(hkv_disk *d, const hkv_disk_device_reader *reader)
{
    pthread_mutex_lock(&d->lock);
    if (reader != NULL)
        d->dev = *reader;
    else
        memset(&d->dev, 0, sizeof d->dev);
    pthread_mutex_unlock(&d->lock);
}

int hkv_disk_fd(const hkv_disk *d)
{
    return d->fd;
}

int hkv_disk_io_threads(const hkv_disk *d)
{
    return d->num_workers;
}

/* ------------------------------------------------------------------ */
/* completions                                                         */

/* Unlink done op i (whose predecessor in the done list is prev). */
static void done_unlink(hkv_disk *d, int32_t prev, int32_t i)
{
    int32_t next = d->ops[i].next;
    if (prev == NIL)
        d->done_head = next;
    else
        d->ops[prev].next = next;
    if (d->done_tail == i)
        d->done_tail = prev;
    d->caller_ops--;
    op_release(d, i);
}

int hkv_disk_poll(hkv_disk *d, uint64_t *tickets, hkv_disk_result *results, int max)
{
    int n = 0;
    pthread_mutex_lock(&d->lock);
    int32_t prev = NIL;
    for (int32_t i = d->done_head; i != NIL && n < max;) {
        op *o = &d->ops[i];
        int32_t next = o->next;
        if (o->waited) {
            prev = i;
        } else {
            tickets[n] = o->ticket;
            if (results != NULL)
                results[n] = o->result;
            n++;
            done_unlink(d, prev, i);
        }
        i = next;
    }
    pthread_mutex_unlock(&d->lock);
    return n;
}

int32_t hkv_disk_ticket_index(uint64_t ticket)
{
    return (int32_t)(ticket & ((1u << 20) - 1));
}

int32_t hkv_disk_ticket_capacity(const hkv_disk *d)
{
    return d->num_ops;
}

static struct timespec deadline_after(int64_t timeout_ns)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += timeout_ns / 1000000000;
    t.tv_nsec += timeout_ns % 1000000000;
    if (t.tv_nsec >= 1000000000) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000;
    }
    return t;
}

/* Completions poll would return now (lock held). */
static int ready_count(hkv_disk *d)
{
    int n = 0;
    for (int32_t i = d->done_head; i != NIL; i = d->ops[i].next)
        n += !d->ops[i].waited;
    return n;
}

int hkv_disk_wait_any(hkv_disk *d, int64_t timeout_ns)
{
    struct timespec deadline = deadline_after(timeout_ns > 0 ? timeout_ns : 0);
    pthread_mutex_lock(&d->lock);
    int n;
    /* nothing queued or running for a caller: nothing will become ready */
    while ((n = ready_count(d)) == 0 && d->caller_ops > 0) {
        int pending = 0;
        for (int32_t i = 0; i < d->num_ops && !pending; i++)
            pending = d->ops[i].kind != OP_WIPE && !d->ops[i].waited &&
                      (d->ops[i].state == OP_QUEUED || d->ops[i].state == OP_RUNNING);
        if (!pending)
            break;
        if (timeout_ns < 0)
            pthread_cond_wait(&d->done_cv, &d->lock);
        else if (pthread_cond_timedwait(&d->done_cv, &d->lock, &deadline) == ETIMEDOUT) {
            n = ready_count(d);
            break;
        }
    }
    pthread_mutex_unlock(&d->lock);
    return n;
}

static op *ticket_op(hkv_disk *d, uint64_t ticket)
{
    uint64_t i = ticket & ((1u << 20) - 1);
    if (ticket == 0 || i >= (uint64_t)d->num_ops || d->ops[i].ticket != ticket ||
        d->ops[i].kind == OP_WIPE || d->ops[i].state == OP_FREE)
        return NULL;
    return &d->ops[i];
}

hkv_status hkv_disk_wait(hkv_disk *d, uint64_t ticket, int64_t timeout_ns,
                         hkv_disk_result *result)
{
    pthread_mutex_lock(&d->lock);
    op *o = ticket_op(d, ticket);
    if (o == NULL || o->waited) {
        pthread_mutex_unlock(&d->lock);
        return hkv_error(HKV_EINVAL, "disk ticket %llu is not outstanding (already "
                         "polled, or waited for elsewhere)", (unsigned long long)ticket);
    }
    o->waited = 1;
    struct timespec deadline = deadline_after(timeout_ns > 0 ? timeout_ns : 0);
    while (o->state != OP_DONE) {
        if (timeout_ns < 0) {
            pthread_cond_wait(&d->done_cv, &d->lock);
        } else if (pthread_cond_timedwait(&d->done_cv, &d->lock, &deadline) == ETIMEDOUT &&
                   o->state != OP_DONE) {
            o->waited = 0;
            pthread_mutex_unlock(&d->lock);
            return hkv_error(HKV_EBUSY, "disk ticket %llu is not done yet",
                             (unsigned long long)ticket);
        }
    }
    if (result != NULL)
        *result = o->result;
    int32_t prev = NIL, want = (int32_t)(o - d->ops);
    for (int32_t i = d->done_head; i != want; i = d->ops[i].next)
        prev = i;
    done_unlink(d, prev, want);
    pthread_mutex_unlock(&d->lock);
    return HKV_OK;
}

void hkv_disk_drain(hkv_disk *d)
{
    pthread_mutex_lock(&d->lock);
    while (d->running > 0)
        pthread_cond_wait(&d->done_cv, &d->lock);
    pthread_mutex_unlock(&d->lock);
}

hkv_status hkv_disk_write_sync(hkv_disk *d, int64_t user_id, int64_t page_index,
                               uint64_t fingerprint, uint32_t token_count,
                               const struct iovec *iov, int iovcnt, hkv_disk_result *result)
{
    uint64_t t;
    hkv_status st = hkv_disk_write(d, user_id, page_index, fingerprint, token_count, iov,
                                   iovcnt, &t);
    return st != HKV_OK ? st : hkv_disk_wait(d, t, -1, result);
}

hkv_status hkv_disk_read_sync(hkv_disk *d, int64_t user_id, int64_t page_index,
                              uint64_t fingerprint, const struct iovec *iov, int iovcnt,
                              hkv_disk_result *result)
{
    uint64_t t;
    hkv_status st = hkv_disk_read(d, user_id, page_index, fingerprint, iov, iovcnt, &t);
    return st != HKV_OK ? st : hkv_disk_wait(d, t, -1, result);
}

/* ------------------------------------------------------------------ */
/* lookups, drops, stats                                               */

int hkv_disk_contains(hkv_disk *d, int64_t user_id, int64_t page_index, uint64_t fingerprint)
{
    pthread_mutex_lock(&d->lock);
    int32_t s = km_get(&d->index, user_id, page_index);
    int hit = s != NIL && d->slots[s].fingerprint == fingerprint;
    pthread_mutex_unlock(&d->lock);
    return hit;
}

int hkv_disk_find(hkv_disk *d, int64_t user_id, int64_t page_index, uint64_t *fingerprint,
                  uint32_t *token_count, uint64_t *data_len)
{
    pthread_mutex_lock(&d->lock);
    int32_t s = km_get(&d->index, user_id, page_index);
    if (s != NIL) {
        if (fingerprint != NULL)
            *fingerprint = d->slots[s].fingerprint;
        if (token_count != NULL)
            *token_count = d->slots[s].tokens;
        if (data_len != NULL)
            *data_len = d->slots[s].data_len;
    }
    pthread_mutex_unlock(&d->lock);
    return s != NIL;
}

int64_t hkv_disk_count_run(hkv_disk *d, int64_t user_id, int64_t from_page,
                           const uint64_t *fingerprints, int64_t max_pages)
{
    int64_t n = 0;
    pthread_mutex_lock(&d->lock);
    for (; n < max_pages; n++) {
        int32_t s = km_get(&d->index, user_id, from_page + n);
        if (s == NIL || (fingerprints != NULL && d->slots[s].fingerprint != fingerprints[n]))
            break;
        lru_touch(d, s);
    }
    pthread_mutex_unlock(&d->lock);
    return n;
}

int64_t hkv_disk_drop_user(hkv_disk *d, int64_t user_id, int64_t from_page)
{
    int64_t n = 0;
    pthread_mutex_lock(&d->lock);
    for (int32_t s = km_get(&d->users, user_id, 0); s != NIL;) {
        int32_t next = d->slots[s].u_next;
        if (d->slots[s].page >= from_page) {
            unindex(d, s);
            retire_slot(d, s);
            n++;
        }
        s = next;
    }
    d->st.dropped += (uint64_t)n;
    for (int32_t i = 0; i < d->num_ops; i++) {
        op *o = &d->ops[i];
        if (o->kind == OP_WRITE && (o->state == OP_QUEUED || o->state == OP_RUNNING) &&
            o->user == user_id && o->page >= from_page)
            o->cancelled = 1;
    }
    pthread_mutex_unlock(&d->lock);
    return n;
}

void hkv_disk_get_stats(hkv_disk *d, hkv_disk_stats *out)
{
    pthread_mutex_lock(&d->lock);
    *out = d->st;
    out->in_flight = d->caller_ops;
    out->direct_io = d->direct;
    out->preallocated = d->preallocated;
    out->persist = d->cfg.persist;
    pthread_mutex_unlock(&d->lock);
    out->crc_hw = hkv_crc32c_hw();
}

hkv_status hkv_disk_inject(hkv_disk *d, hkv_disk_fault fault, int32_t count)
{
    if ((int)fault < 0 || fault >= HKV_DISK_NUM_FAULTS || count < 0)
        return hkv_error(HKV_EINVAL, "no disk fault %d (count %d)", (int)fault, (int)count);
    atomic_store(&d->faults[fault], count);
    return HKV_OK;
}

const char *hkv_disk_path(const hkv_disk *d)
{
    return d->path;
}

int64_t hkv_disk_record_offset(hkv_disk *d, int64_t user_id, int64_t page_index)
{
    pthread_mutex_lock(&d->lock);
    int32_t s = km_get(&d->index, user_id, page_index);
    pthread_mutex_unlock(&d->lock);
    return s == NIL ? -1 : (int64_t)slot_offset(d, s);
}

hkv_status hkv_disk_check(hkv_disk *d)
{
    hkv_status st = HKV_OK;
    pthread_mutex_lock(&d->lock);
    int64_t valid = 0, in_lru = 0, in_free = 0, in_chains = 0;
    for (int32_t s = 0; s < d->num_slots; s++)
        if (d->slots[s].state == SLOT_VALID) {
            valid++;
            if (km_get(&d->index, d->slots[s].user, d->slots[s].page) != s) {
                st = hkv_error(HKV_ESTATE, "slot %d is valid but not indexed", (int)s);
                goto out;
            }
        }
    for (int32_t s = d->lru_head, prev = NIL; s != NIL; prev = s, s = d->slots[s].lru_next) {
        if (d->slots[s].state != SLOT_VALID || d->slots[s].lru_prev != prev ||
            ++in_lru > d->num_slots) {
            st = hkv_error(HKV_ESTATE, "LRU list broken at slot %d", (int)s);
            goto out;
        }
    }
    for (int32_t s = d->free_top; s != NIL; s = d->slots[s].next)
        if (d->slots[s].state != SLOT_FREE || ++in_free > d->num_slots) {
            st = hkv_error(HKV_ESTATE, "free list broken at slot %d", (int)s);
            goto out;
        }
    for (uint32_t i = 0; i <= d->users.mask; i++) {
        if (d->users.val[i] == NIL)
            continue;
        for (int32_t s = d->users.val[i], prev = NIL; s != NIL;
             prev = s, s = d->slots[s].u_next) {
            if (d->slots[s].state != SLOT_VALID || d->slots[s].user != d->users.a[i] ||
                d->slots[s].u_prev != prev || ++in_chains > d->num_slots) {
                st = hkv_error(HKV_ESTATE, "user chain of %lld broken at slot %d",
                               (long long)d->users.a[i], (int)s);
                goto out;
            }
        }
    }
    if (valid != d->st.records || in_lru != valid || in_chains != valid ||
        (uint64_t)valid * d->record_bytes != d->st.bytes_used)
        st = hkv_error(HKV_ESTATE, "%lld valid slots, %lld records, %lld in the LRU, "
                       "%lld in user chains", (long long)valid, (long long)d->st.records,
                       (long long)in_lru, (long long)in_chains);
out:
    pthread_mutex_unlock(&d->lock);
    return st;
}
