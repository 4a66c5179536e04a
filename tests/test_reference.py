"""Tests of the pure-PyTorch HSTU reference model (CPU, fast).

The cached path is exercised with ``FakeKVCache``, a tiny dict-of-tensors test
double of the ``hstu_kvcache.KVCache`` interface the model is written against
(lookup / allocate / append / gather). It checks the model's use of that
interface; the real cache has its own tests.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

try:
    from hstu_kvcache import reference as R
except ImportError:
    # The reference model needs no compiled code: load it by path when the package
    # itself cannot be imported (extension not built yet, say).
    _path = pathlib.Path(__file__).resolve().parents[1] / "hstu_kvcache" / "reference.py"
    _spec = importlib.util.spec_from_file_location("hstu_kvcache_reference", _path)
    assert _spec is not None and _spec.loader is not None
    R = importlib.util.module_from_spec(_spec)
    sys.modules[_spec.name] = R
    _spec.loader.exec_module(R)


# --------------------------------------------------------------------------- #
# A test double of the KV cache interface
# --------------------------------------------------------------------------- #


@dataclass
class _Lookup:
    user_ids: list[int]
    history_lengths: np.ndarray
    cached_lengths: np.ndarray
    token_keys: list[torch.Tensor | None]


@dataclass
class _Meta:
    user_ids: list[int]
    cached: list[int]
    lengths: list[int]
    new_history_offsets: torch.Tensor
    total_history_offsets: torch.Tensor
    positions: torch.Tensor
    batch_indices: torch.Tensor
    new_history_nnz: int
    row_offsets: list[int]  # first row of each user in append's input with candidates
    num_rows: int
    released: bool = False

    def release(self) -> None:
        self.released = True


class FakeKVCache:
    """Per user, per layer, a ``[len, H, D]`` K and V tensor; trust or verified lookup."""

    def __init__(self, num_layers: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.dtype = dtype
        self.device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0"
        self.users: dict[int, dict] = {}
        self.appended_rows = 0  # total new-token rows written (all layers)
        self.batches: list[_Meta] = []

    def lookup(self, user_ids, history_lengths, token_keys=None) -> _Lookup:
        uids = [int(u) for u in np.asarray(user_ids)]
        lengths = np.asarray(history_lengths, dtype=np.int64)
        offs = np.concatenate([[0], np.cumsum(lengths)])
        cached, keys = [], []
        for b, (u, n) in enumerate(zip(uids, lengths)):
            kb = None if token_keys is None else torch.as_tensor(token_keys[offs[b]:offs[b + 1]]).cpu()
            keys.append(kb)
            entry = self.users.get(u)
            c = 0 if entry is None else min(entry["len"], int(n))  # trust mode: append-only
            if c and kb is not None:  # verified mode: longest matching prefix
                if entry["keys"] is None:
                    c = 0
                else:
                    same = (entry["keys"][:c] == kb[:c]).to(torch.int64)
                    c = int(torch.cumprod(same, 0).sum())
            cached.append(c)
        return _Lookup(uids, lengths, np.array(cached, dtype=np.int64), keys)

    def allocate(self, lk: _Lookup, num_candidates=None) -> _Meta:
        """Like ``KVCache.allocate``: with ``num_candidates``, ``append`` also takes rows
        laid out per user as [new history ; candidates] and skips the candidates."""
        H, D = self.num_heads, self.head_dim
        for u, n, c, kb in zip(lk.user_ids, lk.history_lengths, lk.cached_lengths, lk.token_keys):
            n, c = int(n), int(c)
            old = self.users.get(u)
            entry = {"len": n, "filled": [c] * self.num_layers, "keys": kb,
                     "k": [], "v": []}
            for layer in range(self.num_layers):
                for name in ("k", "v"):
                    t = torch.full((n, H, D), float("nan"), dtype=self.dtype, device=self.device)
                    if c:
                        t[:c] = old[name][layer][:c]
                    entry[name].append(t)
            self.users[u] = entry
        new = lk.history_lengths - lk.cached_lengths
        cands = np.zeros_like(new) if num_candidates is None else np.asarray(num_candidates, dtype=np.int64)
        assert cands.shape == new.shape
        to_i32 = lambda a: torch.tensor(np.asarray(a), dtype=torch.int32, device=self.device)  # noqa: E731
        meta = _Meta(
            user_ids=lk.user_ids, cached=lk.cached_lengths.tolist(), lengths=lk.history_lengths.tolist(),
            new_history_offsets=to_i32(np.concatenate([[0], np.cumsum(new)])),
            total_history_offsets=to_i32(np.concatenate([[0], np.cumsum(lk.history_lengths)])),
            positions=to_i32(np.concatenate([np.arange(c, n) for c, n in zip(lk.cached_lengths, lk.history_lengths)] + [[]])),
            batch_indices=to_i32(np.repeat(np.arange(len(new)), new)),
            new_history_nnz=int(new.sum()),
            row_offsets=np.concatenate([[0], np.cumsum(new + cands)]).tolist(),
            num_rows=int((new + cands).sum()),
        )
        self.batches.append(meta)
        return meta

    def append(self, layer_idx, k_rows, v_rows, meta: _Meta) -> None:
        assert not meta.released
        # Rows of new history tokens only, or [new history ; candidates] per user.
        with_cands = k_rows.shape[0] == meta.num_rows != meta.new_history_nnz
        for t in (k_rows, v_rows):
            assert t.dtype == self.dtype and t.device == self.device, (t.dtype, t.device)
            assert t.shape == (meta.num_rows if with_cands else meta.new_history_nnz,
                               self.num_heads, self.head_dim)
        starts = meta.row_offsets if with_cands else meta.new_history_offsets.tolist()
        for b, u in enumerate(meta.user_ids):
            entry = self.users[u]
            c, n = meta.cached[b], meta.lengths[b]
            assert entry["filled"][layer_idx] == c, "append twice for one layer"
            s = starts[b]
            entry["k"][layer_idx][c:n] = k_rows[s:s + n - c]
            entry["v"][layer_idx][c:n] = v_rows[s:s + n - c]
            entry["filled"][layer_idx] = n
            self.appended_rows += n - c

    def gather(self, layer_idx, meta: _Meta):
        assert not meta.released
        ks, vs = [], []
        for u, n in zip(meta.user_ids, meta.lengths):
            entry = self.users[u]
            assert entry["filled"][layer_idx] == n, "gather before append"
            ks.append(entry["k"][layer_idx][:n])
            vs.append(entry["v"][layer_idx][:n])
        return torch.cat(ks).clone(), torch.cat(vs).clone()


# --------------------------------------------------------------------------- #
# Fixtures and helpers
# --------------------------------------------------------------------------- #


def small_cfg(**kw) -> "R.HSTUConfig":
    base = dict(num_items=500, num_actions=5, d_model=32, num_heads=2, head_dim=16,
                num_layers=3, max_seq_len=128, seed=7)
    base.update(kw)
    return R.HSTUConfig(**base)


@pytest.fixture(scope="module")
def model():
    return R.HSTUModel(small_cfg())


def batch_for(cfg, lengths, ncand, seed=0):
    g = torch.Generator().manual_seed(seed)
    return R.make_synthetic_batch(cfg, list(range(100, 100 + len(lengths))), lengths, ncand, g)


def user_slice(offsets: torch.Tensor, b: int) -> slice:
    return slice(int(offsets[b]), int(offsets[b + 1]))


# --------------------------------------------------------------------------- #
# Basic shape / determinism
# --------------------------------------------------------------------------- #


def test_scores_shape_and_finite(model):
    batch = batch_for(model.cfg, [5, 0, 40, 1], [3, 2, 0, 4])
    scores = model(batch)
    assert scores.shape == (9,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    # Same seed, same parameters: a second model scores identically.
    torch.testing.assert_close(R.HSTUModel(model.cfg)(batch), scores, rtol=0, atol=0)
    assert not torch.equal(R.HSTUModel(replace(model.cfg, seed=8))(batch), scores)


def test_activations_stay_order_one():
    cfg = small_cfg(num_layers=8, max_seq_len=256)
    m = R.HSTUModel(cfg)
    batch = batch_for(cfg, [200, 64], [8, 8])
    for k, v in m.history_kv(batch):
        assert 0.05 < float(k.float().std()) < 5 and 0.05 < float(v.float().std()) < 5
    s = m(batch)
    assert 0.01 < float(s.abs().mean()) < 10


def test_lengths_to_offsets_and_strip():
    lengths = torch.tensor([3, 0, 2, 4])
    assert R.lengths_to_offsets(lengths).tolist() == [0, 3, 3, 5, 9]
    values = torch.arange(9) * 10
    v, n, off = R.strip_cached_tokens_reference(values, lengths, np.array([1, 0, 2, 3]))
    assert v.tolist() == [10, 20, 80] and n.tolist() == [2, 0, 0, 1] and off.tolist() == [0, 2, 2, 2, 3]
    with pytest.raises(ValueError, match="num_cached"):
        R.strip_cached_tokens_reference(values, lengths, np.array([4, 0, 0, 0]))


# --------------------------------------------------------------------------- #
# Mask correctness and the caching property
# --------------------------------------------------------------------------- #


def test_candidate_score_ignores_other_candidates(model):
    batch = batch_for(model.cfg, [30, 12], [4, 3])
    base = model(batch)
    # Replace every candidate but the first of each user.
    items = batch.candidate_item_ids.clone()
    keep = torch.tensor([0, 4])
    changed = (items + 17) % model.cfg.num_items
    changed[keep] = items[keep]
    other = model(replace(batch, candidate_item_ids=changed))
    torch.testing.assert_close(other[keep], base[keep], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(other[1:4], base[1:4])
    # Adding candidates leaves existing scores alone too.
    more = replace(batch, candidate_item_ids=torch.cat([items[:4], torch.tensor([1, 2]), items[4:]]),
                   num_candidates=torch.tensor([6, 3]))
    torch.testing.assert_close(model(more)[[0, 1, 2, 3, 6, 7, 8]], base, rtol=1e-6, atol=1e-7)


def test_candidate_score_depends_on_history(model):
    batch = batch_for(model.cfg, [30], [2])
    items = batch.history_item_ids.clone()
    items[0] = (items[0] + 1) % model.cfg.num_items
    assert not torch.allclose(model(replace(batch, history_item_ids=items)), model(batch))


def test_history_token_ignores_later_tokens(model):
    cfg = model.cfg
    batch = batch_for(cfg, [40, 25], [3, 3])
    p = 17  # tokens 0..p of user 0 must not see changes after p
    off = batch.history_offsets()
    items, actions = batch.history_item_ids.clone(), batch.history_action_ids.clone()
    sl = slice(int(off[0]) + p + 1, int(off[1]))
    items[sl] = (items[sl] + 3) % cfg.num_items
    actions[sl] = (actions[sl] + 1) % cfg.num_actions
    changed = replace(batch, history_item_ids=items, history_action_ids=actions)
    for (k0, v0), (k1, v1) in zip(model.history_kv(batch), model.history_kv(changed)):
        # Same shapes, so same kernels: masked tokens contribute exact zeros, bit for bit.
        assert torch.equal(k1[: p + 1], k0[: p + 1]) and torch.equal(v1[: p + 1], v0[: p + 1])
        assert not torch.allclose(k1[p + 1: 40], k0[p + 1: 40])
        assert torch.equal(k1[40:], k0[40:]) and torch.equal(v1[40:], v0[40:])  # other user untouched
    # ... while an earlier token does reach later ones (the test above is not vacuous).
    items2 = batch.history_item_ids.clone()
    items2[0] = (items2[0] + 1) % cfg.num_items
    kv2 = model.history_kv(replace(batch, history_item_ids=items2))
    assert not torch.allclose(kv2[-1][0][1:40], model.history_kv(batch)[-1][0][1:40])


def test_appending_history_keeps_earlier_kv(model):
    """Recomputing from scratch after an append reproduces the earlier tokens' K/V.

    Only up to float rounding: CPU (and GPU) GEMM libraries pick kernels by matrix
    size, so a longer sequence can round a row differently (seen: 1 ulp for 1-5 row
    matrices). The model itself has no dependence on later tokens (previous test,
    bit-exact at equal shapes); a cache stores the K/V bits, see the next test.
    """
    users = R.SyntheticUsers(model.cfg, [1, 2, 3], initial_length=[20, 1, 33], seed=3)
    before = users.request(new_events=0, num_candidates=4)
    after = users.request(new_events=[5, 9, 1], num_candidates=6)
    off_b, off_a = before.history_offsets(), after.history_offsets()
    for (kb, vb), (ka, va) in zip(model.history_kv(before), model.history_kv(after)):
        for b in range(3):
            n, a0 = int(before.history_lengths[b]), int(off_a[b])
            torch.testing.assert_close(ka[a0:a0 + n], kb[user_slice(off_b, b)], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(va[a0:a0 + n], vb[user_slice(off_b, b)], rtol=1e-6, atol=1e-6)


def test_cached_prefix_stays_bit_identical(model):
    """Growing histories only ever appends to the cache: earlier tokens' K/V keep their bits,
    and they equal what a from-scratch run computes for the same history (same shapes)."""
    cfg = model.cfg
    users = R.SyntheticUsers(cfg, [1, 2], initial_length=[9, 30], seed=8)
    cache = _fake_cache(cfg)
    first = users.request(num_candidates=2)
    model(first, cache=cache)
    snapshot = {u: [t.clone() for t in cache.users[u]["k"] + cache.users[u]["v"]] for u in (1, 2)}
    # What the cache holds after the first request is what the dense path computes.
    kv = model.history_kv(first)
    torch.testing.assert_close(torch.cat([cache.users[1]["k"][0], cache.users[2]["k"][0]]), kv[0][0],
                               rtol=1e-6, atol=1e-6)
    for grow in ([3, 0], [1, 4]):
        model(users.request(new_events=grow, num_candidates=2), cache=cache)
    for u, n in ((1, 9), (2, 30)):
        now = cache.users[u]["k"] + cache.users[u]["v"]
        for old, new in zip(snapshot[u], now):
            assert torch.equal(new[:n], old)


def test_synthetic_users_are_deterministic_and_append_only():
    cfg = small_cfg()
    a = R.SyntheticUsers(cfg, [5, 6], initial_length=10, seed=1)
    b = R.SyntheticUsers(cfg, [6], initial_length=10, seed=1)
    r1 = a.request(new_events=3)
    r2 = b.request(new_events=3)
    torch.testing.assert_close(r1.history_item_ids[13:], r2.history_item_ids)  # user 6 alike
    r3 = a.request([5], new_events=2)
    assert r3.history_lengths.tolist() == [15]
    assert torch.equal(r3.history_timestamps[:13], r1.history_timestamps[:13])
    with pytest.raises(ValueError, match="outside"):
        a.request([5], new_events=cfg.max_seq_len)


# --------------------------------------------------------------------------- #
# Cached forward and M-FALCON
# --------------------------------------------------------------------------- #


def _fake_cache(cfg, dtype=None):
    return FakeKVCache(cfg.num_layers, cfg.num_heads, cfg.head_dim, dtype=dtype or cfg.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-6)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=4e-2))])
def test_cached_forward_equals_full_recompute(dtype, tol):
    cfg = small_cfg(dtype=dtype)
    m = R.HSTUModel(cfg)
    users = R.SyntheticUsers(cfg, [11, 12, 13, 14], initial_length=[0, 7, 30, 64], seed=5)
    cache = _fake_cache(cfg)
    grows = [[0, 0, 0, 0], [3, 1, 0, 5], [1, 8, 2, 0], [0, 0, 0, 0], [4, 2, 2, 2]]
    for r, grow in enumerate(grows):
        batch = users.request(new_events=grow, num_candidates=[3, 1, 4, 2])
        appended_before = cache.appended_rows
        cached = m(batch, cache=cache)
        full = m(batch)
        torch.testing.assert_close(cached.float(), full.float(), **tol)
        # Only the tokens the cache lacked were computed.
        expected_new = int(batch.history_lengths.sum()) if r == 0 else sum(grow)
        assert cache.appended_rows - appended_before == expected_new * cfg.num_layers
        assert cache.batches[-1].released


def test_cached_forward_subset_of_users_and_new_user():
    cfg = small_cfg()
    m = R.HSTUModel(cfg)
    users = R.SyntheticUsers(cfg, [1, 2, 3], initial_length=[10, 20, 0], seed=9)
    cache = _fake_cache(cfg)
    m(users.request([1, 2], new_events=0), cache=cache)
    for uids, grow in (([2], [3]), ([3, 1], [6, 0]), ([1, 2, 3], [2, 2, 2])):
        batch = users.request(uids, new_events=grow, num_candidates=5)
        torch.testing.assert_close(m(batch, cache=cache), m(batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_mfalcon_equals_all_at_once(model, chunk):
    batch = batch_for(model.cfg, [9, 0, 31, 4], [5, 3, 0, 7], seed=2)
    full = model(batch)
    torch.testing.assert_close(model(batch, candidate_chunk=chunk), full, rtol=1e-5, atol=1e-6)


def test_mfalcon_with_cache():
    cfg = small_cfg()
    m = R.HSTUModel(cfg)
    users = R.SyntheticUsers(cfg, [1, 2], initial_length=[12, 5], seed=4)
    cache = _fake_cache(cfg)
    for grow in ([0, 0], [2, 3], [1, 0]):
        batch = users.request(new_events=grow, num_candidates=[7, 2])
        before = cache.appended_rows
        torch.testing.assert_close(m(batch, cache=cache, candidate_chunk=3), m(batch), rtol=1e-5, atol=1e-6)
        # One history pass regardless of the number of candidate micro-batches.
        assert cache.appended_rows - before == int(batch.history_lengths.sum() if grow == [0, 0]
                                                   else sum(grow)) * cfg.num_layers


# --------------------------------------------------------------------------- #
# The batched path against the per-user reference
# --------------------------------------------------------------------------- #


def assert_scores_close(got, want, rel):
    """Max abs difference relative to the scores' scale (scores near 0 get no slack of their own)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.numel() == 0:
        return
    scale = float(want.float().abs().max().clamp_min(1e-6))
    err = float((got.float() - want.float()).abs().max()) / scale
    assert err <= rel, (err, rel)


_REL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_equals_per_user_and_dense(dtype):
    """Batched cached path == per-user cached path == dense recompute == batched no-cache,
    over rounds with empty histories, users with nothing new (and without candidates),
    different candidate counts and M-FALCON chunks."""
    cfg = small_cfg(dtype=dtype)
    m = R.HSTUModel(cfg)
    users = R.SyntheticUsers(cfg, [1, 2, 3, 4, 5], initial_length=[0, 7, 30, 64, 0], seed=11)
    fast, slow = _fake_cache(cfg), _fake_cache(cfg)
    rounds = [  # (users, new events, candidates, chunk)
        ([1, 2, 3, 4, 5], [0, 0, 0, 0, 0], [3, 1, 4, 2, 0], None),
        ([1, 2, 3, 4, 5], [3, 0, 0, 5, 0], [2, 0, 5, 1, 3], None),   # nothing new, no candidates
        ([2, 4, 1], [1, 0, 0], [4, 4, 4], 3),                         # all equal rows, chunked
        ([5, 3], [0, 0], [1, 6], 2),                                  # empty history, all cached
        ([1, 2, 3, 4, 5], [2, 2, 2, 2, 1], [0, 0, 0, 0, 0], None),    # no candidates at all
        ([4, 5, 2], [9, 4, 0], [7, 1, 2], 1),
    ]
    for uids, grow, ncand, chunk in rounds:
        batch = users.request(uids, new_events=grow, num_candidates=ncand)
        before_fast, before_slow = fast.appended_rows, slow.appended_rows
        got = m(batch, cache=fast, candidate_chunk=chunk, verify_tokens=True)
        ref = m(batch, cache=slow, candidate_chunk=chunk, verify_tokens=True, batched=False)
        dense = m(batch)
        nocache = m(batch, batched=True)
        nocache_chunked = m(batch, candidate_chunk=chunk, batched=True)
        assert got.shape == (sum(ncand),)
        for other in (ref, nocache, nocache_chunked):
            assert_scores_close(got, other, _REL[dtype])
        assert_scores_close(dense, nocache, _REL[dtype])
        # Both paths appended exactly the new tokens.
        assert fast.appended_rows - before_fast == slow.appended_rows - before_slow
        assert fast.batches[-1].released
    for u in (1, 2, 3, 4, 5):
        for name in ("k", "v"):
            for a, b in zip(fast.users[u][name], slow.users[u][name]):
                torch.testing.assert_close(a, b, rtol=_REL[dtype] * 10, atol=_REL[dtype] * 10)


def test_batched_score_blocks_bound_memory():
    """With the scores' memory bound at one user's block, the result is the same."""
    cfg = small_cfg()
    m = R.HSTUModel(cfg)
    batch = batch_for(cfg, [40, 0, 17, 33], [3, 5, 0, 2], seed=4)
    full = m(batch, batched=True)
    m.max_score_elements = 1  # one user per block
    try:
        assert_scores_close(m(batch, batched=True), full, 1e-6)
        assert_scores_close(m(batch, batched=True, candidate_chunk=2), full, 1e-5)
    finally:
        del m.max_score_elements
    assert_scores_close(full, m(batch), 1e-5)


def test_batched_triangle_path():
    """Equal lengths and one cached prefix (the serving case): the corner mask is a triangle."""
    cfg = small_cfg()
    m = R.HSTUModel(cfg)
    users = R.SyntheticUsers(cfg, [1, 2, 3], initial_length=26, seed=12)
    fast, slow = _fake_cache(cfg), _fake_cache(cfg)
    for grow, chunk in ((0, None), (4, None), (3, 2)):
        batch = users.request(new_events=grow, num_candidates=5)
        plan = R.plan_batched_pass(batch.history_lengths.numpy(), batch.history_lengths.numpy() - grow,
                                   np.full(3, grow), np.full(3, 5))
        assert grow == 0 or plan["causal_diagonal"] is not None
        dense = m(batch)
        assert_scores_close(m(batch, cache=fast, candidate_chunk=chunk), dense, 1e-5)
        assert_scores_close(m(batch, cache=slow, candidate_chunk=chunk, batched=False), dense, 1e-5)
        assert_scores_close(m(batch, batched=True), dense, 1e-5)
        m.max_score_elements = 1
        try:
            assert_scores_close(m(batch, batched=True, candidate_chunk=chunk), dense, 1e-5)
        finally:
            del m.max_score_elements


def test_batched_path_all_histories_empty_and_no_rows():
    cfg = small_cfg()
    m = R.HSTUModel(cfg)
    batch = batch_for(cfg, [0, 0, 0], [2, 0, 3], seed=5)
    assert_scores_close(m(batch, batched=True), m(batch), 1e-5)
    cache = _fake_cache(cfg)
    assert_scores_close(m(batch, cache=cache), m(batch), 1e-5)
    # Nothing new and no candidates: nothing to compute, nothing appended.
    empty = batch_for(cfg, [0, 0], [0, 0], seed=6)
    assert m(empty, cache=cache).shape == (0,)
    assert m(empty, batched=True).shape == (0,)


def _plan_cases():
    rng = np.random.default_rng(0)
    cases = []
    for seed in range(10):
        B = int(rng.integers(1, 6))
        hl = rng.integers(0, 12, B)
        if seed % 3 == 0:  # the common case: one length, one cached prefix
            hl[:] = 11
            start = np.full(B, int(rng.integers(0, 11)))
        else:
            start = np.array([rng.integers(0, n + 1) for n in hl])
        n_new = hl - start
        if seed % 3 == 2:  # a later M-FALCON pass: candidates only
            start, n_new = hl.copy(), np.zeros(B, dtype=np.int64)
        cases.append((hl, start, n_new, rng.integers(0, 4, B)))
    cases.append((np.array([9, 9]), np.array([5, 9]), np.array([4, 0]), np.array([2, 3])))  # one user all cached
    cases.append((np.array([9, 9]), np.array([5, 5]), np.array([4, 4]), np.array([0, 3])))
    return cases


@pytest.mark.parametrize("hl,start,n_new,n_cand", _plan_cases())
def test_plan_hidden_corner_covers_the_mask(hl, start, n_new, n_cand):
    """Every hidden (row, column) of the full per-user mask lies in the planned corner, and the
    corner's mask (triangle or limit vector) hides exactly those of the real rows."""
    p = R.plan_batched_pass(hl, start, n_new, n_cand)
    L, mr, c0, diag = p["max_history"], p["mask_rows"], p["mask_col0"], p["causal_diagonal"]
    j = np.arange(L)
    for b in range(len(hl)):
        for r in range(n_new[b] + n_cand[b]):
            visible = j <= (start[b] + r if r < n_new[b] else hl[b] - 1)
            hidden_cols = np.flatnonzero(~visible)
            if hidden_cols.size:
                assert r < mr and hidden_cols.min() >= c0
            if r < mr:
                planned = (j[c0:] - c0 > r + diag) if diag is not None else (j[c0:] > p["limit"][b, r])
                assert np.array_equal(planned, ~visible[c0:]), (b, r)
    assert p["num_rows"] == int((n_new + n_cand).sum()) and p["unpad"].shape == (p["num_rows"],)
    if p["row_pad"] is not None:
        assert np.array_equal(p["row_pad"][p["unpad"]], np.arange(p["num_rows"]))


def test_plan_uses_the_triangle_in_the_common_case():
    p = R.plan_batched_pass(np.array([4096] * 3), np.array([3968] * 3), np.array([128] * 3), np.array([256] * 3))
    assert (p["mask_rows"], p["mask_col0"], p["causal_diagonal"], p["row_pad"]) == (128, 3969, -1, None)
    p = R.plan_batched_pass(np.array([7, 5]), np.array([0, 0]), np.array([7, 5]), np.array([2, 2]))
    assert p["causal_diagonal"] is None and p["row_pad"] is not None  # unequal lengths: limit mask


@pytest.mark.parametrize("H,B,slab,bound", [(4, 16, 10, 10**9), (4, 16, 10, 320), (4, 16, 10, 170),
                                             (2, 5, 10, 20), (3, 1, 10, 1)])
def test_score_blocks_cover_every_slab_once(H, B, slab, bound):
    blocks = R.score_blocks(H, B, slab, bound)
    covered = [i for i0, i1, _, _ in blocks for i in range(i0, i1)]
    assert covered == list(range(H * B))
    for i0, i1, b0, b1 in blocks:
        assert (i1 - i0) * slab <= max(bound, slab)
        assert [i % B for i in range(i0, i1)] == [b for _ in range((i1 - i0) // (b1 - b0)) for b in range(b0, b1)]


def _count_aten_ops(fn):
    """Number of ATen operator calls made by ``fn()`` (a proxy for kernel launches)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


class _StubCache:
    """A cache that holds ``cached`` tokens of everyone and launches no operators of its own
    (the fake cache loops over users in Python, which would muddy an operator count)."""

    def __init__(self, cfg, cached):
        self.cfg, self.cached = cfg, cached

    def lookup(self, user_ids, history_lengths, token_keys=None):
        n = np.asarray(history_lengths)
        return SimpleNamespace(cached_lengths=np.minimum(n, self.cached), lengths=n)

    def allocate(self, lk, num_candidates=None):
        return SimpleNamespace(new_history_nnz=int((lk.lengths - lk.cached_lengths).sum()),
                               total=int(lk.lengths.sum()))

    def append(self, layer, k, v, meta):
        pass

    def gather(self, layer, meta):
        if not hasattr(self, "kv"):
            self.kv = torch.zeros(meta.total, self.cfg.num_heads, self.cfg.head_dim)
        return self.kv, self.kv


def test_batched_op_count_does_not_grow_with_batch_size():
    """The batched path launches the same operators for 2 users as for 7 (same shapes per
    user), while the per-user reference grows with the batch."""
    cfg = small_cfg()
    m = R.HSTUModel(cfg)

    def ops(n_users, batched):
        batch = batch_for(cfg, [20] * n_users, [4] * n_users, seed=3)
        return _count_aten_ops(lambda: m(batch, cache=_StubCache(cfg, cached=17), batched=batched))

    assert ops(2, True) == ops(7, True)
    assert ops(7, False) > ops(2, False)


try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test extra
    given = None

if given is not None:
    _PROP_MODEL = R.HSTUModel(small_cfg(num_layers=2, max_seq_len=64, seed=3))

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(data=st.data())
    def test_cached_and_chunked_forward_property(data):
        """Random users, growth patterns, candidate counts and chunk sizes: cached == dense."""
        cfg = _PROP_MODEL.cfg
        n_users = data.draw(st.integers(1, 4))
        init = data.draw(st.lists(st.integers(0, 20), min_size=n_users, max_size=n_users))
        users = R.SyntheticUsers(cfg, list(range(n_users)), initial_length=init, max_history=48,
                                 seed=data.draw(st.integers(0, 2**16)))
        cache, ref_cache = _fake_cache(cfg), _fake_cache(cfg)
        for _ in range(data.draw(st.integers(1, 3))):
            uids = data.draw(st.lists(st.integers(0, n_users - 1), min_size=1, max_size=n_users, unique=True))
            grow = [data.draw(st.integers(0, min(5, 48 - users.lengths[u]))) for u in uids]
            ncand = data.draw(st.lists(st.integers(0, 5), min_size=len(uids), max_size=len(uids)))
            chunk = data.draw(st.one_of(st.none(), st.integers(1, 4)))
            batch = users.request(uids, new_events=grow, num_candidates=ncand)
            got = _PROP_MODEL(batch, cache=cache, candidate_chunk=chunk)
            dense = _PROP_MODEL(batch)
            torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-6)
            per_user = _PROP_MODEL(batch, cache=ref_cache, candidate_chunk=chunk, batched=False)
            torch.testing.assert_close(per_user, dense, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(_PROP_MODEL(batch, candidate_chunk=chunk, batched=True), dense,
                                       rtol=1e-5, atol=1e-6)


def _real_cache_or_skip(cfg, **kw):
    try:
        from hstu_kvcache import KVCache, KVCacheConfig
    except ImportError as exc:  # the compiled package is not built here
        pytest.skip(f"hstu_kvcache.KVCache unavailable: {exc}")
    dtype = str(cfg.dtype).removeprefix("torch.")
    return KVCache(KVCacheConfig(num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                                 head_dim=cfg.head_dim, num_pages=256, page_size=4, dtype=dtype,
                                 device="cpu", max_batch_size=8, max_seq_len=cfg.max_seq_len, **kw))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, dict(rtol=1e-5, atol=1e-6)),
                                       (torch.bfloat16, dict(rtol=2e-2, atol=4e-2))])
@pytest.mark.parametrize("verify,batched", [(False, None), (True, None), (True, False)])
def test_cached_forward_with_real_kvcache(dtype, tol, verify, batched):
    """The same rounds against the package's KVCache (CPU pool, 4-token pages), through the
    batched path (rows appended as [new ; candidates]) and the per-user one."""
    cfg = small_cfg(dtype=dtype)
    m = R.HSTUModel(cfg)
    cache = _real_cache_or_skip(cfg, verify_tokens=verify)
    users = R.SyntheticUsers(cfg, [11, 12, 13, 14], initial_length=[0, 7, 30, 64], seed=5)
    for grow, chunk in (([0, 0, 0, 0], None), ([3, 1, 0, 5], 2), ([1, 8, 2, 0], None), ([0, 0, 0, 0], 1)):
        batch = users.request(new_events=grow, num_candidates=[3, 1, 4, 2])
        got = m(batch, cache=cache, candidate_chunk=chunk, verify_tokens=verify, batched=batched)
        torch.testing.assert_close(got.float(), m(batch).float(), **tol)
    for u in (11, 12, 13, 14):
        assert cache.cached_length(u) == users.lengths[u]


@pytest.mark.gpu
def test_batched_path_syncs_once_per_forward_not_per_layer():
    """On a GPU, the batched cached forward synchronises with the host the same number of
    times for 2 layers as for 6 (only the per-forward bookkeeping), and matches the
    per-user path. Counted with torch's sync debug mode (the C core's own calls aside)."""
    import warnings

    from hstu_kvcache import KVCache, KVCacheConfig

    def syncs(num_layers):
        cfg = small_cfg(num_layers=num_layers, device="cuda", max_seq_len=256)
        m = R.HSTUModel(cfg)
        cache = KVCache(KVCacheConfig(num_layers=num_layers, num_heads=cfg.num_heads,
                                      head_dim=cfg.head_dim, num_pages=128, page_size=8,
                                      dtype="float32", device="cuda", max_batch_size=4,
                                      max_seq_len=256, verify_tokens=True))
        users = R.SyntheticUsers(cfg, [1, 2, 3], initial_length=[40, 0, 75], seed=2)
        m(users.request(num_candidates=4), cache=cache, verify_tokens=True)
        m(users.request(new_events=[1, 1, 1], num_candidates=[4, 2, 6]), cache=cache, verify_tokens=True)
        batch = users.request(new_events=[3, 5, 0], num_candidates=[4, 2, 6]).to("cuda")
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                got = m(batch, cache=cache, verify_tokens=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        n = sum("synchronizing" in str(w.message) for w in caught)
        want = m(batch)
        assert_scores_close(got, want, 1e-5)
        return n

    few, many = syncs(2), syncs(6)
    print(f"host syncs per cached forward: {few} (2 layers), {many} (6 layers)")
    # Per-forward bookkeeping only (the first forward of a process may add an allocation).
    assert many <= few <= 8


def test_verified_mode_recomputes_rewritten_history():
    cfg = small_cfg()
    m = R.HSTUModel(cfg)
    users = R.SyntheticUsers(cfg, [1], initial_length=30, seed=6)
    batch = users.request(new_events=0, num_candidates=4)
    trust, verified = _fake_cache(cfg), _fake_cache(cfg)
    m(batch, cache=trust)
    m(batch, cache=verified, verify_tokens=True)
    # Rewrite token 10 in place (same length): trust mode reuses stale K/V, verified does not.
    items = batch.history_item_ids.clone()
    items[10] = (items[10] + 1) % cfg.num_items
    rewritten = replace(batch, history_item_ids=items)
    full = m(rewritten)
    assert not torch.allclose(m(rewritten, cache=trust), full)
    before = verified.appended_rows
    torch.testing.assert_close(m(rewritten, cache=verified, verify_tokens=True), full, rtol=1e-5, atol=1e-6)
    assert verified.appended_rows - before == 20 * cfg.num_layers  # tokens 10..29 recomputed


def test_token_keys():
    cfg = small_cfg()
    batch = batch_for(cfg, [6, 3], [1, 1])
    keys = R.token_keys(batch)
    assert keys.dtype == torch.int64 and keys.shape == (9,)
    assert torch.equal(keys, R.token_keys(batch))
    for field in ("history_item_ids", "history_action_ids", "history_timestamps"):
        t = getattr(batch, field).clone()
        t[4] += 1
        if field == "history_action_ids":
            t[4] %= cfg.num_actions
        k2 = R.token_keys(replace(batch, **{field: t}))
        assert (k2 != keys).tolist() == [i == 4 for i in range(9)]


def test_time_features_are_cache_safe():
    cfg = small_cfg()
    users = R.SyntheticUsers(cfg, [1], initial_length=10, seed=2)
    b1 = users.request(num_candidates=1)
    b2 = users.request(new_events=5, num_candidates=1)
    f1, f2 = R.time_features(b1), R.time_features(b2)
    assert torch.equal(f2[0][:10], f1[0]) and torch.equal(f2[1][:10], f1[1])
    assert int(f1[1][0]) == 0  # first event: "no previous event"


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("mutate,message", [
    (lambda b: replace(b, history_lengths=torch.tensor([5, 6])), "sum\\(history_lengths\\)"),
    (lambda b: replace(b, history_action_ids=b.history_action_ids[:-1]), "history_action_ids has"),
    (lambda b: replace(b, num_candidates=torch.tensor([2, 2, 2])), "num_candidates has 3 entries"),
    (lambda b: replace(b, candidate_item_ids=b.candidate_item_ids[:-1]), "sum\\(num_candidates\\)"),
    (lambda b: replace(b, history_item_ids=b.history_item_ids + 10_000), "history_item_ids must be in"),
    (lambda b: replace(b, history_action_ids=b.history_action_ids + 5), "history_action_ids must be in"),
    (lambda b: replace(b, history_item_ids=b.history_item_ids.to(torch.int32)), "int64"),
    (lambda b: replace(b, history_timestamps=b.history_timestamps.flip(0)), "non-decreasing"),
    (lambda b: replace(b, num_candidates=torch.tensor([3, -1])), "num_candidates must be >= 0"),
])
def test_bad_inputs_raise(model, mutate, message):
    batch = batch_for(model.cfg, [4, 6], [1, 1])
    with pytest.raises(ValueError, match=message):
        model(mutate(batch))


def test_positions_beyond_max_seq_len_raise(model):
    n = model.cfg.max_seq_len
    model(batch_for(model.cfg, [n], [2]))  # positions 0..N-1; candidates clamp to N-1
    with pytest.raises(ValueError, match="max_seq_len"):
        model(batch_for(model.cfg, [n + 1], [2]))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(batch_for(model.cfg, [n + 1], [2]), cache=_fake_cache(model.cfg))


def test_bad_arguments_raise(model):
    batch = batch_for(model.cfg, [4], [2])
    with pytest.raises(ValueError, match="candidate_chunk"):
        model(batch, candidate_chunk=0)
    with pytest.raises(ValueError, match="verify_tokens"):
        model(batch, verify_tokens=True)
    dup = replace(batch_for(model.cfg, [4, 4], [1, 1]), user_ids=torch.tensor([3, 3]))
    with pytest.raises(ValueError, match="at most once"):
        model(dup, cache=_fake_cache(model.cfg))
    with pytest.raises(ValueError, match="num_heads"):
        R.HSTUConfig(num_heads=0)
    with pytest.raises(ValueError, match="differ in length"):
        R.make_synthetic_batch(model.cfg, [1, 2], [3], [1, 1], torch.Generator())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("mode,verify", [("lazy", False), ("eager", True)])
def test_cached_forward_with_host_tier_evictions(device, mode, verify):
    """Rounds of random users whose histories grow, with a GPU tier far too
    small for them: users are evicted to the host tier and onboarded back
    (some hit fully, some partly, some lose pages), and in verified mode some
    histories are rewritten.  Scores equal the full recompute every round."""
    from hstu_kvcache import KVCache, KVCacheConfig

    cfg = small_cfg(device=device, max_seq_len=300)
    m = R.HSTUModel(cfg)
    page_bytes = 2 * 4 * cfg.num_heads * cfg.head_dim * 4
    cache = KVCache(KVCacheConfig(
        num_layers=cfg.num_layers, num_heads=cfg.num_heads, head_dim=cfg.head_dim,
        num_pages=60, page_size=4, dtype="float32", device=device, max_batch_size=4,
        max_seq_len=cfg.max_seq_len, verify_tokens=verify, offload_mode=mode,
        host_capacity_bytes=120 * cfg.num_layers * page_bytes))
    ids = [1, 2, 3, 4, 5, 6]
    users = R.SyntheticUsers(cfg, ids, initial_length=[40, 0, 70, 12, 55, 90], seed=7,
                             max_history=200)
    rng = np.random.default_rng(3)
    for r in range(8):
        pick = sorted(rng.choice(ids, size=3, replace=False).tolist())
        grow = [int(g) for g in rng.integers(0, 6, size=3)]
        batch = users.request(pick, new_events=grow, num_candidates=[3, 2, 4])
        if verify and r == 5:  # a rewritten event in the first user's history
            batch.history_item_ids[3] = (batch.history_item_ids[3] + 1) % cfg.num_items
        got = m(batch, cache=cache, verify_tokens=verify)
        assert_scores_close(got, m(batch), 1e-5)
    s = cache.stats()
    assert s["onboard_pages"] > 0 and s["offload_pages"] > 0 and s["pages_evicted"] > 0
    cache.check()
