"""Shared helpers of the benchmarks: machine description, JSON results, tables,
a dependency-free progress bar, and PNG plots of the JSON results.

Plots need matplotlib (``pip install hstu-kvcache[bench]``); without it a
benchmark prints one line and writes no plot.  ``python
benchmarks/plot_results.py results/*.json`` (or any benchmark's
``--plot-only FILE``) draws the plots of recorded results without a GPU.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, TypeVar

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> Dict[str, Any]:
    """What ran the benchmark: CPU, GPU, software versions."""
    info: Dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            info["driver"] = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_results(name: str, payload: Dict[str, Any], out_dir: Path | None = None,
                  plot: bool = True) -> Path:
    """Write payload (plus machine and command) to results/<name>.json and,
    with ``plot``, its PNG plot to results/<name>.png."""
    out = Path(out_dir) if out_dir else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "command": " ".join([Path(sys.executable).name] + sys.argv),
           "machine": machine(), **payload}
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    if plot:
        try:
            png = plot_results(doc, path.with_suffix(".png"))
        except Exception as e:  # noqa: BLE001 - a plot must not lose the results
            print(f"no plot written: {type(e).__name__}: {e}")
        else:
            if png is not None:
                print(f"wrote {png}")
    return path


def table(headers: Sequence[str], rows: List[Sequence[Any]]) -> str:
    """A plain text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def gpu_tag() -> str:
    """Short name of the GPU for result files: 'h100', 'h200', else 'gpu'."""
    try:
        import torch
        name = torch.cuda.get_device_name().lower()
    except Exception:
        return "gpu"
    for tag in ("h100", "h200", "b200", "a100", "l20", "l40"):
        if tag in name:
            return tag
    return "gpu"


# ---------------------------------------------------------------------------
# progress

T = TypeVar("T")


class Progress:
    """A dependency-free progress bar on stderr.

    Drawn only when stderr is a terminal (a log file gets no carriage-return
    noise) unless ``HSTU_KVCACHE_PROGRESS=1`` forces it (``=0`` silences it).
    Use as ``with Progress(total, "e2e") as bar: ... bar.update(note="batch 4")``
    or wrap an iterable with :func:`progress`.
    """

    def __init__(self, total: int, desc: str = "", width: int = 30,
                 enabled: Optional[bool] = None, stream: Any = None):
        self.total, self.desc, self.width = max(int(total), 0), desc, width
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            env = os.environ.get("HSTU_KVCACHE_PROGRESS")
            enabled = env == "1" if env in ("0", "1") else _isatty(self.stream)
        self.enabled = enabled
        self.done = 0
        self.start = time.perf_counter()
        self._closed = False

    def update(self, n: int = 1, note: str = "") -> None:
        """Count n more steps done and redraw."""
        self.done += n
        if not self.enabled:
            return
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(frac * self.width)
        elapsed = time.perf_counter() - self.start
        eta = elapsed / frac - elapsed if 0 < frac < 1 else 0.0
        head = f"{self.desc} " if self.desc else ""
        self.stream.write(f"\r{head}[{bar:<{self.width}}] {self.done}/{self.total} "
                          f"{elapsed:6.1f}s eta {eta:5.1f}s {note}\033[K")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (idempotent)."""
        if self.enabled and not self._closed:
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress(items: Iterable[T], desc: str = "", total: Optional[int] = None,
             note: Optional[Callable[[T], str]] = None) -> Iterator[T]:
    """Iterate over items with a :class:`Progress` bar (a step when each
    item is done; ``note(item)`` labels the bar)."""
    items = list(items) if total is None and not hasattr(items, "__len__") else items
    bar = Progress(len(items) if total is None else total, desc)  # type: ignore[arg-type]
    try:
        for item in items:
            yield item
            bar.update(1, note(item) if note else "")
    finally:
        bar.close()


# ---------------------------------------------------------------------------
# plots

def _pyplot() -> Any:
    """matplotlib.pyplot with a file-only backend, or None (one line said)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written "
              "(pip install 'hstu-kvcache[bench]')")
        return None
    return plt


def _title(doc: Dict[str, Any], text: str) -> str:
    gpu = doc.get("machine", {}).get("gpu") or doc.get("machine", {}).get("cpu", "")
    return f"{text}\n{gpu}, {doc.get('date', '')}"


def _plot_e2e(doc: Dict[str, Any], plt: Any) -> Any:
    res = doc["results"]
    b = [r["batch"] for r in res]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.plot(b, [r["without_cache_ms"] for r in res], "o-", label="without cache")
    ax.plot(b, [r["with_cache_ms"] for r in res], "s-", label="with cache (GPU tier)")
    if all("with_cache_host_tier_ms" in r for r in res):
        ax.plot(b, [r["with_cache_host_tier_ms"] for r in res], "^-",
                label="with cache (onboarded from host tier)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(b, [str(x) for x in b])
    ax.set_xlabel("users per batch")
    ax.set_ylabel("latency per request batch (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    w = doc.get("workload", {})
    ax.set_title(f"HSTU {w.get('layers', '?')} layers, history {w.get('history', '?')} "
                 f"({w.get('cached', '?')} cached)")
    ax2.bar([str(x) for x in b], [r["speedup"] for r in res], color="tab:green")
    ax2.axhline(1.0, color="grey", lw=1)
    ax2.set_xlabel("users per batch")
    ax2.set_ylabel("speedup (without / with cache)")
    ax2.set_title("speedup")
    for i, r in enumerate(res):
        ax2.annotate(f"{r['speedup']:.2f}x", (i, r["speedup"]), ha="center", va="bottom")
    fig.suptitle(_title(doc, "end to end: latency with and without the KV cache"))
    return fig


def _plot_facade(doc: Dict[str, Any], plt: Any) -> Any:
    res = doc["results"]
    t = [r["tokens_per_user"] for r in res]
    anchor = doc.get("anchor_ms", {})
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax.plot(t, [r["facade_lookup_allocate_ms"] for r in res], "o-", label="recsys facade")
    ax.plot(t, [r["native_lookup_allocate_ms"] for r in res], "s-", label="native KVCache")
    if "lookup_allocate_all_on_gpu" in anchor:
        ax.axhline(anchor["lookup_allocate_all_on_gpu"], color="tab:red", ls="--",
                   label="recsys-examples manager")
    ax.set_xlabel("history tokens per user")
    ax.set_ylabel("lookup + allocate (ms)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title("host time, everything on the GPU")
    for key, mark in (("facade_offload_ms", "o-"), ("native_offload_ms", "s-"),
                      ("facade_onboard_ms", "o--"), ("native_onboard_ms", "s--")):
        ax2.plot(t, [r[key] for r in res], mark, label=key[:-3].replace("_", " "))
    for key, mark in (("offload", "x:"), ("onboard", "+:")):
        if len(anchor.get(key, [])) == len(t):
            ax2.plot(t, anchor[key], mark, color="tab:red", label=f"recsys-examples {key}")
    ax2.set_xlabel("history tokens per user")
    ax2.set_ylabel("transfer time per batch (ms)")
    ax2.set_ylim(bottom=0)
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    ax2.set_title("offload / onboard")
    fig.suptitle(_title(doc, "recsys facade vs native API vs the anchor"))
    return fig


def _plot_host(doc: Dict[str, Any], plt: Any) -> Any:
    res = doc["results"]
    cases = [r["case"] for r in res]
    x = range(len(cases))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.38
    ax.bar([i - w / 2 for i in x], [r["native_us_median"] for r in res], w,
           label="hstu_kvcache C core")
    ax.bar([i + w / 2 for i in x], [r["plain_python_us_median"] for r in res], w,
           label="plain Python bookkeeping")
    anchor = doc.get("anchor", {}).get("recsys_examples_lookup_allocate_batch8_ms")
    if anchor:
        ax.axhline(anchor * 1000, color="tab:red", ls="--",
                   label="recsys-examples manager, batch 8")
    ax.set_yscale("log")
    ax.set_xticks(list(x), cases)
    ax.set_ylabel("lookup + allocate + release, median (us)")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    for i, r in enumerate(res):
        ax.annotate(f"{r['speedup_vs_plain_python']:.0f}x faster", (i - w / 2, r["native_us_median"]),
                    ha="center", va="bottom")
    wl = doc.get("workload", {})
    fig.suptitle(_title(doc, f"host-side latency of one batch ({wl.get('batch', '?')} users x "
                             f"{wl.get('history', '?')} tokens, {wl.get('device', '')})"))
    return fig


def _plot_kernels(doc: Dict[str, Any], plt: Any) -> Any:
    res = doc["results"]
    head_dims = sorted({r["head_dim"] for r in res})
    kernels = [k for k in res[0]["GBps"] if k != "copy"]
    fig, axes = plt.subplots(1, len(head_dims), figsize=(5 * len(head_dims), 4.5),
                             sharey=True, squeeze=False)
    for ax, hd in zip(axes[0], head_dims):
        rows = sorted((r for r in res if r["head_dim"] == hd), key=lambda r: r["page_size"])
        ps = [r["page_size"] for r in rows]
        ax.plot(ps, [r["GBps"]["copy"] for r in rows], "k--", lw=2,
                label="device copy (limit, same run)")
        for k in kernels:
            ax.plot(ps, [r["GBps"][k] for r in rows], ":" if k.startswith("torch") else "-",
                    marker="o", label=k.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ps, [str(p) for p in ps])
        ax.set_xlabel("page size (tokens)")
        ax.set_title(f"head_dim {hd}")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    axes[0][0].set_ylabel("throughput (GB/s, read + write)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(_title(doc, "kernels: throughput against the device copy measured in the same run"))
    return fig


def _plot_tiers(doc: Dict[str, Any], plt: Any) -> Any:
    """Offload and onboard GB/s per tokens per user, one line per transfer
    path and host pool (older results have one series)."""
    res = doc["results"]
    series: Dict[str, List[Dict[str, Any]]] = {}
    for r in res:
        key = f"{r.get('path', 'default')}, {r.get('host_pool', 'fresh')} pool"
        series.setdefault(key, []).append(r)
    t = sorted({r["tokens_per_user"] for r in res})
    limit = doc.get("pinned_GBps", {})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, what, lim in ((axes[0], "offload", "d2h"), (axes[1], "onboard", "h2d")):
        for key, rows in series.items():
            ax.plot([r["tokens_per_user"] for r in rows], [r[f"{what}_GBps"] for r in rows],
                    "o-", label=key)
        if lim in limit:
            ax.axhline(limit[lim], color="k", ls="--",
                       label=f"pinned copy {lim.upper()}, same run ({limit[lim]:.1f})")
        plain = [r for r in res if "plain_torch_per_page_GBps" in r
                 and r.get("path", "default") == "default"]
        if what == "onboard" and plain:
            ax.plot([r["tokens_per_user"] for r in plain],
                    [r["plain_torch_per_page_GBps"] for r in plain], "x:",
                    label="one torch copy per page")
        anchor = doc.get("anchor", {}).get(f"recsys_examples_{what}_GBps", [])
        if len(anchor) == 3:
            ax.plot([1024, 2048, 4096], anchor, "v:", color="tab:red",
                    label="recsys-examples (anchor)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(t, [str(x) for x in t])
        ax.set_xlabel("history tokens per user")
        ax.set_title(f"{what} ({'GPU -> host' if what == 'offload' else 'host -> GPU'})")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GB/s")
    fig.suptitle(_title(doc, "tier transfers against the pinned-copy limit measured in the same run"))
    return fig


def _plot_disk(doc: Dict[str, Any], plt: Any) -> Any:
    """Disk store write/read GB/s next to raw I/O of the same bytes and
    file flags measured in the same run."""
    r = dict(doc["results"])
    if "gds" in r.get("paths", {}):
        r["gds_read_gbps"] = r["paths"]["gds"]["read_gbps"]
    groups = [("write", [("raw, contiguous", "raw_write_gbps"),
                         ("raw, store's pieces", "raw_pwritev_9_pieces_gbps"),
                         ("store", "store_write_gbps")]),
              ("read", [("raw, contiguous", "raw_read_gbps"),
                        ("raw, store's pieces", "raw_preadv_9_pieces_gbps"),
                        ("store (CRC checked)", "store_read_gbps"),
                        ("store, GDS to GPU", "gds_read_gbps")]),
              ("durable write", [("raw + fdatasync", "raw_write_fdatasync_each_gbps"),
                                 ("store, persist", "store_write_persist_gbps")])]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    x = 0
    ticks, labels = [], []
    for name, bars in groups:
        for label, key in bars:
            if key in r:
                ax.bar(x, r[key], color="tab:orange" if label.startswith("store") else "tab:gray")
                ax.text(x, r[key], f"{r[key]:.2f}", ha="center", va="bottom", fontsize=8)
                ticks.append(x)
                labels.append(f"{name}\n{label}")
                x += 1
        x += 0.6
    ax.set_xticks(ticks, labels, fontsize=7)
    ax.set_ylabel("GB/s")
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle(_title(doc, "disk tier against raw I/O of the same bytes, same run"))
    return fig


#: result name prefix -> plotter
PLOTTERS: Dict[str, Callable[[Dict[str, Any], Any], Any]] = {
    "e2e": _plot_e2e, "facade": _plot_facade, "host": _plot_host,
    "kernels": _plot_kernels, "tiers": _plot_tiers, "disk": _plot_disk,
}


def plot_results(doc: Dict[str, Any], path: Path) -> Optional[Path]:
    """Draw the PNG of one benchmark's result dict (as written by
    :func:`write_results`) into ``path``.  Returns the path, or None when
    matplotlib is missing.  Raises ValueError for an unknown benchmark."""
    name = str(doc.get("benchmark", ""))
    plotter = PLOTTERS.get(name.split("_", 1)[0])
    if plotter is None:
        raise ValueError(f"no plot for benchmark {name!r} (known: {', '.join(PLOTTERS)})")
    plt = _pyplot()
    if plt is None:
        return None
    fig = plotter(doc, plt)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(json_path: Path) -> Optional[Path]:
    """Plot results/<name>.json into results/<name>.png next to it."""
    json_path = Path(json_path)
    out = plot_results(json.loads(json_path.read_text()), json_path.with_suffix(".png"))
    if out is not None:
        print(f"wrote {out}")
    return out


def add_plot_only(ap: Any) -> None:
    """The --plot-only FILE option every benchmark has."""
    ap.add_argument("--plot-only", metavar="JSON", default=None,
                    help="draw the PNG of a recorded result file and exit (no GPU needed)")
