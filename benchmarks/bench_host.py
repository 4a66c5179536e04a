"""Host-side cost of lookup + allocate (+ metadata) from Python.

Batch of 8 users x 4096 history tokens, page size 32 (128 pages per user):
  (a) every token cached, (b) nothing cached, (c) 32 new tokens per user.
Reports microseconds per call and per page, next to a plain-Python
implementation of the same bookkeeping run in the same process.  The
bookkeeping does not depend on heads or head_dim, so the page table is kept
tiny (1 head x 8) to fit any machine; on the CPU device path the metadata
is built on the host, on CUDA it is also uploaded and the per-token fields
are computed by a kernel (pass --device cuda).

    python benchmarks/bench_host.py [--device cpu|cuda] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Progress, add_plot_only, plot_file, table, write_results  # noqa: E402

import hstu_kvcache as hk  # noqa: E402

B, L, P, NEW = 8, 4096, 32, 32


class PlainPythonCache:
    """What a user would write without this package: dicts and lists for
    the per-user page lists, a free list, an LRU, and the same metadata
    arrays (kv_indptr, kv_indices, kv_last_page_len, offsets, per-token
    batch index and position) as NumPy arrays."""

    def __init__(self, num_pages: int, page_size: int):
        self.page_size = page_size
        self.free = list(range(num_pages - 1, -1, -1))
        self.users: "OrderedDict[int, dict]" = OrderedDict()

    def lookup(self, user_ids, lengths):
        out = []
        for u, n in zip(user_ids, lengths):
            e = self.users.get(u)
            out.append(min(e["length"], n) if e else 0)
        return out

    def allocate(self, user_ids, lengths, cached):
        ps = self.page_size
        indptr, indices, last, tot_off, new_off = [0], [], [], [0], [0]
        bidx, pos = [], []
        for b, (u, n, c) in enumerate(zip(user_ids, lengths, cached)):
            e = self.users.get(u)
            if e is None:
                e = self.users[u] = {"length": 0, "pages": []}
            self.users.move_to_end(u)
            need = -(-n // ps) - len(e["pages"])
            for _ in range(need):
                if not self.free:
                    self._evict_one(set(user_ids))
                e["pages"].append(self.free.pop())
            pages = e["pages"][: -(-n // ps)]
            indices.extend(pages)
            indptr.append(len(indices))
            last.append(n - (len(pages) - 1) * ps if n else 0)
            tot_off.append(tot_off[-1] + n)
            new_off.append(new_off[-1] + n - c)
            bidx.extend([b] * (n - c))
            pos.extend(range(c, n))
        as32 = lambda x: np.array(x, dtype=np.int32)  # noqa: E731
        return {"kv_indptr": as32(indptr), "kv_indices": as32(indices),
                "kv_last_page_len": as32(last), "total_history_offsets": as32(tot_off),
                "new_history_offsets": as32(new_off), "batch_indices": as32(bidx),
                "positions": as32(pos)}

    def _evict_one(self, pinned):
        for u, e in self.users.items():
            if u not in pinned and e["pages"]:
                self.free.append(e["pages"].pop())
                e["length"] = min(e["length"], len(e["pages"]) * self.page_size)
                return
        raise RuntimeError("pool full")

    def commit(self, user_ids, lengths):
        for u, n in zip(user_ids, lengths):
            self.users[u]["length"] = n

    def rollback(self, user_ids, cached):
        ps = self.page_size
        for u, c in zip(user_ids, cached):
            e = self.users[u]
            keep = -(-c // ps)
            while len(e["pages"]) > keep:
                self.free.append(e["pages"].pop())

    def evict_all(self):
        for e in self.users.values():
            self.free.extend(e["pages"])
        self.users.clear()


def time_calls(fn, repeat):
    """Median and p90 wall time of fn() in microseconds."""
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * len(samples))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2000)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    add_plot_only(ap)
    args = ap.parse_args()
    if args.plot_only:
        plot_file(Path(args.plot_only))
        return

    num_pages = 4 * B * L // P
    cfg = hk.KVCacheConfig(num_layers=1, num_heads=1, head_dim=8, num_pages=num_pages,
                           page_size=P, max_batch_size=B, max_seq_len=L + NEW,
                           device=args.device, max_open_batches=4)
    cache = hk.KVCache(cfg)
    ids = np.arange(1, B + 1, dtype=np.int64)
    full = np.full(B, L, dtype=np.int64)
    grown = np.full(B, L + NEW, dtype=np.int64)
    plain = PlainPythonCache(num_pages, P)
    sync = (lambda: None)
    if args.device.startswith("cuda"):
        import torch
        sync = torch.cuda.synchronize

    def fill():
        """Cache every user's 4096 tokens (appends of the tiny table)."""
        cache.evict_all()
        batch = cache.prepare(ids, full)
        import torch
        k = torch.zeros((batch.new_history_nnz, 1, 8), device=cfg.device)
        cache.append(0, k, k, batch)
        batch.release()
        del batch
        plain.evict_all()
        c = plain.lookup(list(ids), list(full))
        plain.allocate(list(ids), list(full), c)
        plain.commit(list(ids), list(full))
        sync()

    rows, results = [], []

    def native_case(lengths):
        """prepare (lookup + allocate + metadata) then release: a batch
        without appends rolls back, so every iteration sees the same state."""
        def one():
            cache.prepare(ids, lengths).release()
        for _ in range(50):  # warm up: metadata blocks, page bookkeeping
            one()
        sync()
        return time_calls(one, args.repeat)

    def plain_case(lengths, before):
        lst = list(lengths)
        idl = list(ids)

        def one():
            before()
            c = plain.lookup(idl, lst)
            plain.allocate(idl, lst, c)
            plain.rollback(idl, c)
        for _ in range(20):
            one()
        return time_calls(one, max(50, args.repeat // 10))

    fill()
    cases = []
    bar = Progress(6, "host")
    # (a) everything cached
    a = native_case(full)
    bar.update(note="(a) native")
    pa = plain_case(full, lambda: None)
    bar.update(note="(a) plain Python")
    cases.append(("(a) all cached", a, pa, B * L // P))
    # (c) 32 new tokens per user (allocate then release without appending:
    # the batch rolls back, so every iteration sees the same state)
    c = native_case(grown)
    bar.update(note="(c) native")
    pc = plain_case(grown, lambda: None)
    bar.update(note="(c) plain Python")
    cases.append(("(c) 32 new tokens/user", c, pc, B * (L + NEW) // P))
    # (b) nothing cached: evict everything first
    cache.evict_all()
    plain.evict_all()
    b = native_case(full)
    bar.update(note="(b) native")
    pb = plain_case(full, lambda: None)
    bar.update(note="(b) plain Python")
    bar.close()
    cases.append(("(b) nothing cached", b, pb, B * L // P))

    for name, (med, p90), (pmed, pp90), pages in cases:
        rows.append([name, med, p90, med * 1e3 / pages, pmed, pmed / med])
        results.append({"case": name, "native_us_median": med, "native_us_p90": p90,
                        "native_ns_per_page": med * 1e3 / pages, "plain_python_us_median": pmed,
                        "plain_python_us_p90": pp90, "speedup_vs_plain_python": pmed / med,
                        "pages_in_batch": pages})
    print(f"lookup + allocate + metadata (+ release), batch {B} x {L} tokens, page {P}, "
          f"device {cfg.device}")
    print(table(["case", "us median", "us p90", "ns/page", "plain Python us", "speedup"], rows))
    print("anchor (recsys-examples manager, native backend, H100 host): "
          "0.86 ms lookup+allocate for batch 8 x 4096 all on GPU, 0.18 ms for batch 1")
    path = write_results(f"host_{cfg.device_kind}", {
        "workload": {"batch": B, "history": L, "page_size": P, "new_tokens_case_c": NEW,
                     "device": cfg.device, "repeat": args.repeat},
        "target_us_case_a": 20.0,
        "anchor": {"recsys_examples_lookup_allocate_batch8_ms": 0.86,
                   "recsys_examples_lookup_allocate_batch1_ms": 0.18},
        "results": results}, Path(args.out) if args.out else None)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
