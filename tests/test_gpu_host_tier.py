"""Host tier on the GPU: transfers equal the CPU path bit for bit, and the
ordering contract holds under injected copy delays (and visibly breaks when
the waits are removed, so the test can fail)."""

import numpy as np
import pytest

import hstu_kvcache as hk

from test_gpu import bits, pair, same_tables, serve_both

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu


# How transfers move pages (HSTU_KVCACHE_DMA_MIN_BYTES, read when a cache is
# created): "kernel" only, "dma" for every run of 2+ consecutive pages (the
# test pages are 4 KiB, far below the default 1 MiB), or the default.
PATHS = {"kernel": "0", "dma": "1", "default": None}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    if PATHS[request.param] is not None:
        monkeypatch.setenv("HSTU_KVCACHE_DMA_MIN_BYTES", PATHS[request.param])
    return request.param


def check_path(gpu, path):
    s = gpu.stats()
    if path == "kernel":
        assert s["dma_bytes"] == 0 and s["kernel_bytes"] > 0
    elif path == "dma":
        assert s["dma_bytes"] > 0


def host_pair(mode, gpu_pages=8, host_pages=40, **kw):
    page_bytes = 2 * 8 * 2 * 32 * 4  # page 8, 2 heads x 32, float32
    return pair(num_pages=gpu_pages, host_capacity_bytes=host_pages * 2 * page_bytes,
                offload_mode=mode, **kw)


def scenario(cpu, gpu, t_cpu, t_gpu, gen, rounds=3):
    """Users cycle through a GPU tier too small for them: write-backs (or
    eager copies), onboarding back, partial pages, a verified rewrite."""
    lengths = {1: 30, 2: 17, 3: 24}
    for r in range(rounds):
        for u in (1, 2, 3):
            serve_both(cpu, gpu, [u], [lengths[u]], gen)
            same_tables(t_cpu, t_gpu)
            lengths[u] += 3 + r
    for u in (1, 2, 3):
        for layer in range(2):
            kc, vc = cpu.read(u, layer)
            kg, vg = gpu.read(u, layer)
            assert torch.equal(bits(kc), bits(kg).cpu()) and torch.equal(bits(vc), bits(vg).cpu())
    sc, sg = cpu.stats(), gpu.stats()
    for key in ("onboard_pages", "offload_pages", "writeback_pages", "pages_evicted",
                "host_pages_used"):
        assert sc[key] == sg[key], key
    assert sg["onboard_pages"] > 0 and sg["offload_pages"] > 0
    gpu.check()


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_host_tier_matches_cpu(mode, path):
    cpu, gpu, t_cpu, t_gpu = host_pair(mode)
    scenario(cpu, gpu, t_cpu, t_gpu, torch.Generator().manual_seed(2))
    check_path(gpu, path)


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_ordering_holds_with_delayed_copies(mode, path, monkeypatch):
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "3000")
    cpu, gpu, t_cpu, t_gpu = host_pair(mode)
    scenario(cpu, gpu, t_cpu, t_gpu, torch.Generator().manual_seed(3))
    check_path(gpu, path)


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_ordering_test_fails_without_the_waits(mode, path, monkeypatch):
    """The test of the test: with the waits removed, delayed copies land after
    the reads and writes they should precede, and results differ."""
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "3000")
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_SKIP_WAITS", "1")
    cpu, gpu, t_cpu, t_gpu = host_pair(mode)
    with pytest.raises(AssertionError):
        scenario(cpu, gpu, t_cpu, t_gpu, torch.Generator().manual_seed(4))
    torch.cuda.synchronize()


def test_onboard_waits_for_the_offload_writing_its_pages(path, monkeypatch):
    """Eager offload of a user, then at once an eviction and onboarding of
    the same pages: the onboard reads host pages an offload still writes
    (delayed), so it must wait for it; without the wait it reads stale
    bytes (checked in the companion test below)."""
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "4000")
    _, gpu, _, _ = host_pair("eager", gpu_pages=16)
    k = torch.randn(2, 32, 2, 32, device="cuda")
    with gpu.prepare([2], [32]) as b:       # an offload queued ahead: user 1's
        gpu.append(range(2), k, k, b)       # copy lands a whole delay after the
    with gpu.prepare([1], [32]) as b:       # onboard's own (equal) delay
        gpu.append(range(2), k, k + 1, b)   # eager offload queued, delayed
    gpu.evict([1], gpu=True, host=False)    # host copy still being written
    with gpu.prepare([1], [32]) as b:       # onboards it back
        for layer in range(2):
            kg, vg = gpu.gather(layer, b)
            torch.cuda.synchronize()
            assert torch.equal(kg, k[layer]) and torch.equal(vg, k[layer] + 1)
    check_path(gpu, path)


def test_onboard_after_offload_fails_without_the_wait(monkeypatch):
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "4000")
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_SKIP_WAITS", "1")
    with pytest.raises(AssertionError):
        test_onboard_waits_for_the_offload_writing_its_pages("default", monkeypatch)
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_offload_budget(mode, path, monkeypatch, expect_waits=False):
    """A budget of one page in flight: eager offloads are deferred (written
    back at eviction instead), write-backs wait for older copies; every
    user's K/V still reads back exactly."""
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "2000")
    one_page = 2 * (2 * 8 * 2 * 32 * 4)
    _, gpu, _, _ = host_pair(mode, max_offload_bytes=one_page)
    gen = torch.Generator().manual_seed(5)
    ref = {}
    for r in range(4):
        for u in (1, 2, 3):
            n = 17 + 6 * r + u
            with gpu.prepare([u], [n]) as b:
                cached = n - b.new_history_nnz
                k = torch.randn(2, b.new_history_nnz, 2, 32, generator=gen)
                gpu.append(range(2), k.cuda(), k.cuda() + 1, b)
            ref[u] = torch.cat([ref[u][:, :cached], k], dim=1) if cached else k
    for u in (1, 2, 3):
        for layer in range(2):
            kg, vg = gpu.read(u, layer)
            torch.cuda.synchronize()
            want = ref[u][layer, :kg.shape[0]]
            assert torch.equal(kg.cpu(), want) and torch.equal(vg.cpu(), want + 1)
    s = gpu.stats()
    if expect_waits:
        if mode == "eager":
            assert s["offloads_deferred"] > 0
        assert s["offload_backpressure_waits"] > 0
    assert s["onboard_pages"] > 0
    check_path(gpu, path)
    gpu.check()


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_offload_budget_waits_timing(mode, monkeypatch):
    """With copies really running in the background (not under
    compute-sanitizer, which serializes them) the budget defers and waits."""
    test_offload_budget(mode, "default", monkeypatch, expect_waits=True)


def test_wait_layer_orders_a_reader():
    """A reader of the table (a paged attention kernel) waits per layer."""
    import os
    os.environ["HSTU_KVCACHE_DEBUG_COPY_DELAY_US"] = "2000"
    try:
        _, gpu, _, t_gpu = host_pair("lazy")
    finally:
        del os.environ["HSTU_KVCACHE_DEBUG_COPY_DELAY_US"]
    k = torch.randn(2, 16, 2, 32, device="cuda")
    with gpu.prepare([1], [16]) as b:
        gpu.append(range(2), k, k + 1, b)
    for u in (2, 3):  # push user 1 to the host tier
        with gpu.prepare([u], [32]) as b:
            z = torch.zeros(2, 32, 2, 32, device="cuda")
            gpu.append(range(2), z, z, b)
    assert gpu.cached_tiers(1)[0] == 0
    with gpu.prepare([1], [16]) as b:        # onboards 2 pages, delayed
        pages = b.kv_indices.long()
        b.wait_layer(1)
        got = t_gpu[1, pages, 0].reshape(16, 2, 32).clone()  # a "kernel" reading layer 1
    torch.cuda.synchronize()
    assert torch.equal(got, k[1])


def test_close_with_transfers_in_flight(monkeypatch):
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "5000")
    _, gpu, _, _ = host_pair("eager")
    k = torch.randn(2, 24, 2, 32, device="cuda")
    with gpu.prepare([1], [24]) as b:
        gpu.append(range(2), k, k, b)       # eager offload queued, delayed
    assert gpu.stats()["transfers_in_flight"] >= 1
    gpu.close()                             # waits for the copies, frees cleanly


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_async_prepare_on_gpu_matches_cpu(mode, path, monkeypatch):
    """The worker thread issues the allocation's CUDA work (metadata upload,
    write-backs, layer-wise onboarding) on the caller's and the side streams;
    results equal the synchronous CPU path, also with delayed copies."""
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "1000")
    cpu, gpu, t_cpu, t_gpu = host_pair(mode)
    gen = torch.Generator().manual_seed(9)
    lengths = {1: 30, 2: 17, 3: 24}
    for r in range(3):
        for u in (1, 2, 3):
            b_cpu = cpu.prepare([u], [lengths[u]])
            b_gpu = gpu.prepare_async([u], [lengths[u]]).wait(30.0)
            k = torch.randn(2, b_cpu.new_history_nnz, 2, 32, generator=gen)
            cpu.append(range(2), k, k + 1, b_cpu)
            gpu.append(range(2), k.cuda(), k.cuda() + 1, b_gpu)
            for layer in range(2):
                kc, vc = cpu.gather(layer, b_cpu)
                kg, vg = gpu.gather(layer, b_gpu)
                torch.cuda.synchronize()
                assert torch.equal(bits(kc), bits(kg).cpu()) and torch.equal(bits(vc), bits(vg).cpu())
            b_cpu.release()
            b_gpu.release()
            del b_cpu, b_gpu
            same_tables(t_cpu, t_gpu)
            lengths[u] += 2 + r
    assert gpu.stats()["onboard_pages"] > 0
    check_path(gpu, path)
    gpu.check()


def test_prefetch_then_prepare_waits_for_the_copy(path, monkeypatch):
    """A prefetch's copies are delayed; the batch that uses the user right
    after waits for them per layer (append, gather and wait_layer), and an
    explicit evict waits for them too."""
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "4000")
    _, gpu, _, t_gpu = host_pair("lazy", gpu_pages=16)
    k = torch.randn(2, 40, 2, 32, device="cuda")
    with gpu.prepare([1], [40]) as b:
        gpu.append(range(2), k, k + 1, b)
        # Warm up the kernels read below: the first launch of a kernel loads
        # its module (CUDA lazy loading), which waits for all work on the
        # device and would order the reads after the copies by itself.
        pages = b.kv_indices.long()
        t_gpu[1, pages[:5], 0].reshape(40, 2, 32).clone()
        gpu.gather(0, b)
        torch.cuda.synchronize()
    gpu.evict([1], gpu=True, host=False, offload=True)
    gpu.sync_transfers()
    assert gpu.prefetch([1]) == 1                # 5 pages, delayed
    with gpu.prepare([1], [44]) as b:            # nothing left to onboard
        assert b.lookup.cached_lengths.tolist() == [40]
        pages = b.kv_indices.long()
        b.wait_layer(1)
        got = t_gpu[1, pages[:5], 0].reshape(40, 2, 32).clone()   # a raw reader
        new = torch.randn(2, 4, 2, 32, device="cuda")
        gpu.append(range(2), new, new + 1, b)
        for layer in range(2):
            kg, vg = gpu.gather(layer, b)
            torch.cuda.synchronize()
            assert torch.equal(kg[:40], k[layer]) and torch.equal(vg[:40], k[layer] + 1)
    torch.cuda.synchronize()
    assert torch.equal(got, k[1])
    s = gpu.stats()
    assert s["prefetch_pages"] == 5 and s["onboard_pages"] == 5
    assert gpu.prefetch([1]) == 0                # already up
    gpu.evict([1], gpu=False, host=True)
    gpu.evict([1], gpu=True, host=False, offload=True)
    gpu.sync_transfers()
    assert gpu.prefetch([1]) == 1
    gpu.evict([1])                               # waits for the copy, then drops
    assert gpu.cached_tiers(1) == (0, 0)
    check_path(gpu, path)
    gpu.check()


def test_prefetch_ordering_fails_without_the_waits(monkeypatch):
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "4000")
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_SKIP_WAITS", "1")
    with pytest.raises(AssertionError):
        test_prefetch_then_prepare_waits_for_the_copy("default", monkeypatch)
    torch.cuda.synchronize()



def test_early_reuse_waits_for_the_earlier_batch_on_another_stream():
    """Batch x appends on one stream behind a long kernel; batch y continues
    it on another stream: y's appends and reads wait for x's layers."""
    _, gpu, _, _ = pair()
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    kx = torch.randn(2, 24, 2, 32, device="cuda")
    ky = torch.randn(2, 8, 2, 32, device="cuda")
    torch.cuda.synchronize()
    x = gpu.prepare([1], [24], stream=s1)
    y = gpu.prepare([1], [32], stream=s2)
    assert y.lookup.cached_lengths.tolist() == [24]
    with torch.cuda.stream(s1):
        torch.cuda._sleep(50_000_000)              # x's appends land late
        gpu.append(range(2), kx, kx + 1, x, stream=s1)
    with torch.cuda.stream(s2):
        gpu.append(range(2), ky, ky + 1, y, stream=s2)
        got = [gpu.gather(layer, y, stream=s2) for layer in range(2)]
    torch.cuda.synchronize()
    for layer in range(2):
        k, v = got[layer]
        assert torch.equal(k, torch.cat([kx[layer], ky[layer]]))
        assert torch.equal(v, torch.cat([kx[layer], ky[layer]]) + 1)
    x.release()
    y.release()
    assert gpu.cached_length(1) == 32
    gpu.check()


def test_early_reuse_ordering_fails_without_the_waits(monkeypatch):
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_SKIP_WAITS", "1")
    with pytest.raises(AssertionError):
        test_early_reuse_waits_for_the_earlier_batch_on_another_stream()
    torch.cuda.synchronize()


def test_failed_onboard_on_gpu_leaves_the_host_copy(path, monkeypatch):
    """The CUDA path's handling of a transfer that fails at launch (ids given
    back to the ring, pages dropped, nothing pinned)."""
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_FAIL_TRANSFERS", "1:1")
    _, gpu, _, _ = host_pair("lazy", gpu_pages=16)
    k = torch.randn(2, 40, 2, 32, device="cuda")
    with gpu.prepare([1], [40]) as b:
        gpu.append(range(2), k, k + 1, b)
    gpu.evict([1], gpu=True, host=False, offload=True)
    with pytest.raises(hk.CudaError, match="injected"):
        gpu.prepare([1], [40])
    assert gpu.cached_tiers(1) == (0, 40) and gpu.stats()["pages_used"] == 0
    gpu.check()
    with gpu.prepare([1], [40]) as b:
        for layer in range(2):
            kg, vg = gpu.gather(layer, b)
            torch.cuda.synchronize()
            assert torch.equal(kg, k[layer]) and torch.equal(vg, k[layer] + 1)
    check_path(gpu, path)
    gpu.check()


@pytest.mark.parametrize("copy_engines", [True, False])
def test_copy_engines_option(copy_engines, monkeypatch):
    """copy_engines=False keeps every page on the copy kernel; True moves
    runs of at least 1 MiB per layer by DMA; the bytes are the same."""
    monkeypatch.delenv("HSTU_KVCACHE_DMA_MIN_BYTES", raising=False)
    cpu, gpu, t_cpu, t_gpu = pair(num_pages=700, max_seq_len=4096, max_batch_size=2,
                                  host_capacity_bytes=700 * 2 * 4096,
                                  copy_engines=copy_engines)
    gen = torch.Generator().manual_seed(11)
    for _ in range(2):                            # 2048 tokens: 256 pages, 1 MiB a layer
        serve_both(cpu, gpu, [1, 2], [2048, 40], gen)
        for c in (cpu, gpu):
            c.evict([1, 2], gpu=True, host=False, offload=True)
        serve_both(cpu, gpu, [1, 2], [2048, 40], gen)
        same_tables(t_cpu, t_gpu)
        for c in (cpu, gpu):
            c.evict([1, 2])
    s = gpu.stats()
    assert s["onboard_pages"] > 0
    assert (s["dma_bytes"] > 0) == copy_engines
    gpu.check()


def test_disk_tier_round_trip_on_gpu(path, tmp_path, monkeypatch):
    """Disk -> host -> GPU on CUDA (pinned host pages as the I/O buffers),
    with delayed copies: the write waits for the offload copy to land, the
    onboard for the read."""
    monkeypatch.setenv("HSTU_KVCACHE_DEBUG_COPY_DELAY_US", "2000")
    gpu = hk.KVCache(hk.KVCacheConfig(
        num_layers=2, num_heads=2, head_dim=32, num_pages=16, page_size=8, max_batch_size=6,
        max_seq_len=600, dtype="float32", device="cuda", host_capacity_bytes=40 * 2 * 4096,
        disk_dir=str(tmp_path), disk_capacity_bytes=8 << 20, disk_admit_after=0))
    k = torch.randn(2, 40, 2, 32, device="cuda")
    with gpu.prepare([1], [40]) as b:
        gpu.append(range(2), k, k + 1, b)
    gpu.evict([1], gpu=True, host=False, offload=True)
    gpu.sync_transfers()
    assert gpu.cached_on_disk(1) == 40
    gpu.evict([1], gpu=False, host=True)
    assert gpu.cached_tiers(1) == (0, 0)
    with gpu.prepare([1], [40]) as b:
        for layer in range(2):
            kg, vg = gpu.gather(layer, b)
            torch.cuda.synchronize()
            assert torch.equal(kg, k[layer]) and torch.equal(vg, k[layer] + 1)
    s = gpu.stats()
    assert s["disk_writes"] == 5 and s["disk_reads"] == 5
    check_path(gpu, path)
    gpu.check()
