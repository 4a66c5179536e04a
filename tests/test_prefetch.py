"""prefetch(user_ids): host-tier pages come up to the GPU tier ahead of a
request, as a hint that never writes back, never touches users in open
batches and drops what it has no room for (CPU path; the GPU ordering is in
test_gpu_host_tier.py)."""

import numpy as np
import pytest

import hstu_kvcache as hk
from hstu_kvcache.errors import InvalidArgumentError

torch = pytest.importorskip("torch")

L, H, D, P = 2, 2, 4, 4
PAGE_BYTES = 2 * P * H * D * 4


def make(num_pages=8, host_pages=40, **kw):
    kw.setdefault("max_batch_size", 4)
    return hk.KVCache(hk.KVCacheConfig(
        num_layers=L, num_heads=H, head_dim=D, page_size=P, num_pages=num_pages,
        max_seq_len=64, host_capacity_bytes=host_pages * L * PAGE_BYTES, **kw))


def serve(cache, user, length, gen, ref):
    """One request; ref[user] keeps what the user's K should be."""
    with cache.prepare([user], [length]) as b:
        cached = length - b.new_history_nnz
        k = torch.randn(L, b.new_history_nnz, H, D, generator=gen)
        cache.append(range(L), k, k + 1, b)
    ref[user] = torch.cat([ref[user][:, :cached], k], dim=1) if cached else k


def check_user(cache, user, ref):
    for layer in range(L):
        k, v = cache.read(user, layer)
        want = ref[user][layer, :k.shape[0]]
        assert torch.equal(k, want) and torch.equal(v, want + 1)


def to_host(cache, user):
    cache.evict([user], gpu=True, host=False, offload=True)
    assert cache.cached_tiers(user)[0] == 0


def test_prefetch_brings_pages_up_and_prepare_finds_them():
    cache, gen, ref = make(), torch.Generator().manual_seed(0), {}
    serve(cache, 1, 16, gen, ref)
    to_host(cache, 1)
    assert cache.prefetch([1]) == 1
    assert cache.cached_tiers(1) == (16, 16)
    s = cache.stats()
    assert s["prefetch_users"] == 1 and s["prefetch_pages"] == 4
    onboarded = s["onboard_pages"]
    with cache.prepare([1], [20]) as b:          # 16 cached, 4 new
        assert b.lookup.cached_lengths.tolist() == [16]
        k = torch.randn(L, 4, H, D, generator=gen)
        cache.append(range(L), k, k + 1, b)
        for layer in range(L):
            kg, vg = cache.gather(layer, b)
            assert torch.equal(kg[:16], ref[1][layer])
    assert cache.stats()["onboard_pages"] == onboarded   # nothing left to onboard
    cache.check()


def test_prefetch_skips_unknown_busy_and_gpu_resident_users():
    cache, gen, ref = make(), torch.Generator().manual_seed(1), {}
    serve(cache, 1, 8, gen, ref)                 # on the GPU only (lazy)
    serve(cache, 2, 8, gen, ref)
    to_host(cache, 2)
    before = cache.stats()
    with cache.prepare([2], [8]):                # user 2 pinned by a batch
        assert cache.prefetch([1, 2, 99]) == 0
        assert cache.cached_tiers(1) == (8, 0)
    after = cache.stats()
    assert after["prefetch_users"] == 0 and after["prefetch_pages"] == 0
    assert after["pages_evicted"] == before["pages_evicted"]
    check_user(cache, 1, ref)
    check_user(cache, 2, ref)
    cache.check()


def test_prefetch_never_writes_back_and_drops_without_room():
    """A GPU tier full of users whose pages have no host copy (lazy mode):
    making room would need write-backs, so the prefetch is dropped."""
    cache, gen, ref = make(num_pages=8), torch.Generator().manual_seed(2), {}
    serve(cache, 1, 16, gen, ref)
    to_host(cache, 1)
    serve(cache, 2, 16, gen, ref)
    serve(cache, 3, 16, gen, ref)                # GPU full: 2 and 3, 4 pages each
    before = cache.stats()
    assert cache.prefetch([1]) == 0
    after = cache.stats()
    assert after["prefetch_dropped"] == before["prefetch_dropped"] + 1
    assert after["writeback_pages"] == before["writeback_pages"]
    assert after["pages_evicted"] == before["pages_evicted"]
    assert cache.cached_tiers(2)[0] == 16 and cache.cached_tiers(3)[0] == 16
    for u in (1, 2, 3):
        check_user(cache, u, ref)
    cache.check()


def test_prefetch_takes_pages_that_have_a_host_copy():
    """Eager mode: other users' pages have host copies, so dropping them is
    free; the least recently used go first, tail first."""
    cache, gen, ref = make(num_pages=8, offload_mode="eager"), torch.Generator().manual_seed(3), {}
    serve(cache, 1, 16, gen, ref)
    to_host(cache, 1)
    serve(cache, 2, 16, gen, ref)
    serve(cache, 3, 16, gen, ref)
    before = cache.stats()
    assert cache.prefetch([1]) == 1
    after = cache.stats()
    assert after["writeback_pages"] == before["writeback_pages"]
    assert after["pages_evicted"] == before["pages_evicted"] + 4
    assert cache.cached_tiers(1) == (16, 16)
    assert cache.cached_tiers(2) == (0, 16)      # least recently used
    assert cache.cached_tiers(3) == (16, 16)
    for u in (1, 2, 3):
        check_user(cache, u, ref)
    cache.check()


def test_partial_prefetch_keeps_a_prefix():
    cache, gen, ref = make(num_pages=8), torch.Generator().manual_seed(4), {}
    serve(cache, 1, 24, gen, ref)                # 6 pages
    to_host(cache, 1)
    serve(cache, 2, 20, gen, ref)                # 5 pages, no host copy: 3 free
    assert cache.prefetch([1]) == 1
    assert cache.cached_tiers(1) == (12, 24)     # 3 pages came up
    check_user(cache, 1, ref)
    serve(cache, 1, 28, gen, ref)                # the rest is onboarded
    check_user(cache, 1, ref)
    cache.check()


def test_prefetch_in_verified_mode_keeps_the_keys():
    cache = make(verify_tokens=True)
    keys = np.arange(100, 116, dtype=np.int64)
    k = torch.randn(L, 16, H, D)
    with cache.prepare([1], [16], token_keys=keys) as b:
        cache.append(range(L), k, k, b)
    to_host(cache, 1)
    assert cache.prefetch([1]) == 1
    other = keys.copy()
    other[10] = -1                               # history rewritten at token 10
    assert cache.lookup([1], [16], token_keys=other).cached_lengths.tolist() == [10]
    assert cache.lookup([1], [16], token_keys=keys).cached_lengths.tolist() == [16]
    cache.check()


def test_prefetch_bad_input_leaves_the_cache_usable():
    cache, gen, ref = make(), torch.Generator().manual_seed(5), {}
    serve(cache, 1, 8, gen, ref)
    to_host(cache, 1)
    for bad in ([1.5], [[1, 2]], "1", [None]):
        with pytest.raises(InvalidArgumentError):
            cache.prefetch(bad)
    assert cache.cached_tiers(1) == (0, 8)
    assert cache.prefetch([]) == 0
    # more users than max_batch_size are taken in chunks
    assert cache.prefetch(list(range(100, 110)) + [1]) == 1
    check_user(cache, 1, ref)
    cache.check()


def test_prefetch_without_a_host_tier_does_nothing():
    cache = make(host_pages=0)
    k = torch.randn(L, 8, H, D)
    with cache.prepare([1], [8]) as b:
        cache.append(range(L), k, k, b)
    assert cache.prefetch([1]) == 0
    assert cache.stats()["prefetch_dropped"] == 0
