"""The host tier on the CPU path: write-back at eviction (lazy), write-through
at commit (eager), onboarding back, host eviction, verified mode across
tiers, and a random soak with every read checked against what was written."""

import numpy as np
import pytest

from hstu_kvcache import InvalidArgumentError, KVCache, KVCacheConfig

from test_cache_cpu import H, D, check_truth, serve

torch = pytest.importorskip("torch")


def make(gpu_pages=8, host_pages=32, page_size=4, **kw):
    layers = kw.pop("num_layers", 2)
    page_bytes = 2 * page_size * H * D * 4
    args = dict(num_layers=layers, num_heads=H, head_dim=D, num_pages=gpu_pages,
                page_size=page_size, max_batch_size=4, max_seq_len=128,
                host_capacity_bytes=host_pages * layers * page_bytes)
    args.update(kw)
    return KVCache(KVCacheConfig(**args))


def test_config_sizes_the_host_tier():
    cache = make(host_pages=32)
    assert cache.config.host_pages == 32
    assert cache.stats()["host_pages_total"] == 32
    with pytest.raises(InvalidArgumentError, match="offload_mode"):
        KVCacheConfig(num_layers=1, num_heads=1, head_dim=4, num_pages=4, offload_mode="soon")
    with pytest.raises(InvalidArgumentError, match="holds no page"):
        KVCacheConfig(num_layers=1, num_heads=1, head_dim=4, num_pages=4, page_size=4,
                      host_capacity_bytes=10)


def test_lazy_write_back_keeps_evicted_users_cached():
    cache = make(gpu_pages=8, host_pages=32)
    truth = {}
    serve(cache, [1], [12], truth)          # 3 GPU pages
    serve(cache, [2], [14], truth)          # 4 GPU pages (1 partial)
    assert cache.stats()["offload_pages"] == 0
    serve(cache, [3], [16], truth)          # needs 4: user 1 is written back
    s = cache.stats()
    assert s["writeback_pages"] == 3 and s["offload_pages"] == 3
    assert cache.cached_tiers(1) == (0, 12)  # all on the host now
    assert cache.cached_length(1) == 12
    check_truth(cache, truth)               # reads from the host tier
    # user 1 comes back with 2 new events: 12 cached, onboarded, 2 computed
    batch = serve(cache, [1], [14], truth)
    assert batch.lookup.cached_lengths.tolist() == [12]
    assert cache.stats()["onboard_pages"] == 3
    assert cache.cached_tiers(1)[0] == 14
    check_truth(cache, truth)
    cache.check()


def test_partial_tail_page_is_not_written_back():
    cache = make(gpu_pages=4, host_pages=32)
    truth = {}
    serve(cache, [1], [10], truth)          # 3 pages, last one half full
    serve(cache, [2], [16], truth)          # evicts user 1 entirely
    assert cache.cached_tiers(1) == (0, 8)  # two full pages kept, 2 tokens lost
    assert cache.cached_length(1) == 8
    check_truth(cache, truth)
    batch = serve(cache, [1], [11], truth)
    assert batch.lookup.cached_lengths.tolist() == [8]
    check_truth(cache, truth)
    cache.check()


def test_eager_offload_makes_eviction_free():
    cache = make(gpu_pages=8, host_pages=32, offload_mode="eager")
    truth = {}
    serve(cache, [1], [12], truth)
    assert cache.cached_tiers(1) == (12, 12)  # copied at commit
    serve(cache, [2], [14], truth)
    assert cache.cached_tiers(2) == (14, 12)  # the partial page stays GPU-only
    serve(cache, [3], [16], truth)
    s = cache.stats()
    assert s["writeback_pages"] == 0 and s["offload_pages"] == 3 + 3 + 4
    assert cache.cached_length(1) == 12 and cache.cached_tiers(1) == (0, 12)
    check_truth(cache, truth)
    cache.check()


def test_host_tier_eviction_is_lru_and_tail_first():
    cache = make(gpu_pages=4, host_pages=6)
    truth = {}
    serve(cache, [1], [16], truth)          # 4 pages
    serve(cache, [2], [16], truth)          # user 1 -> host (4 host pages)
    serve(cache, [3], [16], truth)          # user 2 -> host: needs 4, host has 2 free
    # user 1 (least recent) lost its 2 tail host pages
    assert cache.cached_tiers(1) == (0, 8)
    assert cache.cached_tiers(2) == (0, 16)
    assert cache.stats()["host_pages_evicted"] == 2
    check_truth(cache, truth)
    cache.check()


def test_explicit_tier_eviction():
    cache = make(gpu_pages=16, host_pages=32)
    truth = {}
    serve(cache, [1, 2], [12, 9], truth)
    cache.evict([1], gpu=True, host=False, offload=True)  # write back, then drop
    assert cache.cached_tiers(1) == (0, 12)
    cache.evict([2], gpu=True, host=False)                 # no offload: gone
    assert cache.cached_length(2) == 0
    check_truth(cache, truth)
    cache.evict([1], gpu=False, host=True)
    assert cache.cached_length(1) == 0
    serve(cache, [1, 2], [4, 4], truth)
    assert cache.evict_all(gpu=True, host=False, offload=True) == 2
    assert cache.cached_tiers(1) == (0, 4) and cache.cached_tiers(2) == (0, 4)
    assert cache.evict_all() == 2
    s = cache.stats()
    assert s["users_cached"] == 0 and s["host_pages_used"] == 0 and s["pages_used"] == 0
    with pytest.raises(InvalidArgumentError, match="gpu=True"):
        cache.evict([1], gpu=False, host=False)
    cache.check()


def test_verified_mode_across_tiers():
    cache = make(gpu_pages=4, host_pages=32, verify_tokens=True)
    truth = {}
    keys = np.arange(100, 116)
    serve(cache, [1], [16], truth, keys=keys)
    serve(cache, [2], [16], truth, keys=np.arange(500, 516))  # user 1 -> host
    assert cache.cached_tiers(1) == (0, 16)
    assert cache.lookup([1], [16], keys).cached_lengths.tolist() == [16]
    edited = keys.copy()
    edited[9] = -1
    assert cache.lookup([1], [16], edited).cached_lengths.tolist() == [9]
    # serving the edited history onboards 9 tokens' pages and rewrites the rest
    serve(cache, [1], [16], truth, keys=edited)
    assert cache.lookup([1], [16], edited).cached_lengths.tolist() == [16]
    assert cache.lookup([1], [16], keys).cached_lengths.tolist() == [9]
    check_truth(cache, truth)
    cache.check()


def test_shorter_history_onboards_only_what_it_needs():
    cache = make(gpu_pages=4, host_pages=32)
    truth = {}
    serve(cache, [1], [16], truth)
    serve(cache, [2], [16], truth)          # user 1 -> host
    with cache.prepare([1], [6]) as b:      # trust mode: 6 of 16 tokens
        assert b.new_history_nnz == 0 and b.num_pages == 2
        assert b.kv_last_page_len.tolist() == [2]
    assert cache.cached_tiers(1) == (8, 16)
    check_truth(cache, truth)
    cache.check()


@pytest.mark.parametrize("mode", ["lazy", "eager"])
@pytest.mark.parametrize("verify", [False, True])
def test_random_soak_against_truth(mode, verify):
    rng = np.random.default_rng({'lazy': 1, 'eager': 2}[mode] * 10 + int(verify))
    cache = make(gpu_pages=12, host_pages=20, offload_mode=mode, verify_tokens=verify,
                 max_seq_len=64)
    gen = torch.Generator().manual_seed(1)
    truth = {}
    hist = {u: [] for u in range(8)}
    next_key = 1
    for step in range(150):
        op = rng.random()
        if op < 0.75:
            ids = rng.choice(8, size=int(rng.integers(1, 4)), replace=False).tolist()
            for u in ids:
                grow = int(rng.integers(0, 7))
                if len(hist[u]) + grow > 64:
                    hist[u] = []
                hist[u] += list(range(next_key, next_key + grow))
                next_key += grow
                if verify and hist[u] and rng.random() < 0.15:
                    hist[u][int(rng.integers(len(hist[u])))] = next_key
                    next_key += 1
            keys = np.array([k for u in ids for k in hist[u]], dtype=np.int64) if verify else None
            lengths = [len(hist[u]) for u in ids]
            try:
                serve(cache, ids, lengths, truth, keys=keys, gen=gen)
            except Exception as e:  # only a full pool may refuse a batch
                assert type(e).__name__ == "CacheFullError", e
        elif op < 0.85:
            cache.evict([int(rng.integers(8))], gpu=True, host=bool(rng.integers(2)),
                        offload=bool(rng.integers(2)))
        else:
            u = int(rng.integers(8))
            if verify and hist[u]:
                k = np.array(hist[u], dtype=np.int64)
                got = cache.lookup([u], [len(k)], k).cached_lengths[0]
                assert got <= cache.cached_length(u)
        cache.check()
    check_truth(cache, truth)
    s = cache.stats()
    assert s["offload_pages"] > 0 and s["onboard_pages"] > 0
