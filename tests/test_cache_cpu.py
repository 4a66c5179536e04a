"""The native API on the CPU device path: metadata, round trips, modes,
eviction, errors (each leaving the cache consistent and usable), views."""

import gc
import threading

import numpy as np
import pytest

import hstu_kvcache as hk
from hstu_kvcache import (CacheBusyError, CacheFullError, InvalidArgumentError,
                          InvalidStateError, KVCache, KVCacheConfig, StaleLookupError)

torch = pytest.importorskip("torch")

H, D = 2, 8
FIELDS_CPU = ["kv_indptr", "kv_indices", "kv_last_page_len", "total_history_lengths",
              "total_history_offsets", "cached_lengths", "new_history_lengths",
              "new_history_offsets", "row_offsets", "batch_indices", "positions"]


def make(**kw):
    args = dict(num_layers=2, num_heads=H, head_dim=D, num_pages=32, page_size=4,
                max_batch_size=8, max_seq_len=256)
    args.update(kw)
    return KVCache(KVCacheConfig(**args))


def rand_kv(rows, dtype=torch.float32, layers=None, gen=None):
    shape = (rows, H, D) if layers is None else (layers, rows, H, D)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return k, v


def serve(cache, ids, lengths, truth, keys=None, gen=None):
    """One request batch: prepare, append every layer, remember what was
    written per (user, layer, position) in `truth`, release."""
    batch = cache.prepare(ids, lengths, token_keys=keys)
    nl = cache.config.num_layers
    new_off = batch.host("new_history_offsets")
    cached = batch.host("cached_lengths")
    dtype = getattr(torch, cache.config.dtype)
    for layer in range(nl):
        k, v = rand_kv(batch.new_history_nnz, dtype, gen=gen)
        cache.append(layer, k, v, batch)
        for b, uid in enumerate(ids):
            rows = slice(new_off[b], new_off[b + 1])
            if new_off[b + 1] == new_off[b]:
                continue  # nothing written: the cache keeps what it had
            ku, vu = truth.setdefault((uid, layer), (None, None))
            c = int(cached[b])
            prev_k = ku[:c] if ku is not None else k[:0]
            prev_v = vu[:c] if vu is not None else v[:0]
            truth[(uid, layer)] = (torch.cat([prev_k, k[rows]]), torch.cat([prev_v, v[rows]]))
    assert batch.committed
    batch.release()
    return batch


def check_truth(cache, truth):
    for (uid, layer), (k, v) in truth.items():
        n = cache.cached_length(uid)
        kr, vr = cache.read(uid, layer)
        assert kr.shape[0] == n
        assert torch.equal(kr, k[:n]) and torch.equal(vr, v[:n]), (uid, layer)


# --------------------------------------------------------------------------
# metadata

def test_first_batch_metadata_exact():
    cache = make()
    batch = cache.prepare([10, 20, 30], [5, 0, 8])
    assert batch.lookup.cached_lengths.tolist() == [0, 0, 0]
    assert batch.kv_indptr.tolist() == [0, 2, 2, 4]
    assert batch.kv_indices.tolist() == [0, 1, 2, 3]
    assert batch.kv_last_page_len.tolist() == [1, 0, 4]
    assert batch.total_history_lengths.tolist() == [5, 0, 8]
    assert batch.total_history_offsets.tolist() == [0, 5, 5, 13]
    assert batch.new_history_offsets.tolist() == [0, 5, 5, 13]
    assert batch.batch_indices.tolist() == [0] * 5 + [2] * 8
    assert batch.positions.tolist() == list(range(5)) + list(range(8))
    assert batch.new_history_nnz == 13 and batch.num_pages == 4
    assert batch.kv_indptr.dtype == torch.int32
    cache.check()


def test_growing_history_appends_into_partial_page():
    cache = make()
    truth = {}
    serve(cache, [1], [5], truth)
    batch = cache.prepare([1], [7])
    assert batch.lookup.cached_lengths.tolist() == [5]
    assert batch.kv_indices.tolist() == [0, 1]  # the partial page is reused
    assert batch.kv_last_page_len.tolist() == [3]
    assert batch.positions.tolist() == [5, 6]
    assert batch.batch_indices.tolist() == [0, 0]
    assert batch.cached_lengths.tolist() == [5]
    assert batch.new_history_lengths.tolist() == [2]
    batch.release()  # aborted: nothing appended
    assert cache.cached_length(1) == 5
    cache.check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [2, 4, 32, 256])
def test_round_trip_over_rounds(dtype, page_size):
    cache = make(dtype=dtype, page_size=page_size, num_pages=64, max_seq_len=512)
    gen = torch.Generator().manual_seed(page_size)
    truth = {}
    lengths = {1: 3, 2: 0, 3: 40, 4: 1}
    for _ in range(4):
        ids = list(lengths)
        serve(cache, ids, [lengths[u] for u in ids], truth, gen=gen)
        check_truth(cache, truth)
        for u in lengths:
            lengths[u] += u
    cache.check()


def test_gather_returns_cached_and_new_tokens():
    cache = make()
    truth = {}
    serve(cache, [1, 2], [6, 3], truth)
    batch = cache.prepare([2, 1, 3], [5, 6, 2])
    for layer in range(2):
        k, v = rand_kv(batch.new_history_nnz)
        cache.append(layer, k, v, batch)
        kg, vg = cache.gather(layer, batch)
        assert kg.shape == (13, H, D)
        # user 2: 3 cached + 2 new; user 1: 6 cached; user 3: 2 new
        assert torch.equal(kg[0:3], truth[(2, layer)][0])
        assert torch.equal(kg[3:5], k[0:2])
        assert torch.equal(kg[5:11], truth[(1, layer)][0])
        assert torch.equal(vg[11:13], v[2:4])
    batch.release()


def test_multi_layer_append():
    cache = make(num_layers=3)
    batch = cache.prepare([7], [9])
    k, v = rand_kv(9, layers=2)
    cache.append(range(0, 2), k, v, batch)
    assert not batch.committed
    k2, v2 = rand_kv(9)
    cache.append(2, k2, v2, batch)
    assert batch.committed
    batch.release()
    assert torch.equal(cache.read(7, 1)[0], k[1])
    assert torch.equal(cache.read(7, 2)[1], v2)


def test_two_dim_rows_and_strided_rows():
    cache = make(num_layers=1)
    batch = cache.prepare([1], [5])
    qkv = torch.randn(5, 3, H * D)  # K and V as views into a fused tensor
    cache.append(0, qkv[:, 1].reshape(5, H, D), qkv[:, 2], batch)
    batch.release()
    k, v = cache.read(1, 0)
    assert torch.equal(k.reshape(5, -1), qkv[:, 1]) and torch.equal(v.reshape(5, -1), qkv[:, 2])


def test_candidates_are_skipped():
    cache = make(num_layers=1)
    batch = cache.allocate(cache.lookup([1, 2], [3, 2]), num_candidates=[2, 4])
    assert batch.num_rows == 3 + 2 + 2 + 4
    assert batch.row_offsets.tolist() == [0, 5, 11]
    k, v = rand_kv(batch.num_rows)
    cache.append(0, k, v, batch)
    batch.release()
    assert torch.equal(cache.read(1, 0)[0], k[0:3])
    assert torch.equal(cache.read(2, 0)[1], v[5:7])
    # history-only rows are accepted too
    batch = cache.allocate(cache.lookup([3], [2]), num_candidates=[5])
    k, v = rand_kv(2)
    cache.append(0, k, v, batch)
    assert torch.equal(cache.read(3, 0)[0], k)


def test_shorter_history_in_trust_mode_uses_prefix():
    cache = make()
    truth = {}
    serve(cache, [1], [10], truth)
    batch = cache.prepare([1], [6])
    assert batch.lookup.cached_lengths.tolist() == [6]
    assert batch.new_history_nnz == 0 and batch.committed
    assert batch.kv_indices.tolist() == [0, 1] and batch.kv_last_page_len.tolist() == [2]
    batch.release()
    assert cache.cached_length(1) == 10  # nothing was dropped


def test_verified_mode_reuses_only_matching_prefix():
    cache = make(verify_tokens=True)
    truth = {}
    keys = np.arange(100, 110, dtype=np.int64)
    serve(cache, [1], [10], truth, keys=keys)
    assert cache.lookup([1], [10], keys).cached_lengths.tolist() == [10]
    # same history grown: everything reused
    grown = np.concatenate([keys, [7, 8]])
    assert cache.lookup([1], [12], grown).cached_lengths.tolist() == [10]
    # rewritten at position 6 (inside the second page)
    rewritten = keys.copy()
    rewritten[6] = -1
    assert cache.lookup([1], [10], rewritten).cached_lengths.tolist() == [6]
    # sliding window: the first event was dropped -> nothing matches
    assert cache.lookup([1], [9], keys[1:]).cached_lengths.tolist() == [0]
    # serve the rewritten history: tokens 6.. are recomputed and replace the old ones
    serve(cache, [1], [10], truth, keys=rewritten)
    assert cache.cached_length(1) == 10
    check_truth(cache, truth)
    assert cache.lookup([1], [10], keys).cached_lengths.tolist() == [6]
    assert cache.lookup([1], [10], rewritten).cached_lengths.tolist() == [10]
    cache.check()


def test_verified_mode_truncated_history():
    cache = make(verify_tokens=True)
    truth = {}
    keys = np.arange(9, dtype=np.int64)
    serve(cache, [5], [9], truth, keys=keys)
    assert cache.lookup([5], [4], keys[:4]).cached_lengths.tolist() == [4]
    assert cache.lookup([5], [0], keys[:0]).cached_lengths.tolist() == [0]


# --------------------------------------------------------------------------
# eviction

def test_eviction_is_lru_and_tail_first():
    cache = make(num_pages=8)
    truth = {}
    serve(cache, [1], [12], truth)  # 3 pages, oldest
    serve(cache, [2], [12], truth)  # 3 pages
    serve(cache, [3], [8], truth)   # needs 2 pages: 2 free, no eviction
    assert cache.stats()["pages_evicted"] == 0
    serve(cache, [4], [8], truth)   # needs 2 more: user 1 loses its 2 tail pages
    assert cache.cached_length(1) == 4 and cache.cached_length(2) == 12
    st = cache.stats()
    assert st["pages_evicted"] == 2 and st["pages_free"] == 0
    check_truth(cache, truth)       # user 1 keeps a usable prefix
    serve(cache, [2], [13], truth)  # touches user 2 (needs 1 page: from user 1)
    assert cache.cached_length(1) == 0 and cache.stats()["users_evicted"] == 1
    cache.check()


def test_explicit_evict_and_evict_all():
    cache = make()
    truth = {}
    serve(cache, [1, 2, 3], [5, 5, 5], truth)
    cache.evict([2, 99])
    assert [cache.cached_length(u) for u in (1, 2, 3)] == [5, 0, 5]
    open_batch = cache.prepare([1], [6])
    with pytest.raises(CacheBusyError):
        cache.evict([1, 3])
    assert cache.cached_length(3) == 5  # nobody dropped
    assert cache.evict_all() == 1       # user 1 is pinned
    assert cache.cached_length(1) == 5 and cache.cached_length(3) == 0
    open_batch.release()
    assert cache.evict_all() == 1
    assert cache.stats()["pages_used"] == 0
    cache.check()


# --------------------------------------------------------------------------
# errors leave the cache consistent

def state(cache):
    s = cache.stats()
    return {k: s[k] for k in ("pages_free", "pages_used", "pages_pinned", "users_cached",
                              "open_batches", "pages_allocated", "pages_evicted")}


def test_pool_full_raises_and_changes_nothing():
    cache = make(num_pages=6)
    truth = {}
    serve(cache, [1], [8], truth)
    held = cache.prepare([1], [8])  # pins user 1's two pages
    before = state(cache)
    with pytest.raises(CacheFullError, match="num_pages"):
        cache.prepare([2, 3], [12, 9])  # 3 + 3 pages > 4 available
    assert state(cache) == before
    cache.check()
    held.release()
    serve(cache, [2, 3], [12, 9], truth)  # now user 1 can be evicted
    assert cache.cached_length(1) == 0
    check_truth(cache, truth)


@pytest.mark.parametrize("call,needle", [
    (lambda c: c.lookup([1, 1], [2, 3]), "more than once"),
    (lambda c: c.lookup([1], [-1]), "negative"),
    (lambda c: c.lookup([1], [257]), "max_seq_len"),
    (lambda c: c.lookup(list(range(9)), [1] * 9), "max_batch_size"),
    (lambda c: c.lookup([1, 2], [1]), "entries"),
    (lambda c: c.lookup([[1]], [1]), "1-D"),
    (lambda c: c.lookup([1.5], [1]), "integers"),
    (lambda c: c.lookup(["a"], [1]), "integers"),
    (lambda c: c.lookup([1], [1], token_keys=[5]), "trust mode"),
    (lambda c: c.allocate("x"), "LookupResult"),
    (lambda c: c.allocate(c.lookup([1], [1]), num_candidates=[1, 2]), "num_candidates"),
    (lambda c: c.allocate(c.lookup([1], [1]), num_candidates=[-1]), "num_candidates"),
])
def test_bad_batch_arguments(call, needle):
    cache = make()
    truth = {}
    serve(cache, [1], [3], truth)
    before = state(cache)
    with pytest.raises(InvalidArgumentError, match=needle):
        call(cache)
    assert state(cache) == before
    cache.check()
    serve(cache, [1, 2], [4, 4], truth)
    check_truth(cache, truth)


def test_verified_mode_key_errors():
    cache = make(verify_tokens=True)
    with pytest.raises(InvalidArgumentError, match="token_keys"):
        cache.lookup([1], [3])
    with pytest.raises(InvalidArgumentError, match="3 tokens"):
        cache.lookup([1], [3], token_keys=[1, 2])


@pytest.mark.parametrize("make_kv,needle", [
    (lambda n: rand_kv(n, torch.float16), "dtype"),
    (lambda n: (torch.randn(n, H, D + 1), torch.randn(n, H, D + 1)), r"\[rows"),
    (lambda n: (torch.randn(n + 1, H, D), torch.randn(n + 1, H, D)), "rows"),
    (lambda n: (torch.randn(n, D, H).transpose(1, 2), torch.randn(n, H, D)), "contiguous"),
    (lambda n: (torch.randn(n, H, D), torch.randn(n, H, D).to(torch.float64)), "dtype"),
    (lambda n: (torch.randn(2, n, H, D), torch.randn(2, n, H, D)), r"\[rows"),
    (lambda n: ([1.0] * n, torch.randn(n, H, D)), "DLPack"),
])
def test_bad_append_arguments(make_kv, needle):
    cache = make()
    batch = cache.prepare([1], [5])
    before = state(cache)
    k, v = make_kv(5)
    with pytest.raises(InvalidArgumentError, match=needle):
        cache.append(0, k, v, batch)
    assert state(cache) == before and not batch.committed
    k, v = rand_kv(5)
    cache.append(0, k, v, batch)
    cache.append(1, k, v, batch)
    assert batch.committed
    cache.check()


def test_append_state_errors():
    cache = make()
    batch = cache.prepare([1], [5])
    k, v = rand_kv(5)
    with pytest.raises(InvalidArgumentError, match="outside"):
        cache.append(2, k, v, batch)
    with pytest.raises(InvalidArgumentError, match="layer"):
        cache.append("0", k, v, batch)
    cache.append(0, k, v, batch)
    with pytest.raises(InvalidStateError, match="already"):
        cache.append(0, k, v, batch)
    batch.release()
    with pytest.raises(InvalidStateError, match="released"):
        cache.append(1, k, v, batch)
    other = make()
    with pytest.raises(InvalidArgumentError, match="this cache"):
        other.append(0, k, v, batch)
    cache.check()


def test_stale_lookup_is_detected():
    cache = make()
    truth = {}
    serve(cache, [1], [8], truth)
    lk = cache.lookup([1], [10])
    cache.evict([1])
    with pytest.raises(StaleLookupError, match="look the batch up again"):
        cache.allocate(lk)
    cache.check()
    lk = cache.lookup([2], [3])   # user 2 unknown at lookup
    serve(cache, [2], [3], truth)  # ... then cached by someone else
    with pytest.raises(StaleLookupError):
        cache.allocate(lk)
    serve(cache, [1, 2], [10, 4], truth)
    check_truth(cache, truth)


def test_user_in_an_unfinished_batch_is_busy_without_early_reuse():
    """Strict mode; the default (early reuse) is in test_early_reuse.py."""
    cache = make(early_reuse=False)
    truth = {}
    b1 = cache.prepare([1, 2], [5, 5])
    with pytest.raises(CacheBusyError, match="still being appended"):
        cache.prepare([3, 2], [4, 6])
    assert cache.cached_length(3) == 0
    k, v = rand_kv(10)
    cache.append(0, k, v, b1)
    cache.append(1, k, v, b1)
    # committed but still open: appending more is fine ...
    b2 = cache.prepare([2], [7])
    assert b2.lookup.cached_lengths.tolist() == [5]
    b2.release()
    b1.release()
    serve(cache, [3, 2], [4, 6], truth)
    cache.check()


def test_committed_open_batch_blocks_rewrites():
    cache = make(verify_tokens=True)
    truth = {}
    serve(cache, [1], [8], truth, keys=np.arange(8))
    reader = cache.prepare([1], [8], token_keys=np.arange(8))
    keys = np.arange(8)
    keys[2] = 99
    with pytest.raises(CacheBusyError, match="rewrite"):
        cache.prepare([1], [8], token_keys=keys)
    reader.release()
    serve(cache, [1], [8], truth, keys=keys)
    assert cache.lookup([1], [8], keys).cached_lengths.tolist() == [8]


def test_abandoned_batch_rolls_back():
    cache = make()
    truth = {}
    serve(cache, [1], [6], truth)
    batch = cache.prepare([1, 2], [9, 4])
    k, v = rand_kv(batch.new_history_nnz)
    cache.append(0, k, v, batch)  # layer 1 never written
    del batch
    gc.collect()
    assert cache.cached_length(1) == 6 and cache.cached_length(2) == 0
    s = cache.stats()
    assert s["batches_aborted"] == 1 and s["open_batches"] == 0 and s["pages_used"] == 2
    check_truth(cache, truth)
    cache.check()


def test_too_many_open_batches():
    cache = make(max_open_batches=2)
    b1 = cache.prepare([1], [1])
    b2 = cache.prepare([2], [1])
    with pytest.raises(CacheBusyError, match="max_open_batches"):
        cache.prepare([3], [1])
    b1.release()
    view = b1.kv_indices  # a metadata tensor keeps the block
    del b1
    gc.collect()
    with pytest.raises(CacheBusyError):
        cache.prepare([3], [1])
    assert view.tolist() == [0]
    del view
    gc.collect()
    b3 = cache.prepare([3], [1])
    assert cache.stats()["pages_used"] == 2  # the aborted batch gave its page back
    del b2, b3


def test_closed_cache():
    cache = make()
    batch = cache.prepare([1], [3])
    cache.close()
    with pytest.raises(InvalidStateError, match="closed"):
        cache.lookup([1], [3])
    k, v = rand_kv(3)
    with pytest.raises(InvalidStateError, match="closed"):
        cache.append(0, k, v, batch)
    assert batch.kv_indptr.tolist() == [0, 1]  # metadata still readable
    batch.release()
    del batch
    cache.close()  # idempotent


# --------------------------------------------------------------------------
# views

def test_layer_table_is_a_shared_view():
    cache = make(num_layers=2)
    batch = cache.prepare([1], [6])
    ks = []
    for layer in range(2):
        k, v = rand_kv(6)
        cache.append(layer, k, v, batch)
        ks.append((k, v))
    table = torch.from_dlpack(cache.layer_table(1))
    assert table.shape == (32, 2, 4, H, D)
    pages = batch.kv_indices.tolist()
    assert torch.equal(table[pages[0], 0], ks[1][0][0:4])
    assert torch.equal(table[pages[1], 1, :2], ks[1][1][4:6])
    whole = np.from_dlpack(cache.table())
    assert whole.shape == (2, 32, 2, 4, H, D)
    assert np.array_equal(whole[0, pages[0], 0], ks[0][0][0:4].numpy())
    # writes through the view are seen by the cache (same memory)
    table[pages[0], 0, 0] = 7.0
    assert torch.all(cache.read(1, 1)[0][0] == 7.0)
    with pytest.raises(InvalidArgumentError):
        cache.layer_table(2)


def test_views_outlive_the_cache():
    cache = make()
    truth = {}
    serve(cache, [1], [4], truth)
    table = torch.from_dlpack(cache.layer_table(0))
    batch = cache.prepare([1], [4])
    indices = batch.kv_indices
    cache.close()
    del cache, batch
    gc.collect()
    assert torch.equal(table[indices[0], 0], truth[(1, 0)][0])


def test_input_forms():
    cache = make()
    for ids, lengths in [([1, 2], [3, 4]), (np.array([3, 4], np.int32), np.array([1, 1])),
                         (torch.tensor([5, 6]), torch.tensor([2, 2], dtype=torch.int32)),
                         ((7,), (1,))]:
        b = cache.prepare(ids, lengths)
        assert b.batch_size == len(ids)
        b.release()
    empty = cache.prepare([], [])
    assert empty.batch_size == 0 and empty.kv_indptr.tolist() == [0] and empty.committed


def test_stats_counters():
    cache = make()
    truth = {}
    serve(cache, [1, 2], [4, 6], truth)
    serve(cache, [1, 2], [5, 6], truth)
    s = cache.stats()
    assert s["lookups"] == 2 and s["lookup_users"] == 4
    assert s["hit_tokens"] == 10 and s["missed_tokens"] == 11
    assert s["hit_rate"] == pytest.approx(10 / 21)
    assert s["batches_allocated"] == 2 and s["batches_committed"] == 2
    assert s["pages_used"] == 4 and s["pages_free"] == 28 and s["pages_total"] == 32
    assert s["tokens_appended"] == 11 * 2
    assert s["users_cached"] == 2 and s["open_batches"] == 0
    for name in ("lookup_latency", "allocate_latency"):
        h = s[name]
        assert h["count"] == 2 and h["sum"] > 0
        counts = [c for _, c in h["buckets"]]
        assert counts == sorted(counts) and counts[-1] == 2  # cumulative
        assert h["buckets"][-1][0] == float("inf")


def test_threads_share_one_cache():
    cache = make(num_pages=256, max_open_batches=16)
    errors = []

    def worker(base):
        try:
            gen = torch.Generator().manual_seed(base)
            truth = {}
            for r in range(30):
                ids = [base + i for i in range(3)]
                serve(cache, ids, [r + 1 + i for i in range(3)], truth, gen=gen)
            check_truth(cache, truth)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(1000 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cache.check()


def test_cuda_request_without_gpu_is_a_clear_error():
    if hk.cuda_available():
        pytest.skip("a GPU is present")
    with pytest.raises(hk.NoDeviceError, match="cpu"):
        make(device="cuda")


def test_gather_and_scatter_pages():
    cache = make(num_layers=3, num_pages=8)
    table = torch.from_dlpack(cache.table())
    table.copy_(torch.randn_like(table))
    ids = torch.tensor([6, 0, 3], dtype=torch.int32)
    staged = cache.gather_pages(ids)
    assert staged.shape == (3, 3, 2, 4, H, D)
    assert torch.equal(staged, table[:, [6, 0, 3]])
    part = cache.gather_pages(ids, layers=range(1, 3))
    assert torch.equal(part, table[1:3, [6, 0, 3]])
    new = torch.randn_like(part)
    before = table.clone()
    cache.scatter_pages(ids, new, layers=slice(1, 3))
    assert torch.equal(table[1:3, [6, 0, 3]], new)
    untouched = [p for p in range(8) if p not in (6, 0, 3)]
    assert torch.equal(table[:, untouched], before[:, untouched])
    assert torch.equal(table[0], before[0])
    with pytest.raises(InvalidArgumentError, match="outside"):
        cache.gather_pages(torch.tensor([8], dtype=torch.int32))
    with pytest.raises(InvalidArgumentError, match="int32"):
        cache.gather_pages(torch.tensor([1]))
    with pytest.raises(InvalidArgumentError, match="staging"):
        cache.scatter_pages(ids, new[:, :2])
    assert torch.equal(cache.gather_pages(ids[:0]), table[:, []])


def test_impossible_sizes_are_rejected_before_allocation():
    with pytest.raises(InvalidArgumentError, match="overflows"):
        make(num_layers=8, num_heads=2**20, head_dim=2**20, num_pages=1024, page_size=256)
    with pytest.raises(hk.OutOfMemoryError, match="host memory"):  # no overflow, too big
        make(num_layers=1, num_heads=2**20, head_dim=2**20, num_pages=1024, page_size=256)
    with pytest.raises(InvalidArgumentError, match="2\\^29"):
        make(num_pages=2**29)
