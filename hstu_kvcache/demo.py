"""The main job: serve a stream of HSTU requests with the cache and without
it, and show hit rate, latency and that the scores match.

    python -m hstu_kvcache demo [--requests 120] [--device cuda] [--plot latency.png] ...

Users come back with a few new events each time (their history grows);
the cache keeps their history K/V, so each request only computes the new
events and the candidates.  Every request is also scored by a full
recompute, and the largest score difference must stay within tolerance.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import List, Optional, Sequence

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m hstu_kvcache demo",
        description="Serve a synthetic stream of HSTU requests with and without the KV cache.")
    # Sizes default per device (None = the device's default below): the CPU
    # runs a small model in well under a minute; on a GPU the model is the
    # benchmark's HSTU (8 layers, d_model 1024, 4 x 256), big enough that the
    # work the cache saves is not hidden behind kernel launch overhead.
    p.add_argument("--requests", type=int, default=None, help="request batches to serve")
    p.add_argument("--users", type=int, default=None, help="distinct users in the stream")
    p.add_argument("--batch", type=int, default=None, help="users per request batch")
    p.add_argument("--history", type=int, default=None, help="initial history length per user")
    p.add_argument("--new-events", type=int, default=None, help="most new events per visit")
    p.add_argument("--candidates", type=int, default=None, help="candidates per user")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument("--cache-fraction", type=float, default=None,
                   help="GPU/CPU tier size as a fraction of all users' histories "
                        "(below 1 some users get evicted; default 0.8 on the CPU, "
                        "1.1 on a GPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--verify", action="store_true", help="verified mode (token keys)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="write a PNG of the per-request latency with and without the cache "
                        "(needs matplotlib)")
    return p


#: per-device defaults of the size options
DEFAULTS = {
    "cpu": dict(requests=60, users=24, batch=4, history=1024, new_events=8, candidates=16,
                layers=2, d_model=64, heads=2, head_dim=32, dtype="float32",
                cache_fraction=0.8),
    "cuda": dict(requests=40, users=32, batch=8, history=4096, new_events=64, candidates=256,
                 layers=8, d_model=1024, heads=4, head_dim=256, dtype="bfloat16",
                 cache_fraction=1.1),
}


class Progress:
    """A dependency-free progress bar on stderr (quiet when not a terminal)."""

    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.enabled, self.width = total, enabled, width
        self.start = time.perf_counter()

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        frac = done / max(self.total, 1)
        bar = "#" * int(frac * self.width)
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        sys.stderr.write(f"\r[{bar:<{self.width}}] {done}/{self.total} {rate:5.1f} req/s {note}")
        sys.stderr.flush()
        if done == self.total:
            sys.stderr.write("\n")


def plot_latency(lat_cache: Sequence[float], lat_full: Sequence[float], path: str,
                 title: str = "") -> bool:
    """Write a PNG of per-request latency (seconds in, ms plotted) with and
    without the cache: the series over the run and their distributions.
    Returns False (after saying so in one line) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written (pip install matplotlib)")
        return False
    with_ms = [x * 1e3 for x in lat_cache]
    without_ms = [x * 1e3 for x in lat_full]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    ax.plot(range(1, len(without_ms) + 1), without_ms, lw=1, label="without cache (recompute)")
    ax.plot(range(1, len(with_ms) + 1), with_ms, lw=1, label="with cache")
    ax.set_xlabel("request batch")
    ax.set_ylabel("latency (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    if with_ms and without_ms:
        ax2.boxplot([without_ms, with_ms], showfliers=True)
        ax2.set_xticks([1, 2], ["without", "with cache"])
        p50w, p50c = percentile(without_ms, 50), percentile(with_ms, 50)
        ax2.set_title(f"p50 {p50w:.2f} -> {p50c:.2f} ms ({p50w / max(p50c, 1e-12):.2f}x)")
    ax2.set_ylim(bottom=0)
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(title or "hstu-kvcache demo: latency with and without the KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def percentile(xs: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    import hstu_kvcache as hk
    from hstu_kvcache.reference import HSTUConfig, HSTUModel, SyntheticUsers

    device = args.device
    if device == "auto":
        device = "cuda" if hk.cuda_available() and torch.cuda.is_available() else "cpu"
    for key, value in DEFAULTS["cuda" if device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    dtype = getattr(torch, args.dtype)
    visits_per_user = math.ceil(args.requests * args.batch / args.users) + 1
    max_history = args.history + visits_per_user * args.new_events
    cfg = HSTUConfig(num_items=10_000, num_actions=8, d_model=args.d_model, num_heads=args.heads,
                     head_dim=args.head_dim, num_layers=args.layers,
                     max_seq_len=max_history + args.candidates + 1, dtype=dtype,
                     device=device, seed=args.seed)
    model = HSTUModel(cfg).eval()
    users = SyntheticUsers(cfg, list(range(1, args.users + 1)), initial_length=args.history,
                           max_history=max_history, seed=args.seed)
    pages_per_user = math.ceil(max_history / args.page_size)
    num_pages = max(args.batch * pages_per_user,
                    int(args.cache_fraction * args.users * pages_per_user))
    cache = hk.KVCache(hk.KVCacheConfig(
        num_layers=args.layers, num_heads=args.heads, head_dim=args.head_dim,
        num_pages=num_pages, page_size=args.page_size, dtype=args.dtype, device=device,
        max_batch_size=args.batch, max_seq_len=cfg.max_seq_len, verify_tokens=args.verify))
    rng = np.random.default_rng(args.seed)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    # On a GPU all users go through each layer at once (fewer, larger
    # kernels); on the CPU the per-user loops of the model are faster.
    batched = device.startswith("cuda")

    print(f"hstu-kvcache demo: {args.requests} batches of {args.batch} users "
          f"({args.users} users, history {args.history}+, {args.candidates} candidates), "
          f"{args.layers} layers, {args.heads}x{args.head_dim} heads, {args.dtype} on {device}; "
          f"cache of {num_pages} pages x {args.page_size} tokens "
          f"({cache.config.table_bytes / 2**20:.0f} MiB), "
          f"{'verified' if args.verify else 'trust'} mode")

    lat_cache: List[float] = []
    lat_full: List[float] = []
    max_abs = max_rel = 0.0
    progress = Progress(args.requests, not args.no_progress and sys.stderr.isatty())
    for r in range(args.requests):
        ids = rng.choice(args.users, size=args.batch, replace=False) + 1
        grow = [min(int(g), max_history - users.lengths[int(u)])
                for g, u in zip(rng.integers(1, args.new_events + 1, size=args.batch), ids)]
        batch = users.request(ids.tolist(), new_events=grow,
                              num_candidates=args.candidates)
        batch = batch.to(device)
        sync()
        t0 = time.perf_counter()
        scores = model(batch, cache=cache, verify_tokens=args.verify, batched=batched)
        sync()
        t1 = time.perf_counter()
        reference = model(batch, batched=batched)
        sync()
        t2 = time.perf_counter()
        if r > 0:  # the first request pays one-time warm-up
            lat_cache.append(t1 - t0)
            lat_full.append(t2 - t1)
        diff = (scores.float() - reference.float()).abs()
        max_abs = max(max_abs, float(diff.max()))
        max_rel = max(max_rel, float((diff / reference.float().abs().clamp_min(1e-3)).max()))
        progress.update(r + 1, f"hit {cache.stats()['hit_rate']:.1%}")

    stats = cache.stats()
    ok = max_abs <= tol
    p50c, p99c = percentile(lat_cache, 50) * 1e3, percentile(lat_cache, 99) * 1e3
    p50f, p99f = percentile(lat_full, 50) * 1e3, percentile(lat_full, 99) * 1e3
    rows = [
        ("requests served", f"{args.requests} batches, {args.requests * args.batch} user requests"),
        ("hit rate (history tokens)", f"{stats['hit_rate']:.1%}"),
        ("pages evicted", f"{stats['pages_evicted']} ({stats['users_evicted']} users dropped)"),
        ("latency p50 with cache", f"{p50c:.2f} ms"),
        ("latency p50 without cache", f"{p50f:.2f} ms  (speedup {p50f / p50c:.2f}x)"),
        ("latency p99 with / without", f"{p99c:.2f} ms / {p99f:.2f} ms"),
        ("max |score difference|", f"{max_abs:.2e} (tolerance {tol:.0e}, max rel {max_rel:.1e})"),
        ("outputs match", "yes" if ok else "NO"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    if args.plot and plot_latency(
            lat_cache, lat_full, args.plot,
            f"hstu-kvcache demo: {args.layers} layers, batch {args.batch}, history "
            f"{args.history}+, {args.dtype} on {device}; hit rate {stats['hit_rate']:.1%}"):
        print(f"  wrote {args.plot}")
    cache.check()
    cache.close()
    return 0 if ok else 1


def main(argv: Optional[List[str]] = None) -> int:
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
