"""Model-based test: random sequences of lookup / allocate / append / abort /
evict against a plain-Python model of the cache, with the invariants checked
after every step.

The model implements the documented policy independently: cached prefix
(trust: min(cached, history); verified: longest prefix of equal keys),
truncation of rewritten tails, all-or-nothing allocation, eviction of the
least recently used unpinned user's tail pages, commit when every layer was
appended and roll back otherwise.
"""

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from hstu_kvcache import CacheFullError, KVCache, KVCacheConfig

torch = pytest.importorskip("torch")

H, D, LAYERS = 1, 4, 2
USERS = list(range(6))


def div_up(a, b):
    return -(-a // b)


class ModelUser:
    def __init__(self):
        self.length = 0          # cached tokens
        self.keys = []           # keys of the cached tokens (verified mode)
        self.kv = [torch.empty(0, H, D) for _ in range(LAYERS)]  # K rows per layer

    def truncate(self, n):
        self.length = n
        self.keys = self.keys[:n]
        self.kv = [t[:n] for t in self.kv]


class CacheMachine(RuleBasedStateMachine):
    @initialize(page_size=st.sampled_from([2, 4]), num_pages=st.integers(4, 14),
                verified=st.booleans())
    def setup(self, page_size, num_pages, verified):
        self.P = page_size
        self.num_pages = num_pages
        self.verified = verified
        self.cache = KVCache(KVCacheConfig(
            num_layers=LAYERS, num_heads=H, head_dim=D, num_pages=num_pages,
            page_size=page_size, max_batch_size=4, max_seq_len=64,
            verify_tokens=verified))
        self.model = OrderedDict()  # uid -> ModelUser, least recently used first
        # each user's true history as keys; requests send a view of it
        self.history = {u: [] for u in USERS}
        self.next_key = 1
        self.gen = torch.Generator().manual_seed(0)

    # -- model helpers ------------------------------------------------------
    def pages(self, u):
        return div_up(self.model[u].length, self.P)

    def used(self):
        return sum(self.pages(u) for u in self.model)

    def model_cached(self, u, keys):
        m = self.model.get(u)
        if m is None:
            return 0
        n = min(m.length, len(keys))
        if not self.verified:
            return n
        i = 0
        while i < n and m.keys[i] == keys[i]:
            i += 1
        return i

    def evict_one_page(self, pinned):
        for u in list(self.model):
            if u in pinned:
                continue
            m = self.model[u]
            pages = div_up(m.length, self.P) - 1
            m.truncate(min(m.length, pages * self.P))
            if pages == 0:
                del self.model[u]
            return
        raise AssertionError("model found nothing to evict")

    # -- rules ------------------------------------------------------------------
    @rule(data=st.data())
    def serve(self, data):
        ids = data.draw(st.lists(st.sampled_from(USERS), min_size=1, max_size=4, unique=True))
        requests = []
        for u in ids:
            hist = self.history[u]
            action = data.draw(st.sampled_from(["grow", "grow", "same", "rewrite", "window"]))
            if action == "grow":
                for _ in range(data.draw(st.integers(1, 9))):
                    hist.append(self.next_key)
                    self.next_key += 1
            elif action == "rewrite" and hist:
                hist[data.draw(st.integers(0, len(hist) - 1))] = self.next_key
                self.next_key += 1
            elif action == "window" and hist:
                del hist[:data.draw(st.integers(1, len(hist)))]
            requests.append(list(hist) if self.verified or action != "window"
                            else list(hist))
        lengths = [len(r) for r in requests]
        keys = np.array([k for r in requests for k in r], dtype=np.int64) \
            if self.verified else None

        lk = self.cache.lookup(ids, lengths, keys)
        expect = [self.model_cached(u, r) for u, r in zip(ids, requests)]
        assert lk.cached_lengths.tolist() == expect
        if self.verified:
            for u, r, c in zip(ids, requests, expect):  # never a mismatching token
                assert self.model.get(u) is None or self.model[u].keys[:c] == r[:c]

        # feasibility, as documented: pages needed vs. free + evictable
        need = freed = batch_old = 0
        for u, L, c in zip(ids, lengths, expect):
            old = self.pages(u) if u in self.model else 0
            n = L - c
            keep = div_up(c, self.P) if n > 0 else old
            target = div_up(L, self.P) if n > 0 else old
            need += target - keep
            freed += old - keep
            batch_old += old
        available = self.num_pages - self.used() + (self.used() - batch_old) + freed
        if need > available:
            with pytest.raises(CacheFullError):
                self.cache.allocate(lk)
            return
        batch = self.cache.allocate(lk)

        # model the allocation: touch + truncate, then pages with eviction
        pinned = set(ids)
        for u, L, c in zip(ids, lengths, expect):
            if u not in self.model:
                if L == 0:
                    continue
                self.model[u] = ModelUser()
            self.model.move_to_end(u)
            if L - c > 0 and self.model[u].length > c:
                self.model[u].truncate(c)
        free = self.num_pages - self.used()
        for u, L, c in zip(ids, lengths, expect):
            if L - c <= 0:
                continue
            for _ in range(div_up(L, self.P) - div_up(c, self.P)):
                if free == 0:
                    self.evict_one_page(pinned)
                else:
                    free -= 1
        # the model's new pages are only accounted through lengths at commit;
        # keep a "reserved" view for the page count check below
        reserved = {u: (L if L - c > 0 else None) for u, L, c in zip(ids, lengths, expect)}

        nnz = batch.new_history_nnz
        assert nnz == sum(L - c for L, c in zip(lengths, expect))
        layers_done = data.draw(st.integers(0, LAYERS)) if nnz else LAYERS
        rows = []
        for layer in range(layers_done):
            k = torch.randn(nnz, H, D, generator=self.gen)
            v = k + 1.0
            self.cache.append(layer, k, v, batch)
            rows.append(k)
        s = self.cache.stats()
        expect_used = sum(div_up(reserved[u], self.P) if reserved.get(u) else self.pages(u)
                          for u in self.model)
        assert s["pages_used"] == expect_used
        batch.release()

        if layers_done == LAYERS:  # committed: new tokens become cached
            off = 0
            for u, L, c, r in zip(ids, lengths, expect, requests):
                n = L - c
                if n > 0:
                    m = self.model[u]
                    m.length = L
                    m.keys = m.keys[:c] + r[c:]
                    m.kv = [torch.cat([m.kv[i][:c], rows[i][off:off + n]])
                            for i in range(LAYERS)]
                off += n
        else:  # rolled back: new users disappear
            for u, L, c in zip(ids, lengths, expect):
                if u in self.model and self.model[u].length == 0:
                    del self.model[u]

    @rule(data=st.data())
    def evict(self, data):
        ids = data.draw(st.lists(st.sampled_from(USERS), max_size=3, unique=True))
        self.cache.evict(ids)
        for u in ids:
            self.model.pop(u, None)

    @rule()
    def evict_all(self):
        assert self.cache.evict_all() == len(self.model)
        self.model.clear()

    # -- invariants -----------------------------------------------------------
    @invariant()
    def consistent(self):
        self.cache.check()  # no page owned twice, chains, counts, LRU, hash table
        s = self.cache.stats()
        assert s["pages_free"] + s["pages_used"] == s["pages_total"] == self.num_pages
        assert s["pages_used"] == self.used()
        assert s["users_cached"] == len(self.model)
        assert s["open_batches"] == 0 and s["pages_pinned"] == 0

    @invariant()
    def contents(self):
        for u in USERS:
            m = self.model.get(u)
            assert self.cache.cached_length(u) == (m.length if m else 0)
            if m is None:
                continue
            for layer in range(LAYERS):
                k, v = self.cache.read(u, layer)
                assert torch.equal(k, m.kv[layer]), (u, layer)
                assert torch.equal(v, m.kv[layer] + 1.0)

    def teardown(self):
        if hasattr(self, "cache"):
            self.cache.close()


CacheMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCacheModel = CacheMachine.TestCase
