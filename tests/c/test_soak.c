/*
 * test_soak.c - thousands of random operations on small caches, against a
 * model of what the cache must do.
 *
 * The model is deliberately written from the contract (cache.h and the
 * design notes), not from cache.c's code:
 *   - per user: the committed length, the reserved length (pages), the
 *     keys of the tokens the cache holds, open batches holding it (pins),
 *     whether an uncommitted batch is writing it, and when it was last
 *     used (LRU);
 *   - lookup must answer exactly: min(length, history) in trust mode, the
 *     longest common prefix of the keys in verified mode;
 *   - allocate's status is predicted exactly (EBUSY / EFULL / ESTALE /
 *     EINVAL for max_batch_tokens / OK), including the pool arithmetic of
 *     "pages of the batch and of open batches cannot be taken";
 *   - a lookup is stale exactly when the user's entry lost tokens, was
 *     created or removed since (other batches, evictions and aborts may
 *     run between a lookup and its allocate);
 *   - LRU eviction is not predicted page by page but checked after the
 *     fact: only unpinned users outside the batch may lose tokens, whole
 *     pages from the tail, and the victims must be the least recently
 *     used ones, all but the last emptied completely;
 *   - every token read back (batch reads, read_user) must hold the
 *     contents written for its key.
 * After every operation hkv_cache_check must pass and the gauges must
 * match the model.
 *
 * Four configurations run: trust and verified mode, page sizes 2 to 8,
 * pools small enough that eviction, EFULL and EBUSY all happen often
 * (HKV_SOAK_VERBOSE=1 prints how often).  --seed=N and --long explore
 * further; a failure prints its seed and operation number.
 */
#include <stdlib.h>

#include "cache_util.h"

#define S_USERS 20
#define S_MAXLEN 40
#define S_LAYERS 3
#define S_OPEN 4          /* max_open_batches */
#define S_BATCH 5         /* max_batch_size */

typedef struct muser {
    int64_t id;
    int64_t stream[S_MAXLEN];   /* the user's current true history       */
    int64_t held[S_MAXLEN];     /* keys of the tokens the cache holds     */
    int64_t len;                /* committed tokens                       */
    int64_t reserved;           /* tokens with pages                      */
    int pins;                   /* open batches holding the user          */
    int filling;                /* an uncommitted batch writes it         */
    int exists;                 /* has an index entry                     */
    uint64_t touch;             /* clock of the last use (LRU)            */
    uint64_t version;           /* bumped whenever the cache's epoch of
                                 * the user must change: created, lost
                                 * tokens (eviction, rewrite), removed    */
} muser;

typedef struct mbatch {
    hkv_batch *b;
    req r;
    int user[REQ_MAX_USERS];    /* model user of each batch entry, or -1  */
    uint8_t fills[REQ_MAX_USERS];
    uint8_t done[S_LAYERS];
    int committed;
} mbatch;

typedef struct soak {
    hkv_cache *c;
    hkv_config cfg;
    test_rng rng;
    muser u[S_USERS];
    mbatch open[S_OPEN];
    int nopen;
    uint64_t clock;
    hkv_stats st;                /* after the previous operation          */
    const char *op;              /* what is running, for failure messages */
    int64_t ops, allocs, efull, ebusy, estale, einval, evicted, aborted;
} soak;

static int64_t pages_for(const soak *s, int64_t tokens)
{
    return (tokens + s->cfg.page_size - 1) / s->cfg.page_size;
}

static int user_of(const soak *s, int64_t id)
{
    for (int i = 0; i < S_USERS; i++)
        if (s->u[i].id == id)
            return i;
    return -1;
}

/* ------------------------------------------------------------------ */
/* whole-state checks                                                  */

/*
 * The cache's own invariant check, then every user's length against the
 * model and the gauges against model sums.  Call when no eviction can
 * have happened since the model was last synchronized.
 */
static int soak_check(soak *s)
{
    if (hkv_cache_check(s->c) != HKV_OK) {
        test_fail(__FILE__, __LINE__, "after %s: hkv_cache_check: %s", s->op,
                  hkv_last_error());
        return 1;
    }
    int64_t used = 0, pinned = 0, users = 0;
    for (int i = 0; i < S_USERS; i++) {
        const muser *m = &s->u[i];
        int64_t n = -1;
        (void)hkv_cache_user_length(s->c, m->id, &n);
        if (n != m->len) {
            test_fail(__FILE__, __LINE__, "after %s: user %lld has %lld tokens, "
                      "model %lld", s->op, (long long)m->id, (long long)n,
                      (long long)m->len);
            return 1;
        }
        users += m->exists;
        used += pages_for(s, m->reserved);
        if (m->pins > 0)
            pinned += pages_for(s, m->reserved);
    }
    hkv_cache_stats(s->c, &s->st);
    if (s->st.users_cached != users || s->st.pages_used != used ||
        s->st.pages_pinned != pinned || s->st.open_batches != s->nopen ||
        s->st.pages_free != s->cfg.num_pages - used) {
        test_fail(__FILE__, __LINE__, "after %s: gauges users %lld/%lld pages "
                  "%lld/%lld pinned %lld/%lld open %lld/%d (cache/model)", s->op,
                  (long long)s->st.users_cached, (long long)users,
                  (long long)s->st.pages_used, (long long)used,
                  (long long)s->st.pages_pinned, (long long)pinned,
                  (long long)s->st.open_batches, s->nopen);
        return 1;
    }
    return 0;
}

/* Contents of one user as read_user returns them. */
static int soak_check_user(soak *s, int i)
{
    return check_user(s->c, s->u[i].id, s->u[i].held, s->u[i].len);
}

/* ------------------------------------------------------------------ */
/* batch lifecycle in the model                                        */

static void model_commit(soak *s, mbatch *mb)
{
    for (int32_t b = 0; b < mb->r.n; b++)
        if (mb->fills[b]) {
            muser *m = &s->u[mb->user[b]];
            m->len = m->reserved;
            m->filling = 0;
            mb->fills[b] = 0;
        }
    mb->committed = 1;
}

/* close (rolling back an uncommitted batch) and forget the batch */
static void model_close(soak *s, int k)
{
    mbatch *mb = &s->open[k];
    for (int32_t b = 0; b < mb->r.n; b++) {
        if (mb->user[b] < 0)
            continue;
        muser *m = &s->u[mb->user[b]];
        if (mb->fills[b]) {
            m->reserved = m->len;
            m->filling = 0;
        }
        if (--m->pins == 0 && m->reserved == 0) {
            m->exists = 0;
            m->version++;
        }
    }
    s->open[k] = s->open[--s->nopen];
}

/* Append the given layers of an open batch in random groups and forms. */
static int soak_append(soak *s, mbatch *mb, int all)
{
    int32_t l = 0;
    while (l < S_LAYERS) {
        if (mb->done[l] || (!all && rng_chance(&s->rng, 1, 2))) {
            l++;
            continue;
        }
        int32_t count = 1;
        while (l + count < S_LAYERS && !mb->done[l + count] &&
               rng_chance(&s->rng, 1, 2))
            count++;
        int form = count > 1 ? 3 : (int)rng_below(&s->rng, 4);
        int cands = mb->r.use_cands && rng_chance(&s->rng, 1, 2);
        HCHECK_ST(req_append(s->c, mb->b, &mb->r, l, count, form, cands), HKV_OK);
        for (int32_t i = l; i < l + count; i++)
            mb->done[i] = 1;
        l += count;
    }
    int left = 0;
    for (int32_t i = 0; i < S_LAYERS; i++)
        left += !mb->done[i];
    hkv_batch_info info;
    hkv_batch_get_info(mb->b, &info);
    if (left == 0 && !mb->committed)
        model_commit(s, mb);
    HCHECK_EQ(info.committed, mb->committed);
    return 0;
}

/* Read every layer the batch has complete and compare. */
static int soak_read_batch(soak *s, mbatch *mb)
{
    for (int32_t l = 0; l < S_LAYERS; l++)
        if (mb->committed || mb->done[l])
            if (req_check_read(s->c, mb->b, &mb->r, l) != 0)
                return 1;
    return 0;
}

/* Finish an open batch: complete or abandon it, then free it. */
static int soak_finish(soak *s, int k)
{
    mbatch *mb = &s->open[k];
    if (!mb->committed && rng_chance(&s->rng, 1, 2)) {
        if (soak_append(s, mb, 1) != 0)
            return 1;
        if (soak_read_batch(s, mb) != 0)
            return 1;
    }
    if (!mb->committed)
        s->aborted++;
    if (rng_chance(&s->rng, 1, 3))
        hkv_batch_close(mb->b);
    hkv_batch_free(mb->b);
    model_close(s, k);
    return 0;
}

/* ------------------------------------------------------------------ */
/* allocate: predicted status and LRU eviction check                   */

/*
 * What allocate must answer for request r, given the model and, per entry,
 * whether the user's cache entry changed since the lookup.
 */
static hkv_status predict_allocate(soak *s, const req *r, const int *changed)
{
    int64_t need = 0, unpinned_kept = 0, pinned = 0, new_tokens = 0;
    for (int i = 0; i < S_USERS; i++)
        if (s->u[i].pins > 0)
            pinned += pages_for(s, s->u[i].reserved);
    for (int32_t b = 0; b < r->n; b++) {
        const muser *m = &s->u[user_of(s, r->ids[b])];
        if (changed[b])
            return HKV_ESTALE;
        int64_t n = r->lens[b] - r->cached[b];
        int truncate = m->exists && n > 0 && m->reserved > r->cached[b];
        if (m->exists && m->pins > 0 && (m->filling || truncate))
            return HKV_EBUSY;
        int64_t keep = n > 0 ? pages_for(s, r->cached[b])
                             : pages_for(s, m->reserved);
        if (n > 0)
            need += pages_for(s, r->lens[b]) - keep;
        if (m->exists && m->pins == 0)
            unpinned_kept += keep;
        new_tokens += n;
    }
    if (new_tokens > s->cfg.max_batch_tokens)
        return HKV_EINVAL;
    if (need > s->cfg.num_pages - pinned - unpinned_kept)
        return HKV_EFULL;
    if (s->nopen == S_OPEN)
        return HKV_EBUSY;
    return HKV_OK;
}

/* Metadata of a new batch against its request. */
static int check_meta(soak *s, mbatch *mb)
{
    const req *r = &mb->r;
    const int32_t *indptr = meta_of(s->c, mb->b, HKV_META_KV_INDPTR);
    const int32_t *last = meta_of(s->c, mb->b, HKV_META_KV_LAST_PAGE_LEN);
    const int32_t *cached = meta_of(s->c, mb->b, HKV_META_CACHED_LENGTHS);
    const int32_t *new_off = meta_of(s->c, mb->b, HKV_META_NEW_OFFSETS);
    const int32_t *row_off = meta_of(s->c, mb->b, HKV_META_ROW_OFFSETS);
    const int32_t *idx = meta_of(s->c, mb->b, HKV_META_KV_INDICES);
    const int32_t *bi = meta_of(s->c, mb->b, HKV_META_BATCH_INDICES);
    const int32_t *pos = meta_of(s->c, mb->b, HKV_META_POSITIONS);
    uint8_t seen[256] = {0};
    int64_t t = 0, rows = 0;
    HCHECK(s->cfg.num_pages <= 256);
    HCHECK_EQ(indptr[0], 0);
    HCHECK_EQ(new_off[0], 0);
    for (int32_t b = 0; b < r->n; b++) {
        int64_t len = r->lens[b], pages = pages_for(s, len);
        HCHECK_EQ(indptr[b + 1] - indptr[b], pages);
        HCHECK_EQ(last[b], len == 0 ? 0 : len - (pages - 1) * s->cfg.page_size);
        HCHECK_EQ(cached[b], r->cached[b]);
        HCHECK_EQ(new_off[b + 1] - new_off[b], len - r->cached[b]);
        rows += len - r->cached[b] + (r->use_cands ? r->cands[b] : 0);
        HCHECK_EQ(row_off[b + 1], rows);
        for (int32_t i = indptr[b]; i < indptr[b + 1]; i++) {
            HCHECK(idx[i] >= 0 && idx[i] < s->cfg.num_pages);
            HCHECK(!seen[idx[i]]++);          /* no page twice in a batch */
        }
        for (int64_t p = r->cached[b]; p < len; p++, t++) {
            HCHECK_EQ(bi[t], b);
            HCHECK_EQ(pos[t], p);
        }
    }
    return 0;
}

/*
 * After a successful allocate (model already updated for the batch's own
 * users): find the users that lost tokens to LRU eviction and check who
 * they are, then bring the model in line.
 */
static int check_eviction(soak *s, const hkv_stats *before)
{
    int victims[S_USERS], nv = 0;
    int64_t lost_pages = 0, emptied = 0;
    for (int i = 0; i < S_USERS; i++) {
        muser *m = &s->u[i];
        int64_t n = -1;
        (void)hkv_cache_user_length(s->c, m->id, &n);
        if (n == m->len)
            continue;
        /* Only unpinned users lose tokens, whole pages from the tail. */
        if (n > m->len || m->pins > 0 || n % s->cfg.page_size != 0) {
            test_fail(__FILE__, __LINE__, "allocate: user %lld went from %lld to "
                      "%lld tokens (pins %d)", (long long)m->id, (long long)m->len,
                      (long long)n, m->pins);
            return 1;
        }
        victims[nv++] = i;
        lost_pages += pages_for(s, m->reserved) - pages_for(s, n);
        emptied += n == 0;
    }
    /* The victims are the least recently used unpinned users: walking the
     * candidates oldest first, every victim but the last is emptied, and
     * no candidate is skipped. */
    int order[S_USERS], nc = 0;
    for (int i = 0; i < S_USERS; i++)
        if (s->u[i].exists && s->u[i].pins == 0)
            order[nc++] = i;
    for (int a = 1; a < nc; a++)                      /* insertion sort by touch */
        for (int b = a; b > 0 && s->u[order[b - 1]].touch > s->u[order[b]].touch; b--) {
            int x = order[b];
            order[b] = order[b - 1];
            order[b - 1] = x;
        }
    for (int k = 0; k < nv; k++) {
        int is_victim = 0;
        for (int q = 0; q < nv; q++)
            is_victim |= victims[q] == order[k];
        int64_t n = -1;
        (void)hkv_cache_user_length(s->c, s->u[order[k]].id, &n);
        if (!is_victim || (k < nv - 1 && n != 0)) {
            test_fail(__FILE__, __LINE__, "eviction is not LRU: user %lld (rank %d "
                      "of %d candidates) %s", (long long)s->u[order[k]].id, k, nc,
                      is_victim ? "kept tokens before a later victim"
                                : "was skipped");
            return 1;
        }
    }
    hkv_stats now;
    hkv_cache_stats(s->c, &now);
    HCHECK_EQ(now.pages_evicted - before->pages_evicted, lost_pages);
    HCHECK_EQ(now.users_evicted - before->users_evicted, emptied);
    for (int k = 0; k < nv; k++) {
        muser *m = &s->u[victims[k]];
        int64_t n = -1;
        (void)hkv_cache_user_length(s->c, m->id, &n);
        m->len = m->reserved = n;
        m->exists = n > 0;
        m->version++;
    }
    s->evicted += nv;
    return 0;
}

/* ------------------------------------------------------------------ */
/* operations                                                          */

/* A random history for user i: grow, shrink or anything, and in verified
 * mode sometimes rewrite the user's stream from a random point first. */
static void make_history(soak *s, req *r, int i)
{
    muser *m = &s->u[i];
    int64_t len;
    switch (rng_below(&s->rng, 4)) {
    case 0:
    case 1:
        len = m->len + rng_range(&s->rng, 0, 9);
        break;
    case 2:
        len = rng_range(&s->rng, 0, m->len);
        break;
    default:
        len = rng_range(&s->rng, 0, S_MAXLEN);
        break;
    }
    if (len > S_MAXLEN)
        len = S_MAXLEN;
    if (s->cfg.verify_tokens && len > 0 && rng_chance(&s->rng, 1, 5)) {
        int64_t from = rng_below(&s->rng, len);
        for (int64_t p = from; p < S_MAXLEN; p++)
            m->stream[p] = (int64_t)rng_next(&s->rng);
    }
    req_add_keys(r, m->id, len, m->stream);
}

static int op_batch(soak *s, int mode);
static int op_finish(soak *s);
static int op_read(soak *s);
static int op_evict(soak *s);
static int op_evict_all(soak *s);

/*
 * One batch: lookup (checked exactly), allocate (status predicted
 * exactly), then write it completely, partly or not at all, and keep it
 * open or free it.  Between lookup and allocate,
 *   mode 0: nothing;
 *   mode 1: one of the batch's users is evicted explicitly;
 *   mode 2: a few random operations, other batches included, run: any of
 *           them may have made the lookup stale, or the users busy.
 */
static int op_batch(soak *s, int mode)
{
    mbatch *mb;
    req r;
    uint64_t version[REQ_MAX_USERS];
    int changed[REQ_MAX_USERS] = {0};
    req_init(&r);
    int n = (int)rng_range(&s->rng, 1, S_BATCH);
    int picked[S_USERS] = {0};
    for (int k = 0; k < n; k++) {
        int i;
        do
            i = (int)rng_below(&s->rng, S_USERS);
        while (picked[i]);
        picked[i] = 1;
        make_history(s, &r, i);
        r.cands[k] = rng_range(&s->rng, 0, 3);
    }
    r.use_cands = rng_chance(&s->rng, 1, 2);

    s->op = "lookup";
    HCHECK_ST(req_lookup(s->c, &r), HKV_OK);
    for (int32_t b = 0; b < r.n; b++) {
        const muser *m = &s->u[user_of(s, r.ids[b])];
        int64_t want = m->len < r.lens[b] ? m->len : r.lens[b];
        if (s->cfg.verify_tokens) {
            int64_t off = req_key_off(&r, b), p = 0;
            while (p < want && m->held[p] == r.keys[off + p])
                p++;
            want = p;
        }
        if (r.cached[b] != want || (r.epochs[b] == 0) != !m->exists) {
            test_fail(__FILE__, __LINE__, "lookup of user %lld: cached %lld, model "
                      "%lld (epoch %llu, exists %d)", (long long)r.ids[b],
                      (long long)r.cached[b], (long long)want,
                      (unsigned long long)r.epochs[b], m->exists);
            return 1;
        }
        version[b] = m->version;
    }

    if (mode == 1) {
        int32_t b = (int32_t)rng_below(&s->rng, r.n);
        muser *m = &s->u[user_of(s, r.ids[b])];
        s->op = "evict before allocate";
        hkv_status st = hkv_cache_evict(s->c, 1, &r.ids[b], HKV_TIER_ALL, 0, NULL);
        HCHECK_ST(st, m->pins > 0 ? HKV_EBUSY : HKV_OK);
        if (st == HKV_OK) {
            m->version += m->exists;
            m->len = m->reserved = 0;
            m->exists = 0;
        }
        if (soak_check(s) != 0)
            return 1;
    } else if (mode == 2) {
        for (int64_t k = rng_range(&s->rng, 1, 3); k > 0; k--) {
            int64_t x = rng_below(&s->rng, 10);
            int bad = x < 5   ? op_batch(s, 0)
                      : x < 7 ? op_finish(s)
                      : x < 8 ? op_read(s)
                      : x < 9 ? op_evict(s)
                              : op_evict_all(s);
            if (bad)
                return 1;
        }
    }
    /* The lookup is stale for a user whose epoch had to change, except
     * that absent then and absent now is the same answer (epoch 0, nothing
     * cached), whatever happened in between. */
    for (int32_t b = 0; b < r.n; b++) {
        const muser *m = &s->u[user_of(s, r.ids[b])];
        changed[b] = m->version != version[b] && (r.epochs[b] != 0 || m->exists);
    }

    s->op = "allocate";
    hkv_status want = predict_allocate(s, &r, changed);
    hkv_stats before;
    hkv_cache_stats(s->c, &before);
    hkv_batch *b = NULL;
    hkv_status st = req_allocate(s->c, &r, &b);
    if (st != want) {
        test_fail(__FILE__, __LINE__, "allocate: got %s, model says %s (%s)",
                  hkv_status_name(st), hkv_status_name(want),
                  st == HKV_OK ? "" : hkv_last_error());
        for (int32_t k = 0; k < r.n; k++) {
            const muser *m = &s->u[user_of(s, r.ids[k])];
            printf("    user %lld: history %lld, looked up %lld (epoch %llu), "
                   "model: %s, length %lld, reserved %lld, pins %d%s\n",
                   (long long)r.ids[k], (long long)r.lens[k], (long long)r.cached[k],
                   (unsigned long long)r.epochs[k],
                   changed[k] ? "epoch must have changed" : "same epoch",
                   (long long)m->len, (long long)m->reserved, m->pins,
                   m->filling ? ", filling" : "");
        }
        if (b != NULL)
            hkv_batch_free(b);
        return 1;
    }
    if (st != HKV_OK) {
        hkv_stats after;
        s->efull += st == HKV_EFULL;
        s->ebusy += st == HKV_EBUSY;
        s->estale += st == HKV_ESTALE;
        s->einval += st == HKV_EINVAL;
        hkv_cache_stats(s->c, &after);
        HCHECK(stats_equal(&before, &after));   /* nothing changed */
        HCHECK(b == NULL);
        return soak_check(s);
    }
    s->allocs++;

    /* The model side of allocate, user by user in batch order.  The
     * prediction said OK, so there is a free slot for the batch. */
    mb = &s->open[s->nopen];
    memset(mb, 0, sizeof *mb);
    mb->b = b;
    mb->r = r;
    int64_t new_tokens = 0;
    for (int32_t k = 0; k < r.n; k++) {
        int i = user_of(s, r.ids[k]);
        muser *m = &s->u[i];
        int64_t cl = r.cached[k], len = r.lens[k];
        mb->user[k] = -1;
        if (!m->exists && len == 0)
            continue;                      /* no entry for an empty unknown */
        mb->user[k] = i;
        m->version += !m->exists;          /* a new entry, a new epoch */
        m->exists = 1;
        m->pins++;
        m->touch = ++s->clock;
        if (len > cl) {
            if (m->reserved > cl) {        /* rewritten tail dropped */
                m->version += m->len > cl;
                m->len = m->reserved = cl;
            }
            m->reserved = len;
            m->filling = 1;
            mb->fills[k] = 1;
            memcpy(m->held, r.keys + req_key_off(&r, k), (size_t)len * sizeof *m->held);
            new_tokens += len - cl;
        }
    }
    s->nopen++;
    if (new_tokens == 0)
        model_commit(s, mb);              /* nothing to write: committed */
    hkv_batch_info info;
    hkv_batch_get_info(b, &info);
    HCHECK_EQ(info.new_tokens, new_tokens);
    HCHECK_EQ(info.committed, mb->committed);
    if (check_meta(s, mb) != 0 || check_eviction(s, &before) != 0)
        return 1;
    if (soak_check(s) != 0)
        return 1;

    /* Lifecycle: mostly complete and free; sometimes leave it open,
     * complete or partly written, for later operations to meet. */
    s->op = "append";
    int64_t what = rng_below(&s->rng, 20);
    if (what < 12) {
        if (soak_append(s, mb, 1) != 0 || soak_read_batch(s, mb) != 0)
            return 1;
        s->op = "free";
        if (soak_finish(s, s->nopen - 1) != 0)
            return 1;
    } else if (what < 16) {
        if (soak_append(s, mb, 0) != 0 || soak_read_batch(s, mb) != 0)
            return 1;
    } else {
        if (soak_append(s, mb, 1) != 0)
            return 1;
    }
    return soak_check(s);
}

static int op_finish(soak *s)
{
    if (s->nopen == 0)
        return 0;
    s->op = "finish";
    if (soak_finish(s, (int)rng_below(&s->rng, s->nopen)) != 0)
        return 1;
    return soak_check(s);
}

static int op_read(soak *s)
{
    s->op = "read";
    if (s->nopen > 0 &&
        soak_read_batch(s, &s->open[rng_below(&s->rng, s->nopen)]) != 0)
        return 1;
    return soak_check_user(s, (int)rng_below(&s->rng, S_USERS));
}

static int op_evict(soak *s)
{
    int64_t ids[3];
    int n = (int)rng_range(&s->rng, 1, 3), busy = 0;
    for (int k = 0; k < n; k++) {
        ids[k] = s->u[rng_below(&s->rng, S_USERS)].id;
        busy |= s->u[user_of(s, ids[k])].pins > 0;
    }
    s->op = "evict";
    hkv_status st = hkv_cache_evict(s->c, n, ids, HKV_TIER_ALL, 0, NULL);
    HCHECK_ST(st, busy ? HKV_EBUSY : HKV_OK);
    for (int k = 0; st == HKV_OK && k < n; k++) {
        muser *m = &s->u[user_of(s, ids[k])];
        m->version += m->exists;
        m->len = m->reserved = 0;
        m->exists = 0;
    }
    return soak_check(s);
}

static int op_evict_all(soak *s)
{
    int64_t want = 0;
    for (int i = 0; i < S_USERS; i++)
        if (s->u[i].exists && s->u[i].pins == 0) {
            want++;
            s->u[i].len = s->u[i].reserved = 0;
            s->u[i].exists = 0;
            s->u[i].version++;
        }
    s->op = "evict_all";
    HCHECK_EQ(hkv_cache_evict_all(s->c, HKV_TIER_ALL, 0, NULL), want);
    return soak_check(s);
}

static int soak_run(hkv_config cfg, uint64_t seed, int ops)
{
    soak *s = calloc(1, sizeof *s);
    HCHECK(s != NULL);
    s->cfg = cfg;
    s->rng.s = seed;
    s->op = "create";
    hkv_status st = hkv_cache_create(&cfg, &s->c);
    if (st != HKV_OK) {
        free(s);
        HCHECK_ST(st, HKV_OK);
    }
    s->cfg = *hkv_cache_config(s->c);        /* with defaults filled in */
    for (int i = 0; i < S_USERS; i++) {
        /* ids spread over the int64 range, negative ones included */
        s->u[i].id = i % 3 == 0 ? -(int64_t)(i + 1) * 7919
                   : i == 1 ? INT64_MAX : i == 2 ? INT64_MIN : (int64_t)i << 40;
        for (int p = 0; p < S_MAXLEN; p++)
            s->u[i].stream[p] = tok_key(s->u[i].id, p);
    }
    int bad = 0;
    for (int op = 0; op < ops && !bad; op++) {
        int64_t x = rng_below(&s->rng, 100);
        s->ops++;
        if (x < 45)
            bad = op_batch(s, 0);
        else if (x < 50)
            bad = op_batch(s, 1);
        else if (x < 55)
            bad = op_batch(s, 2);
        else if (x < 72)
            bad = op_finish(s);
        else if (x < 90)
            bad = op_read(s);
        else if (x < 99)
            bad = op_evict(s);
        else
            bad = op_evict_all(s);
    }
    /* Drain: finish every open batch, check every user's contents. */
    while (!bad && s->nopen > 0)
        bad = op_finish(s);
    for (int i = 0; !bad && i < S_USERS; i++)
        bad = soak_check_user(s, i);
    if (bad)
        printf("\n    (soak seed %llu, operation %lld, %s)",
               (unsigned long long)seed, (long long)s->ops, s->op);
    else if (getenv("HKV_SOAK_VERBOSE") != NULL)
        printf("[%lld ops: %lld batches, %lld full, %lld busy, %lld stale, "
               "%lld too many tokens, %lld evictions, %lld aborted] ",
               (long long)s->ops, (long long)s->allocs, (long long)s->efull,
               (long long)s->ebusy, (long long)s->estale, (long long)s->einval,
               (long long)s->evicted, (long long)s->aborted);
    /* On failure the open batches are abandoned with the cache. */
    for (int k = 0; k < s->nopen; k++)
        hkv_batch_free(s->open[k].b);
    hkv_cache_destroy(s->c);
    free(s);
    return bad;
}

static hkv_config soak_cfg(int32_t page_size, int32_t num_pages, int verify,
                           int64_t max_batch_tokens)
{
    hkv_config cfg = cfg_small(S_LAYERS, page_size, num_pages, S_BATCH, S_MAXLEN);
    cfg.verify_tokens = verify;
    cfg.max_open_batches = S_OPEN;
    cfg.max_batch_tokens = max_batch_tokens;
    return cfg;
}

static void test_soak_trust_page4(void)
{
    CHECK(soak_run(soak_cfg(4, 40, 0, 0), hkv_test_seed, 10000 * hkv_test_scale) == 0);
}

static void test_soak_trust_page2(void)
{
    CHECK(soak_run(soak_cfg(2, 64, 0, 60), hkv_test_seed + 1, 10000 * hkv_test_scale) == 0);
}

static void test_soak_verified_page4(void)
{
    CHECK(soak_run(soak_cfg(4, 40, 1, 0), hkv_test_seed + 2, 10000 * hkv_test_scale) == 0);
}

static void test_soak_verified_page8(void)
{
    CHECK(soak_run(soak_cfg(8, 24, 1, 48), hkv_test_seed + 3, 10000 * hkv_test_scale) == 0);
}

void run_soak_tests(void)
{
    RUN(test_soak_trust_page4);
    RUN(test_soak_trust_page2);
    RUN(test_soak_verified_page4);
    RUN(test_soak_verified_page8);
}
