"""The recsys-examples facade against the native API on the same workload:
lookup, allocate, onboard and offload times.

Workload (issue 6): 8 layers, 4 heads x 256, bf16, page 32, batch 8,
1024 / 2048 / 4096 tokens per user.  The anchor's own numbers for it are in
DESIGN.md (offload 5.4 / 10.4 / 20.4 ms, onboard 5.6 / 10.5 / 20.4 ms,
lookup + allocate 0.86 ms with everything on the GPU).

    python benchmarks/bench_facade.py [--out DIR]
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
from hstu_kvcache.recsys import KVCacheManager, get_kvcache_config  # noqa: E402

LAYERS, HEADS, HEAD_DIM, PAGE, BATCH = 8, 4, 256, 32, 8
PAGE_BYTES = 2 * PAGE * HEADS * HEAD_DIM * 2  # one layer's page, bf16


def ms(fn, repeat=5, setup=None):
    """Median wall milliseconds of fn() (GPU work included)."""
    out = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    add_plot_only(ap)
    args = ap.parse_args()
    if args.plot_only:
        plot_file(Path(args.plot_only))
        return
    if not hk.cuda_available():
        sys.exit("needs a CUDA GPU and a CUDA build of hstu_kvcache")
    rows, results = [], []
    for tokens in progress((1024, 2048, 4096), "facade", note=lambda t: f"{t} tokens/user"):
        pages = BATCH * tokens // PAGE + 64
        mgr = KVCacheManager.from_config(get_kvcache_config(
            num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE,
            offload_chunksize=PAGE * 4, num_primary_cache_pages=pages, num_buffer_pages=0,
            host_capacity_per_layer=pages * PAGE_BYTES, max_batch_size=BATCH,
            max_seq_len=tokens, dtype=torch.bfloat16, device=0,
            host_kvstorage_backend="native"))
        native = hk.KVCache(hk.KVCacheConfig(
            num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE,
            num_pages=pages, dtype="bfloat16", device="cuda", max_batch_size=BATCH,
            max_seq_len=tokens, host_capacity_bytes=pages * LAYERS * PAGE_BYTES))
        ids = list(range(BATCH))
        lens = [tokens] * BATCH
        k = torch.randn(BATCH * tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        # fill both caches
        im, lr = mgr.lookup_kvcache(ids, lens)
        meta = mgr.allocate_kvcache(im, lr)
        for layer in range(LAYERS):
            mgr.gpu_kvcache_mgr.put(k, k, layer, meta)
        mgr.offload_launch(im, meta)
        with native.prepare(ids, lens) as b:
            native.append(range(LAYERS), k.expand(LAYERS, -1, -1, -1), k.expand(LAYERS, -1, -1, -1), b)
        torch.cuda.synchronize()

        r = {"tokens_per_user": tokens}
        held = []

        def facade_lookup_allocate():
            im, lr = mgr.lookup_kvcache(ids, lens)
            held.append((im, mgr.allocate_kvcache(im, lr)))

        def end_request():  # the anchor's end of a request: offload_launch
            while held:
                mgr.offload_launch(*held.pop())

        r["facade_lookup_allocate_ms"] = ms(facade_lookup_allocate, setup=end_request)
        end_request()
        r["native_lookup_allocate_ms"] = ms(lambda: native.prepare(ids, lens).release())

        def facade_offload():
            mgr.evict(ids, for_gpu=True)
            mgr.offload_flush()

        def facade_onboard():
            im, lr = mgr.lookup_kvcache(ids, lens)
            meta = mgr.allocate_kvcache(im, lr)
            handle = mgr.onboard_launch(im, lr, meta)
            mgr.onboard_wait(im, handle)
            mgr.offload_launch(im, meta)

        def native_offload():
            native.evict(ids, gpu=True, host=False, offload=True)
            native.sync_transfers()

        def native_onboard():
            b = native.prepare(ids, lens)
            b.wait_layer(LAYERS - 1)
            torch.cuda.synchronize()
            b.release()

        # offload: the users are back on the GPU (onboarded) and nowhere else
        r["facade_offload_ms"] = ms(facade_offload,
                                    setup=lambda: (facade_onboard(), mgr.evict(ids, for_host=True)))
        r["facade_onboard_ms"] = ms(facade_onboard, setup=facade_offload)
        r["native_offload_ms"] = ms(native_offload,
                                    setup=lambda: (native_onboard(),
                                                   native.evict(ids, gpu=False, host=True)))
        r["native_onboard_ms"] = ms(native_onboard, setup=native_offload)
        nbytes = BATCH * tokens // PAGE * LAYERS * PAGE_BYTES
        for key in ("facade_offload", "facade_onboard", "native_offload", "native_onboard"):
            r[key + "_GBps"] = nbytes / (r[key + "_ms"] * 1e-3) / 1e9
        rows.append([tokens, r["facade_lookup_allocate_ms"], r["native_lookup_allocate_ms"],
                     r["facade_offload_ms"], r["native_offload_ms"],
                     r["facade_onboard_ms"], r["native_onboard_ms"]])
        results.append(r)
        print(f"{tokens} tokens/user done", flush=True)
        native.close()
    print(f"\n{LAYERS} layers, {HEADS}x{HEAD_DIM} bf16, page {PAGE}, batch {BATCH}; "
          "anchor: offload 5.4/10.4/20.4 ms, onboard 5.6/10.5/20.4 ms, lookup+allocate 0.86 ms\n")
    print(table(["tokens", "facade lookup+alloc ms", "native ms", "facade offload ms",
                 "native ms", "facade onboard ms", "native ms"], rows))
    path = write_results("facade_" + gpu_tag(), {
        "workload": {"layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM,
                     "page_size": PAGE, "batch": BATCH, "dtype": "bfloat16"},
        "anchor_ms": {"offload": [5.4, 10.4, 20.4], "onboard": [5.6, 10.5, 20.4],
                      "lookup_allocate_all_on_gpu": 0.86},
        "results": results}, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
