"""Onboard (host -> GPU) and offload (GPU -> host) throughput of the host tier,
against the pinned host<->device copy bandwidth measured in the same run and
against the plain PyTorch alternative (one .copy_() per page).

Workload (issue: host tier): 8 layers, 4 heads x 256, bf16, page 32, batch 8,
1024 / 2048 / 4096 tokens per user.  Sections:

- throughput on a fresh host pool, with the default transfer path (DMA for
  runs of consecutive pages, the kernel for the rest) and the kernel alone;
  host time of the call that launches an onboard (synchronous prepare, and
  the caller's part of prepare_async);
- the same with a host pool fragmented by earlier evictions;
- onboarding one batch while offloading another (both copy directions),
  against two plain copies in opposite directions;
- overlap: prepare_async with a full onboard next to a stand-in embedding
  lookup on the compute stream, against each alone.

    python benchmarks/bench_tiers.py [--out DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_plot_only, gpu_tag, plot_file, progress, table, write_results  # noqa: E402

import torch  # noqa: E402

import hstu_kvcache as hk  # noqa: E402

LAYERS, HEADS, HEAD_DIM, PAGE, BATCH = 8, 4, 256, 32, 8
PAGE_BYTES = 2 * PAGE * HEADS * HEAD_DIM * 2            # one layer, K and V
USER_BYTES_PER_TOKEN = LAYERS * PAGE_BYTES // PAGE


def pinned_bandwidth(nbytes: int) -> tuple[float, float, float]:
    """GB/s of large pinned H2D and D2H copies, and of both at once on two
    streams (the physical limits the transfers are compared with)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host2 = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = []
    for src, dst in ((host, dev), (dev, host)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out.append(3 * nbytes / (time.perf_counter() - t0) / 1e9)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(3):
        with torch.cuda.stream(s1):
            dev.copy_(host, non_blocking=True)
        with torch.cuda.stream(s2):
            host2.copy_(dev2, non_blocking=True)
    torch.cuda.synchronize()
    out.append(6 * nbytes / (time.perf_counter() - t0) / 1e9)
    return out[0], out[1], out[2]


def make_cache(tokens: int, gpu_users: int, host_users: int, **kw) -> hk.KVCache:
    pages = tokens // PAGE
    return hk.KVCache(hk.KVCacheConfig(
        num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE,
        num_pages=gpu_users * pages + 64, dtype="bfloat16", device="cuda",
        max_batch_size=BATCH, max_seq_len=tokens,
        host_capacity_bytes=(host_users * pages + 64) * LAYERS * PAGE_BYTES, **kw))


def fill(cache: hk.KVCache, ids: list[int], tokens: int) -> None:
    k = torch.randn(LAYERS, len(ids) * tokens, HEADS, HEAD_DIM, device="cuda",
                    dtype=torch.bfloat16)
    with cache.prepare(ids, [tokens] * len(ids)) as b:
        cache.append(range(LAYERS), k, k, b)
    torch.cuda.synchronize()


def fragment_host(cache: hk.KVCache, tokens: int, first_id: int) -> None:
    """Fill the host tier with users of random lengths and drop every other
    one: the batch's pages then land in the holes."""
    gen = torch.Generator().manual_seed(1)
    uid, free_tokens = first_id, 0
    while free_tokens < 2 * BATCH * tokens:
        ids, lens = [], []
        for _ in range(BATCH):
            ids.append(uid)
            lens.append(PAGE * int(torch.randint(2, 24, (1,), generator=gen)))
            uid += 1
        k = torch.zeros(LAYERS, sum(lens), HEADS, HEAD_DIM, device="cuda",
                        dtype=torch.bfloat16)
        with cache.prepare(ids, lens) as b:
            cache.append(range(LAYERS), k, k, b)
        cache.evict(ids, gpu=True, host=False, offload=True)
        cache.evict(ids[::2], gpu=False, host=True)
        free_tokens += sum(lens[::2])
    cache.sync_transfers()


def throughput(tokens: int, repeat: int, fragmented: bool) -> dict:
    """Offload then onboard the batch `repeat` times; medians."""
    ids = list(range(BATCH))
    nbytes = BATCH * tokens * USER_BYTES_PER_TOKEN
    cache = make_cache(tokens, BATCH + 8, 4 * BATCH if fragmented else BATCH)
    if fragmented:
        fragment_host(cache, tokens, 1000)
    fill(cache, ids, tokens)
    off_t, on_t, launch_us, async_us, alloc_us = [], [], [], [], []
    for r in range(-2, repeat):      # two warm-up rounds: thread start, first events
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache.evict(ids, gpu=True, host=False, offload=True)   # write back, drop
        cache.sync_transfers()
        off_t.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        h0 = cache.stats()["allocate_latency"]
        t0 = time.perf_counter()
        if r % 2 == 0:
            b = cache.prepare(ids, [tokens] * BATCH)            # onboards everything
            t_call = (time.perf_counter() - t0) * 1e6
        else:
            pending = cache.prepare_async(ids, [tokens] * BATCH)
            t_call = (time.perf_counter() - t0) * 1e6
            b = pending.wait(60.0)
        b.wait_layer(LAYERS - 1)
        torch.cuda.synchronize()
        t_total = time.perf_counter() - t0
        h1 = cache.stats()["allocate_latency"]
        if r >= 0:
            on_t.append(t_total)
            (launch_us if r % 2 == 0 else async_us).append(t_call)
            alloc_us.append((h1["sum"] - h0["sum"]) * 1e6)
        page_ids = b.kv_indices.tolist()
        b.release()
        cache.evict(ids, gpu=False, host=True)                # next round writes again
    s = cache.stats()
    assert s["onboard_pages"] == (repeat + 2) * BATCH * tokens // PAGE, s["onboard_pages"]
    res = {"bytes": nbytes,
           "offload_GBps": nbytes / statistics.median(off_t) / 1e9,
           "onboard_GBps": nbytes / statistics.median(on_t) / 1e9,
           "prepare_host_us": statistics.median(launch_us),
           "allocate_core_us": statistics.median(alloc_us),
           "prepare_async_caller_us": statistics.median(async_us) if async_us else None,
           "dma_share": s["dma_bytes"] / max(1, s["dma_bytes"] + s["kernel_bytes"])}
    if not fragmented:
        res["plain_torch_per_page_GBps"] = plain_torch(cache, page_ids, nbytes)
    cache.close()
    return res


def plain_torch(cache: hk.KVCache, page_ids: list[int], nbytes: int) -> float:
    """What a user writes in PyTorch: one .copy_() per page and layer."""
    tbl = torch.from_dlpack(cache.table())
    host = torch.empty((LAYERS, len(page_ids)) + tuple(tbl.shape[2:]), dtype=tbl.dtype,
                       pin_memory=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for layer in range(LAYERS):
        for i, p in enumerate(page_ids):
            tbl[layer, p].copy_(host[layer, i], non_blocking=True)
    torch.cuda.synchronize()
    return nbytes / (time.perf_counter() - t0) / 1e9


def bidirectional(tokens: int, repeat: int) -> dict:
    """Batch A on the host only, batch B on the GPU: offload B while A is
    onboarded; bytes of both over the wall time."""
    a_ids, b_ids = list(range(BATCH)), list(range(100, 100 + BATCH))
    nbytes = BATCH * tokens * USER_BYTES_PER_TOKEN
    cache = make_cache(tokens, 3 * BATCH, 3 * BATCH)
    times = []
    for _ in range(repeat):
        fill(cache, a_ids, tokens)
        cache.evict(a_ids, gpu=True, host=False, offload=True)
        cache.sync_transfers()
        fill(cache, b_ids, tokens)                 # fresh GPU pages after A's
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache.evict(b_ids, gpu=True, host=False, offload=True)   # D2H
        batch = cache.prepare(a_ids, [tokens] * BATCH)           # H2D at once
        batch.wait_layer(LAYERS - 1)
        cache.sync_transfers()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        batch.release()
        cache.evict(a_ids + b_ids, gpu=True, host=True)
    cache.close()
    return {"bytes_each_way": nbytes, "combined_GBps": 2 * nbytes / statistics.median(times) / 1e9}


def overlap(tokens: int, repeat: int) -> dict:
    """prepare_async (full onboard) beside a stand-in embedding lookup."""
    ids = list(range(BATCH))
    cache = make_cache(tokens, BATCH + 8, BATCH)
    fill(cache, ids, tokens)
    emb = torch.randn(1 << 21, 256, device="cuda", dtype=torch.bfloat16)   # 1 GiB table
    idx = torch.randint(0, emb.shape[0], (BATCH * tokens * 8,), device="cuda")

    def embedding(steps: int) -> torch.Tensor:
        out = None
        for _ in range(steps):
            out = torch.nn.functional.embedding(idx, emb).sum(0)
        return out

    def timed(fn) -> float:
        ts = []
        for _ in range(repeat):
            cache.evict(ids, gpu=True, host=False, offload=True)
            cache.sync_transfers()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts) * 1e3

    def onboard() -> None:
        b = cache.prepare_async(ids, [tokens] * BATCH).wait(60.0)
        b.wait_layer(LAYERS - 1)
        torch.cuda.synchronize()
        b.release()

    # size the stand-in to take about as long as the onboard
    t_on = timed(onboard)
    embedding(2)                                        # warm up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    embedding(4)
    torch.cuda.synchronize()
    steps = max(1, round(4 * t_on / ((time.perf_counter() - t0) * 1e3)))
    t_emb = timed(lambda: embedding(steps))

    def both() -> None:
        pending = cache.prepare_async(ids, [tokens] * BATCH)
        embedding(steps)                                # the caller's own work
        b = pending.wait(60.0)
        b.wait_layer(LAYERS - 1)
        torch.cuda.synchronize()
        b.release()

    t_both = timed(both)
    cache.close()
    return {"prepare_onboard_ms": t_on, "embedding_ms": t_emb, "both_ms": t_both,
            "max_ms": max(t_on, t_emb), "sum_ms": t_on + t_emb,
            "overlap_efficiency": (t_on + t_emb - t_both) / min(t_on, t_emb)}


# transfer paths: HSTU_KVCACHE_DMA_MIN_BYTES (read when a cache is created)
PATHS = {"default": None, "kernel": "0", "dma256k": str(256 << 10)}


def with_path(path: str, fn, *args):
    """Run fn with the transfer path forced."""
    old = os.environ.get("HSTU_KVCACHE_DMA_MIN_BYTES")
    if PATHS[path] is not None:
        os.environ["HSTU_KVCACHE_DMA_MIN_BYTES"] = PATHS[path]
    try:
        return fn(*args)
    finally:
        if old is None:
            os.environ.pop("HSTU_KVCACHE_DMA_MIN_BYTES", None)
        else:
            os.environ["HSTU_KVCACHE_DMA_MIN_BYTES"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=6)
    add_plot_only(ap)
    args = ap.parse_args()
    if args.plot_only:
        plot_file(Path(args.plot_only))
        return
    if not hk.cuda_available():
        sys.exit("needs a CUDA GPU and a CUDA build of hstu_kvcache")
    h2d, d2h, both = pinned_bandwidth(1 << 30)
    print(f"pinned bandwidth: H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s, both ways {both:.1f} GB/s",
          flush=True)
    rows, results = [], []
    cases = [(t, p, False) for t in (1024, 2048, 4096) for p in ("default", "kernel")]
    cases += [(t, p, True) for t in (1024, 4096) for p in ("default", "dma256k", "kernel")]
    for i, (tokens, path, frag) in enumerate(progress(
            cases, "tiers", note=lambda c: f"{c[0]} tokens, {c[1]}")):
        r = with_path(path, throughput, tokens, args.repeat, frag)
        r.update(tokens_per_user=tokens, path=path, host_pool="fragmented" if frag else "fresh",
                 offload_fraction=r["offload_GBps"] / d2h, onboard_fraction=r["onboard_GBps"] / h2d)
        results.append(r)
        rows.append([tokens, path, r["host_pool"], r["offload_GBps"], r["offload_fraction"],
                     r["onboard_GBps"], r["onboard_fraction"], r["prepare_host_us"],
                     r["allocate_core_us"], r["prepare_async_caller_us"], r["dma_share"],
                     r.get("plain_torch_per_page_GBps", float("nan"))])
        print(f"[{i + 1}/{len(cases)}] {tokens} tokens, {path}, {r['host_pool']}: offload "
              f"{r['offload_GBps']:.1f} GB/s, onboard {r['onboard_GBps']:.1f} GB/s", flush=True)
    bidi = with_path("default", bidirectional, 4096, args.repeat)
    bidi["fraction_of_both_ways"] = bidi["combined_GBps"] / both
    print(f"bidirectional: {bidi['combined_GBps']:.1f} GB/s", flush=True)
    ovl = {p: with_path(p, overlap, 4096, args.repeat) for p in ("default", "kernel")}
    print(f"\n{LAYERS} layers, {HEADS}x{HEAD_DIM} bf16, page {PAGE}, batch {BATCH}; pinned "
          f"H2D {h2d:.1f}, D2H {d2h:.1f}, both ways {both:.1f} GB/s\n")
    print(table(["tokens", "path", "host pool", "offload GB/s", "of D2H", "onboard GB/s",
                 "of H2D", "prepare us", "core alloc us", "async caller us", "DMA share",
                 "torch per-page GB/s"], rows))
    print(f"\nonboard one batch while offloading another (4096 tokens): "
          f"{bidi['combined_GBps']:.1f} GB/s, {100 * bidi['fraction_of_both_ways']:.0f} % of two "
          f"plain copies in opposite directions")
    print()
    print(table(["path", "prepare+onboard ms", "embedding ms", "both ms", "max ms", "sum ms"],
                [[p, o["prepare_onboard_ms"], o["embedding_ms"], o["both_ms"], o["max_ms"],
                  o["sum_ms"]] for p, o in ovl.items()]))
    path = write_results("tiers_" + gpu_tag(), {
        "workload": {"layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM,
                     "page_size": PAGE, "batch": BATCH, "dtype": "bfloat16"},
        "pinned_GBps": {"h2d": h2d, "d2h": d2h, "both_ways": both},
        "anchor": {"recsys_examples_offload_GBps": [50.0, 51.5, 52.6],
                   "recsys_examples_onboard_GBps": [47.8, 50.9, 52.7],
                   "recsys_examples_host_ms_per_onboard_launch": [0.7, 1.0]},
        "targets": {"fraction_4096": 0.97, "fraction_1024": 0.93, "fraction_fragmented": 0.90,
                    "bidirectional_GBps": 80, "host_us_per_launch": 50},
        "results": results, "bidirectional": bidi, "overlap": ovl},
        Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
