/*
 * kernel_check.cu - checks every CUDA kernel of cuda/ against the host
 * implementation of csrc/kernels_cpu.c, bit for bit, and times them.
 *
 * Method (one case = one operation on one random configuration):
 *   - inputs are random bytes, never zeros;
 *   - every output buffer, on the GPU and on the host, is poisoned with
 *     0xA5 bytes first, and is allocated with slack past its end;
 *   - the test builds its own expected output from the contract of
 *     kernels.h (an independent model: per user and token, not per
 *     batch_indices), and both the CPU output and the GPU output must
 *     equal it byte for byte over the whole buffer, so anything the
 *     operation must not touch (pages not in the list, candidate rows,
 *     gaps between strided rows, rows past out_total, the slack) must
 *     still hold the poison.
 *
 * Usage: kernel_check [--quick | --small | --bench] [--seed N]
 *   (default)  every page size 2..256 and every row shape
 *   --quick    page sizes 2, 8, 32, 128, 256 and fewer row shapes
 *   --small    a small set, for compute-sanitizer
 *   --bench    bandwidth of append/read/gather/scatter against
 *              cudaMemcpy device-to-device (8 layers x 8 x 4096 tokens)
 * Prints one line per case and "N passed, N failed"; exits non-zero on
 * any failure.
 */
#include <cuda_runtime.h>

#include <algorithm>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "../../csrc/cuda_rt.h"
#include "../../csrc/crc32c.h"
#include "../../csrc/kernels.h"

typedef std::vector<uint8_t> Bytes;

static const uint8_t POISON = 0xA5;
static int g_pass, g_fail;
static const int DEV = 0;

/* ---------------------------------------------------------------- util */

#define CK(call)                                                            \
    do {                                                                    \
        cudaError_t e_ = (call);                                            \
        if (e_ != cudaSuccess) {                                            \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__,   \
                    #call, cudaGetErrorString(e_));                         \
            fatal();                                                        \
        }                                                                   \
    } while (0)

#define HK(call)                                                            \
    do {                                                                    \
        hkv_status s_ = (call);                                             \
        if (s_ != HKV_OK) {                                                 \
            fprintf(stderr, "%s:%d: %s -> %s: %s\n", __FILE__, __LINE__,    \
                    #call, hkv_status_name(s_), hkv_last_error());          \
            fatal();                                                        \
        }                                                                   \
    } while (0)

static void fatal(void)
{
    printf("%d passed, %d failed (aborted on a fatal error)\n", g_pass,
           g_fail + 1);
    exit(2);
}

/* splitmix64: small, fast, good enough for test data. */
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next()
    {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    /* uniform in [lo, hi] */
    int64_t range(int64_t lo, int64_t hi)
    {
        return lo + (int64_t)(next() % (uint64_t)(hi - lo + 1));
    }
    void fill(void *p, size_t n)
    {
        uint8_t *b = (uint8_t *)p;
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            uint64_t x = next();
            memcpy(b + i, &x, 8);
        }
        if (i < n) {
            uint64_t x = next();
            memcpy(b + i, &x, n - i);
        }
    }
};

static void report(bool ok, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void report(bool ok, const char *fmt, ...)
{
    va_list ap;
    printf("%s ", ok ? "PASS" : "FAIL");
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    if (ok)
        g_pass++;
    else
        g_fail++;
}

static void *dalloc(size_t n)
{
    void *p = NULL;
    HK(hkv_cuda_malloc(DEV, n ? n : 1, &p));
    return p;
}

static void dfree(void *p)
{
    HK(hkv_cuda_free(DEV, p));
}

/*
 * A cudaMemcpy from pageable memory may return before its DMA has landed,
 * and the kernels under test run on a non-blocking stream that does not
 * wait for the legacy stream: wait for the device before going on.
 */
static void upload(void *d, const void *h, size_t n)
{
    if (n)
        CK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize());
}

static void download(void *h, const void *d, size_t n)
{
    if (n)
        CK(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost));
}

static void dpoison(void *d, size_t n)
{
    HK(hkv_cuda_memset(DEV, d, POISON, n));
}

/* Upload a host vector to a fresh device buffer. */
template <typename T>
static T *dcopy(const std::vector<T> &h)
{
    T *d = (T *)dalloc(h.size() * sizeof(T));
    upload(d, h.data(), h.size() * sizeof(T));
    return d;
}

/*
 * Compare `got` with `want`; on mismatch describe the first differing
 * byte into `why` (appended) and return false.
 */
static bool same(const char *what, const void *got, const void *want,
                 size_t n, char *why, size_t whylen)
{
    const uint8_t *g = (const uint8_t *)got, *w = (const uint8_t *)want;
    if (memcmp(g, w, n) == 0)
        return true;
    size_t i = 0, bad = 0;
    while (g[i] == w[i])
        i++;
    for (size_t j = i; j < n; j++)
        bad += g[j] != w[j];
    size_t used = strlen(why);
    snprintf(why + used, whylen - used,
             " [%s: %zu bytes differ, first at %zu: got 0x%02x want 0x%02x]",
             what, bad, i, g[i], w[i]);
    return false;
}

/* Run the GPU work queued by `st` to completion and check both. */
static void gpu_done(hkv_status st, const char *what, cudaStream_t s)
{
    if (st != HKV_OK) {
        fprintf(stderr, "%s -> %s: %s\n", what, hkv_status_name(st),
                hkv_last_error());
        fatal();
    }
    HK(hkv_cuda_stream_sync(DEV, s));
    CK(cudaGetLastError());
}

static std::vector<int32_t> permutation(Rng &rng, int n)
{
    std::vector<int32_t> p(n);
    for (int i = 0; i < n; i++)
        p[i] = i;
    for (int i = n - 1; i > 0; i--)
        std::swap(p[i], p[rng.range(0, i)]);
    return p;
}

/* ------------------------------------------------------- row operations */

struct RowShape {
    int esize, heads, dim;
};

/* Table layers of a case: the table's layer count, the first layer the
 * operation touches and how many. Odd counts exercise the unpaired
 * layer of the rows kernel. */
struct LayerMode {
    int table_layers, first, count;
};
static const LayerMode kLayerModes[] = {
    {1, 0, 1}, {3, 1, 2}, {5, 2, 3}, {4, 0, 4},
};

static const char *kLayoutNames[] = {
    "contig", "padded", "qkv-view", "misaligned", "kv-pair",
};
enum { NUM_LAYOUTS = 5 };

/*
 * A batch: per user, cached history length, new tokens and candidates.
 * Some users have no history at all, some no new token, some no
 * candidate.
 */
struct Batch {
    std::vector<int32_t> cached, fresh, cand;
};

static Batch random_batch(Rng &rng, int max_users, int max_len, bool all_users)
{
    Batch bt;
    int users = all_users ? max_users : (int)rng.range(1, max_users);
    for (int b = 0; b < users; b++) {
        int kind = (int)rng.range(0, 5);
        int c = (int)rng.range(1, max_len), f = (int)rng.range(1, max_len / 2 + 1);
        if (kind == 0)
            c = f = 0;          /* empty history, nothing new */
        else if (kind == 1)
            f = 0;              /* no new token */
        else if (kind == 2)
            c = 0;              /* first visit */
        bt.cached.push_back(c);
        bt.fresh.push_back(f);
        bt.cand.push_back(rng.range(0, 2) ? (int)rng.range(1, 9) : 0);
    }
    return bt;
}

/*
 * One append or read case.  Append: the tokens are each user's new
 * tokens, rows hold new tokens then candidates.  Read: the tokens are the
 * whole history, rows hold history then candidates.
 */
static void rows_case(Rng &rng, RowShape rs, int ps, int layout,
                      LayerMode lm, bool append, cudaStream_t stream,
                      int max_users, int max_len, bool all_users = false)
{
    const int64_t rb = (int64_t)rs.esize * rs.heads * rs.dim;
    Batch bt = random_batch(rng, max_users, max_len, all_users);
    const int B = (int)bt.cached.size();

    /* Pages: each user owns ceil(history / ps) distinct random pages. */
    std::vector<int32_t> kv_indptr(B + 1, 0);
    for (int b = 0; b < B; b++)
        kv_indptr[b + 1] = kv_indptr[b] + (bt.cached[b] + bt.fresh[b] + ps - 1) / ps;
    const int used_pages = kv_indptr[B];
    const int num_pages = used_pages + (int)rng.range(1, 4);
    std::vector<int32_t> perm = permutation(rng, num_pages);
    std::vector<int32_t> kv_indices(perm.begin(), perm.begin() + used_pages);
    if (kv_indices.empty())
        kv_indices.push_back(0);    /* keep the device array non-empty */

    /* Tokens of the operation and their rows. */
    std::vector<int32_t> start(B), count(B), tok_off(B + 1, 0), row_off(B + 1, 0);
    for (int b = 0; b < B; b++) {
        start[b] = append ? bt.cached[b] : 0;
        count[b] = append ? bt.fresh[b] : bt.cached[b] + bt.fresh[b];
        tok_off[b + 1] = tok_off[b] + count[b];
        row_off[b + 1] = row_off[b] + count[b] + bt.cand[b];
    }
    const int64_t nnz = tok_off[B], R = row_off[B];
    std::vector<int32_t> bidx(nnz + 1), pos(nnz + 1);
    hkv_token_meta_args ma = {tok_off.data(), start.data(), B, nnz,
                              bidx.data(), pos.data()};
    hkv_cpu_token_meta(&ma);

    /* The caller's K/V: one buffer, K and V at byte offsets with strides. */
    const int L = lm.count;
    int64_t k_off, v_off, ks, vs, kls, vls;
    switch (layout) {
    default:
    case 0:     /* two dense [L, R, rb] tensors back to back */
        ks = vs = rb;
        kls = vls = R * rb;
        k_off = 0;
        v_off = L * R * rb + 64;
        break;
    case 1:     /* padded rows and layers: gaps must stay untouched */
        ks = vs = rb + 16 * rng.range(1, 3);
        kls = vls = R * ks + 48;
        k_off = 32;
        v_off = k_off + L * kls + 16;
        break;
    case 2:     /* K and V as views into a fused [L, R, 3, rb] QKV */
        ks = vs = 3 * rb;
        kls = vls = R * 3 * rb;
        k_off = rb;
        v_off = 2 * rb;
        break;
    case 3:     /* pointers and strides only element aligned */
        ks = vs = rb + 2 * rs.esize;
        kls = vls = R * ks + rs.esize;
        k_off = rs.esize;
        v_off = k_off + L * kls + 3 * rs.esize;
        break;
    case 4:     /* K and V interleaved per row, layers padded */
        ks = vs = 2 * rb;
        kls = vls = R * 2 * rb + 64;
        k_off = 0;
        v_off = rb;
        break;
    }
    const int64_t ubytes = std::max(k_off + (L - 1) * kls + R * ks,
                                    v_off + (L - 1) * vls + R * vs) + 64;

    hkv_table_desc td;
    td.base = NULL;
    td.num_layers = lm.table_layers;
    td.num_pages = num_pages;
    td.page_size = ps;
    td.row_bytes = rb;
    const int64_t tbytes = lm.table_layers * hkv_layer_bytes(&td);

    /* Host buffers: input random, output poisoned. */
    Bytes table(tbytes), user(ubytes);
    if (append) {
        rng.fill(user.data(), ubytes);
        memset(table.data(), POISON, tbytes);
    } else {
        rng.fill(table.data(), tbytes);
        memset(user.data(), POISON, ubytes);
    }

    /* Expected output, from the contract, user by user. */
    Bytes want = append ? table : user;
    for (int b = 0; b < B; b++) {
        for (int j = 0; j < count[b]; j++) {
            int64_t p = start[b] + j;
            int64_t page = kv_indices[kv_indptr[b] + p / ps];
            int64_t row = row_off[b] + j;
            for (int i = 0; i < L; i++) {
                int64_t layer = lm.first + i;
                int64_t tk = layer * hkv_layer_bytes(&td) +
                             page * hkv_page_bytes(&td) + (p % ps) * rb;
                int64_t tv = tk + ps * rb;
                int64_t uk = k_off + i * kls + row * ks;
                int64_t uv = v_off + i * vls + row * vs;
                if (append) {
                    memcpy(&want[tk], &user[uk], rb);
                    memcpy(&want[tv], &user[uv], rb);
                } else {
                    memcpy(&want[uk], &table[tk], rb);
                    memcpy(&want[uv], &table[tv], rb);
                }
            }
        }
    }

    /* CPU. */
    hkv_rows_args a;
    memset(&a, 0, sizeof a);
    a.table = td;
    a.first_layer = lm.first;
    a.num_layers = L;
    a.k_row_stride = ks;
    a.v_row_stride = vs;
    a.k_layer_stride = kls;
    a.v_layer_stride = vls;
    a.batch_indices = bidx.data();
    a.positions = pos.data();
    a.token_offsets = tok_off.data();
    a.row_offsets = row_off.data();
    a.kv_indptr = kv_indptr.data();
    a.kv_indices = kv_indices.data();
    a.nnz = nnz;
    Bytes cpu_user = user, cpu_table = table;
    a.table.base = cpu_table.data();
    a.k = cpu_user.data() + k_off;
    a.v = cpu_user.data() + v_off;
    if (append)
        hkv_cpu_append(&a);
    else
        hkv_cpu_read(&a);

    /* GPU: same arguments, device pointers. */
    uint8_t *d_table = (uint8_t *)dalloc(tbytes), *d_user = (uint8_t *)dalloc(ubytes);
    int32_t *d_bidx = dcopy(bidx), *d_pos = dcopy(pos), *d_tok = dcopy(tok_off),
            *d_row = dcopy(row_off), *d_indptr = dcopy(kv_indptr),
            *d_ind = dcopy(kv_indices);
    if (append) {
        upload(d_user, user.data(), ubytes);
        dpoison(d_table, tbytes);
    } else {
        upload(d_table, table.data(), tbytes);
        dpoison(d_user, ubytes);
    }
    hkv_rows_args g = a;
    g.table.base = d_table;
    g.k = d_user + k_off;
    g.v = d_user + v_off;
    g.batch_indices = d_bidx;
    g.positions = d_pos;
    g.token_offsets = d_tok;
    g.row_offsets = d_row;
    g.kv_indptr = d_indptr;
    g.kv_indices = d_ind;
    gpu_done(append ? hkv_cuda_append(&g, DEV, stream)
                    : hkv_cuda_read(&g, DEV, stream),
             append ? "hkv_cuda_append" : "hkv_cuda_read", stream);
    Bytes gpu(append ? tbytes : ubytes);
    download(gpu.data(), append ? (void *)d_table : (void *)d_user, gpu.size());

    char why[512] = "";
    bool ok = same("cpu", append ? cpu_table.data() : cpu_user.data(),
                   want.data(), want.size(), why, sizeof why);
    ok &= same("gpu", gpu.data(), want.data(), want.size(), why, sizeof why);
    report(ok, "%-6s esize=%d H=%d D=%-3d row=%-5lld ps=%-3d %-10s layers=%d+%d/%d "
           "users=%d nnz=%lld%s",
           append ? "append" : "read", rs.esize, rs.heads, rs.dim, (long long)rb,
           ps, kLayoutNames[layout], lm.first, L, lm.table_layers, B,
           (long long)nnz, why);

    dfree(d_table);
    dfree(d_user);
    dfree(d_bidx);
    dfree(d_pos);
    dfree(d_tok);
    dfree(d_row);
    dfree(d_indptr);
    dfree(d_ind);
}

/* ------------------------------------------------------ page operations */

static void pages_case(Rng &rng, RowShape rs, int ps, LayerMode lm,
                       bool scatter, cudaStream_t stream)
{
    hkv_table_desc td;
    td.base = NULL;
    td.num_layers = lm.table_layers;
    td.page_size = ps;
    td.row_bytes = (int64_t)rs.esize * rs.heads * rs.dim;
    const int64_t pb = hkv_page_bytes(&td);

    /* Keep the table near 24 MiB at most. */
    int64_t max_pages = (24 << 20) / (pb * lm.table_layers);
    max_pages = std::max<int64_t>(2, std::min<int64_t>(max_pages, 48));
    td.num_pages = (int32_t)rng.range(1, max_pages);
    const int64_t tbytes = lm.table_layers * hkv_layer_bytes(&td);

    /* Scatter needs distinct page ids; gather may repeat one. */
    int64_t n = rng.range(1, td.num_pages);
    std::vector<int32_t> ids;
    if (scatter) {
        std::vector<int32_t> perm = permutation(rng, td.num_pages);
        ids.assign(perm.begin(), perm.begin() + n);
    } else {
        for (int64_t i = 0; i < n; i++)
            ids.push_back((int32_t)rng.range(0, td.num_pages - 1));
    }

    const int L = lm.count;
    const int64_t sbytes = L * n * pb + pb / 2 + 16;    /* + slack */
    Bytes table(tbytes), staging(sbytes);
    if (scatter) {
        memset(table.data(), POISON, tbytes);
        rng.fill(staging.data(), sbytes);
    } else {
        rng.fill(table.data(), tbytes);
        memset(staging.data(), POISON, sbytes);
    }

    Bytes want = scatter ? table : staging;
    for (int i = 0; i < L; i++)
        for (int64_t p = 0; p < n; p++) {
            int64_t t = (lm.first + i) * hkv_layer_bytes(&td) + ids[p] * pb;
            int64_t s = (i * n + p) * pb;
            if (scatter)
                memcpy(&want[t], &staging[s], pb);
            else
                memcpy(&want[s], &table[t], pb);
        }

    Bytes cpu_table = table, cpu_staging = staging;
    hkv_pages_args a;
    a.table = td;
    a.table.base = cpu_table.data();
    a.first_layer = lm.first;
    a.num_layers = L;
    a.page_ids = ids.data();
    a.n = n;
    a.staging = cpu_staging.data();
    if (scatter)
        hkv_cpu_scatter_pages(&a);
    else
        hkv_cpu_gather_pages(&a);

    uint8_t *d_table = (uint8_t *)dalloc(tbytes), *d_staging = (uint8_t *)dalloc(sbytes);
    int32_t *d_ids = dcopy(ids);
    if (scatter) {
        dpoison(d_table, tbytes);
        upload(d_staging, staging.data(), sbytes);
    } else {
        upload(d_table, table.data(), tbytes);
        dpoison(d_staging, sbytes);
    }
    hkv_pages_args g = a;
    g.table.base = d_table;
    g.page_ids = d_ids;
    g.staging = d_staging;
    gpu_done(scatter ? hkv_cuda_scatter_pages(&g, DEV, stream)
                     : hkv_cuda_gather_pages(&g, DEV, stream),
             scatter ? "hkv_cuda_scatter_pages" : "hkv_cuda_gather_pages", stream);
    Bytes gpu(want.size());
    download(gpu.data(), scatter ? (void *)d_table : (void *)d_staging, gpu.size());

    char why[512] = "";
    bool ok = same("cpu", scatter ? cpu_table.data() : cpu_staging.data(),
                   want.data(), want.size(), why, sizeof why);
    ok &= same("gpu", gpu.data(), want.data(), want.size(), why, sizeof why);
    report(ok, "%-7s esize=%d H=%d D=%-3d page=%-7lld ps=%-3d layers=%d+%d/%d "
           "pages=%lld/%d%s",
           scatter ? "scatter" : "gather", rs.esize, rs.heads, rs.dim,
           (long long)pb, ps, lm.first, L, lm.table_layers, (long long)n,
           td.num_pages, why);

    dfree(d_table);
    dfree(d_staging);
    dfree(d_ids);
}

/* ------------------------------------------------------- token metadata */

static void meta_case(Rng &rng, int batch, int max_new, cudaStream_t stream)
{
    std::vector<int32_t> off(batch + 1, 0), cached(batch);
    for (int b = 0; b < batch; b++) {
        int n = rng.range(0, 3) == 0 ? 0 : (int)rng.range(0, max_new);
        off[b + 1] = off[b] + n;
        cached[b] = (int32_t)rng.range(0, 100000);
    }
    const int64_t nnz = off[batch], slack = 5;

    std::vector<int32_t> want_b(nnz + slack), want_p(nnz + slack);
    memset(want_b.data(), POISON, want_b.size() * 4);
    memset(want_p.data(), POISON, want_p.size() * 4);
    for (int b = 0; b < batch; b++)
        for (int64_t t = off[b]; t < off[b + 1]; t++) {
            want_b[t] = b;
            want_p[t] = cached[b] + (int32_t)(t - off[b]);
        }

    std::vector<int32_t> cb(nnz + slack), cp(nnz + slack);
    memset(cb.data(), POISON, cb.size() * 4);
    memset(cp.data(), POISON, cp.size() * 4);
    hkv_token_meta_args a = {off.data(), cached.data(), batch, nnz,
                             cb.data(), cp.data()};
    hkv_cpu_token_meta(&a);

    int32_t *d_off = dcopy(off), *d_cached = dcopy(cached);
    int32_t *d_b = (int32_t *)dalloc(cb.size() * 4), *d_p = (int32_t *)dalloc(cp.size() * 4);
    dpoison(d_b, cb.size() * 4);
    dpoison(d_p, cp.size() * 4);
    hkv_token_meta_args g = {d_off, d_cached, batch, nnz, d_b, d_p};
    gpu_done(hkv_cuda_token_meta(&g, DEV, stream), "hkv_cuda_token_meta", stream);
    std::vector<int32_t> gb(cb.size()), gp(cp.size());
    download(gb.data(), d_b, gb.size() * 4);
    download(gp.data(), d_p, gp.size() * 4);

    char why[512] = "";
    size_t nb = want_b.size() * 4;
    bool ok = same("cpu batch_indices", cb.data(), want_b.data(), nb, why, sizeof why);
    ok &= same("cpu positions", cp.data(), want_p.data(), nb, why, sizeof why);
    ok &= same("gpu batch_indices", gb.data(), want_b.data(), nb, why, sizeof why);
    ok &= same("gpu positions", gp.data(), want_p.data(), nb, why, sizeof why);
    report(ok, "meta    batch=%d nnz=%lld%s", batch, (long long)nnz, why);

    dfree(d_off);
    dfree(d_cached);
    dfree(d_b);
    dfree(d_p);
}

/* ---------------------------------------------------------------- strip */

template <typename I>
static void strip_case_t(Rng &rng, int batch, int64_t rb, int max_len,
                         int64_t short_by, int mis, cudaStream_t stream)
{
    const bool is64 = sizeof(I) == 8;
    const int64_t base = rng.range(0, 1) ? 0 : rng.range(1, 5); /* offsets[0] */
    std::vector<I> off(batch + 1);
    std::vector<int32_t> drop(batch);
    off[0] = (I)base;
    for (int b = 0; b < batch; b++) {
        int64_t len = rng.range(0, 4) == 0 ? 0 : rng.range(0, max_len);
        off[b + 1] = (I)(off[b] + len);
        drop[b] = (int32_t)rng.range(-3, len + 3);  /* clamping both ways */
    }
    const int64_t nrows = (int64_t)off[batch];

    std::vector<I> want_len(batch + 3), want_off(batch + 4);
    memset(want_len.data(), POISON, want_len.size() * sizeof(I));
    memset(want_off.data(), POISON, want_off.size() * sizeof(I));
    int64_t total = 0;
    for (int b = 0; b < batch; b++) {
        int64_t len = (int64_t)off[b + 1] - (int64_t)off[b];
        int64_t d = std::min<int64_t>(std::max<int64_t>(drop[b], 0), len);
        want_len[b] = (I)(len - d);
        want_off[b] = (I)total;
        total += len - d;
    }
    want_off[batch] = (I)total;
    const int64_t out_total = std::max<int64_t>(0, total - short_by);

    Bytes values(nrows * rb + mis + 8);
    rng.fill(values.data(), values.size());
    const int64_t obytes = (out_total + 3) * rb + mis + 8;
    Bytes want_vals(obytes);
    memset(want_vals.data(), POISON, obytes);
    for (int b = 0; b < batch; b++) {
        int64_t d = (int64_t)off[b + 1] - (int64_t)off[b] - (int64_t)want_len[b];
        for (int64_t i = 0; i < (int64_t)want_len[b]; i++) {
            int64_t r = (int64_t)want_off[b] + i;
            if (r < out_total)
                memcpy(&want_vals[mis + r * rb],
                       &values[mis + ((int64_t)off[b] + d + i) * rb], rb);
        }
    }

    /* CPU */
    Bytes cv(obytes, POISON);
    std::vector<I> cl(want_len.size()), co(want_off.size());
    memset(cl.data(), POISON, cl.size() * sizeof(I));
    memset(co.data(), POISON, co.size() * sizeof(I));
    hkv_strip_args a;
    a.values = values.data() + mis;
    a.row_bytes = rb;
    a.offsets = off.data();
    a.index_int64 = is64;
    a.num_drop = drop.data();
    a.batch = batch;
    a.out_values = cv.data() + mis;
    a.out_lengths = cl.data();
    a.out_offsets = co.data();
    a.out_total = out_total;
    hkv_cpu_strip(&a);

    /* GPU */
    uint8_t *d_vals = (uint8_t *)dalloc(values.size()), *d_out = (uint8_t *)dalloc(obytes);
    upload(d_vals, values.data(), values.size());
    dpoison(d_out, obytes);
    I *d_off = dcopy(off);
    int32_t *d_drop = dcopy(drop);
    I *d_len = (I *)dalloc(cl.size() * sizeof(I)), *d_ooff = (I *)dalloc(co.size() * sizeof(I));
    dpoison(d_len, cl.size() * sizeof(I));
    dpoison(d_ooff, co.size() * sizeof(I));
    hkv_strip_args g = a;
    g.values = d_vals + mis;
    g.offsets = d_off;
    g.num_drop = d_drop;
    g.out_values = d_out + mis;
    g.out_lengths = d_len;
    g.out_offsets = d_ooff;
    gpu_done(hkv_cuda_strip(&g, DEV, stream), "hkv_cuda_strip", stream);
    Bytes gv(obytes);
    std::vector<I> gl(cl.size()), go(co.size());
    download(gv.data(), d_out, obytes);
    download(gl.data(), d_len, gl.size() * sizeof(I));
    download(go.data(), d_ooff, go.size() * sizeof(I));

    char why[512] = "";
    size_t lb = want_len.size() * sizeof(I), ob = want_off.size() * sizeof(I);
    bool ok = same("cpu lengths", cl.data(), want_len.data(), lb, why, sizeof why);
    ok &= same("cpu offsets", co.data(), want_off.data(), ob, why, sizeof why);
    ok &= same("cpu values", cv.data(), want_vals.data(), obytes, why, sizeof why);
    ok &= same("gpu lengths", gl.data(), want_len.data(), lb, why, sizeof why);
    ok &= same("gpu offsets", go.data(), want_off.data(), ob, why, sizeof why);
    ok &= same("gpu values", gv.data(), want_vals.data(), obytes, why, sizeof why);
    report(ok, "strip   int%d batch=%d row=%lld rows=%lld kept=%lld out_total=%lld "
           "offset=%d%s", is64 ? 64 : 32, batch, (long long)rb, (long long)nrows,
           (long long)total, (long long)out_total, mis, why);

    dfree(d_vals);
    dfree(d_out);
    dfree(d_off);
    dfree(d_drop);
    dfree(d_len);
    dfree(d_ooff);
}

static void strip_case(Rng &rng, bool is64, int batch, int64_t rb, int max_len,
                       int64_t short_by, int mis, cudaStream_t stream)
{
    if (is64)
        strip_case_t<int64_t>(rng, batch, rb, max_len, short_by, mis, stream);
    else
        strip_case_t<int32_t>(rng, batch, rb, max_len, short_by, mis, stream);
}

/* -------------------------------------------------- empty work, errors */

static void edge_cases(cudaStream_t stream, bool with_api_errors)
{
    hkv_rows_args ra;
    hkv_pages_args pa;
    hkv_token_meta_args ma;
    hkv_strip_args sa;
    memset(&ra, 0, sizeof ra);
    memset(&pa, 0, sizeof pa);
    memset(&ma, 0, sizeof ma);
    memset(&sa, 0, sizeof sa);
    ra.table.page_size = 32;
    ra.table.row_bytes = 512;
    ra.num_layers = 4;
    pa.table = ra.table;
    pa.num_layers = 4;

    /* Empty work: HKV_OK with NULL pointers, nothing launched. */
    bool ok = hkv_cuda_append(&ra, DEV, stream) == HKV_OK &&
              hkv_cuda_read(&ra, DEV, stream) == HKV_OK &&
              hkv_cuda_gather_pages(&pa, DEV, stream) == HKV_OK &&
              hkv_cuda_scatter_pages(&pa, DEV, stream) == HKV_OK &&
              hkv_cuda_token_meta(&ma, DEV, stream) == HKV_OK;
    HK(hkv_cuda_stream_sync(DEV, stream));
    report(ok, "empty   nnz=0 / n=0 launch nothing and return HKV_OK");

    /* strip of an empty batch still writes out_offsets[0] = 0 */
    for (int is64 = 0; is64 < 2; is64++) {
        uint8_t *d = (uint8_t *)dalloc(16), h[16], want[16];
        dpoison(d, 16);
        memset(want, POISON, 16);
        memset(want, 0, is64 ? 8 : 4);
        sa.index_int64 = is64;
        sa.out_offsets = d;
        hkv_status st = hkv_cuda_strip(&sa, DEV, stream);
        HK(hkv_cuda_stream_sync(DEV, stream));
        download(h, d, 16);
        report(st == HKV_OK && memcmp(h, want, 16) == 0,
               "empty   strip batch=0 int%d writes out_offsets[0]=0 only",
               is64 ? 64 : 32);
        dfree(d);
    }

    /* Errors come back as statuses with messages, never as crashes. */
    int dummy = 0;
    ra.nnz = 1;
    ra.table.page_size = 24;
    ra.batch_indices = ra.positions = &dummy;
    hkv_clear_error();
    hkv_status st = hkv_cuda_append(&ra, DEV, stream);
    report(st == HKV_EINVAL && strstr(hkv_last_error(), "page_size"),
           "error   page_size 24 -> %s: %s", hkv_status_name(st), hkv_last_error());
    /* A failing CUDA call (skipped under compute-sanitizer, which would
     * count the deliberate error as one). */
    if (with_api_errors) {
        int ndev = 0;
        HK(hkv_cuda_device_count(&ndev));
        hkv_clear_error();
        ra.nnz = 0;
        st = hkv_cuda_read(&ra, ndev + 7, stream);
        report(st == HKV_ECUDA && strstr(hkv_last_error(), "failed:"),
               "error   device %d -> %s: %s", ndev + 7, hkv_status_name(st),
               hkv_last_error());
        HK(hkv_cuda_stream_sync(DEV, stream));  /* the device still works */
    }
}

/* The cuda_rt.h services, as the C core will use them. */
/* CRC-32C of device memory equals the host's, for lengths around the
 * 4 KiB chunks, odd alignments and a continued checksum. */
static void crc_cases(cudaStream_t stream)
{
    const int64_t lens[] = {0, 1, 7, 4095, 4096, 4097, 3 * 4096 + 5, 1 << 20, (1 << 20) + 13};
    const int64_t most = (1 << 20) + 13 + 8;
    Rng rng(7);
    std::vector<uint8_t> host((size_t)most);
    rng.fill(host.data(), host.size());
    void *d = NULL, *scratch = NULL, *out = NULL;
    HK(hkv_cuda_malloc(DEV, (size_t)most, &d));
    HK(hkv_cuda_malloc(DEV, (size_t)hkv_cuda_crc32c_scratch_words(most) * 4, &scratch));
    HK(hkv_cuda_malloc(DEV, 4, &out));
    HK(hkv_cuda_memcpy_async(DEV, d, host.data(), (size_t)most, stream));
    for (int64_t len : lens)
        for (int64_t off : {0, 1, 3})
            for (uint32_t seed : {0u, 0x12345678u}) {
                uint32_t got = 0;
                HK(hkv_cuda_crc32c((const char *)d + off, len, seed, (uint32_t *)scratch,
                                   (uint32_t *)out, DEV, stream));
                HK(hkv_cuda_memcpy_async(DEV, &got, out, 4, stream));
                HK(hkv_cuda_stream_sync(DEV, stream));
                uint32_t want = hkv_crc32c_sw(seed, host.data() + off, (size_t)len);
                report(got == want, "crc32c len %lld offset %lld seed %08x: %08x vs %08x",
                       (long long)len, (long long)off, seed, got, want);
            }
    uint32_t check = 0;
    HK(hkv_cuda_memcpy_async(DEV, d, "123456789", 9, stream));
    HK(hkv_cuda_crc32c(d, 9, 0, (uint32_t *)scratch, (uint32_t *)out, DEV, stream));
    HK(hkv_cuda_memcpy_async(DEV, &check, out, 4, stream));
    HK(hkv_cuda_stream_sync(DEV, stream));
    report(check == 0xE3069283u, "crc32c check value %08x", check);
    HK(hkv_cuda_free(DEV, d));
    HK(hkv_cuda_free(DEV, scratch));
    HK(hkv_cuda_free(DEV, out));
}

static void runtime_case(cudaStream_t stream)
{
    int n = -1, done = -1;
    HK(hkv_cuda_device_count(&n));
    bool ok = hkv_cuda_built() == 1 && n >= 1;

    const size_t bytes = 3 << 20;
    void *h1 = NULL, *h2 = NULL, *d = NULL, *ev = NULL;
    HK(hkv_cuda_host_alloc(bytes, &h1));
    HK(hkv_cuda_host_alloc(bytes, &h2));
    HK(hkv_cuda_malloc(DEV, bytes, &d));
    HK(hkv_cuda_event_create(DEV, &ev));
    Rng rng(99);
    rng.fill(h1, bytes);
    memset(h2, 0, bytes);
    HK(hkv_cuda_memset(DEV, d, 0x5A, bytes));
    HK(hkv_cuda_memcpy_async(DEV, d, h1, bytes, stream));
    HK(hkv_cuda_event_record(DEV, ev, stream));
    HK(hkv_cuda_stream_wait_event(DEV, NULL, ev));  /* legacy stream waits */
    HK(hkv_cuda_memcpy_async(DEV, h2, d, bytes, NULL));
    HK(hkv_cuda_stream_sync(DEV, NULL));
    HK(hkv_cuda_event_sync(DEV, ev));
    HK(hkv_cuda_event_query(DEV, ev, &done));
    ok = ok && done == 1 && memcmp(h1, h2, bytes) == 0;
    HK(hkv_cuda_event_destroy(DEV, ev));
    HK(hkv_cuda_free(DEV, d));
    HK(hkv_cuda_host_free(h1));
    HK(hkv_cuda_host_free(h2));
    report(ok, "runtime devices=%d pinned round trip, events, stream wait", n);
}

/* ------------------------------------------------ tables beyond 4 GiB */

/*
 * A 6 GiB table: append into, gather from, scatter into and read from
 * pages of its last layers, whose byte offsets are past 2^32 (and page
 * offsets past 2^31).  The host reference runs on a small table holding
 * only the touched pages, renumbered.
 */
static void big_case(Rng &rng, cudaStream_t stream)
{
    hkv_table_desc td;
    td.num_layers = 3;
    td.page_size = 32;
    td.row_bytes = 512;
    td.num_pages = 65536 + 8;           /* a layer is just over 2 GiB */
    const int64_t tbytes = td.num_layers * hkv_layer_bytes(&td);
    const int64_t pb = hkv_page_bytes(&td);

    Batch bt;
    bt.cached = {40, 0, 90};
    bt.fresh = {30, 70, 5};
    bt.cand = {3, 0, 2};
    const int B = 3;
    std::vector<int32_t> kv_indptr(B + 1, 0);
    for (int b = 0; b < B; b++)
        kv_indptr[b + 1] = kv_indptr[b] + (bt.cached[b] + bt.fresh[b] + 31) / 32;
    const int P = kv_indptr[B];
    std::vector<int32_t> perm = permutation(rng, 4000);
    std::vector<int32_t> real(P), mini(P);
    for (int i = 0; i < P; i++) {
        real[i] = td.num_pages - 1 - perm[i];    /* high page ids */
        mini[i] = i;
    }

    /* Append the new tokens, layers 1..2. */
    std::vector<int32_t> tok_off(B + 1, 0), row_off(B + 1, 0);
    for (int b = 0; b < B; b++) {
        tok_off[b + 1] = tok_off[b] + bt.fresh[b];
        row_off[b + 1] = row_off[b] + bt.fresh[b] + bt.cand[b];
    }
    const int64_t nnz = tok_off[B], R = row_off[B], rb = td.row_bytes;
    std::vector<int32_t> bidx(nnz), pos(nnz);
    hkv_token_meta_args ma = {tok_off.data(), bt.cached.data(), B, nnz,
                              bidx.data(), pos.data()};
    hkv_cpu_token_meta(&ma);
    const int64_t ubytes = 2 * 2 * R * rb;
    Bytes user(ubytes);
    rng.fill(user.data(), ubytes);

    hkv_table_desc mt = td;
    mt.num_pages = P;
    Bytes mtable(td.num_layers * hkv_layer_bytes(&mt), POISON);
    mt.base = mtable.data();

    hkv_rows_args a;
    memset(&a, 0, sizeof a);
    a.table = mt;
    a.first_layer = 1;
    a.num_layers = 2;
    a.k = user.data();
    a.v = user.data() + 2 * R * rb;
    a.k_row_stride = a.v_row_stride = rb;
    a.k_layer_stride = a.v_layer_stride = R * rb;
    a.batch_indices = bidx.data();
    a.positions = pos.data();
    a.token_offsets = tok_off.data();
    a.row_offsets = row_off.data();
    a.kv_indptr = kv_indptr.data();
    a.kv_indices = mini.data();
    a.nnz = nnz;
    hkv_cpu_append(&a);
    hkv_pages_args pa;
    pa.table = mt;
    pa.first_layer = 1;
    pa.num_layers = 2;
    pa.page_ids = mini.data();
    pa.n = P;
    Bytes want_staging(2 * P * pb);
    pa.staging = want_staging.data();
    hkv_cpu_gather_pages(&pa);

    uint8_t *d_table = (uint8_t *)dalloc(tbytes);
    dpoison(d_table, tbytes);
    uint8_t *d_user = (uint8_t *)dalloc(ubytes), *d_staging = (uint8_t *)dalloc(2 * P * pb);
    upload(d_user, user.data(), ubytes);
    int32_t *d_bidx = dcopy(bidx), *d_pos = dcopy(pos), *d_tok = dcopy(tok_off),
            *d_row = dcopy(row_off), *d_indptr = dcopy(kv_indptr), *d_real = dcopy(real);
    hkv_rows_args g = a;
    g.table = td;
    g.table.base = d_table;
    g.k = d_user;
    g.v = d_user + 2 * R * rb;
    g.batch_indices = d_bidx;
    g.positions = d_pos;
    g.token_offsets = d_tok;
    g.row_offsets = d_row;
    g.kv_indptr = d_indptr;
    g.kv_indices = d_real;
    gpu_done(hkv_cuda_append(&g, DEV, stream), "hkv_cuda_append (big)", stream);
    hkv_pages_args gp = pa;
    gp.table = td;
    gp.table.base = d_table;
    gp.page_ids = d_real;
    gp.staging = d_staging;
    gpu_done(hkv_cuda_gather_pages(&gp, DEV, stream), "hkv_cuda_gather_pages (big)", stream);
    Bytes got(2 * P * pb);
    download(got.data(), d_staging, got.size());
    char why[512] = "";
    bool ok = same("append+gather", got.data(), want_staging.data(), got.size(),
                   why, sizeof why);

    /* Scatter fresh pages over the same ids, then read every history
     * token back into poisoned rows. */
    Bytes staging2(2 * P * pb);
    rng.fill(staging2.data(), staging2.size());
    pa.staging = staging2.data();
    hkv_cpu_scatter_pages(&pa);
    std::vector<int32_t> hist(B), htok(B + 1, 0), hrow(B + 1, 0), zero(B, 0);
    for (int b = 0; b < B; b++) {
        htok[b + 1] = htok[b] + bt.cached[b] + bt.fresh[b];
        hrow[b + 1] = hrow[b] + bt.cached[b] + bt.fresh[b] + bt.cand[b];
    }
    const int64_t hnnz = htok[B], HR = hrow[B];
    std::vector<int32_t> hb(hnnz), hp(hnnz);
    hkv_token_meta_args hm = {htok.data(), zero.data(), B, hnnz, hb.data(), hp.data()};
    hkv_cpu_token_meta(&hm);
    const int64_t rbytes = 2 * 2 * HR * rb;
    Bytes want_rows(rbytes, POISON);
    a.k = want_rows.data();
    a.v = want_rows.data() + 2 * HR * rb;
    a.k_layer_stride = a.v_layer_stride = HR * rb;
    a.batch_indices = hb.data();
    a.positions = hp.data();
    a.token_offsets = htok.data();
    a.row_offsets = hrow.data();
    a.nnz = hnnz;
    hkv_cpu_read(&a);

    uint8_t *d_rows = (uint8_t *)dalloc(rbytes);
    dpoison(d_rows, rbytes);
    upload(d_staging, staging2.data(), staging2.size());
    gpu_done(hkv_cuda_scatter_pages(&gp, DEV, stream), "hkv_cuda_scatter_pages (big)", stream);
    int32_t *d_hb = dcopy(hb), *d_hp = dcopy(hp), *d_htok = dcopy(htok), *d_hrow = dcopy(hrow);
    g.k = d_rows;
    g.v = d_rows + 2 * HR * rb;
    g.k_layer_stride = g.v_layer_stride = HR * rb;
    g.batch_indices = d_hb;
    g.positions = d_hp;
    g.token_offsets = d_htok;
    g.row_offsets = d_hrow;
    g.nnz = hnnz;
    gpu_done(hkv_cuda_read(&g, DEV, stream), "hkv_cuda_read (big)", stream);
    Bytes got_rows(rbytes);
    download(got_rows.data(), d_rows, rbytes);
    ok &= same("scatter+read", got_rows.data(), want_rows.data(), rbytes, why,
               sizeof why);
    report(ok, "big     table=%.2f GiB, pages %d..%d of layers 1-2 (offsets > 4 GiB)%s",
           tbytes / 1073741824.0, *std::min_element(real.begin(), real.end()),
           *std::max_element(real.begin(), real.end()), why);

    void *bufs[] = {d_table, d_user, d_staging, d_bidx, d_pos, d_tok, d_row,
                    d_indptr, d_real, d_rows, d_hb, d_hp, d_htok, d_hrow};
    for (void *p : bufs)
        dfree(p);
}

/* ---------------------------------------------------------------- bench */

__global__ void fill_random_kernel(uint64_t *p, size_t n, uint64_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        p[i] = z ^ (z >> 31);
    }
}

static void dfill_random(void *d, size_t bytes, uint64_t seed)
{
    fill_random_kernel<<<1024, 256>>>((uint64_t *)d, bytes / 8, seed);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
}

struct Timer {
    cudaEvent_t a, b;
    Timer() { CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b)); }
    ~Timer() { cudaEventDestroy(a); cudaEventDestroy(b); }
};

/* Median time in ms of `reps` runs of fn (after 3 warm-ups). */
template <typename F>
static double time_ms(cudaStream_t s, int reps, F fn)
{
    Timer t;
    std::vector<float> ms;
    for (int i = 0; i < 3; i++)
        fn();
    CK(cudaStreamSynchronize(s));
    for (int i = 0; i < reps; i++) {
        float x = 0;
        CK(cudaEventRecord(t.a, s));
        fn();
        CK(cudaEventRecord(t.b, s));
        CK(cudaEventSynchronize(t.b));
        CK(cudaEventElapsedTime(&x, t.a, t.b));
        ms.push_back(x);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

static void bench(cudaStream_t s)
{
    const int L = 8, B = 8, T = 4096, H = 4, reps = 15;
    const int dims[] = {64, 128, 256};
    const int pss[] = {2, 8, 32, 128};
    const int64_t nnz = (int64_t)B * T;
    Rng rng(7);

    printf("\nbench: %d layers x batch %d x %d tokens, bf16, %d heads; "
           "GB/s counts bytes read + written; frac = op / cudaMemcpy D2D of the same bytes\n",
           L, B, T, H);
    printf("%-9s %4s %4s %10s %9s %9s %9s %6s\n", "op", "D", "ps", "MiB moved",
           "ms", "GB/s", "copyGB/s", "frac");

    for (int D : dims) {
        const int64_t rb = (int64_t)H * D * 2;
        const int64_t S = (int64_t)L * nnz * 2 * rb;     /* bytes read */
        void *table = dalloc(S), *staging = dalloc(S), *k = dalloc(S / 2),
             *v = dalloc(S / 2);
        dfill_random(table, S, 1);
        dfill_random(staging, S, 2);
        dfill_random(k, S / 2, 3);
        dfill_random(v, S / 2, 4);
        double copy_ms = time_ms(s, reps, [&] {
            CK(cudaMemcpyAsync(staging, table, S, cudaMemcpyDeviceToDevice, s));
        });
        const double copy_bw = 2.0 * S / copy_ms / 1e6;

        for (int ps : pss) {
            const int num_pages = (int)(nnz / ps);
            std::vector<int32_t> ids = permutation(rng, num_pages);
            std::vector<int32_t> tok(B + 1), cached(B, 0), indptr(B + 1);
            for (int b = 0; b <= B; b++) {
                tok[b] = b * T;
                indptr[b] = b * (T / ps);
            }
            std::vector<int32_t> bidx(nnz), pos(nnz);
            hkv_token_meta_args ma = {tok.data(), cached.data(), B, nnz,
                                      bidx.data(), pos.data()};
            hkv_cpu_token_meta(&ma);
            int32_t *d_ids = dcopy(ids), *d_tok = dcopy(tok), *d_indptr = dcopy(indptr),
                    *d_bidx = dcopy(bidx), *d_pos = dcopy(pos);

            hkv_rows_args ra;
            ra.table.base = table;
            ra.table.num_layers = L;
            ra.table.num_pages = num_pages;
            ra.table.page_size = ps;
            ra.table.row_bytes = rb;
            ra.first_layer = 0;
            ra.num_layers = L;
            ra.k = k;
            ra.v = v;
            ra.k_row_stride = ra.v_row_stride = rb;
            ra.k_layer_stride = ra.v_layer_stride = nnz * rb;
            ra.batch_indices = d_bidx;
            ra.positions = d_pos;
            ra.token_offsets = d_tok;
            ra.row_offsets = d_tok;
            ra.kv_indptr = d_indptr;
            ra.kv_indices = d_ids;
            ra.nnz = nnz;
            hkv_pages_args pa;
            pa.table = ra.table;
            pa.first_layer = 0;
            pa.num_layers = L;
            pa.page_ids = d_ids;
            pa.n = num_pages;
            pa.staging = staging;

            struct {
                const char *name;
                double ms;
            } r[5];
            r[0].name = "append";
            r[0].ms = time_ms(s, reps, [&] { HK(hkv_cuda_append(&ra, DEV, s)); });
            r[1].name = "read";
            r[1].ms = time_ms(s, reps, [&] { HK(hkv_cuda_read(&ra, DEV, s)); });
            r[2].name = "gather";
            r[2].ms = time_ms(s, reps, [&] { HK(hkv_cuda_gather_pages(&pa, DEV, s)); });
            r[3].name = "scatter";
            r[3].ms = time_ms(s, reps, [&] { HK(hkv_cuda_scatter_pages(&pa, DEV, s)); });
            /* The per-layer path of inference: one launch per layer. */
            r[4].name = "append1L";
            r[4].ms = time_ms(s, reps, [&] {
                for (int l = 0; l < L; l++) {
                    hkv_rows_args one = ra;
                    one.first_layer = l;
                    one.num_layers = 1;
                    one.k = (char *)k + l * ra.k_layer_stride;
                    one.v = (char *)v + l * ra.v_layer_stride;
                    HK(hkv_cuda_append(&one, DEV, s));
                }
            });
            for (auto &x : r) {
                double bw = 2.0 * S / x.ms / 1e6;
                printf("%-9s %4d %4d %10.1f %9.4f %9.1f %9.1f %6.3f\n", x.name, D,
                       ps, 2.0 * S / 1048576.0, x.ms, bw, copy_bw, bw / copy_bw);
            }
            fflush(stdout);
            void *bufs[] = {d_ids, d_tok, d_indptr, d_bidx, d_pos};
            for (void *p : bufs)
                dfree(p);
        }
        printf("%-9s %4d %4s %10.1f %9.4f %9.1f %9.1f %6.3f\n", "memcpy", D, "-",
               2.0 * S / 1048576.0, copy_ms, copy_bw, copy_bw, 1.0);
        dfree(table);
        dfree(staging);
        dfree(k);
        dfree(v);
    }
}

/* ----------------------------------------------------------------- main */

int main(int argc, char **argv)
{
    enum { FULL, QUICK, SMALL, BENCH } mode = FULL;
    uint64_t seed = 12345;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--quick"))
            mode = QUICK;
        else if (!strcmp(argv[i], "--small"))
            mode = SMALL;
        else if (!strcmp(argv[i], "--bench"))
            mode = BENCH;
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: %s [--quick|--small|--bench] [--seed N]\n",
                    argv[0]);
            return 2;
        }
    }

    int ndev = 0;
    HK(hkv_cuda_device_count(&ndev));
    if (ndev < 1) {
        printf("no CUDA device\n0 passed, 1 failed\n");
        return 1;
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, DEV));
    printf("device: %s, %d SMs, seed %llu\n", prop.name, prop.multiProcessorCount,
           (unsigned long long)seed);

    void *first = dalloc(16);                       /* bring the context up */
    dfree(first);
    cudaStream_t stream;
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

    if (mode == BENCH) {
        bench(stream);
        CK(cudaStreamDestroy(stream));
        return 0;
    }

    Rng rng(seed);
    std::vector<RowShape> shapes;
    std::vector<int> page_sizes;
    if (mode == FULL) {
        shapes = {{2, 4, 64}, {2, 4, 128}, {2, 4, 256}, {4, 4, 64}, {4, 2, 128},
                  {2, 1, 32}, {4, 1, 256}, {2, 2, 96},  {2, 1, 36}, {2, 1, 33},
                  {4, 1, 35}, {2, 8, 32}};
        page_sizes = {2, 4, 8, 16, 32, 64, 128, 256};
    } else if (mode == QUICK) {
        shapes = {{2, 4, 64}, {2, 4, 256}, {4, 1, 32}, {2, 1, 36}, {2, 1, 33},
                  {4, 2, 128}};
        page_sizes = {2, 8, 32, 128, 256};
    } else {
        shapes = {{2, 4, 64}, {2, 1, 33}, {4, 1, 36}};
        page_sizes = {2, 32, 256};
    }
    const int max_users = mode == SMALL ? 4 : 9;

    runtime_case(stream);
    crc_cases(stream);
    edge_cases(stream, mode != SMALL);

    int variant = 0;
    for (RowShape rs : shapes)
        for (int ps : page_sizes)
            for (int append = 1; append >= 0; append--) {
                /* Cycle layouts and layer modes so that each shape and page
                 * size meets several of them; every other case runs on the
                 * legacy default stream. */
                int layout = variant % NUM_LAYOUTS;
                LayerMode lm = kLayerModes[(variant / NUM_LAYOUTS + variant) % 4];
                cudaStream_t s = variant % 2 ? stream : (cudaStream_t)0;
                int max_len = mode == SMALL ? ps + 10 : 2 * ps + 40;
                rows_case(rng, rs, ps, layout, lm, append, s, max_users, max_len);
                variant++;
            }

    /* Batches big enough that one warp takes several layers of a token
     * (the launcher splits layers over blockIdx.y only while tokens are
     * too few to fill the GPU), with odd and even layer counts. */
    struct { RowShape rs; int ps, layout, lmode, users, max_len; } big_rows[] = {
        {{2, 4, 64}, 16, 2, 2, 8, 6000},    /* qkv view, 3 layers   */
        {{2, 4, 128}, 128, 1, 3, 6, 3000},  /* padded, 4 layers     */
        {{2, 1, 33}, 8, 3, 1, 8, 6000},     /* 2-byte width, 2 layers */
    };
    for (auto &c : big_rows) {
        if (mode == SMALL) {    /* still several layers per warp on an H100 */
            c.users = 6;
            c.max_len = 2500;
            c.ps = 32;
            c.lmode = 3;
        }
        for (int append = 1; append >= 0; append--)
            rows_case(rng, c.rs, c.ps, c.layout, kLayerModes[c.lmode], append,
                      stream, c.users, c.max_len, true);
        if (mode == SMALL)
            break;
    }

    for (RowShape rs : shapes)
        for (int ps : page_sizes)
            for (int scatter = 0; scatter < 2; scatter++) {
                LayerMode lm = kLayerModes[variant % 4];
                cudaStream_t s = variant % 2 ? stream : (cudaStream_t)0;
                pages_case(rng, rs, ps, lm, scatter, s);
                variant++;
            }

    /* token metadata: tiny to a few million tokens, batch up to 3000 */
    meta_case(rng, 1, 10, stream);
    meta_case(rng, 7, 40, stream);
    meta_case(rng, 100, 300, stream);
    meta_case(rng, 3000, 50, stream);
    if (mode != SMALL)
        meta_case(rng, 2500, 2000, stream);     /* ~2.5 M tokens */

    /* strip: int32 and int64, row sizes from one byte to whole embeddings,
     * batches over one scan chunk, short out_total, unaligned buffers */
    struct { int batch; int64_t rb; int max_len; int64_t short_by; int mis; } sc[] = {
        {1, 8, 20, 0, 0},       {5, 256, 30, 0, 0},      {7, 1, 50, 0, 0},
        {33, 2, 40, 0, 0},      {64, 12, 40, 3, 0},      {100, 24, 64, 0, 4},
        {1000, 128, 20, 0, 0},  {1025, 64, 16, 7, 0},    {3000, 8, 30, 0, 0},
        {2500, 256, 12, 0, 8},  {300, 1024, 8, 1000000, 0}, {2049, 4, 100, 0, 2},
    };
    for (auto &c : sc)
        for (int is64 = 0; is64 < 2; is64++) {
            if (mode == SMALL && c.batch > 1100)
                continue;
            strip_case(rng, is64, c.batch, c.rb, c.max_len, c.short_by, c.mis,
                       variant++ % 2 ? stream : (cudaStream_t)0);
        }
    if (mode != SMALL) {
        strip_case(rng, false, 3000, 8, 1500, 0, 0, stream);    /* ~2 M rows */
        strip_case(rng, true, 2000, 16, 2000, 11, 0, stream);
        big_case(rng, stream);
    }

    CK(cudaStreamDestroy(stream));
    printf("%d passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
