"""prepare_async: the allocation runs on the cache's worker thread while
the caller goes on; results equal the synchronous path; errors, slots,
dropped and cancelled prepares, threads."""

import threading
import time

import numpy as np
import pytest

from hstu_kvcache import (CacheBusyError, CacheFullError, InvalidStateError, KVCache,
                          KVCacheConfig, StaleLookupError)

from test_cache_cpu import FIELDS_CPU, H, D, check_truth, rand_kv

torch = pytest.importorskip("torch")


def make(**kw):
    args = dict(num_layers=2, num_heads=H, head_dim=D, num_pages=32, page_size=4,
                max_batch_size=8, max_seq_len=256)
    args.update(kw)
    return KVCache(KVCacheConfig(**args))


def wait_until(cond, seconds=5.0):
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_async_equals_sync():
    a, s = make(), make()
    for ids, lengths in (([1, 2, 3], [5, 0, 9]), ([2, 1], [3, 7])):
        pending = a.prepare_async(ids, lengths, num_candidates=[1] * len(ids))
        assert pending.lookup.cached_lengths.tolist() == s.lookup(ids, lengths).cached_lengths.tolist()
        ba = pending.wait()
        bs = s.prepare(ids, lengths, num_candidates=[1] * len(ids))
        assert pending.ready()
        for name in FIELDS_CPU:
            assert torch.equal(getattr(ba, name), getattr(bs, name)), name
        for cache, b in ((a, ba), (s, bs)):
            k, v = rand_kv(b.num_rows, gen=torch.Generator().manual_seed(1))
            cache.append(range(2), torch.stack([k, k]), torch.stack([v, v]), b)
            b.release()
    for u in (1, 2, 3):
        assert torch.equal(a.read(u, 1)[0], s.read(u, 1)[0])
    a.check()


def test_errors_surface_at_wait():
    cache = make(num_pages=4)
    pending = cache.prepare_async([1], [100])  # 25 pages > 4
    with pytest.raises(CacheFullError):
        pending.wait()
    with pytest.raises(CacheFullError):  # an error is final: the same again
        pending.wait()
    with cache.prepare([2], [3]) as b:
        k, v = rand_kv(3)
        cache.append(range(2), torch.stack([k, k]), torch.stack([v, v]), b)
    lk = cache.lookup([2], [5])
    cache.evict([2])
    stale = cache._native.prepare_async(lk.user_ids, lk.history_lengths, lk.cached_lengths,
                                        lk._epochs, None, None, 0)
    with pytest.raises(StaleLookupError):
        stale.wait(1.0)
    cache.check()


def test_batch_is_taken_once_and_timeouts():
    cache = make()
    pending = cache.prepare_async([1], [3])
    batch = pending.wait(timeout=5.0)
    assert pending.wait(0.0) is batch            # the same batch again
    assert pending.wait_layer(0) is batch        # a no-op stream wait on the CPU
    with pytest.raises(InvalidStateError, match="already taken"):
        pending._native.wait(0.0)                # the core hands it over once
    batch.release()


def test_slots_are_bounded_and_come_back():
    cache = make(max_open_batches=2)
    p1 = cache.prepare_async([1], [1])
    p2 = cache.prepare_async([2], [1])
    with pytest.raises(CacheBusyError, match="prepare slots"):
        cache.prepare_async([3], [1])
    b1 = p1.wait()
    b1.release()
    del b1, p1
    b2 = p2.wait()
    del b2, p2
    wait_until(lambda: cache.stats()["open_batches"] == 0)
    cache.prepare_async([3], [2]).wait().release()


def test_dropped_pending_frees_its_batch():
    cache = make()
    for i in range(20):
        cache.prepare_async([i], [5])  # dropped at once, never waited
    wait_until(lambda: cache.stats()["batches_allocated"] == 20 and
               cache.stats()["open_batches"] == 0)
    s = cache.stats()
    assert s["batches_aborted"] == 20 and s["pages_used"] == 0  # all rolled back
    cache.check()


def test_close_with_prepares_in_flight():
    for _ in range(10):
        cache = make()
        pending = [cache.prepare_async([i], [8]) for i in range(6)]
        cache.close()
        for p in pending:  # each one either ran or was cancelled; nothing hangs
            try:
                b = p.wait(5.0)
            except InvalidStateError:
                continue
            k, v = rand_kv(8)
            with pytest.raises(InvalidStateError, match="closed"):
                cache.append(0, k, v, b)
            b.release()  # a no-op once the cache is gone


def test_threads_submit_concurrently():
    cache = make(num_pages=512, max_open_batches=32)
    errors = []

    def worker(base):
        try:
            gen = torch.Generator().manual_seed(base)
            for r in range(25):
                ids = [base + 1, base + 2]
                pending = cache.prepare_async(ids, [r + 1, r + 3])
                b = pending.wait(10.0)
                k, v = rand_kv(b.new_history_nnz, gen=gen)
                cache.append(range(2), torch.stack([k, k]), torch.stack([v, v]), b)
                b.release()
            assert cache.cached_length(base + 1) == 25
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(100 * t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cache.check()
