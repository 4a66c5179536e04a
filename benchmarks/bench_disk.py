"""The disk tier through the cache: write-through of users' pages to disk,
read-back (disk -> host -> GPU) and the onboarding latency of one
4096-token user, next to a raw sequential write / read of the same bytes
with the same file flags (O_DIRECT) measured in the same run.

Workload (issue: disk tier): 8 layers, 4 heads x 256, bf16, page 32: one
page record is 1 MiB of K/V, a 4096-token user 128 MiB.

With GPUDirect Storage (``disk_gds``) on a CUDA device the read-back and the
onboarding run twice: staged (disk -> pinned host page -> GPU, the default)
and direct (cuFile reads into the GPU pages, checked there).

    python benchmarks/bench_disk.py [--dir DIR] [--users 8] [--device cuda|cpu]
                                    [--gds off|on|both] [--out DIR]
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


def measure(args: argparse.Namespace, directory: str, dev: str, gds: str,
            total: int) -> dict:
    """Write-through, read-back and one user's onboarding through one cache
    whose disk reads are staged (gds='off') or direct (gds='on')."""
    n = args.users
    pages = n * TOKENS // PAGE
    cache = hk.KVCache(hk.KVCacheConfig(
        num_layers=LAYERS, num_heads=HEADS, head_dim=HEAD_DIM, page_size=PAGE,
        num_pages=pages + 64, dtype="bfloat16", device=args.device, max_batch_size=n,
        max_seq_len=TOKENS, host_capacity_bytes=(pages + 64) * PAGE_BYTES,
        disk_dir=directory, disk_capacity_bytes=2 * total + (64 << 20), disk_admit_after=0,
        disk_gds=gds, disk_io_threads=args.io_threads))
    ids = list(range(n))
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
            for layer in (0, LAYERS - 1):           # what came back is what went down
                kg, _ = cache.gather(layer, b)
                assert torch.equal(kg, k[layer]), f"layer {layer} differs ({gds})"
        print(f"[{gds} {r + 1}/{args.repeat}] write {writes[-1]:.2f} GB/s, read "
              f"{reads[-1]:.2f} GB/s, one 4096-token user {one_user[-1]:.1f} ms", flush=True)
    s = cache.stats()
    status = cache.disk_gds_status()
    cache.close()
    if gds == "on":
        assert s["disk_gds_reads"] == s["disk_reads"] > 0, "the reads did not go direct"
    return {"write_gbps": statistics.median(writes), "read_gbps": statistics.median(reads),
            "user_4096_tokens_onboard_ms": statistics.median(one_user),
            "reads_gbps_all": reads, "user_ms_all": one_user, "gds_status": status,
            "stats": {key: s[key] for key in ("disk_writes", "disk_reads", "disk_gds_reads",
                                              "disk_read_misses", "checksum_failures",
                                              "disk_io_errors", "disk_records")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=None, help="directory of the disk tier (default: a "
                    "temporary directory under $TMPDIR)")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--device", default="cuda" if hk.cuda_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gds", choices=("off", "on", "both"), default="both",
                    help="disk reads staged through the host (off), straight to the GPU "
                    "with GPUDirect Storage (on), or each in turn (both; CUDA only)")
    ap.add_argument("--io-threads", type=int, default=2,
                    help="the disk tier's I/O threads (disk_io_threads)")
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
    dev = "cuda" if args.device.startswith("cuda") else "cpu"
    paths = ["off"] if dev == "cpu" or args.gds == "off" else (
        ["on"] if args.gds == "on" else ["off", "on"])
    res = {"raw_write_gbps": raw_w, "raw_read_gbps": raw_r, "paths": {}}
    for gds in paths:
        sub = os.path.join(args.dir, "gds_" + gds)
        os.makedirs(sub, exist_ok=True)
        res["paths"]["gds" if gds == "on" else "staged"] = measure(args, sub, dev, gds, total)
    if tmp is not None:
        tmp.cleanup()
    staged = res["paths"].get("staged")
    for name, r in res["paths"].items():
        r["write_of_raw"] = r["write_gbps"] / raw_w
        r["read_of_raw"] = r["read_gbps"] / raw_r
        if staged is not None and name != "staged":
            r["read_of_staged"] = r["read_gbps"] / staged["read_gbps"]
            r["user_ms_of_staged"] = r["user_4096_tokens_onboard_ms"] / \
                staged["user_4096_tokens_onboard_ms"]
    # the headline figures (the default path, as before)
    first = res["paths"]["staged" if staged is not None else "gds"]
    res.update({"store_write_gbps": first["write_gbps"], "store_read_gbps": first["read_gbps"],
                "store_write_of_raw": first["write_of_raw"],
                "store_read_of_raw": first["read_of_raw"],
                "user_4096_tokens_onboard_ms": first["user_4096_tokens_onboard_ms"]})
    print()
    rows = []
    for name, r in res["paths"].items():
        how = "disk -> host -> " + dev if name == "staged" else \
            f"disk -> GPU (GDS, {r['gds_status']})"
        rows.append([f"write-through ({name})", r["write_gbps"], r["write_of_raw"], "-"])
        rows.append([f"read-back {how}", r["read_gbps"], r["read_of_raw"],
                     r["user_4096_tokens_onboard_ms"]])
    rows += [["raw O_DIRECT write", raw_w, 1.0, "-"], ["raw O_DIRECT read", raw_r, 1.0, "-"]]
    print(table(["what", "GB/s", "of raw", "4096-token user, ms"], rows))
    path = write_results("disk_cache_" + (gpu_tag() if dev == "cuda" else "cpu"), {
        "workload": {"layers": LAYERS, "heads": HEADS, "head_dim": HEAD_DIM, "page_size": PAGE,
                     "tokens_per_user": TOKENS, "users": n, "dtype": "bfloat16",
                     "device": args.device, "record_bytes": PAGE_BYTES,
                     "disk_io_threads": args.io_threads},
        "results": res}, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
