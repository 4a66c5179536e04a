"""Prometheus metrics of hstu_kvcache caches.

:meth:`KVCache.stats` returns the core's counters as a plain dict; this module
turns them into Prometheus metrics:

- :data:`METRICS` documents, for every stats key, the metric it becomes
  (name, type, help text, unit);
- :func:`render` writes the text exposition format 0.0.4 for one cache or a
  mapping ``name -> cache`` (each sample labelled ``cache="name"``);
- :func:`serve` exposes ``/metrics`` over HTTP on a background daemon thread
  (through prometheus_client when it is installed, else through a small
  :mod:`http.server` fallback);
- :func:`collector` gives a prometheus_client collector for applications that
  run their own registry.

A Grafana dashboard for these metrics is ``dashboards/grafana_hstu_kvcache.json``.

Stats keys that are not in :data:`METRICS` (counters the core gains later)
are still exported, as gauges named ``hstu_kvcache_<key>`` (or, for a
histogram, ``hstu_kvcache_<key>_seconds``), so a new counter is visible
before anyone documents it here.  A cache that was closed exports
``hstu_kvcache_up 0`` and nothing else; a scrape never fails because of one
cache.

Example::

    import hstu_kvcache as hk
    from hstu_kvcache import metrics

    cache = hk.KVCache(hk.KVCacheConfig(...))
    server = metrics.serve({"ranking": cache}, port=9400)   # http://127.0.0.1:9400/metrics
    ...
    server.close()
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from socketserver import ThreadingMixIn
from typing import (Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Tuple,
                    Union)
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from .errors import InvalidArgumentError, KVCacheError

__all__ = ["METRICS", "UP_METRIC", "MetricSpec", "MetricsServer", "MissingDependencyError",
           "CONTENT_TYPE", "PREFIX", "render", "serve", "collector"]

_log = logging.getLogger(__name__)

PREFIX = "hstu_kvcache_"
"""Prefix of every metric name."""

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Content-Type of the text exposition format that :func:`render` writes."""


class MetricSpec(NamedTuple):
    """How one stats key is exported."""

    name: str   #: full Prometheus metric name (counters end in ``_total``)
    type: str   #: ``"counter"``, ``"gauge"`` or ``"histogram"``
    help: str   #: HELP text
    unit: str   #: what one unit of the value is (documentation; base units)


_C, _G, _H = "counter", "gauge", "histogram"

#: Stats key -> metric.  Counters only grow (use ``rate()``), gauges are the
#: state at scrape time, histograms are latencies in seconds with cumulative
#: buckets (use ``histogram_quantile()`` over ``rate(..._bucket)``).
#: Entries whose key a cache does not report are simply not exported: the
#: prepare/onboard/offload latencies are named here ahead of the host tier so
#: their metric names are fixed before the core reports them.
METRICS: Dict[str, MetricSpec] = {
    # -- counters -------------------------------------------------------------
    "lookups": MetricSpec(
        "hstu_kvcache_lookups_total", _C, "Lookup calls.", "calls"),
    "lookup_users": MetricSpec(
        "hstu_kvcache_lookup_users_total", _C,
        "Users looked up (one per user per lookup call).", "users"),
    "hit_tokens": MetricSpec(
        "hstu_kvcache_hit_tokens_total", _C,
        "History tokens whose K/V were found cached at lookup.", "tokens"),
    "missed_tokens": MetricSpec(
        "hstu_kvcache_missed_tokens_total", _C,
        "History tokens not cached at lookup (their K/V must be computed).", "tokens"),
    "batches_allocated": MetricSpec(
        "hstu_kvcache_batches_allocated_total", _C,
        "Batches allocated (pages reserved and metadata built).", "batches"),
    "batches_committed": MetricSpec(
        "hstu_kvcache_batches_committed_total", _C,
        "Batches closed after every layer was appended.", "batches"),
    "batches_aborted": MetricSpec(
        "hstu_kvcache_batches_aborted_total", _C,
        "Batches closed before every layer was appended (their new tokens are dropped).",
        "batches"),
    "pages_allocated": MetricSpec(
        "hstu_kvcache_pages_allocated_total", _C, "Pages taken from the free list.", "pages"),
    "pages_evicted": MetricSpec(
        "hstu_kvcache_pages_evicted_total", _C,
        "Pages taken from least recently used users to make room.", "pages"),
    "pages_dropped": MetricSpec(
        "hstu_kvcache_pages_dropped_total", _C,
        "Pages freed by an explicit evict or a history truncation.", "pages"),
    "users_evicted": MetricSpec(
        "hstu_kvcache_users_evicted_total", _C,
        "Users that lost their last cached page.", "users"),
    "tokens_appended": MetricSpec(
        "hstu_kvcache_tokens_appended_total", _C,
        "History tokens written into pages, counted once per layer.", "tokens"),
    "onboard_pages": MetricSpec(
        "hstu_kvcache_onboard_pages_total", _C,
        "Pages copied from the host tier to the GPU tier (all layers).", "pages"),
    "onboard_bytes": MetricSpec(
        "hstu_kvcache_onboard_bytes_total", _C,
        "Bytes copied from the host tier to the GPU tier.", "bytes"),
    "offload_pages": MetricSpec(
        "hstu_kvcache_offload_pages_total", _C,
        "Pages copied from the GPU tier to the host tier (all layers).", "pages"),
    "offload_bytes": MetricSpec(
        "hstu_kvcache_offload_bytes_total", _C,
        "Bytes copied from the GPU tier to the host tier.", "bytes"),
    "writeback_pages": MetricSpec(
        "hstu_kvcache_writeback_pages_total", _C,
        "Pages offloaded because the GPU tier evicted them (lazy write-back).", "pages"),
    "host_pages_evicted": MetricSpec(
        "hstu_kvcache_host_pages_evicted_total", _C,
        "Host-tier pages taken from least recently used users.", "pages"),
    "transfers": MetricSpec(
        "hstu_kvcache_transfers_total", _C,
        "Onboard and offload transfers queued.", "transfers"),
    "transfers_failed": MetricSpec(
        "hstu_kvcache_transfers_failed_total", _C,
        "Transfers that could not be queued (a failed offload leaves the pages on the GPU, "
        "a failed onboard reads as a miss).", "transfers"),
    "onboard_seconds": MetricSpec(
        "hstu_kvcache_onboard_seconds_total", _C,
        "Time of host-to-GPU page copies (CPU path: the copy; CUDA: queued to seen complete, "
        "an upper bound).", "seconds"),
    "offload_seconds": MetricSpec(
        "hstu_kvcache_offload_seconds_total", _C,
        "Time of GPU-to-host page copies (CPU path: the copy; CUDA: queued to seen complete, "
        "an upper bound).", "seconds"),
    "events_dropped": MetricSpec(
        "hstu_kvcache_events_dropped_total", _C,
        "Cache event records overwritten before drain_events() took them (ring full).",
        "events"),
    "offloads_deferred": MetricSpec(
        "hstu_kvcache_offloads_deferred_total", _C,
        "Eager offloads left to eviction time because max_offload_bytes were in flight.",
        "offloads"),
    "offload_backpressure_waits": MetricSpec(
        "hstu_kvcache_offload_backpressure_waits_total", _C,
        "Write-backs that waited for older copies to stay within max_offload_bytes.",
        "waits"),
    "dma_bytes": MetricSpec(
        "hstu_kvcache_transfer_dma_bytes_total", _C,
        "Transfer bytes moved by DMA (runs of consecutive pages).", "bytes"),
    "kernel_bytes": MetricSpec(
        "hstu_kvcache_transfer_kernel_bytes_total", _C,
        "Transfer bytes moved by the zero-copy kernel (scattered pages).", "bytes"),
    "disk_writes": MetricSpec(
        "hstu_kvcache_disk_writes_total", _C,
        "Pages written to the disk tier (durable with disk_persist).", "pages"),
    "disk_write_failures": MetricSpec(
        "hstu_kvcache_disk_write_failures_total", _C,
        "Pages not written to disk: user not admitted yet, no space, or an I/O error.",
        "pages"),
    "disk_reads": MetricSpec(
        "hstu_kvcache_disk_reads_total", _C,
        "Pages read back from the disk tier (checked): into the host tier, or "
        "straight into GPU pages with GPUDirect Storage.", "pages"),
    "disk_gds_reads": MetricSpec(
        "hstu_kvcache_disk_gds_reads_total", _C,
        "Of disk_reads: pages read straight into GPU pages (GPUDirect Storage).", "pages"),
    "disk_gds_fallbacks": MetricSpec(
        "hstu_kvcache_disk_gds_fallbacks_total", _C,
        "Users whose disk pages went through the host tier although GPUDirect "
        "Storage is on (host copy ahead of the GPU's, or no free GPU page).", "users"),
    "disk_read_misses": MetricSpec(
        "hstu_kvcache_disk_read_misses_total", _C,
        "Disk reads that found no valid record: the tokens were recomputed.", "reads"),
    "checksum_failures": MetricSpec(
        "hstu_kvcache_checksum_failures_total", _C,
        "Disk records dropped because their checksum, header or length failed the check.",
        "records"),
    "disk_io_errors": MetricSpec(
        "hstu_kvcache_disk_io_errors_total", _C,
        "Failed disk reads, writes or syncs (after the retry).", "errors"),
    "prefetch_users": MetricSpec(
        "hstu_kvcache_prefetch_users_total", _C,
        "Users whose prefetch (host -> GPU ahead of a request) started.", "users"),
    "prefetch_pages": MetricSpec(
        "hstu_kvcache_prefetch_pages_total", _C,
        "Pages onboarded by prefetch (all layers).", "pages"),
    "prefetch_dropped": MetricSpec(
        "hstu_kvcache_prefetch_dropped_total", _C,
        "Users a prefetch skipped: no room without a write-back, or too many "
        "prefetches in flight.", "users"),
    # -- gauges ---------------------------------------------------------------
    # not hstu_kvcache_pages_total: the _total suffix belongs to counters
    # (promtool check metrics flags a gauge that carries it)
    "pages_total": MetricSpec(
        "hstu_kvcache_pages_capacity", _G, "Pages of the device tier (free + used).", "pages"),
    "pages_free": MetricSpec(
        "hstu_kvcache_pages_free", _G, "Pages on the free list.", "pages"),
    "pages_used": MetricSpec(
        "hstu_kvcache_pages_used", _G, "Pages holding cached K/V.", "pages"),
    "pages_pinned": MetricSpec(
        "hstu_kvcache_pages_pinned", _G,
        "Pages of users in open batches (not evictable).", "pages"),
    "users_cached": MetricSpec(
        "hstu_kvcache_users_cached", _G, "Users with at least one cached page.", "users"),
    "open_batches": MetricSpec(
        "hstu_kvcache_open_batches", _G, "Batches allocated and not yet released.", "batches"),
    "host_pages_total": MetricSpec(
        "hstu_kvcache_host_pages_capacity", _G, "Pages of the host tier.", "pages"),
    "host_pages_free": MetricSpec(
        "hstu_kvcache_host_pages_free", _G, "Free pages of the host tier.", "pages"),
    "host_pages_used": MetricSpec(
        "hstu_kvcache_host_pages_used", _G,
        "Host-tier pages holding K/V (or still read by a copy).", "pages"),
    "transfers_in_flight": MetricSpec(
        "hstu_kvcache_transfers_in_flight", _G,
        "Transfers queued on the side streams and not yet completed.", "transfers"),
    "offload_queued_bytes": MetricSpec(
        "hstu_kvcache_offload_queued_bytes", _G,
        "Offload bytes queued and not yet known complete (bounded by max_offload_bytes).",
        "bytes"),
    "disk_records": MetricSpec(
        "hstu_kvcache_disk_records", _G, "Pages held by the disk tier.", "pages"),
    "disk_bytes_used": MetricSpec(
        "hstu_kvcache_disk_bytes_used", _G, "Bytes of the disk tier's file in use.", "bytes"),
    "disk_bytes_capacity": MetricSpec(
        "hstu_kvcache_disk_bytes_capacity", _G, "Bytes of the disk tier's file.", "bytes"),
    "disk_in_flight": MetricSpec(
        "hstu_kvcache_disk_in_flight", _G,
        "Disk reads and writes submitted and not yet collected.", "operations"),
    "disk_gds_active": MetricSpec(
        "hstu_kvcache_disk_gds_active", _G,
        "1 when disk reads go straight to GPU memory (GPUDirect Storage), else 0.",
        "flag"),
    "events_pending": MetricSpec(
        "hstu_kvcache_events_pending", _G,
        "Cache event records waiting for drain_events().", "events"),
    "hit_rate": MetricSpec(
        "hstu_kvcache_hit_ratio", _G,
        "Hit tokens over looked-up history tokens since the cache was created "
        "(derived; rate() of the token counters gives the recent ratio).", "ratio"),
    # -- latency histograms ---------------------------------------------------
    "lookup_latency": MetricSpec(
        "hstu_kvcache_lookup_latency_seconds", _H,
        "Host time of lookup calls in the core.", "seconds"),
    "allocate_latency": MetricSpec(
        "hstu_kvcache_allocate_latency_seconds", _H,
        "Host time of allocate calls in the core (pages, eviction, metadata).", "seconds"),
    "prepare_latency": MetricSpec(
        "hstu_kvcache_prepare_latency_seconds", _H,
        "Time from prepare to its metadata being ready.", "seconds"),
    "onboard_latency": MetricSpec(
        "hstu_kvcache_onboard_latency_seconds", _H,
        "Time of one onboard transfer from a lower tier to the device (CUDA: queued to "
        "seen complete).", "seconds"),
    "offload_latency": MetricSpec(
        "hstu_kvcache_offload_latency_seconds", _H,
        "Time of one offload transfer from the device to a lower tier (CUDA: queued to "
        "seen complete).", "seconds"),
}

UP_METRIC = MetricSpec(
    "hstu_kvcache_up", _G,
    "1 if the cache answered stats, 0 if it is closed or failed.", "")
"""Exported for every cache, open or not (not a stats key)."""

_GENERIC_HELP = ("Value of stats()[{key!r}] of hstu_kvcache "
                 "(not documented in hstu_kvcache.metrics).")

_BASE_UNITS = ("seconds", "bytes", "ratio")

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_RESERVED_LABELS = ("cache", "le")


class MissingDependencyError(KVCacheError, ImportError):
    """An optional dependency (here prometheus_client) is not installed.

    It derives from ImportError, so the usual ``except ImportError`` around an
    optional feature works, and from :class:`KVCacheError`, so the package's
    promise that every error it raises derives from KVCacheError holds too.
    It lives here rather than in :mod:`hstu_kvcache.errors` because only this
    optional module raises it."""


# ---------------------------------------------------------------------------
# Collecting: caches -> families (shared by render() and the collector)

class _Family:
    """One metric family: samples are ``(suffix, labels, value)`` with
    ``labels`` a tuple of (name, value) pairs and value an int or float."""

    __slots__ = ("name", "type", "help", "unit", "samples")

    def __init__(self, spec: MetricSpec):
        self.name, self.type, self.help, self.unit = spec
        self.samples: List[Tuple[str, Tuple[Tuple[str, str], ...], Union[int, float]]] = []


def _caches(caches: Any) -> List[Tuple[str, Any]]:
    """(name, cache) pairs of a single cache or a mapping name -> cache.

    A mapping is read on every call, so a dict given to serve() may gain or
    lose caches later.  Anything with a ``stats()`` method counts as a cache
    (KVCache, the recsys facade, test doubles)."""
    if isinstance(caches, Mapping):
        # list() first: another thread may change the dict while we scrape
        items = list(caches.items())
        for name, cache in items:
            if not callable(getattr(cache, "stats", None)):
                raise InvalidArgumentError(
                    f"caches[{name!r}] is a {type(cache).__name__}, not a cache with stats()")
        return [(str(name), cache) for name, cache in items]
    if callable(getattr(caches, "stats", None)):
        return [("default", caches)]
    raise InvalidArgumentError(
        f"caches must be a KVCache or a mapping name -> KVCache, not {type(caches).__name__}")


def _labels(extra_labels: Optional[Mapping[str, Any]]) -> Tuple[Tuple[str, str], ...]:
    if not extra_labels:
        return ()
    if not isinstance(extra_labels, Mapping):
        raise InvalidArgumentError("extra_labels must be a mapping label name -> value")
    out = []
    for k, v in extra_labels.items():
        if not isinstance(k, str) or not _LABEL_NAME.match(k) or k.startswith("__"):
            raise InvalidArgumentError(f"{k!r} is not a valid Prometheus label name")
        if k in _RESERVED_LABELS:
            raise InvalidArgumentError(f"label {k!r} is set by hstu_kvcache.metrics itself")
        out.append((k, str(v)))
    return tuple(out)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float))   # bool is an int: exported as 0/1


def _spec_for(key: str, value: Any) -> Optional[MetricSpec]:
    """The table's spec, or a generic one for a key the table does not know
    (None when the value is not exportable)."""
    spec = METRICS.get(key)
    if spec is not None:
        return spec
    base = re.sub(r"[^a-zA-Z0-9_]", "_", str(key))
    if isinstance(value, Mapping) and "buckets" in value:
        # The core exports its histograms in seconds (csrc/module.c), and
        # they are all latencies; base units belong in the name.
        spec = MetricSpec(PREFIX + base + ("" if base.endswith("_seconds") else "_seconds"),
                          _H, _GENERIC_HELP.format(key=key), "seconds")
    elif _is_number(value):
        spec = MetricSpec(PREFIX + base, _G, _GENERIC_HELP.format(key=key), "")
    else:
        return None   # strings, lists, None ...: numbers only
    if _taken(spec.name):
        return None   # would collide with a documented metric or its series
    return spec


def _taken(name: str) -> bool:
    """True if `name` is a documented metric or one of its sample names."""
    for spec in list(METRICS.values()) + [UP_METRIC]:
        if name == spec.name or (spec.type == _H and name in (
                spec.name + "_bucket", spec.name + "_sum", spec.name + "_count")):
            return True
        if spec.type == _C and name == spec.name[:-len("_total")]:
            return True   # prometheus_client would read it as the same family
    return False


def _le(bound: float) -> str:
    """A bucket bound as an ``le`` label value.  The core computes bounds as
    ns * 1e-9, which is not always the shortest decimal (2.5000000000000004e-06);
    rounding to 12 digits keeps the label stable and readable."""
    bound = float(bound)
    if math.isinf(bound):
        return "+Inf"
    return repr(float(f"{bound:.12g}"))


def _histogram_samples(value: Mapping[str, Any],
                       labels: Tuple[Tuple[str, str], ...]) -> List[Tuple[str, Any, Any]]:
    """_bucket/_sum/_count samples of one exported histogram (raises
    TypeError/ValueError/KeyError on a malformed one)."""
    count = value["count"]
    total = value["sum"]
    if not (_is_number(count) and _is_number(total)):
        raise TypeError("histogram count and sum must be numbers")
    out = []
    last = None
    for bound, cum in value["buckets"]:
        if not _is_number(cum):
            raise TypeError("bucket counts must be numbers")
        last = float(bound)
        out.append(("_bucket", labels + (("le", _le(bound)),), cum))
    if last is None or not math.isinf(last):
        # Prometheus needs the +Inf bucket; it holds every observation.
        out.append(("_bucket", labels + (("le", "+Inf"),), count))
    out.append(("_sum", labels, total))
    out.append(("_count", labels, count))
    return out


def _read_stats(cache: Any) -> Optional[Dict[str, Any]]:
    """stats() of a cache, or None if it is closed or fails: one broken cache
    must not take the whole scrape down."""
    try:
        stats = cache.stats()
    except KVCacheError:
        return None   # closed (InvalidStateError) or busy: reported as up 0
    except Exception:  # noqa: BLE001 - a scrape must survive any cache
        _log.warning("hstu_kvcache.metrics: stats() of a cache failed", exc_info=True)
        return None
    if not isinstance(stats, Mapping):
        return None
    stats = dict(stats)
    if "hit_rate" not in stats and _is_number(stats.get("hit_tokens")) \
            and _is_number(stats.get("missed_tokens")):
        # derive the ratio when the stats do not carry it themselves
        total = stats["hit_tokens"] + stats["missed_tokens"]
        stats["hit_rate"] = stats["hit_tokens"] / total if total else 0.0
    return stats


def _collect(caches: Any, extra_labels: Optional[Mapping[str, Any]] = None) -> List[_Family]:
    """Families of every cache, ordered: up, the table's metrics in table
    order, then undocumented keys by name.  Families without samples are left out."""
    pairs = _caches(caches)
    extra = _labels(extra_labels)
    up = _Family(UP_METRIC)
    families: Dict[str, _Family] = {up.name: up}
    for cache_name, cache in pairs:
        labels = (("cache", cache_name),) + extra
        stats = _read_stats(cache)
        up.samples.append(("", labels, 0 if stats is None else 1))
        if stats is None:
            continue
        for key, value in stats.items():
            spec = _spec_for(key, value)
            if spec is None:
                continue
            fam = families.get(spec.name)
            if fam is None:
                fam = families[spec.name] = _Family(spec)
            elif fam.type != spec.type:
                continue   # an undocumented key clashing with another metric's name
            try:
                if spec.type == _H:
                    if not isinstance(value, Mapping):
                        continue
                    fam.samples.extend(_histogram_samples(value, labels))
                elif _is_number(value):
                    fam.samples.append(("", labels, value))
            except (TypeError, ValueError, KeyError):
                _log.debug("hstu_kvcache.metrics: skipping malformed stats key %r", key)

    order = {spec.name: i for i, spec in enumerate(METRICS.values(), start=1)}
    order[UP_METRIC.name] = 0
    out = [f for f in families.values() if f.samples]
    out.sort(key=lambda f: (order.get(f.name, len(order)), f.name))
    return out


# ---------------------------------------------------------------------------
# Text exposition format 0.0.4

def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _value(v: Union[int, float]) -> str:
    if isinstance(v, bool):
        return str(int(v))
    if isinstance(v, int):
        return str(v)   # exact, even past 2**53
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def render(caches: Any, extra_labels: Optional[Mapping[str, Any]] = None) -> str:
    """The stats of one or several caches in the Prometheus text exposition
    format 0.0.4 (serve it with Content-Type :data:`CONTENT_TYPE`).

    Args:
        caches: a :class:`~hstu_kvcache.KVCache` (labelled ``cache="default"``)
            or a mapping ``name -> KVCache`` (labelled ``cache="<name>"``).
        extra_labels: labels added to every sample, e.g. ``{"model": "ranking"}``
            (``cache`` and ``le`` are reserved).

    Each metric gets one HELP and one TYPE line; histograms are written as
    ``_bucket{le=...}`` (cumulative, ending at ``le="+Inf"``), ``_sum`` and
    ``_count``.  A closed cache exports only ``hstu_kvcache_up 0``.

    Raises:
        InvalidArgumentError: caches or extra_labels are of the wrong kind.
    """
    lines: List[str] = []
    for fam in _collect(caches, extra_labels):
        lines.append(f"# HELP {fam.name} {_escape_help(fam.help)}")
        lines.append(f"# TYPE {fam.name} {fam.type}")
        for suffix, labels, value in fam.samples:
            body = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{fam.name}{suffix}{{{body}}} {_value(value)}")
    return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------
# prometheus_client integration (optional dependency)

def _prometheus() -> Any:
    """The prometheus_client modules we use, or None if it is not installed.
    Imported on each call (cheap once loaded) so tests can hide it."""
    try:
        import prometheus_client  # noqa: F401
        from prometheus_client import core, exposition, registry
    except ImportError:
        return None
    return core, exposition, registry


class _Collector:
    """prometheus_client collector around :func:`_collect`'s data."""

    def __init__(self, caches: Any, extra_labels: Optional[Mapping[str, Any]], core: Any):
        _caches(caches)           # fail now, not at the first scrape
        _labels(extra_labels)
        self._caches = caches
        self._extra = extra_labels
        self._core = core

    def describe(self) -> List[Any]:
        # Nothing: registering must not call into the caches, and the names
        # depend on what each cache reports at scrape time.
        return []

    def collect(self) -> Iterator[Any]:
        core = self._core
        for fam in _collect(self._caches, self._extra):
            label_names = [k for k, _ in fam.samples[0][1] if k != "le"]
            base = fam.name[:-len("_total")] if fam.type == _C and fam.name.endswith("_total") \
                else fam.name
            # OpenMetrics UNIT lines are for base units, and prometheus_client
            # appends the unit to a name that does not end with it: pass it only
            # for a base unit the name already carries (not "pages", "users").
            unit = fam.unit if fam.unit in _BASE_UNITS and base.endswith("_" + fam.unit) else ""
            if fam.type == _H:
                m = core.HistogramMetricFamily(fam.name, fam.help, labels=label_names, unit=unit)
                per: Dict[Tuple[str, ...], Dict[str, Any]] = {}
                for suffix, labels, value in fam.samples:
                    key = tuple(v for k, v in labels if k != "le")
                    h = per.setdefault(key, {"buckets": [], "sum": 0})
                    if suffix == "_bucket":
                        h["buckets"].append((dict(labels)["le"], value))
                    elif suffix == "_sum":
                        h["sum"] = value
                for key, h in per.items():
                    m.add_metric(list(key), h["buckets"], h["sum"])
            else:
                cls = core.CounterMetricFamily if fam.type == _C else core.GaugeMetricFamily
                m = cls(fam.name, fam.help, labels=label_names, unit=unit)
                for _, labels, value in fam.samples:
                    m.add_metric([v for _, v in labels], value)
            yield m


def collector(caches: Any, extra_labels: Optional[Mapping[str, Any]] = None) -> Any:
    """A prometheus_client collector of these caches, for an application that
    runs its own registry::

        from prometheus_client import REGISTRY
        REGISTRY.register(metrics.collector({"ranking": cache}))

    Register one collector with a mapping of every cache rather than one per
    cache: two collectors would each write the HELP/TYPE lines of the same
    metrics.

    Raises:
        MissingDependencyError: prometheus_client is not installed (an
            ImportError and a KVCacheError).
        InvalidArgumentError: caches or extra_labels are of the wrong kind.
    """
    mods = _prometheus()
    if mods is None:
        raise MissingDependencyError(
            "hstu_kvcache.metrics.collector() needs prometheus_client: "
            "pip install prometheus_client (render() and serve() work without it)")
    return _Collector(caches, extra_labels, mods[0])


# ---------------------------------------------------------------------------
# HTTP endpoint

class MetricsServer:
    """Handle of a running ``/metrics`` endpoint (from :func:`serve`).

    Attributes:
        host, port: where it listens (``port`` is the bound one when 0 was asked).
        url: ``http://host:port/metrics``.
        backend: ``"prometheus_client"`` or ``"http.server"``.
    """

    def __init__(self, server: Any, backend: str):
        self._server = server
        self.backend = backend
        self.host: str = server.server_address[0]
        self.port: int = server.server_address[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}/metrics"
        self._thread = threading.Thread(target=server.serve_forever,
                                        name=f"hstu-kvcache-metrics:{self.port}", daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving and free the port (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.url
        return f"MetricsServer({state}, backend={self.backend!r})"


def _family_for(addr: str, port: int) -> int:
    """AF_INET or AF_INET6 for a bind address (http.server defaults to IPv4)."""
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise InvalidArgumentError(f"cannot bind to address {addr!r}: {e}") from None
    return infos[0][0]


class _QuietWSGIHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Scrapes every few seconds would flood stderr."""


def _wsgi_server(caches: Any, extra_labels: Optional[Mapping[str, Any]], port: int, addr: str,
                 mods: Any) -> Any:
    core, exposition, registry = mods
    reg = registry.CollectorRegistry()   # fresh: no process/platform collectors, no clashes
    reg.register(_Collector(caches, extra_labels, core))
    app = exposition.make_wsgi_app(reg)

    def only_metrics(environ: Dict[str, Any], start_response: Any) -> Iterable[bytes]:
        # prometheus_client answers on every path; keep to the documented one
        if environ.get("PATH_INFO", "") in ("/metrics", "/metrics/"):
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: the metrics are at /metrics\n"]

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True   # a stuck scraper must not keep the process alive
        address_family = _family_for(addr, port)

    return make_server(addr, port, only_metrics, server_class=Server,
                       handler_class=_QuietWSGIHandler)


def _plain_server(caches: Any, extra_labels: Optional[Mapping[str, Any]], port: int,
                  addr: str) -> Any:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
                self._send(404, b"not found: the metrics are at /metrics\n",
                           "text/plain; charset=utf-8")
                return
            try:
                body = render(caches, extra_labels).encode("utf-8")
            except Exception:  # noqa: BLE001 - answer 500, keep serving
                _log.warning("hstu_kvcache.metrics: render failed", exc_info=True)
                self._send(500, b"render failed\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, CONTENT_TYPE)

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Scrapes every few seconds would flood stderr."""

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = _family_for(addr, port)

    return Server((addr, port), Handler)


def serve(caches: Any, port: int, addr: str = "127.0.0.1",
          extra_labels: Optional[Mapping[str, Any]] = None) -> MetricsServer:
    """Serve the caches' metrics at ``http://addr:port/metrics`` from a
    background daemon thread; returns a handle whose ``close()`` stops it.

    With prometheus_client installed the endpoint is its WSGI app over a
    fresh registry holding one collector of these caches (so a scraper that
    asks for OpenMetrics gets it, and gzip works); without it a small
    :mod:`http.server` serves :func:`render`.  Either way a plain GET gets
    Content-Type ``text/plain; version=0.0.4; charset=utf-8``.

    Args:
        caches: a KVCache or a mapping ``name -> KVCache``; a mapping is read at
            every scrape, so caches may be added to it or removed later.
        port: TCP port; 0 picks a free one (see the handle's ``port``).
        addr: bind address.  The default keeps the endpoint local; pass
            ``"0.0.0.0"`` (or ``"::"``) to let a Prometheus on another host scrape it.
        extra_labels: labels added to every sample.

    Raises:
        InvalidArgumentError: bad caches, labels, port or address.
        OSError: the port cannot be bound (in use, no permission).
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidArgumentError(f"port must be an int in 0..65535, not {port!r}")
    if not isinstance(addr, str):
        raise InvalidArgumentError(f"addr must be a str, not {type(addr).__name__}")
    _caches(caches)
    _labels(extra_labels)
    mods = _prometheus()
    if mods is not None:
        return MetricsServer(_wsgi_server(caches, extra_labels, port, addr, mods),
                             "prometheus_client")
    return MetricsServer(_plain_server(caches, extra_labels, port, addr), "http.server")
