"""End-to-end latency of the reference HSTU model with and without the cache.

Workload (issue 5): 8 layers, d_model 1024, 4 heads x 256, bf16, histories of
4096 tokens of which 3968 are cached (128 new), 256 candidates per user,
batch 1, 2, 4, 8, 16.  The cache runs in verified mode: each timed request
alternates between two histories that share their first 3968 events and
differ in the last 128, so every request finds exactly 3968 tokens cached and
recomputes the rest (steady state without growing the histories).

    python benchmarks/bench_e2e.py [--batches 1,2,4,8,16] [--repeat 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import gpu_tag, table, write_results  # noqa: E402

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


def timed(fn, repeat):
    out = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out), out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8,16")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
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
        max_batch_size=max(batches), max_seq_len=cfg.max_seq_len, verify_tokens=True))
    rows, results = [], []
    gen = torch.Generator().manual_seed(0)
    for bsz in batches:
        cache.evict_all()
        ids = list(range(1000 * bsz, 1000 * bsz + bsz))
        base = make_synthetic_batch(cfg, ids, [HISTORY] * bsz, [CANDIDATES] * bsz, gen).to("cuda")
        a, b = variant(base, 1), variant(base, 2)
        model(a, cache=cache, verify_tokens=True)  # fill: 4096 tokens cached per user
        flip = [a, b]

        def with_cache():
            flip.reverse()
            return model(flip[0], cache=cache, verify_tokens=True)

        def without_cache():
            return model(a)

        with_cache()  # warm-up
        without_cache()
        hits_before = cache.stats()["hit_tokens"]
        t_cache, s_cache = timed(with_cache, args.repeat)
        hits = (cache.stats()["hit_tokens"] - hits_before) / (args.repeat * bsz)
        t_full, s_full = timed(without_cache, args.repeat)
        diff = float((model(a, cache=cache, verify_tokens=True).float() -
                      model(a).float()).abs().max())
        rows.append([bsz, t_full, t_cache, t_full / t_cache, hits, diff])
        results.append({"batch": bsz, "without_cache_ms": t_full, "with_cache_ms": t_cache,
                        "speedup": t_full / t_cache, "cached_tokens_per_user": hits,
                        "samples_without_ms": s_full, "samples_with_ms": s_cache,
                        "max_abs_score_diff": diff})
        print(f"batch {bsz}: {t_full:.1f} ms -> {t_cache:.1f} ms ({t_full / t_cache:.2f}x)",
              flush=True)
    print(f"\nreference HSTU model, 8 layers, d_model 1024, 4x256 heads, bf16, {HISTORY} history "
          f"({HISTORY - NEW} cached), {CANDIDATES} candidates; GPU tier only\n")
    print(table(["batch", "no cache ms", "cache ms", "speedup", "cached/user", "max |diff|"], rows))
    path = write_results("e2e_" + gpu_tag(), {
        "workload": {"layers": 8, "d_model": 1024, "heads": 4, "head_dim": 256,
                     "dtype": "bfloat16", "history": HISTORY, "cached": HISTORY - NEW,
                     "candidates": CANDIDATES, "repeat": args.repeat, "tier": "gpu"},
        "anchor": "recsys-examples: HSTU block 3-20x with 3968 of 4096 cached; e2e 1.3-2.6x (L20)",
        "results": results}, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
