"""The disk tier below the host tier (CPU path): pages of admitted users are
written through to checksummed records, come back disk -> host -> GPU when a
request needs them, survive a reopen with disk_persist, and a record that
fails its check reads as a miss (the tokens are recomputed), never as wrong
data."""

import os

import numpy as np
import pytest
import torch

import hstu_kvcache as hk
from hstu_kvcache.errors import InvalidArgumentError, StaleLookupError

L, H, D, P = 2, 2, 4, 4
PAGE_BYTES = 2 * P * H * D * 4            # one layer
TIER_PAGES = 12                           # GPU and host tiers, pages each


def make(tmp_path, **kw):
    args = dict(num_layers=L, num_heads=H, head_dim=D, page_size=P, num_pages=TIER_PAGES,
                max_batch_size=2, max_seq_len=128,
                host_capacity_bytes=TIER_PAGES * L * PAGE_BYTES,
                disk_dir=str(tmp_path), disk_capacity_bytes=64 << 20, disk_admit_after=0)
    args.update(kw)
    return hk.KVCache(hk.KVCacheConfig(**args))


def serve(cache, user, length, ref, seed, keys=None):
    """One request; ref[user] keeps what the user's K should be."""
    with cache.prepare([user], [length], token_keys=keys) as b:
        cached = int(b.lookup.cached_lengths[0])
        k = torch.randn(L, b.new_history_nnz, H, D, generator=torch.Generator().manual_seed(seed))
        cache.append(range(L), k, k + 1, b)
        for layer in range(L):
            kg, vg = cache.gather(layer, b)
            if cached:
                assert torch.equal(kg[:cached], ref[user][layer, :cached]), "cached K differ"
                assert torch.equal(vg[:cached], ref[user][layer, :cached] + 1)
    ref[user] = torch.cat([ref[user][:, :cached], k], dim=1) if cached else k
    return cached


def push_down(cache, users):
    """Users' pages to the host tier, written through to disk, then off the
    GPU and host tiers: only the disk holds them."""
    cache.evict(users, gpu=True, host=False, offload=True)
    cache.sync_transfers()
    for u in users:
        assert cache.cached_on_disk(u) == cache.cached_tiers(u)[1] > 0
    cache.evict(users, gpu=False, host=True)


def test_round_trip_through_the_disk(tmp_path):
    cache, ref = make(tmp_path), {}
    serve(cache, 1, 32, ref, 1)
    push_down(cache, [1])
    assert cache.cached_tiers(1) == (0, 0) and cache.cached_on_disk(1) == 32
    assert cache.lookup([1], [36]).cached_lengths.tolist() == [32]
    assert serve(cache, 1, 36, ref, 2) == 32       # read back, checked by serve
    s = cache.stats()
    assert s["disk_writes"] == 8 and s["disk_reads"] == 8 and s["checksum_failures"] == 0
    assert s["disk_records"] == 8 and s["disk_bytes_used"] > 0
    cache.check()


def test_users_cycle_through_three_tiers(tmp_path):
    """More users than the GPU and host tiers hold: LRU pressure moves them
    down, requests bring them back; every cached token reads back exactly."""
    cache, ref = make(tmp_path), {}
    lengths = {u: 0 for u in range(1, 5)}
    rng = np.random.default_rng(0)
    for step in range(24):
        u = int(rng.integers(1, 5))
        lengths[u] = min(lengths[u] + int(rng.integers(4, 12)), 44)
        serve(cache, u, lengths[u], ref, 100 + step)
        cache.sync_transfers()
        cache.check()
    s = cache.stats()
    assert s["disk_writes"] > 0 and s["disk_reads"] > 0
    assert s["disk_read_misses"] == 0


def test_corrupt_records_read_as_a_miss(tmp_path):
    cache, ref = make(tmp_path), {}
    serve(cache, 1, 32, ref, 3)
    push_down(cache, [1])
    path = os.path.join(tmp_path, "hkv_disk.dat")
    size = os.path.getsize(path)
    fd = os.open(path, os.O_WRONLY)
    try:                                           # flip a byte every 1 KiB
        for off in range(0, size, 1024):
            os.pwrite(fd, b"\x5a", off)
        os.fsync(fd)
    finally:
        os.close(fd)
    lk = cache.lookup([1], [36])
    assert lk.cached_lengths.tolist() == [32]      # the index still says so
    with pytest.raises(StaleLookupError, match="failed its check"):
        cache.allocate(lk)
    s = cache.stats()
    assert s["checksum_failures"] >= 1 and s["disk_read_misses"] == 1
    assert cache.cached_on_disk(1) == 0
    assert cache.lookup([1], [36]).cached_lengths.tolist() == [0]
    assert serve(cache, 1, 36, ref, 4) == 0        # recomputed, cached again
    cache.check()


def test_records_survive_a_reopen_with_persist(tmp_path):
    cache, ref = make(tmp_path, disk_persist=True), {}
    serve(cache, 7, 32, ref, 5)
    push_down(cache, [7])
    cache.close()
    again = make(tmp_path, disk_persist=True)
    assert again.cached_on_disk(7) == 32
    assert again.lookup([7], [40]).cached_lengths.tolist() == [32]
    assert serve(again, 7, 40, ref, 6) == 32
    again.check()
    again.close()
    fresh = make(tmp_path)                         # without persist: starts empty
    assert fresh.cached_on_disk(7) == 0
    fresh.close()


def test_admission_waits_for_repeat_users(tmp_path):
    cache, ref = make(tmp_path, disk_admit_after=2), {}
    serve(cache, 1, 16, ref, 7)                    # first request: not admitted
    cache.evict([1], gpu=True, host=False, offload=True)
    cache.sync_transfers()
    assert cache.stats()["disk_writes"] == 0 and cache.cached_on_disk(1) == 0
    serve(cache, 1, 24, ref, 8)                    # second request: admitted
    cache.evict([1], gpu=True, host=False, offload=True)
    cache.sync_transfers()
    assert cache.cached_on_disk(1) == 24
    cache.check()


def test_verified_mode_rewrite_drops_stale_records(tmp_path):
    cache, ref = make(tmp_path, verify_tokens=True), {}
    keys = np.arange(1, 33, dtype=np.int64)
    serve(cache, 1, 32, ref, 9, keys=keys)
    push_down(cache, [1])
    other = keys.copy()
    other[13] = -1                                 # history rewritten at token 13
    assert cache.lookup([1], [32], token_keys=other).cached_lengths.tolist() == [12]
    assert cache.lookup([1], [32], token_keys=keys).cached_lengths.tolist() == [32]
    assert serve(cache, 1, 32, ref, 10, keys=other) == 12
    cache.sync_transfers()
    # the rewritten pages are not served from the old records
    assert cache.lookup([1], [32], token_keys=keys).cached_lengths.tolist() == [13]
    cache.check()


def test_evict_drops_disk_records(tmp_path):
    cache, ref = make(tmp_path), {}
    serve(cache, 1, 32, ref, 11)
    push_down(cache, [1])
    cache.evict([1], gpu=False, host=True)         # disk kept
    assert cache.cached_on_disk(1) == 32
    cache.evict([1])                               # every tier
    assert cache.cached_on_disk(1) == 0
    assert cache.lookup([1], [32]).cached_lengths.tolist() == [0]


def test_disk_config_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match="not an existing directory"):
        make(tmp_path, disk_dir=str(tmp_path / "missing"))
    with pytest.raises(InvalidArgumentError, match="host tier"):
        make(tmp_path, host_capacity_bytes=0)
    with pytest.raises(InvalidArgumentError, match="disk_capacity_bytes"):
        make(tmp_path, disk_capacity_bytes=0)
    with pytest.raises(InvalidArgumentError, match="disk_admit_after"):
        make(tmp_path, disk_admit_after=-1)
    with pytest.raises(InvalidArgumentError):
        make(tmp_path, disk_persist=1)
    cache = make(tmp_path)                         # still fine after the errors
    with pytest.raises(hk.KVCacheError):
        make(tmp_path)                             # the file is locked by `cache`
    cache.close()


def test_threads_bring_users_back_from_disk_at_once(tmp_path):
    """Several threads prepare users that only the disk holds: the reads run
    without the cache lock, so the stage-ins interleave with other calls."""
    import threading
    cache = make(tmp_path, num_pages=48, host_capacity_bytes=48 * L * PAGE_BYTES,
                 max_batch_size=4)
    ref = {}
    users = list(range(1, 7))
    for u in users:
        serve(cache, u, 32, ref, 20 + u)
    push_down(cache, users)
    errors = []

    def worker(mine):
        try:
            for rep in range(3):
                for u in mine:
                    with cache.prepare([u], [32]) as b:
                        assert b.lookup.cached_lengths.tolist() == [32]
                        for layer in range(L):
                            kg, _ = cache.gather(layer, b)
                            assert torch.equal(kg, ref[u][layer])
                    cache.evict([u], gpu=True, host=True, disk=False)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(users[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert cache.stats()["disk_reads"] >= 6 * 3 * 8
    cache.check()


def test_a_user_longer_than_the_reads_in_flight(tmp_path):
    """175 pages through a store that takes 64 operations at a time: reads
    are issued in waves and their completions kept until taken in order."""
    cache, ref = make(tmp_path, num_pages=200, host_capacity_bytes=200 * L * PAGE_BYTES,
                      max_seq_len=1024), {}
    serve(cache, 1, 700, ref, 30)
    push_down(cache, [1])
    assert cache.cached_on_disk(1) == 700
    assert serve(cache, 1, 704, ref, 31) == 700
    assert cache.stats()["disk_reads"] == 175
    cache.check()


def test_gds_options_on_the_cpu(tmp_path):
    """GPUDirect Storage needs a CUDA device: 'on' refuses to create the
    cache, 'auto' keeps the staged path and says why."""
    with pytest.raises(InvalidArgumentError, match="disk_gds"):
        make(tmp_path, disk_gds="yes")
    with pytest.raises(InvalidArgumentError, match="disk_dir"):
        hk.KVCacheConfig(num_layers=L, num_heads=H, head_dim=D, num_pages=4, disk_gds="auto")
    with pytest.raises(hk.KVCacheError, match="needs a CUDA device"):
        make(tmp_path, disk_gds="on")
    assert make(tmp_path).disk_gds_status() == "off"
    assert hk.KVCache(hk.KVCacheConfig(num_layers=L, num_heads=H, head_dim=D,
                                       num_pages=4)).disk_gds_status() == "off"
    cache, ref = make(tmp_path, disk_gds="auto"), {}
    assert cache.disk_gds_status().startswith("unavailable: GPUDirect Storage needs a CUDA")
    serve(cache, 1, 16, ref, 40)
    push_down(cache, [1])
    assert serve(cache, 1, 20, ref, 41) == 16      # staged: disk -> host -> GPU
    s = cache.stats()
    assert s["disk_gds_active"] == 0 and s["disk_gds_reads"] == 0 and s["disk_reads"] == 4
    cache.check()


def test_disk_reads_are_onboarding_events(tmp_path):
    cache, ref = make(tmp_path, event_capacity=256), {}
    serve(cache, 1, 32, ref, 42)
    push_down(cache, [1])
    cache.drain_events()
    serve(cache, 1, 36, ref, 43)
    onboarded = [(e.tier, e.from_tier, e.page_index, e.num_pages)
                 for e in cache.drain_events() if e.kind == "onboarded"]
    assert onboarded == [("host", "disk", 0, 8), ("gpu", "host", 0, 8)]


def test_disk_io_threads(tmp_path):
    for bad in (0, 65, 2.5):
        with pytest.raises(InvalidArgumentError, match="disk_io_threads"):
            make(tmp_path, disk_io_threads=bad)
    cache, ref = make(tmp_path, disk_io_threads=6), {}
    serve(cache, 1, 40, ref, 50)
    push_down(cache, [1])
    assert serve(cache, 1, 44, ref, 51) == 40      # ten reads on six threads
    assert cache.stats()["disk_reads"] == 10
    cache.check()
