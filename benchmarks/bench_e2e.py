"""End-to-end latency of the reference HSTU model with and without the cache.

Workload (issue 5): 8 layers, d_model 1024, 4 heads x 256, bf16, histories of
4096 tokens of which 3968 are cached (128 new), 256 candidates per user,
batch 1, 2, 4, 8, 16.  The cache runs in verified mode: each timed request
alternates between two histories that share their first 3968 events and
differ in the last 128, so every request finds exactly 3968 tokens cached and
recomputes the rest (steady state without growing the histories).

Paths timed (``HSTUModel.forward``'s ``batched`` flag):

- no cache, dense: the per-user ``[H, T, T]`` recompute (the plain definition);
- no cache, batched: every user at once, every history token a row;
- cache, batched: every user at once, only the 128 new tokens and the
  candidates are rows, attending to the history K/V gathered from the cache;
- cache, per-user: the readable per-user reference of the cached path.

"no cache ms" is the faster no-cache path, "cache ms" the batched cached path:
the speedup compares the best of each.

    python benchmarks/bench_e2e.py [--batches 1,2,4,8,16] [--repeat 5] [--out DIR] [--profile]
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
from hstu_kvcache.reference import HSTUBatch, HSTUConfig, HSTUModel, make_synthetic_batch  # noqa: E402

HISTORY, NEW, CANDIDATES = 4096, 128, 256


def variant(batch: HSTUBatch, tail_seed: int) -> HSTUBatch:
    """The same batch with the last NEW events of every history changed."""
    g = torch.Generator().manual_seed(tail_seed)
    items = batch.history_item_ids.clone().cpu()
    offsets = torch.cumsum(batch.history_lengths.cpu(), 0)
    for end in offsets.tolist():
        items[end - NEW:end] = torch.randint(0, 100_000, (NEW,), generator=g)
    return HSTUBatch(batch.user_ids, items.to(batch.history_item_ids.device),
                     batch.history_action_ids, batch.history_timestamps,
                     batch.history_lengths, batch.candidate_item_ids, batch.num_candidates)


def timed(fn, repeat, setup=None):
    """Median wall time (ms) of ``fn`` from an idle GPU to its last kernel, the samples,
    and the median host time (until ``fn`` returns): host ~ wall means launch-bound.
    ``setup`` runs before each call, outside the timing."""
    out, host = [], []
    for _ in range(repeat):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out), out, statistics.median(host)


def profile(label, fn):
    """Print where the GPU time (torch.profiler) and the host time (cProfile, which also
    sees the cache's C calls) of one call of ``fn`` go."""
    import cProfile
    import pstats
    from torch.profiler import ProfilerActivity, profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        fn()
        torch.cuda.synchronize()
    print(f"\n--- profile: {label} ---")
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=48))
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    torch.cuda.synchronize()
    print(f"--- host (cProfile, tottime): {label} ---")
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-copy-engines", action="store_true",
                    help="the cache moves tier pages with its copy kernel only "
                         "(KVCacheConfig.copy_engines=False)")
    ap.add_argument("--profile", action="store_true",
                    help="print a torch.profiler table of each path at the largest batch")
    add_plot_only(ap)
    args = ap.parse_args()
    if args.plot_only:
        plot_file(Path(args.plot_only))
        return
    if not hk.cuda_available():
        sys.exit("needs a CUDA GPU and a CUDA build of hstu_kvcache")
    batches = [int(b) for b in args.batches.split(",")]
    cfg = HSTUConfig(num_items=100_000, num_actions=8, d_model=1024, num_heads=4, head_dim=256,
                     num_layers=8, max_seq_len=HISTORY + CANDIDATES + 1, dtype=torch.bfloat16,
                     device="cuda")
    model = HSTUModel(cfg).eval()
    page = 32
    cache = hk.KVCache(hk.KVCacheConfig(
        num_layers=8, num_heads=4, head_dim=256, page_size=page, dtype="bfloat16",
        device="cuda", num_pages=max(batches) * (HISTORY // page + 1) + 64,
        max_batch_size=max(batches), max_seq_len=cfg.max_seq_len, verify_tokens=True,
        copy_engines=not args.no_copy_engines,
        # a host tier as large as the GPU tier, for the onboarding table
        host_capacity_bytes=(max(batches) * (HISTORY // page + 1) + 64) * 8 * 2 * page * 4 * 256 * 2))
    rows, results, host_rows = [], [], []
    gen = torch.Generator().manual_seed(0)
    for bsz in progress(batches, "e2e", note=lambda b: f"batch {b} done"):
        cache.evict_all()
        torch.cuda.reset_peak_memory_stats()
        ids = list(range(1000 * bsz, 1000 * bsz + bsz))
        base = make_synthetic_batch(cfg, ids, [HISTORY] * bsz, [CANDIDATES] * bsz, gen).to("cuda")
        a, b = variant(base, 1), variant(base, 2)
        model(a, cache=cache, verify_tokens=True)  # fill: 4096 tokens cached per user
        flip = [a, b]

        def with_cache(batched=True):
            flip.reverse()
            return model(flip[0], cache=cache, verify_tokens=True, batched=batched)

        paths = {  # name -> callable; both cached paths keep 3968 tokens cached per call
            "without_cache_dense": lambda: model(a, batched=False),
            "without_cache_batched": lambda: model(a, batched=True),
            "with_cache": with_cache,
            "with_cache_per_user": lambda: with_cache(batched=False),
        }
        def to_host_tier():
            """Move the users' cached pages to the host tier (not timed): the
            next cached call onboards its 3968 cached tokens inside the timing."""
            cache.evict(ids, gpu=True, host=False, offload=True)
            cache.sync_transfers()

        times, samples, host = {}, {}, {}
        for name, fn in paths.items():
            fn()  # warm-up
            hits_before = cache.stats()["hit_tokens"]
            times[name], samples[name], host[name] = timed(fn, args.repeat)
            if name == "with_cache":
                hits = (cache.stats()["hit_tokens"] - hits_before) / (args.repeat * bsz)
        onboarded_before = cache.stats()["onboard_pages"]
        times["with_cache_host_tier"], samples["with_cache_host_tier"], \
            host["with_cache_host_tier"] = timed(with_cache, args.repeat, setup=to_host_tier)
        onboarded = (cache.stats()["onboard_pages"] - onboarded_before) / (args.repeat * bsz)
        nc_best = min(("without_cache_dense", "without_cache_batched"), key=times.get)
        t_full, t_cache = times[nc_best], times["with_cache"]
        # Scores of every path for the same request (a), against the dense recompute.
        want = model(a, batched=False).float()
        got = {"with_cache": model(a, cache=cache, verify_tokens=True).float(),
               "with_cache_per_user": model(a, cache=cache, verify_tokens=True, batched=False).float(),
               "without_cache_batched": model(a, batched=True).float()}
        scale = float(want.abs().max())
        diffs = {k: float((v - want).abs().max()) for k, v in got.items()}
        diff = diffs["with_cache"]
        t_host = times["with_cache_host_tier"]
        rows.append([bsz, t_full, t_cache, t_full / t_cache, hits, diff,
                     times["without_cache_dense"], times["without_cache_batched"],
                     times["with_cache_per_user"]])
        host_rows.append([bsz, t_full, t_host, t_full / t_host, onboarded * page])
        results.append({"batch": bsz, "without_cache_ms": t_full, "with_cache_ms": t_cache,
                        "speedup": t_full / t_cache, "cached_tokens_per_user": hits,
                        "without_cache_path": nc_best.removeprefix("without_cache_"),
                        "without_cache_dense_ms": times["without_cache_dense"],
                        "without_cache_batched_ms": times["without_cache_batched"],
                        "with_cache_per_user_ms": times["with_cache_per_user"],
                        "speedup_vs_per_user_cache": times["with_cache_per_user"] / t_cache,
                        "with_cache_host_tier_ms": t_host,
                        "speedup_host_tier": t_full / t_host,
                        "onboarded_tokens_per_user": onboarded * page,
                        "samples_without_ms": samples[nc_best], "samples_with_ms": samples["with_cache"],
                        "samples_ms": samples, "host_ms": host,
                        "max_abs_score_diff": diff, "max_abs_score": scale,
                        "max_abs_score_diff_vs_dense": diffs,
                        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(f"batch {bsz}: {t_full:.1f} ms -> {t_cache:.1f} ms ({t_full / t_cache:.2f}x)  "
              f"[dense {times['without_cache_dense']:.1f}, batched {times['without_cache_batched']:.1f}, "
              f"per-user cache {times['with_cache_per_user']:.1f}; cache host {host['with_cache']:.1f}; "
              f"|diff| {diff:.3g} of {scale:.3g}]", flush=True)
        if args.profile and bsz == min(batches):
            profile(f"with cache, batched, batch {bsz}", with_cache)
        if args.profile and bsz == max(batches):
            profile(f"with cache, batched, batch {bsz}", with_cache)
            profile(f"without cache, batched, batch {bsz}", paths["without_cache_batched"])
    print(f"\nreference HSTU model, 8 layers, d_model 1024, 4x256 heads, bf16, {HISTORY} history "
          f"({HISTORY - NEW} cached), {CANDIDATES} candidates; GPU tier only\n")
    print(table(["batch", "no cache ms", "cache ms", "speedup", "cached/user", "max |diff|",
                 "dense ms", "batched ms", "per-user cache ms"], rows))
    print("\nno cache ms: the faster of dense (per-user T x T) and batched (all users at once);"
          "\ncache ms: batched cached path; per-user cache ms: the per-user reference of the cached path")
    print("\nthe cached prefix on the host tier (onboarded layer by layer inside the timing):\n")
    print(table(["batch", "no cache ms", "cache (host tier) ms", "speedup", "onboarded/user"],
                host_rows))
    path = write_results("e2e_" + gpu_tag() + ("_kernel_copies" if args.no_copy_engines else ""), {
        "copy_engines": not args.no_copy_engines,
        "workload": {"layers": 8, "d_model": 1024, "heads": 4, "head_dim": 256,
                     "dtype": "bfloat16", "history": HISTORY, "cached": HISTORY - NEW,
                     "candidates": CANDIDATES, "repeat": args.repeat,
                     "tiers": "gpu (with_cache_ms) and host (with_cache_host_tier_ms)"},
        "anchor": "recsys-examples: HSTU block 3-20x with 3968 of 4096 cached; e2e 1.3-2.6x (L20)",
        "paths": {"without_cache_ms": "faster of without_cache_dense_ms / without_cache_batched_ms",
                  "with_cache_ms": "batched cached path (HSTUModel.forward(batched=True))",
                  "with_cache_per_user_ms": "per-user reference of the cached path (batched=False)"},
        "results": results}, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
