"""A transfer that fails (injected: HSTU_KVCACHE_DEBUG_FAIL_TRANSFERS="S:N",
S transfers succeed, then N fail at launch) leaves the cache consistent:
the pages it was filling read as a miss, nothing else is lost, and the
cache stays usable (CPU path; the same C code handles CUDA failures)."""

import pytest
import torch

import hstu_kvcache as hk
from hstu_kvcache.errors import CudaError

L, H, D, P = 2, 2, 4, 4
PAGE_BYTES = 2 * P * H * D * 4


def make(monkeypatch, fail, **kw):
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_FAIL_TRANSFERS", fail)
    kw.setdefault("num_pages", 8)
    return hk.KVCache(hk.KVCacheConfig(
        num_layers=L, num_heads=H, head_dim=D, page_size=P, max_batch_size=4,
        max_seq_len=64, host_capacity_bytes=40 * L * PAGE_BYTES, **kw))


def fill(cache, user, length, seed):
    k = torch.randn(L, length, H, D, generator=torch.Generator().manual_seed(seed))
    with cache.prepare([user], [length]) as b:
        cache.append(range(L), k, k + 1, b)
    return k


def test_failed_onboard_leaves_the_host_copy(monkeypatch):
    cache = make(monkeypatch, "1:1")            # the write-back works, the onboard fails
    k = fill(cache, 1, 16, 0)
    cache.evict([1], gpu=True, host=False, offload=True)
    before = cache.stats()
    with pytest.raises(CudaError, match="injected"):
        cache.prepare([1], [20])
    after = cache.stats()
    assert after["pages_used"] == before["pages_used"] == 0   # the GPU pages went back
    assert after["open_batches"] == 0
    assert cache.cached_tiers(1) == (0, 16)      # the host copy is intact
    cache.check()
    with cache.prepare([1], [20]) as b:          # and usable
        assert b.lookup.cached_lengths.tolist() == [16]
        new = torch.zeros(L, 4, H, D)
        cache.append(range(L), new, new, b)
        kg, _ = cache.gather(0, b)
        assert torch.equal(kg[:16], k[0])
    cache.check()


def test_failed_write_back_reads_as_a_miss(monkeypatch):
    cache = make(monkeypatch, "0:1", num_pages=4)   # the first write-back fails
    k1 = fill(cache, 1, 16, 1)                   # 4 pages: the whole GPU tier
    fill(cache, 2, 8, 2)                         # evicts user 1: its first write-back
    s = cache.stats()                            # fails, the tail page is lost, the
    assert s["transfers_failed"] >= 1            # next eviction writes back the rest
    n = cache.cached_length(1)
    assert n == 12 and cache.cached_tiers(1) == (8, 12)
    assert cache.lookup([1], [16]).cached_lengths.tolist() == [12]   # a miss, not garbage
    assert torch.equal(cache.read(1, 0)[0], k1[0, :12])
    cache.check()
    cache.evict([1])
    k = fill(cache, 1, 16, 3)                    # recomputed and cached again
    assert torch.equal(cache.read(1, 1)[0], k[1])
    cache.check()


def test_failed_eager_offload_keeps_the_gpu_pages(monkeypatch):
    cache = make(monkeypatch, "0:1", offload_mode="eager")
    k = fill(cache, 1, 16, 4)                    # the commit's copy fails
    s = cache.stats()
    assert s["transfers_failed"] == 1 and s["host_pages_used"] == 0
    assert cache.cached_tiers(1) == (16, 0)
    assert torch.equal(cache.read(1, 0)[0], k[0])
    fill(cache, 2, 8, 5)                         # the next copies work
    assert cache.cached_tiers(2) == (8, 8)
    cache.check()


def test_failed_prefetch_changes_nothing(monkeypatch):
    cache = make(monkeypatch, "1:1")
    k = fill(cache, 1, 16, 6)
    cache.evict([1], gpu=True, host=False, offload=True)
    with pytest.raises(CudaError, match="injected"):
        cache.prefetch([1])
    assert cache.cached_tiers(1) == (0, 16)
    assert cache.stats()["pages_used"] == 0
    cache.check()
    assert cache.prefetch([1]) == 1
    assert torch.equal(cache.read(1, 1)[0], k[1])
    cache.check()
