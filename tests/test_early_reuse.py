"""Early reuse: batch N+1 is prepared while batch N (same user) is still
appending; N's tokens count as cached for N+1, N+1's reads of them wait for
N's layers, and a broken chain raises instead of reading garbage (CPU path;
the GPU stream ordering is in test_gpu_host_tier.py)."""

import numpy as np
import pytest
import torch

import hstu_kvcache as hk
from hstu_kvcache.errors import CacheBusyError, StaleLookupError

L, H, D = 2, 2, 4


def make(**kw):
    args = dict(num_layers=L, num_heads=H, head_dim=D, num_pages=32, page_size=4,
                max_batch_size=4, max_seq_len=128)
    args.update(kw)
    return hk.KVCache(hk.KVCacheConfig(**args))


def kv(rows, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, rows, H, D, generator=g)


def test_next_batch_continues_one_in_flight():
    cache = make()
    x = cache.prepare([1], [10])
    y = cache.prepare([1], [14])                   # x has appended nothing yet
    assert y.lookup.cached_lengths.tolist() == [10]
    assert y.new_history_nnz == 4
    assert x.kv_indices.tolist() == y.kv_indices.tolist()[:3]   # x's pages, shared
    kx, ky = kv(10, 1), kv(4, 2)
    for layer in range(L):                         # pipelined: layer by layer
        cache.append(layer, kx[layer], kx[layer] + 1, x)
        cache.append(layer, ky[layer], ky[layer] + 1, y)
        k, v = cache.gather(layer, y)
        assert torch.equal(k, torch.cat([kx[layer], ky[layer]]))
        assert torch.equal(v, torch.cat([kx[layer], ky[layer]]) + 1)
    assert x.committed and y.committed
    x.release()
    y.release()
    assert cache.cached_length(1) == 14
    k, _ = cache.read(1, 1)
    assert torch.equal(k, torch.cat([kx[1], ky[1]]))
    s = cache.stats()
    assert s["hit_tokens"] == 10 and s["batches_committed"] == 2
    cache.check()


def test_reading_a_layer_the_earlier_batch_has_not_appended_raises():
    cache = make()
    x = cache.prepare([1, 2], [6, 3])
    y = cache.prepare([1], [9])
    ky = kv(3, 3)
    with pytest.raises(CacheBusyError, match="not appended that layer yet"):
        cache.append(0, ky[0], ky[0], y)
    with pytest.raises(CacheBusyError, match="not appended that layer yet"):
        cache.gather(0, y)
    with pytest.raises(CacheBusyError, match="not appended that layer yet"):
        y.wait_layer(1)
    kx = kv(9, 4)
    cache.append(0, kx[0], kx[0], x)
    cache.append(0, ky[0], ky[0], y)               # now fine
    y.wait_layer(0)
    with pytest.raises(CacheBusyError):
        cache.append(1, ky[1], ky[1], y)
    cache.append(1, kx[1], kx[1], x)
    cache.append(1, ky[1], ky[1], y)
    assert cache.cached_length(1) == 9
    x.release()
    y.release()
    cache.check()


def test_a_reader_of_tokens_in_flight_waits_for_them():
    cache = make()
    x = cache.prepare([1], [8])
    y = cache.prepare([1], [8])                    # nothing new: only reads x's tokens
    assert y.lookup.cached_lengths.tolist() == [8] and y.committed
    with pytest.raises(CacheBusyError):
        cache.gather(0, y)
    kx = kv(8, 5)
    cache.append(range(L), kx, kx, x)
    for layer in range(L):
        k, _ = cache.gather(layer, y)
        assert torch.equal(k, kx[layer])
    y.release()
    x.release()
    cache.check()


@pytest.mark.parametrize("appended", [0, 1])
def test_releasing_the_earlier_batch_unfinished_breaks_the_later_one(appended):
    cache = make()
    base = cache.prepare([1], [4])
    cache.append(range(L), kv(4, 6), kv(4, 6), base)
    base.release()
    x = cache.prepare([1], [8])                    # continues 4 committed tokens
    y = cache.prepare([1], [12])
    assert y.lookup.cached_lengths.tolist() == [8]
    kx, ky = kv(4, 7), kv(4, 8)
    for layer in range(appended):
        cache.append(layer, kx[layer], kx[layer], x)
        cache.append(layer, ky[layer], ky[layer], y)
    x.release()                                    # x never finished
    with pytest.raises(StaleLookupError, match="released before"):
        cache.append(appended, ky[appended], ky[appended], y)
    with pytest.raises(StaleLookupError):
        cache.gather(0, y)
    # the user is busy until y ends; then only the committed tokens remain
    with pytest.raises(CacheBusyError, match="continues a released"):
        cache.prepare([1], [16])
    y.release()
    assert cache.cached_length(1) == 4
    assert cache.lookup([1], [12]).cached_lengths.tolist() == [4]
    cache.check()
    z = cache.prepare([1], [6])
    cache.append(range(L), kv(2, 9), kv(2, 9), z)
    z.release()
    assert cache.cached_length(1) == 6
    cache.check()


def test_releasing_the_later_batch_keeps_the_earlier_one():
    cache = make()
    x = cache.prepare([1], [8])
    y = cache.prepare([1], [12])
    y.release()                                    # y gives its page back
    kx = kv(8, 10)
    cache.append(range(L), kx, kx, x)
    x.release()
    assert cache.cached_length(1) == 8
    k, _ = cache.read(1, 0)
    assert torch.equal(k, kx[0])
    assert cache.stats()["pages_used"] == 2
    cache.check()


def test_lookup_counting_tokens_of_a_released_batch_goes_stale():
    cache = make()
    x = cache.prepare([1], [8])
    lk = cache.lookup([1], [12])
    assert lk.cached_lengths.tolist() == [8]
    x.release()                                    # x's tokens are gone
    with pytest.raises(StaleLookupError):
        cache.allocate(lk)
    assert cache.lookup([1], [12]).cached_lengths.tolist() == [0]
    cache.check()


def test_at_most_two_batches_fill_a_user():
    cache = make()
    x = cache.prepare([1], [8])
    y = cache.prepare([1], [12])
    with pytest.raises(CacheBusyError, match="two batches"):
        cache.prepare([2, 1], [3, 16])
    assert cache.cached_length(2) == 0             # nothing changed
    r = cache.prepare([1], [12])                   # a reader is fine
    assert r.new_history_nnz == 0
    r.release()
    x.release()
    y.release()
    cache.check()


def test_verified_mode_keys_of_tokens_in_flight():
    cache = make(verify_tokens=True)
    keys = np.arange(1, 9, dtype=np.int64)
    x = cache.prepare([1], [8], token_keys=keys)
    same = np.arange(1, 13, dtype=np.int64)
    assert cache.lookup([1], [12], token_keys=same).cached_lengths.tolist() == [8]
    other = same.copy()
    other[5] = -5                                  # rewritten inside x's tokens
    assert cache.lookup([1], [12], token_keys=other).cached_lengths.tolist() == [5]
    with pytest.raises(CacheBusyError, match="rewrite"):
        cache.prepare([1], [12], token_keys=other)
    y = cache.prepare([1], [12], token_keys=same)
    cache.append(range(L), kv(8, 11), kv(8, 11), x)
    cache.append(range(L), kv(4, 12), kv(4, 12), y)
    x.release()
    y.release()
    assert cache.cached_length(1) == 12
    cache.check()


def test_strict_mode_keeps_the_user_busy():
    cache = make(early_reuse=False)
    x = cache.prepare([1], [8])
    assert cache.lookup([1], [12]).cached_lengths.tolist() == [0]
    with pytest.raises(CacheBusyError, match="early_reuse"):
        cache.prepare([1], [12])
    x.release()
    with pytest.raises(hk.KVCacheError):
        make(early_reuse=1)


def test_pipelined_rounds_with_async_prepare():
    """A serving loop: batch i+1 is prepared (on the worker) before batch i
    appends; users repeat across consecutive batches; every user's K/V reads
    back exactly."""
    cache = make(num_pages=64)
    rng = np.random.default_rng(0)
    truth = {}
    lengths = {u: 0 for u in range(1, 6)}
    pending = None
    prev = None
    for step in range(30):
        ids = [int(u) for u in rng.choice(list(lengths), size=2, replace=False)]
        lens = [lengths[u] + int(rng.integers(1, 6)) for u in ids]
        for u, n in zip(ids, lens):
            lengths[u] = n
        nxt = cache.prepare_async(ids, lens)
        if prev is not None:
            finish(cache, prev, truth)
        prev = (nxt.wait(10.0), ids, lens)
    finish(cache, prev, truth)
    for u, n in lengths.items():
        assert cache.cached_length(u) == n
        k, _ = cache.read(u, 1)
        assert torch.equal(k, truth[u][:n])
    cache.check()


def finish(cache, item, truth):
    batch, ids, lens = item
    new = batch.new_history_nnz
    k = torch.randn(L, new, H, D)
    cache.append(range(L), k, k, batch)
    off = batch.host("new_history_offsets")
    cached = batch.lookup.cached_lengths
    for b, u in enumerate(ids):
        old = truth.get(u, torch.empty(0, H, D))[:cached[b]]
        truth[u] = torch.cat([old, k[1, off[b]:off[b + 1]]])
    batch.release()
