"""Cache events on the CPU path: what each operation emits and in which
order (commit, eviction with write-back, onboarding, host eviction,
truncation of a rewritten history), a replay of the events that must agree
with the cache's own view of every user's tiers, overflow, the disabled
default, argument checks."""

import numpy as np
import pytest

import hstu_kvcache as hk
from hstu_kvcache import CacheEvent, EventKind, InvalidArgumentError, KVCache, KVCacheConfig

H, D, PS = 2, 4, 4


def make(gpu_pages=8, host_pages=32, events=1024, **kw):
    page_bytes = 2 * PS * H * D * 4
    args = dict(num_layers=2, num_heads=H, head_dim=D, num_pages=gpu_pages, page_size=PS,
                max_batch_size=4, max_seq_len=128,
                host_capacity_bytes=host_pages * 2 * page_bytes, event_capacity=events)
    args.update(kw)
    return KVCache(KVCacheConfig(**args))


def serve(cache, ids, lengths, keys=None, layers=None):
    """lookup -> allocate -> append (every layer unless `layers`) -> release."""
    batch = cache.prepare(ids, lengths, token_keys=keys)
    n = batch.new_history_nnz
    cfg = cache.config
    for layer in range(cfg.num_layers if layers is None else layers):
        if n == 0:
            break    # committed at allocation
        kv = np.zeros((n, cfg.num_heads, cfg.head_dim), np.float32)
        cache.append(layer, kv, kv, batch)
    batch.release()
    return batch


def short(events):
    """(kind, tier, from_tier, user, first page, pages) of each event."""
    return [(str(e.kind), e.tier, e.from_tier, e.user_id, e.page_index, e.num_pages)
            for e in events]


def test_disabled_by_default_costs_nothing():
    cache = KVCache(KVCacheConfig(num_layers=1, num_heads=1, head_dim=4, num_pages=8,
                                  page_size=4))
    assert cache.config.event_capacity == 0
    serve(cache, [1, 2], [9, 5])
    cache.evict([1])
    assert cache.drain_events() == []
    assert cache.drain_events(10) == []
    s = cache.stats()
    assert s["events_pending"] == 0 and s["events_dropped"] == 0
    cache.check()


def test_sequence_of_operations_in_order():
    cache = make(gpu_pages=8, host_pages=32)
    serve(cache, [1, 2], [10, 6])       # 3 + 2 pages
    assert short(cache.drain_events()) == [
        ("stored", "gpu", "gpu", 1, 0, 3),
        ("stored", "gpu", "gpu", 2, 0, 2),
    ]
    # an aborted batch changes nothing anyone could see
    serve(cache, [1], [13], layers=1)
    assert cache.drain_events() == []
    # user 1 grows: its partial tail page is stored again with the new one
    serve(cache, [1], [13])
    assert short(cache.drain_events()) == [("stored", "gpu", "gpu", 1, 2, 2)]
    # explicit evict of the GPU tier with write-back: full pages offloaded
    cache.evict([2], gpu=True, host=False, offload=True)
    assert short(cache.drain_events()) == [
        ("offloaded", "host", "gpu", 2, 0, 1),
        ("removed", "gpu", "gpu", 2, 0, 2),
    ]
    assert cache.cached_tiers(2) == (0, 4)
    # user 2 comes back: its host page is onboarded, then the new tokens stored
    serve(cache, [2], [9])
    assert short(cache.drain_events()) == [
        ("onboarded", "gpu", "host", 2, 0, 1),
        ("stored", "gpu", "gpu", 2, 1, 2),
    ]
    # a new user needs room: user 1 (least recently used) is written back
    # and loses its GPU tail page
    serve(cache, [3], [8])              # 4 + 3 + 2 pages > 8
    assert short(cache.drain_events()) == [
        ("offloaded", "host", "gpu", 1, 0, 3),
        ("removed", "gpu", "gpu", 1, 3, 1),
        ("stored", "gpu", "gpu", 3, 0, 2),
    ]
    assert cache.cached_tiers(1) == (12, 12)
    # host tier dropped explicitly
    cache.evict([2], gpu=False, host=True)
    assert short(cache.drain_events()) == [("removed", "host", "host", 2, 0, 1)]
    s = cache.stats()
    assert s["events_pending"] == 0 and s["events_dropped"] == 0
    cache.check()


def test_event_fields_and_types():
    cache = make()
    serve(cache, [7], [9])
    (ev,) = cache.drain_events()
    assert isinstance(ev, CacheEvent) and isinstance(ev.kind, EventKind)
    assert ev.kind == "stored" and ev.kind is EventKind.STORED and str(ev.kind) == "stored"
    assert ev.seq == 0 and ev.user_id == 7 and list(ev.pages) == [0, 1, 2]
    assert isinstance(ev.timestamp_ns, int) and ev.timestamp_ns > 0
    import time
    assert ev.timestamp_ns <= time.monotonic_ns()
    assert ev._replace(num_pages=1).num_pages == 1       # a NamedTuple


def test_truncated_history_removes_pages():
    cache = make(gpu_pages=16, verify_tokens=True)
    keys = np.arange(12, dtype=np.int64)
    serve(cache, [1], [12], keys=keys)
    cache.drain_events()
    # the history was rewritten from token 5 on: page 2 goes, pages 1 and 2
    # are stored again with the new tokens
    keys2 = keys.copy()
    keys2[5:] += 1000
    batch = serve(cache, [1], [12], keys=keys2)
    assert batch.lookup.cached_lengths.tolist() == [5]
    assert short(cache.drain_events()) == [
        ("removed", "gpu", "gpu", 1, 2, 1),
        ("stored", "gpu", "gpu", 1, 1, 2),
    ]
    cache.check()


def test_overflow_keeps_newest_and_counts():
    cache = make(gpu_pages=64, events=3)
    for uid in range(1, 8):                        # 7 stored events, no merging
        serve(cache, [uid], [4])
    s = cache.stats()
    assert s["events_dropped"] == 4 and s["events_pending"] == 3
    evs = cache.drain_events(2)
    assert [e.seq for e in evs] == [4, 5] and [e.user_id for e in evs] == [5, 6]
    assert cache.stats()["events_pending"] == 1
    evs = cache.drain_events()
    assert [e.seq for e in evs] == [6]
    assert cache.drain_events() == []
    assert cache.stats()["events_dropped"] == 4       # a counter: stays
    # the cache stays usable and keeps numbering
    serve(cache, [1], [8])
    assert [e.seq for e in cache.drain_events()] == [7]
    cache.check()


def test_drain_partial_and_zero():
    cache = make(gpu_pages=64)
    for uid in range(1, 6):
        serve(cache, [uid], [4])
    assert cache.drain_events(0) == []
    assert [e.user_id for e in cache.drain_events(np.int64(2))] == [1, 2]
    assert [e.user_id for e in cache.drain_events(10)] == [3, 4, 5]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", [1]])
def test_bad_max_events_raises(bad):
    cache = make()
    serve(cache, [1], [4])
    with pytest.raises(InvalidArgumentError):
        cache.drain_events(bad)
    assert len(cache.drain_events()) == 1          # nothing was lost
    serve(cache, [2], [4])
    cache.check()


@pytest.mark.parametrize("bad", [-1, 2**24 + 1, 1.5, "big", True])
def test_bad_event_capacity_raises(bad):
    with pytest.raises(InvalidArgumentError, match="event_capacity"):
        KVCacheConfig(num_layers=1, num_heads=1, head_dim=4, num_pages=4, event_capacity=bad)
    assert isinstance(InvalidArgumentError("x"), hk.KVCacheError)


def test_closed_cache_raises_package_error():
    cache = make()
    cache.close()
    with pytest.raises(hk.KVCacheError):
        cache.drain_events()


@pytest.mark.parametrize("mode,verify", [("lazy", False), ("eager", False), ("lazy", True),
                                         ("eager", True)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_replayed_events_match_the_cache(mode, verify, seed):
    """Apply the events to per-user page sets (stored/onboarded/offloaded
    add to `tier`, removed takes off); after every step they must equal
    what cached_tiers() says each user holds.  In verified mode some
    requests rewrite a user's history, so truncation is covered too."""
    rng = np.random.default_rng(seed)
    cache = make(gpu_pages=10, host_pages=14, offload_mode=mode, events=4096,
                 verify_tokens=verify)
    users = list(range(1, 9))
    lengths = {u: 0 for u in users}
    history = {u: [] for u in users}   # verified mode: the keys of each user
    next_key = [1]
    tiers = {}   # (user, tier) -> set of page indices

    def request_keys(u, length):
        if rng.random() < 0.3 and history[u]:          # rewrite from a random token
            keep = int(rng.integers(0, len(history[u])))
        else:
            keep = len(history[u])
        keys = history[u][:min(keep, length)]
        while len(keys) < length:
            keys.append(next_key[0])
            next_key[0] += 1
        history[u] = keys
        return keys

    def replay():
        for e in cache.drain_events():
            pages = tiers.setdefault((e.user_id, e.tier), set())
            if e.kind == "removed":
                pages.difference_update(e.pages)
            else:
                pages.update(e.pages)

    for step in range(120):
        op = rng.random()
        if op < 0.75:
            ids = [int(u) for u in rng.choice(users, size=int(rng.integers(1, 3)), replace=False)]
            lens = [min(lengths[u] + int(rng.integers(1, 12)), 40) for u in ids]
            keys = None
            if verify:
                keys = np.array([k for u, n in zip(ids, lens) for k in request_keys(u, n)],
                                dtype=np.int64)
            try:
                serve(cache, ids, lens, keys=keys, layers=None if rng.random() < 0.9 else 1)
            except hk.CacheFullError:
                pass
            for u in ids:
                lengths[u] = cache.cached_length(u)
        elif op < 0.85:
            cache.prefetch([int(u) for u in rng.choice(users, size=3, replace=False)])
        else:
            u = int(rng.choice(users))
            gpu, host = [(True, False), (False, True), (True, True)][int(rng.integers(3))]
            cache.evict([u], gpu=gpu, host=host, offload=bool(rng.random() < 0.5))
            lengths[u] = cache.cached_length(u)
        replay()
        for u in users:
            g, h = cache.cached_tiers(u)
            assert tiers.get((u, "gpu"), set()) == set(range(-(-g // PS))), (step, u, g)
            assert tiers.get((u, "host"), set()) == set(range(h // PS)), (step, u, h)
    assert cache.stats()["events_dropped"] == 0
    cache.check()
