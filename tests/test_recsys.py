"""The recsys-examples facade (hstu_kvcache.recsys): a multi-phase scenario
through the anchor's API with exact metadata at each phase, on the CPU path
and (marked gpu) on CUDA, plus the errors bad inputs raise."""

from typing import Dict, List, Tuple

import pytest

torch = pytest.importorskip("torch")

from hstu_kvcache import (CacheBusyError, InvalidArgumentError, InvalidStateError,  # noqa: E402
                          KVCacheError, StaleLookupError)
from hstu_kvcache.recsys import (HostKVTaskStatus, KVCacheManager, KVCacheMetadata,  # noqa: E402
                                 KVIndexMeta, KVLookupResult, get_kvcache_config)

L, H, D, PS = 2, 2, 8, 4
PAGE_BYTES = 2 * PS * H * D * 4          # one layer's page, float32


def make(device="cpu", gpu_pages=8, host_pages=32, backend="native", **kw):
    args = dict(num_layers=L, num_heads=H, head_dim=D, page_size=PS, offload_chunksize=2 * PS,
                num_primary_cache_pages=gpu_pages, num_buffer_pages=0,
                host_capacity_per_layer=host_pages * PAGE_BYTES, max_batch_size=4,
                max_seq_len=64, dtype=torch.float32, device=device,
                host_kvstorage_backend=backend)
    args.update(kw)
    return KVCacheManager.from_config(get_kvcache_config(**args))


def ints(t) -> List[int]:
    return t.cpu().tolist()


Truth = Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]]


def put_all(mgr, meta: KVCacheMetadata, ids: List[int], device, truth: Truth, gen) -> None:
    """Put random K/V of the new tokens of every layer; extend `truth`."""
    new_off = ints(meta.new_history_offsets)
    for layer in range(L):
        meta.kv_onload_handle.stream_wait_layer(layer)
        k = torch.randn(meta.new_history_nnz, H, D, generator=gen).to(device)
        v = torch.randn(meta.new_history_nnz, H, D, generator=gen).to(device)
        mgr.gpu_kvcache_mgr.put(k, v, layer, meta)
        for b, uid in enumerate(ids):
            rows = slice(new_off[b], new_off[b + 1])
            old_k, old_v = truth.get((uid, layer), (k[:0].cpu(), v[:0].cpu()))
            truth[(uid, layer)] = (torch.cat([old_k, k[rows].cpu()]),
                                   torch.cat([old_v, v[rows].cpu()]))


def check_pages(mgr, meta: KVCacheMetadata, ids: List[int], truth: Truth) -> None:
    """`get` on each user's page list returns exactly what was put."""
    indptr, pages, last = ints(meta.kv_indptr), meta.kv_indices, ints(meta.kv_last_page_len)
    for b, uid in enumerate(ids):
        for layer in range(L):
            k, v = mgr.gpu_kvcache_mgr.get(pages[indptr[b]:indptr[b + 1]], last[b], layer)
            tk, tv = truth[(uid, layer)]
            assert torch.equal(k.cpu(), tk) and torch.equal(v.cpu(), tv), (uid, layer)


def lookup_lists(mgr, ids, lengths):
    index_meta, res = mgr.lookup_kvcache(torch.tensor(ids), torch.tensor(lengths))
    assert isinstance(index_meta, KVIndexMeta) and isinstance(res, KVLookupResult)
    assert ints(index_meta.user_ids) == ids and ints(index_meta.seq_lengths) == lengths
    for name in ("cached_start_indices", "gpu_cached_start_indices", "host_cached_start_indices"):
        assert ints(getattr(res, name)) == [0] * len(ids), name  # prefixes, no gaps
    return (index_meta, res, ints(res.cached_lengths), ints(res.gpu_cached_lengths),
            ints(res.host_cached_lengths))


def run_scenario(device: str) -> None:
    gen = torch.Generator().manual_seed(6)
    mgr = make(device)
    assert mgr.host_kvstorage_manager.backend_name == "native"
    assert len(mgr.gpu_kvcache_mgr.get_cache_tables()) == L
    truth: Truth = {}

    # -- phase 1: three new users of different lengths -------------------------
    ids = [10, 20, 30]
    im, res, cached, gpu, host = lookup_lists(mgr, ids, [6, 9, 4])
    assert cached == gpu == host == [0, 0, 0]
    meta = mgr.allocate_kvcache(im, res)
    assert meta.kv_onload_handle.status == HostKVTaskStatus.SKIPPED
    assert ints(meta.kv_indices) == [0, 1, 2, 3, 4, 5]       # fresh pool, in order
    assert ints(meta.kv_indptr) == [0, 2, 5, 6]
    assert ints(meta.kv_last_page_len) == [2, 1, 4]
    assert ints(meta.total_history_lengths) == [6, 9, 4]
    assert ints(meta.total_history_offsets) == [0, 6, 15, 19]
    assert ints(meta.new_history_offsets) == [0, 6, 15, 19]
    assert meta.new_history_nnz == 19 and ints(meta.new_history_nnz_cuda) == [19]
    assert ints(meta.batch_indices) == [0] * 6 + [1] * 9 + [2] * 4
    assert ints(meta.position) == list(range(6)) + list(range(9)) + list(range(4))
    assert meta.max_seqlen == 9 and len(meta.kv_cache_table) == L
    put_all(mgr, meta, ids, device, truth, gen)
    check_pages(mgr, meta, ids, truth)
    first_pages = ints(meta.kv_indices)
    mgr.offload_launch(im, meta)

    # -- phase 2: lookup shows the cached lengths (lazy: nothing on the host) ----
    _, _, cached, gpu, host = lookup_lists(mgr, ids, [6, 9, 4])
    assert cached == gpu == [6, 9, 4] and host == [0, 0, 0]

    # -- phase 3: two histories grow; cached pages keep their ids ------------------
    ids = [10, 30]
    im, res, cached, gpu, host = lookup_lists(mgr, ids, [7, 10])
    assert cached == gpu == [6, 4] and host == [0, 0]
    meta = mgr.allocate_kvcache(im, res)
    pages = ints(meta.kv_indices)
    assert ints(meta.kv_indptr) == [0, 2, 5]
    assert pages[:2] == first_pages[:2] and pages[2] == first_pages[5]
    assert sorted(pages[3:]) == [6, 7]                        # the two free pages
    assert ints(meta.kv_last_page_len) == [3, 2]
    assert ints(meta.total_history_offsets) == [0, 7, 17]
    assert ints(meta.new_history_offsets) == [0, 1, 7]
    assert meta.new_history_nnz == 7 and ints(meta.new_history_nnz_cuda) == [7]
    assert ints(meta.batch_indices) == [0] + [1] * 6
    assert ints(meta.position) == [6] + list(range(4, 10))
    put_all(mgr, meta, ids, device, truth, gen)
    check_pages(mgr, meta, ids, truth)
    mgr.offload_launch(im, meta)

    # -- phase 4: evict user 20 from the GPU: written back, not dropped ----------
    mgr.evict(torch.tensor([20]), for_gpu=True)
    assert mgr.cache.cached_tiers(20) == (0, 8)               # full pages only
    im, res, cached, gpu, host = lookup_lists(mgr, [20], [12])
    assert cached == [8] and gpu == [0] and host == [8]

    # -- phase 5: allocate onboards the host pages into the leading pages ---------
    meta = mgr.allocate_kvcache(im, res)
    handle = mgr.onboard_launch(im, res, meta)
    assert handle is meta.kv_onload_handle and handle.status == HostKVTaskStatus.LAUNCHED
    assert ints(handle.user_ids) == [20]
    pages = ints(meta.kv_indices)
    assert ints(meta.kv_indptr) == [0, 3] and sorted(pages) == sorted(first_pages[2:5])
    assert ints(meta.kv_last_page_len) == [4]
    assert ints(meta.total_history_offsets) == [0, 12]
    assert ints(meta.new_history_offsets) == [0, 4] and meta.new_history_nnz == 4
    assert ints(meta.position) == [8, 9, 10, 11] and ints(meta.batch_indices) == [0] * 4
    assert mgr.onboard_wait(im, handle).ready
    assert mgr.onboard_try_wait(im, handle).status == HostKVTaskStatus.READY
    for layer in range(L):                                      # the onboarded prefix
        k, v = mgr.gpu_kvcache_mgr.get(meta.kv_indices[:2], PS, layer)
        tk, tv = truth[(20, layer)]
        assert torch.equal(k.cpu(), tk[:8]) and torch.equal(v.cpu(), tv[:8])
    truth = {key: (k[:8], v[:8]) if key[0] == 20 else (k, v) for key, (k, v) in truth.items()}
    put_all(mgr, meta, [20], device, truth, gen)
    check_pages(mgr, meta, [20], truth)
    mgr.offload_launch(im, meta)
    mgr.offload_flush()

    # -- phase 6: evict from the host only, then the GPU again ---------------------
    mgr.evict(torch.tensor([20]), for_host=True)
    _, _, cached, gpu, host = lookup_lists(mgr, [20], [12])
    assert cached == gpu == [12] and host == [0]
    mgr.evict(torch.tensor([20]), for_gpu=True)
    _, _, cached, gpu, host = lookup_lists(mgr, [20], [12])
    assert cached == host == [12] and gpu == [0]
    mgr.evict(torch.tensor([20]))                                 # neither tier: no-op
    assert mgr.cache.cached_tiers(20) == (0, 12)

    # -- phase 7: evict everything; the next batch starts from scratch ------------
    mgr.evict_all(for_gpu=True, for_host=True)
    im, res, cached, gpu, host = lookup_lists(mgr, [10, 20, 30], [7, 12, 10])
    assert cached == gpu == host == [0, 0, 0]
    meta = mgr.allocate_kvcache(im, res)
    assert ints(meta.kv_indptr) == [0, 2, 5, 8] and ints(meta.new_history_offsets) == [0, 7, 19, 29]
    assert meta.new_history_nnz == 29
    mgr.cache.check()


def test_scenario_cpu():
    run_scenario("cpu")


@pytest.mark.gpu
def test_scenario_gpu():
    run_scenario("cuda")


def test_nop_backend_drops_on_gpu_eviction():
    mgr = make(backend="nop", host_capacity_per_layer=0)
    assert mgr.host_kvstorage_manager.backend_name == "nop"
    im, res = mgr.lookup_kvcache(torch.tensor([1]), torch.tensor([8]))
    meta = mgr.allocate_kvcache(im, res)
    put_all(mgr, meta, [1], "cpu", {}, torch.Generator().manual_seed(0))
    mgr.evict(torch.tensor([1]), for_gpu=True, for_host=True)
    assert mgr.cache.cached_tiers(1) == (0, 0)
    _, res = mgr.lookup_kvcache(torch.tensor([1]), torch.tensor([8]))
    assert ints(res.cached_lengths) == [0]


def test_output_metadata_buffers_are_filled_and_padded():
    mgr = make()
    out = KVCacheMetadata(kv_indices=torch.full((8,), -1, dtype=torch.int32),
                          kv_indptr=torch.full((5,), -1, dtype=torch.int32),
                          kv_last_page_len=torch.full((4,), -1, dtype=torch.int32),
                          new_history_offsets=torch.full((5,), -1, dtype=torch.int32))
    im, res = mgr.lookup_kvcache(torch.tensor([1, 2]), torch.tensor([5, 3]))
    got = mgr.allocate_kvcache(im, res, output_kvcache_metadata=out)
    assert got is out
    assert ints(out.kv_indices) == [0, 1, 2, 0, 0, 0, 0, 0]
    assert ints(out.kv_indptr) == [0, 2, 3, 3, 3]
    assert ints(out.kv_last_page_len) == [1, 3, 0, 0]
    assert ints(out.new_history_offsets) == [0, 5, 8, 8, 8]
    assert out.new_history_nnz == 8


def test_bad_inputs_raise_kvcache_errors():
    base = dict(num_layers=L, num_heads=H, head_dim=D, page_size=PS, offload_chunksize=PS,
                num_primary_cache_pages=8, num_buffer_pages=0,
                host_capacity_per_layer=PAGE_BYTES * 4, max_batch_size=4, max_seq_len=64,
                dtype=torch.float32, device="cpu")
    for bad in (dict(host_kvstorage_backend="flexkv"), dict(offload_chunksize=6),
                dict(host_kvstorage_backend="native", host_capacity_per_layer=0),
                dict(host_kvstorage_fail_policy="maybe"), dict(offload_mode="soon"),
                dict(page_size=3), dict(device=-1), dict(num_buffer_pages=-1)):
        with pytest.raises(InvalidArgumentError):
            get_kvcache_config(**{**base, **bad})
    with pytest.raises(InvalidArgumentError):
        KVCacheManager.from_config(object())

    mgr, other = make(), make()
    with pytest.raises(InvalidArgumentError):
        mgr.lookup_kvcache(torch.tensor([1, 2]), torch.tensor([4]))
    im, res = mgr.lookup_kvcache(torch.tensor([1, 2]), torch.tensor([4, 6]))
    with pytest.raises(InvalidArgumentError):
        other.allocate_kvcache(im, res)                           # another manager's lookup
    with pytest.raises(InvalidArgumentError):
        mgr.allocate_kvcache(KVIndexMeta(torch.tensor([3, 2]), torch.tensor([4, 6])), res)
    meta = mgr.allocate_kvcache(im, res)
    with pytest.raises(CacheBusyError):                           # batch still being written
        mgr.evict(torch.tensor([1]), for_gpu=True)
    with pytest.raises(InvalidArgumentError):
        mgr.gpu_kvcache_mgr.get(meta.kv_indices[:1], PS, L)       # no such layer
    with pytest.raises(InvalidArgumentError):
        mgr.gpu_kvcache_mgr.get(torch.tensor([99]), PS, 0)        # no such page
    with pytest.raises(InvalidArgumentError):
        mgr.gpu_kvcache_mgr.put(torch.zeros(3, H, D), torch.zeros(3, H, D), 0, meta)  # nnz is 10
    put_all(mgr, meta, [1, 2], "cpu", {}, torch.Generator().manual_seed(1))
    mgr.offload_launch(im, meta)                                  # releases the batch
    with pytest.raises(InvalidStateError):
        mgr.gpu_kvcache_mgr.put(torch.zeros(10, H, D), torch.zeros(10, H, D), 0, meta)
    im, res = mgr.lookup_kvcache(torch.tensor([1]), torch.tensor([8]))
    mgr.evict(torch.tensor([1]), for_gpu=True, for_host=True)     # dropped everywhere
    with pytest.raises(StaleLookupError):
        mgr.allocate_kvcache(im, res)
    for exc in (InvalidArgumentError, InvalidStateError, CacheBusyError, StaleLookupError):
        assert issubclass(exc, KVCacheError)


class FacadeAsModelCache:
    """The reference model's cache protocol (lookup / allocate / append /
    gather / release) spoken through the facade only, the way a
    recsys-examples pipeline drives it."""

    def __init__(self, mgr: KVCacheManager):
        self.mgr = mgr
        self.config = mgr.cache.config          # dtype and device for the model

    def lookup(self, user_ids, history_lengths, token_keys=None):
        assert token_keys is None
        index_meta, res = self.mgr.lookup_kvcache(torch.as_tensor(user_ids),
                                                  torch.as_tensor(history_lengths))
        res.index_meta = index_meta
        return res

    def allocate(self, res, num_candidates=None):
        assert num_candidates is None
        meta = self.mgr.allocate_kvcache(res.index_meta, res)
        self.mgr.onboard_launch(res.index_meta, res, meta)
        meta.release = lambda: self.mgr.offload_launch(res.index_meta, meta)
        return meta

    def append(self, layer, k, v, meta):
        meta.kv_onload_handle.stream_wait_layer(layer)
        self.mgr.gpu_kvcache_mgr.put(k.contiguous(), v.contiguous(), layer, meta)

    def gather(self, layer, meta):
        indptr, last = ints(meta.kv_indptr), ints(meta.kv_last_page_len)
        parts = [self.mgr.gpu_kvcache_mgr.get(meta.kv_indices[indptr[b]:indptr[b + 1]],
                                              last[b], layer) for b in range(len(last))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def test_reference_model_through_the_facade_scores_like_no_cache():
    from hstu_kvcache import reference as R
    cfg = R.HSTUConfig(num_items=500, num_actions=5, d_model=32, num_heads=2, head_dim=16,
                       num_layers=3, max_seq_len=128, seed=7)
    model = R.HSTUModel(cfg)
    page_bytes = 2 * 8 * 2 * 16 * 4
    mgr = KVCacheManager.from_config(get_kvcache_config(
        num_layers=3, num_heads=2, head_dim=16, page_size=8, offload_chunksize=8,
        num_primary_cache_pages=64, num_buffer_pages=0, host_capacity_per_layer=64 * page_bytes,
        max_batch_size=4, max_seq_len=128, dtype=torch.float32, device="cpu",
        host_kvstorage_backend="native"))
    cache = FacadeAsModelCache(mgr)
    users = R.SyntheticUsers(cfg, [11, 12, 13], initial_length=[0, 9, 30], seed=5)
    for r, grow in enumerate([[0, 0, 0], [3, 1, 5], [1, 8, 2], [2, 2, 2]]):
        batch = users.request(new_events=grow, num_candidates=[3, 1, 4])
        scores = model(batch, cache=cache, batched=False)
        torch.testing.assert_close(scores, model(batch), rtol=1e-5, atol=1e-6)
        if r == 1:       # the next request onboards users 12 and 13 from the host
            mgr.evict(torch.tensor([12, 13]), for_gpu=True)
            assert mgr.cache.cached_tiers(13) == (0, 32)
    assert mgr.cache.stats()["onboard_pages"] > 0


def test_eager_mode_offloads_full_pages_at_commit():
    mgr = make(offload_mode="eager")
    im, res = mgr.lookup_kvcache(torch.tensor([1, 2]), torch.tensor([10, 4]))
    meta = mgr.allocate_kvcache(im, res)
    truth: Truth = {}
    put_all(mgr, meta, [1, 2], "cpu", truth, torch.Generator().manual_seed(2))
    assert mgr.offload_launch(im, meta) is None          # the core copies by itself
    mgr.offload_flush()
    _, res = mgr.lookup_kvcache(torch.tensor([1, 2]), torch.tensor([10, 4]))
    assert ints(res.gpu_cached_lengths) == [10, 4]
    assert ints(res.host_cached_lengths) == [8, 4]        # full pages only
    mgr.evict(torch.tensor([1, 2]), for_gpu=True)
    _, res = mgr.lookup_kvcache(torch.tensor([1, 2]), torch.tensor([10, 4]))
    assert ints(res.cached_lengths) == [8, 4] and ints(res.gpu_cached_lengths) == [0, 0]


def test_release_all_rolls_back_an_abandoned_request():
    mgr = make()
    im, res = mgr.lookup_kvcache(torch.tensor([1]), torch.tensor([8]))
    meta = mgr.allocate_kvcache(im, res)
    mgr.gpu_kvcache_mgr.put(torch.ones(8, H, D), torch.ones(8, H, D), 0, meta)  # layer 0 only
    mgr.offload_launch(im, meta)                 # not finished: stays open, user pinned
    with pytest.raises(CacheBusyError):
        mgr.evict(torch.tensor([1]), for_gpu=True)
    mgr.release_all()
    _, res = mgr.lookup_kvcache(torch.tensor([1]), torch.tensor([8]))
    assert ints(res.cached_lengths) == [0]
    mgr.evict_all(for_gpu=True, for_host=True)
    mgr.cache.check()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_strip_cached_tokens_feature_layout(device):
    """Contextual features first, then item and action histories (tokens
    alternate item, action): cached counts include the contextual tokens."""
    from hstu_kvcache.recsys import strip_cached_tokens

    # 2 users; features: ctx, item, action (feature-major segments)
    lengths = torch.tensor([1, 1,  3, 2,  3, 2])
    values = torch.tensor([100, 200,  10, 11, 12, 20, 21,  50, 51, 52, 60, 61]).to(device)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(lengths, 0)])
    # user 0: ctx + 3 history tokens (items 10, 11; action 50) cached; user 1: nothing
    v, l, o = strip_cached_tokens(values, lengths, offsets, torch.tensor([4, 0]),
                                  ["contextual", "item", "action"])
    assert l.tolist() == [0, 1, 1, 2, 2, 2]
    assert v.cpu().tolist() == [200, 12, 20, 21, 51, 52, 60, 61]
    assert o.tolist() == [0, 0, 1, 2, 4, 6, 8]
    # everything cached for user 0 (ctx + 6 history tokens); user 1: ctx + 1 item
    v, l, _ = strip_cached_tokens(values, lengths, offsets, torch.tensor([7, 2]),
                                  ["contextual", "item", "action"])
    assert l.tolist() == [0, 0, 0, 1, 0, 2]
    assert v.cpu().tolist() == [21, 60, 61]


def test_strip_cached_tokens_bad_layout():
    from hstu_kvcache.recsys import strip_cached_tokens

    lengths = torch.tensor([1, 1])
    with pytest.raises(InvalidArgumentError, match="feature_order"):
        strip_cached_tokens(torch.arange(2), lengths, None, [0], ["item", "item"])
    with pytest.raises(InvalidArgumentError, match="users need"):
        strip_cached_tokens(torch.arange(2), lengths, None, [0, 0, 0], ["item", "action"])
    with pytest.raises(InvalidArgumentError, match="negative"):
        strip_cached_tokens(torch.arange(2), lengths, None, [-1], ["item", "action"])
