"""The disk tier through the cache: write-through of users' pages to disk,
read-back (disk -> host -> GPU) and the onboarding latency of one
4096-token user, next to a raw sequential write / read of the same bytes
with the same file flags (O_DIRECT) measured in the same run.

Workload (issue: disk tier): 8 layers, 4 heads x 256, bf16, page 32: one
page record is 1 MiB of K/V, a 4096-token user 128 MiB.

    python benchmarks/bench_disk.py [--dir DIR] [--users 8] [--device cuda|cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_plot_only, gpu_tag, plot_file, table, write_results  # noqa: E402

import torch  # noqa: E402

import hstu_kvcache as hk  # noqa: E402

LAYERS, HEADS, HEAD_DIM, PAGE, TOKENS = 8, 4, 256, 32, 4096
PAGE_BYTES = 2 * PAGE * HEADS * HEAD_DIM * 2 * LAYERS      # a record's data: 1 MiB
USER_BYTES = TOKENS // PAGE * PAGE_BYTES


def raw_io(directory: str, nbytes: int, piece: int = 1 << 20) -> tuple[float, float]:
    """GB/s of a sequential O_DIRECT write then read of nbytes in 1 MiB
    pieces (buffered I/O where the filesystem refuses O_DIRECT)."""
    path = os.path.join(directory, "raw_probe.dat")
    buf = mmap.mmap(-1, piece)                                  # page aligned
    buf.write(os.urandom(piece))
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0 = time.perf_counter()
        for off in range(0, nbytes, piece):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        write = nbytes / (time.perf_counter() - t0) / 1e9
        t0 = time.perf_counter()
        for off in range(0, nbytes, piece):
            os.preadv(fd, [buf], off)
        read = nbytes / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)
        os.unlink(path)
    return write, read


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory of the disk tier (default: a "
                    "temporary directory under $TMPDIR)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--device", default="cuda" if hk.cuda_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    add_plot_only(ap)
    args = ap.parse_args()
    if args.plot_only:
        plot_file(Path(args.plot_only))
        return
    tmp = None
    if args.dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="hkv_bench_disk.")
        args.dir = tmp.name
    n = args.users
    total = n * USER_BYTES
    raw_w, raw_r = raw_io(args.dir, total)
    print(f"raw O_DIRECT on {args.dir}: write {raw_w:.2f} GB/s, read {raw_r:.2f} GB/s", flush=True)
    pages = n * TOKENS // PAGE
    cache = hk.KVCache(hk.KVCacheConfig(
        num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE,
        num_pages=pages + 64, dtype="bfloat16", device=args.device, max_batch_size=n,
        max_seq_len=TOKENS, host_capacity_bytes=(pages + 64) * PAGE_BYTES,
        disk_dir=args.dir, disk_capacity_bytes=2 * total + (64 << 20), disk_admit_after=0))
    ids = list(range(n))
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    k = torch.randn(LAYERS, n * TOKENS, HEADS, HEAD_DIM, dtype=torch.bfloat16, device=dev)
    writes, reads, one_user = [], [], []
    for r in range(args.repeat):
        cache.evict(ids)                                   # every tier: rewrite all
        with cache.prepare(ids, [TOKENS] * n) as b:
            cache.append(range(LAYERS), k, k, b)
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        cache.evict(ids, gpu=True, host=False, offload=True)   # to the host tier ...
        cache.sync_transfers()                                 # ... and through to disk
        writes.append(total / (time.perf_counter() - t0) / 1e9)
        assert all(cache.cached_on_disk(u) == TOKENS for u in ids)
        cache.evict(ids, gpu=False, host=True)                 # only the disk holds them
        t0 = time.perf_counter()
        with cache.prepare([0], [TOKENS]) as b:                # one user: disk -> GPU
            b.wait_layer(LAYERS - 1)
            if dev == "cuda":
                torch.cuda.synchronize()
            one_user.append((time.perf_counter() - t0) * 1e3)
        cache.evict([0], gpu=True, host=True, disk=False)
        t0 = time.perf_counter()
        with cache.prepare(ids, [TOKENS] * n) as b:            # everyone
            b.wait_layer(LAYERS - 1)
            if dev == "cuda":
                torch.cuda.synchronize()
            reads.append(total / (time.perf_counter() - t0) / 1e9)
        print(f"[{r + 1}/{args.repeat}] write {writes[-1]:.2f} GB/s, read {reads[-1]:.2f} GB/s, "
              f"one 4096-token user {one_user[-1]:.1f} ms", flush=True)
    s = cache.stats()
    cache.close()
    if tmp is not None:
        tmp.cleanup()
    res = {"raw_write_gbps": raw_w, "raw_read_gbps": raw_r,
           "store_write_gbps": statistics.median(writes),
           "store_read_gbps": statistics.median(reads),
           "store_write_of_raw": statistics.median(writes) / raw_w,
           "store_read_of_raw": statistics.median(reads) / raw_r,
           "user_4096_tokens_onboard_ms": statistics.median(one_user),
           "stats": {key: s[key] for key in ("disk_writes", "disk_reads", "disk_read_misses",
                                             "checksum_failures", "disk_io_errors",
                                             "disk_records")}}
    print()
    print(table(["what", "GB/s", "of raw"],
                [["cache write-through to disk", res["store_write_gbps"], res["store_write_of_raw"]],
                 ["cache read-back disk -> " + dev, res["store_read_gbps"], res["store_read_of_raw"]],
                 ["raw O_DIRECT write", raw_w, 1.0], ["raw O_DIRECT read", raw_r, 1.0]]))
    print(f"\nonboarding one 4096-token user ({USER_BYTES >> 20} MiB) from disk: "
          f"{res['user_4096_tokens_onboard_ms']:.1f} ms")
    path = write_results("disk_cache_" + (gpu_tag() if dev == "cuda" else "cpu"), {
        "workload": {"layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM, "page_size": PAGE,
                     "tokens_per_user": TOKENS, "users": n, "dtype": "bfloat16",
                     "device": args.device, "record_bytes": PAGE_BYTES},
        "results": res}, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
