"""Throughput of the GPU kernels against the copy bandwidth measured in the
same run and against the same operations written in plain PyTorch.

Workload (issue 3): 8 layers x batch 8 x 4096 tokens, bf16, 4 heads, head_dim
64 / 128 / 256, page sizes 2 / 8 / 32 / 128.  Bytes count reads + writes.

- append (all layers, one launch) and append (one launch per layer)
- read: every history token of the batch back from the pages (per layer)
- gather / scatter: all pages of the batch, all layers, table <-> staging
- copy: a device-to-device copy of the same bytes (the physical limit)
- plain PyTorch: index_copy_ (append), index_select (gather), index_copy_
  along the page dim (scatter), and one .copy_() per page (gather, page >= 32)

    python benchmarks/bench_kernels.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, add_plot_only, gpu_tag, plot_file, table, write_results  # noqa: E402

import torch  # noqa: E402

import hstu_kvcache as hk  # noqa: E402

LAYERS, BATCH, TOKENS, HEADS = 8, 8, 4096, 4


def cuda_time(fn, iters=10, warmup=2):
    """Mean GPU milliseconds of fn() over iters, by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def gbps(nbytes, ms):
    return nbytes / (ms * 1e-3) / 1e9


def run_case(page_size: int, head_dim: int, iters: int):
    dtype = torch.bfloat16
    nnz = BATCH * TOKENS
    row_bytes = HEADS * head_dim * 2
    kv_bytes = 2 * LAYERS * nnz * row_bytes          # K and V, all layers
    moved = 2 * kv_bytes                              # read + write
    num_pages = BATCH * TOKENS // page_size + 8
    cache = hk.KVCache(hk.KVCacheConfig(
        num_layers=LAYERS, num_heads=HEADS, head_dim=head_dim, num_pages=num_pages,
        page_size=page_size, dtype="bfloat16", device="cuda", max_batch_size=BATCH,
        max_seq_len=TOKENS))
    ids = list(range(1, BATCH + 1))
    k = torch.randn(LAYERS, nnz, HEADS, head_dim, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    out = {}

    # copy bandwidth of the same bytes
    src = torch.empty(kv_bytes // 2, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    out["copy"] = gbps(moved, cuda_time(lambda: dst.copy_(src), iters))
    del src, dst

    # append: a fresh batch per call (allocation is host work queued before the kernel)
    def append_all():
        cache.evict_all()
        with cache.prepare(ids, [TOKENS] * BATCH) as b:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            cache.append(range(LAYERS), k, v, b)
            end.record()
        return start, end

    def append_layers():
        cache.evict_all()
        with cache.prepare(ids, [TOKENS] * BATCH) as b:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for layer in range(LAYERS):
                cache.append(layer, k[layer], v[layer], b)
            end.record()
        return start, end

    def event_time(fn):
        fn()
        pairs = [fn() for _ in range(iters)]
        torch.cuda.synchronize()
        return sum(s.elapsed_time(e) for s, e in pairs) / iters

    out["append_all_layers"] = gbps(moved, event_time(append_all))
    out["append_per_layer"] = gbps(moved, event_time(append_layers))

    # read every history token back (per layer), from a committed batch
    cache.evict_all()
    b = cache.prepare(ids, [TOKENS] * BATCH)
    cache.append(range(LAYERS), k, v, b)
    out["read"] = gbps(moved, cuda_time(
        lambda: [cache.gather(layer, b) for layer in range(LAYERS)], iters))

    # page gather / scatter of every page of the batch, all layers
    pages = b.kv_indices
    staging = cache.gather_pages(pages)
    out["gather_pages"] = gbps(moved, cuda_time(lambda: cache.gather_pages(pages, out=staging), iters))
    out["scatter_pages"] = gbps(moved, cuda_time(lambda: cache.scatter_pages(pages, staging), iters))

    # plain PyTorch equivalents on the same table
    tbl = torch.from_dlpack(cache.table())                     # [L, P, 2, S, H, D]
    flat = tbl.view(LAYERS, num_pages * 2 * page_size, HEADS, head_dim)
    pos = b.positions.long()
    page_of = b.kv_indices.long()[b.kv_indptr.long()[b.batch_indices.long()] + pos // page_size]
    k_rows = page_of * 2 * page_size + pos % page_size
    v_rows = k_rows + page_size

    def torch_append():
        for layer in range(LAYERS):
            flat[layer].index_copy_(0, k_rows, k[layer])
            flat[layer].index_copy_(0, v_rows, v[layer])
    out["torch_append_index_copy"] = gbps(moved, cuda_time(torch_append, iters))
    pl = pages.long()
    out["torch_gather_index_select"] = gbps(moved, cuda_time(
        lambda: torch.index_select(tbl, 1, pl, out=staging), iters))
    out["torch_scatter_index_copy"] = gbps(moved, cuda_time(
        lambda: tbl.index_copy_(1, pl, staging), iters))
    if page_size >= 32:
        plist = pl.tolist()

        def per_page():
            for i, p in enumerate(plist):
                staging[:, i].copy_(tbl[:, p])
        out["torch_gather_per_page_copy"] = gbps(moved, cuda_time(per_page, max(2, iters // 4), 1))
    b.release()
    cache.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations and cases")
    ap.add_argument("--out", default=None)
    add_plot_only(ap)
    args = ap.parse_args()
    if args.plot_only:
        plot_file(Path(args.plot_only))
        return
    if not hk.cuda_available():
        sys.exit("needs a CUDA GPU and a CUDA build of hstu_kvcache")
    iters = 3 if args.quick else 10
    page_sizes = [2, 8, 32, 128]
    head_dims = [64, 128, 256] if not args.quick else [128]
    ops = ["append_all_layers", "append_per_layer", "read", "gather_pages", "scatter_pages",
           "torch_append_index_copy", "torch_gather_index_select", "torch_scatter_index_copy",
           "torch_gather_per_page_copy"]
    results, rows = [], []
    bar = Progress(len(head_dims) * len(page_sizes), "kernels")
    for hd in head_dims:
        for ps in page_sizes:
            r = run_case(ps, hd, iters)
            results.append({"page_size": ps, "head_dim": hd, "GBps": r,
                            "fraction_of_copy": {k: r[k] / r["copy"] for k in r if k != "copy"}})
            rows.append([ps, hd, r["copy"]] + [
                f"{r[o]:.0f} ({r[o] / r['copy']:.0%})" if o in r else "-" for o in ops])
            print(f"page {ps:3d} head_dim {hd:3d}: " + ", ".join(
                f"{k} {v:.0f}" for k, v in r.items()), flush=True)
            bar.update(note=f"page {ps} head_dim {hd}")
    bar.close()
    print(f"\nGB/s (fraction of the device copy bandwidth), {LAYERS} layers x batch {BATCH} "
          f"x {TOKENS} tokens, {HEADS} heads, bf16; bytes = read + written\n")
    print(table(["page", "head_dim", "copy"] + [o.replace("torch_", "pt_") for o in ops], rows))
    name = "kernels_" + gpu_tag()
    path = write_results(name, {
        "workload": {"layers": LAYERS, "batch": BATCH, "tokens_per_user": TOKENS,
                     "heads": HEADS, "dtype": "bfloat16", "iters": iters},
        "targets": {"fraction_page_ge_8": 0.85, "fraction_page_2": 0.60},
        "results": results}, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
