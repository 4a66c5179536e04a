"""Onboard (host -> GPU) and offload (GPU -> host) throughput of the host tier,
against the pinned host<->device copy bandwidth measured in the same run and
against the plain PyTorch alternative (one .copy_() per page).

Workload (issue: host tier): 8 layers, 4 heads x 256, bf16, page 32, batch 8,
1024 / 2048 / 4096 tokens per user.

    python benchmarks/bench_tiers.py [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_plot_only, gpu_tag, plot_file, progress, table, write_results  # noqa: E402

import torch  # noqa: E402

import hstu_kvcache as hk  # noqa: E402

LAYERS, HEADS, HEAD_DIM, PAGE, BATCH = 8, 4, 256, 32, 8


def pinned_bandwidth(nbytes: int) -> tuple[float, float]:
    """GB/s of one large pinned H2D and D2H copy (the physical limit)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = []
    for src, dst in ((host, dev), (dev, host)):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out.append(3 * nbytes / (time.perf_counter() - t0) / 1e9)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--repeat", type=int, default=5)
    add_plot_only(ap)
    args = ap.parse_args()
    if args.plot_only:
        plot_file(Path(args.plot_only))
        return
    if not hk.cuda_available():
        sys.exit("needs a CUDA GPU and a CUDA build of hstu_kvcache")
    page_bytes = 2 * PAGE * HEADS * HEAD_DIM * 2
    h2d, d2h = pinned_bandwidth(1 << 30)
    rows, results = [], []
    for tokens in progress((1024, 2048, 4096), "tiers", note=lambda t: f"{t} tokens/user"):
        pages = BATCH * tokens // PAGE
        nbytes = pages * LAYERS * page_bytes
        cache = hk.KVCache(hk.KVCacheConfig(
            num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE,
            num_pages=pages + 64, dtype="bfloat16", device="cuda", max_batch_size=BATCH,
            max_seq_len=tokens, host_capacity_bytes=(pages + 64) * LAYERS * page_bytes))
        ids = list(range(BATCH))
        k = torch.randn(LAYERS, BATCH * tokens, HEADS, HEAD_DIM, device="cuda",
                        dtype=torch.bfloat16)
        with cache.prepare(ids, [tokens] * BATCH) as b:
            cache.append(range(LAYERS), k, k, b)
        off_t, on_t, launch_us = [], [], []
        for _ in range(args.repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            cache.evict_all(gpu=True, host=False, offload=True)  # write back, drop
            cache.sync_transfers()
            off_t.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            b = cache.prepare(ids, [tokens] * BATCH)              # onboards everything
            launch_us.append((time.perf_counter() - t0) * 1e6)
            b.wait_layer(LAYERS - 1)
            torch.cuda.synchronize()
            on_t.append(time.perf_counter() - t0)
            b.release()
            cache.evict_all(gpu=False, host=True)                 # next round writes again
        s = cache.stats()
        assert s["onboard_pages"] == args.repeat * pages, s["onboard_pages"]
        # plain PyTorch: one .copy_() per page and layer, pinned -> device
        tbl = torch.from_dlpack(cache.table())
        host = torch.empty((LAYERS, pages) + tuple(tbl.shape[2:]), dtype=tbl.dtype,
                           pin_memory=True)
        page_ids = b.kv_indices.tolist()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(LAYERS):
            for i, p in enumerate(page_ids):
                tbl[layer, p].copy_(host[layer, i], non_blocking=True)
        torch.cuda.synchronize()
        plain = nbytes / (time.perf_counter() - t0) / 1e9
        off = nbytes / statistics.median(off_t) / 1e9
        on = nbytes / statistics.median(on_t) / 1e9
        rows.append([tokens, nbytes / 2**20, off, off / d2h, on, on / h2d,
                     statistics.median(launch_us), plain])
        results.append({"tokens_per_user": tokens, "bytes": nbytes,
                        "offload_GBps": off, "offload_fraction": off / d2h,
                        "onboard_GBps": on, "onboard_fraction": on / h2d,
                        "onboard_host_us_per_launch": statistics.median(launch_us),
                        "plain_torch_per_page_GBps": plain})
        cache.close()
        print(f"{tokens} tokens/user: offload {off:.1f} GB/s, onboard {on:.1f} GB/s", flush=True)
    print(f"\npinned bandwidth in this run: H2D {h2d:.1f} GB/s, D2H {d2h:.1f} GB/s; "
          f"{LAYERS} layers, {HEADS}x{HEAD_DIM} bf16, page {PAGE}, batch {BATCH}\n")
    print(table(["tokens", "MiB", "offload GB/s", "of D2H", "onboard GB/s", "of H2D",
                 "prepare us", "torch per-page GB/s"], rows))
    path = write_results("tiers_" + gpu_tag(), {
        "workload": {"layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM,
                     "page_size": PAGE, "batch": BATCH, "dtype": "bfloat16"},
        "pinned_GBps": {"h2d": h2d, "d2h": d2h},
        "anchor": {"recsys_examples_offload_GBps": [50.0, 51.5, 52.6],
                   "recsys_examples_onboard_GBps": [47.8, 50.9, 52.7]},
        "results": results}, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
