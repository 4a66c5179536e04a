"""Random interleavings of pipelined batches (early reuse) on the CPU path:
batches of the same users opened, appended layer by layer in any order,
read, and released finished or unfinished.  K/V values are a pure function
of (user, position, layer), so every read can be checked without knowing
which batch wrote a token: whatever the cache returns must be exact, or the
call must raise (CacheBusyError / StaleLookupError), never wrong data."""

import numpy as np
import pytest
import torch

import hstu_kvcache as hk
from hstu_kvcache.errors import CacheBusyError, CacheFullError, StaleLookupError

L, H, D = 3, 1, 2


def value(user, pos, layer):
    return float(user * 4096 + pos * 4 + layer)


def kv_for(users, starts, ends, layer):
    rows = [value(u, p, layer) for u, s, e in zip(users, starts, ends) for p in range(s, e)]
    t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, H, D).contiguous()
    return t, t + 0.5


def expected(users, lengths, layer):
    rows = [value(u, p, layer) for u, n in zip(users, lengths) for p in range(n)]
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 1, 1).expand(-1, H, D)


@pytest.mark.parametrize("seed", range(12))
def test_random_pipelines_never_read_wrong_data(seed):
    rng = np.random.default_rng(seed)
    cache = hk.KVCache(hk.KVCacheConfig(
        num_layers=L, num_heads=H, head_dim=D, num_pages=64, page_size=4,
        max_batch_size=3, max_seq_len=256, max_open_batches=6))
    users = [1, 2, 3]
    open_ = []          # (batch, users, cached, lengths, layers appended)
    counts = {"reads": 0, "refused": 0, "committed": 0, "in_flight_reuse": 0}
    for step in range(150):
        op = rng.random()
        if op < 0.35 and len(open_) < 5:
            ids = [int(u) for u in rng.choice(users, size=int(rng.integers(1, 3)), replace=False)]
            lk = cache.lookup(ids, [1] * len(ids))          # learn the reusable lengths
            base = [int(cache.lookup([u], [256]).cached_lengths[0]) for u in ids]
            lengths = [b + int(rng.integers(0, 6)) for b in base]
            del lk
            try:
                batch = cache.prepare(ids, lengths)
            except (CacheBusyError, CacheFullError):
                counts["refused"] += 1
                continue
            cached = batch.lookup.cached_lengths.tolist()
            committed = [cache.cached_length(u) for u in ids]
            counts["in_flight_reuse"] += sum(c > m for c, m in zip(cached, committed))
            open_.append((batch, ids, cached, lengths, set()))
        elif op < 0.7 and open_:
            batch, ids, cached, lengths, done = open_[int(rng.integers(len(open_)))]
            if batch.released:
                continue
            layer = int(rng.integers(L))
            if layer in done or batch.committed:
                continue
            k, v = kv_for(ids, cached, lengths, layer)
            try:
                cache.append(layer, k, v, batch)
                done.add(layer)
                counts["committed"] += batch.committed
            except (CacheBusyError, StaleLookupError):
                counts["refused"] += 1
        elif op < 0.85 and open_:
            batch, ids, cached, lengths, done = open_[int(rng.integers(len(open_)))]
            if batch.released:
                continue
            layer = int(rng.integers(L))
            try:
                kg, vg = cache.gather(layer, batch)
            except (CacheBusyError, StaleLookupError):
                counts["refused"] += 1
                continue
            want = expected(ids, lengths, layer)
            if layer in done or batch.new_history_nnz == 0:
                rows = list(range(sum(lengths)))        # every token of the batch
            else:                                       # the cached ones only
                offs = np.cumsum([0] + lengths)
                rows = [r for b in range(len(ids)) for r in range(offs[b], offs[b] + cached[b])]
            assert torch.equal(kg[rows], want[rows]), (seed, step)
            assert torch.equal(vg[rows], want[rows] + 0.5), (seed, step)
            counts["reads"] += 1
        elif open_:
            i = int(rng.integers(len(open_)))
            open_.pop(i)[0].release()
        cache.check()
    for batch, *_ in open_:
        batch.release()
    cache.check()
    for u in users:
        n = cache.cached_length(u)
        for layer in range(L):
            k, v = cache.read(u, layer)
            want = expected([u], [n], layer)
            assert torch.equal(k, want) and torch.equal(v, want + 0.5), (seed, u, layer)
    # the interleavings did exercise early reuse, refusals and reads
    assert counts["reads"] > 0 and counts["refused"] > 0, counts
    assert counts["in_flight_reuse"] > 0, counts
