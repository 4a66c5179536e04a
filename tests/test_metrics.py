"""hstu_kvcache.metrics: the Prometheus text exposition (checked with the
official parser of prometheus_client), the collector, the /metrics endpoint
(prometheus_client and http.server fallback) and the Grafana dashboard."""

import json
import math
import re
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import hstu_kvcache as hk
from hstu_kvcache import InvalidArgumentError, KVCacheError, metrics

torch = pytest.importorskip("torch")
prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

H, D = 2, 8
DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "grafana_hstu_kvcache.json"
TIMEOUT = 5.0

# The keys the core reports today; each must have a documented metric.
CORE_KEYS = [
    "lookups", "lookup_users", "hit_tokens", "missed_tokens", "batches_allocated",
    "batches_committed", "batches_aborted", "pages_allocated", "pages_evicted",
    "pages_dropped", "users_evicted", "tokens_appended", "pages_total", "pages_free",
    "pages_used", "pages_pinned", "users_cached", "open_batches", "lookup_latency",
    "allocate_latency", "onboard_pages", "onboard_bytes", "offload_pages", "offload_bytes",
    "onboard_seconds", "offload_seconds", "onboard_latency", "offload_latency",
    "writeback_pages", "host_pages_evicted", "transfers", "transfers_failed",
    "transfers_in_flight", "offload_queued_bytes", "host_pages_total", "host_pages_free",
    "host_pages_used", "events_dropped", "events_pending",
]


def make(num_pages=32):
    return hk.KVCache(hk.KVCacheConfig(num_layers=2, num_heads=H, head_dim=D,
                                       num_pages=num_pages, page_size=4))


def drive(cache, ids, lengths):
    """One request batch through every layer; returns the released batch."""
    batch = cache.prepare(ids, lengths)
    for layer in range(cache.config.num_layers):
        n = batch.new_history_nnz
        cache.append(layer, torch.randn(n, H, D), torch.randn(n, H, D), batch)
    batch.release()
    return batch


@pytest.fixture
def cache():
    c = make()
    drive(c, [1, 2, 3], [5, 9, 2])
    drive(c, [1, 2], [7, 9])          # partial and full hits
    c.lookup([4, 1], [3, 7])          # a miss and a hit, no allocate
    yield c
    c.close()


def families(text):
    """name -> Family; counter families appear under their name with _total."""
    out = {}
    for fam in text_string_to_metric_families(text):
        name = fam.name + "_total" if fam.type == "counter" else fam.name
        assert name not in out, f"{name} rendered twice"
        out[name] = fam
    return out


def value(fam, sample_name=None, **labels):
    hits = [s.value for s in fam.samples
            if (sample_name is None or s.name == sample_name)
            and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(hits) == 1, (fam.name, sample_name, labels, hits)
    return hits[0]


# ---------------------------------------------------------------------------
# the table

def test_table_names_follow_conventions():
    names = set()
    for key, spec in metrics.METRICS.items():
        assert re.fullmatch(r"hstu_kvcache_[a-z][a-z0-9_]*", spec.name), spec
        assert spec.type in ("counter", "gauge", "histogram"), spec
        assert spec.help and "\n" not in spec.help
        if spec.type == "counter":
            assert spec.name.endswith("_total"), spec
        else:
            assert not spec.name.endswith("_total"), spec
        if spec.type == "histogram":
            assert spec.name.endswith("_seconds") and spec.unit == "seconds", spec
        assert spec.name not in names, f"{spec.name} used twice"
        names.add(spec.name)
    assert metrics.UP_METRIC.name not in names
    for key in CORE_KEYS:
        assert key in metrics.METRICS, f"stats key {key!r} has no documented metric"
    assert metrics.METRICS["lookups"].name == "hstu_kvcache_lookups_total"
    assert metrics.METRICS["hit_tokens"].name == "hstu_kvcache_hit_tokens_total"
    assert metrics.METRICS["pages_free"].name == "hstu_kvcache_pages_free"
    assert metrics.METRICS["lookup_latency"].name == "hstu_kvcache_lookup_latency_seconds"
    assert metrics.METRICS["allocate_latency"].name == "hstu_kvcache_allocate_latency_seconds"
    assert metrics.METRICS["hit_rate"].name == "hstu_kvcache_hit_ratio"


def test_core_reports_every_documented_key(cache):
    """Every key the core reports has a documented metric, and every
    documented key but the prepare latency (named ahead) is reported."""
    stats = cache.stats()
    assert set(stats) <= set(metrics.METRICS), set(stats) - set(metrics.METRICS)
    assert set(metrics.METRICS) - set(stats) == {"prepare_latency"}


# ---------------------------------------------------------------------------
# render

def test_render_matches_stats(cache):
    stats = cache.stats()
    assert stats["hit_tokens"] > 0 and stats["missed_tokens"] > 0
    text = metrics.render(cache)
    fams = families(text)
    assert value(fams["hstu_kvcache_up"], cache="default") == 1
    for key, spec in metrics.METRICS.items():
        if key not in stats:
            assert spec.name not in fams
            continue
        fam = fams[spec.name]
        assert fam.type == spec.type
        assert fam.documentation == spec.help
        if spec.type == "histogram":
            h = stats[key]
            assert value(fam, spec.name + "_count", cache="default") == h["count"]
            assert value(fam, spec.name + "_sum", cache="default") == pytest.approx(h["sum"])
            buckets = [s for s in fam.samples if s.name == spec.name + "_bucket"]
            assert len(buckets) == len(h["buckets"])
            for s, (le, cum) in zip(buckets, h["buckets"]):
                assert float(s.labels["le"]) == pytest.approx(le, rel=1e-9)
                assert s.value == cum
        else:
            assert value(fam, spec.name, cache="default") == pytest.approx(stats[key])
    # the stats moved the way the driving above says
    assert value(fams["hstu_kvcache_lookups_total"]) == stats["lookups"] == 3
    assert value(fams["hstu_kvcache_pages_capacity"]) == 32
    assert value(fams["hstu_kvcache_hit_ratio"]) == pytest.approx(
        stats["hit_tokens"] / (stats["hit_tokens"] + stats["missed_tokens"]))


def test_host_tier_and_event_metrics():
    """A cache with a host tier and events: onboard/offload counters, their
    time and histograms, queued bytes and the event gauges parse with the
    official parser and equal stats()."""
    cfg = hk.KVCacheConfig(num_layers=2, num_heads=H, head_dim=D, num_pages=6, page_size=4,
                           host_capacity_bytes=16 * 2 * 2 * 4 * H * D * 4, event_capacity=4)
    c = hk.KVCache(cfg)
    try:
        drive(c, [1, 2], [9, 12])               # 3 + 3 pages: the pool is full
        drive(c, [3], [8])                      # write-back of user 1, eviction
        drive(c, [1], [10])                     # user 1 onboarded from the host
        stats = c.stats()
        assert stats["offload_pages"] > 0 and stats["onboard_pages"] > 0
        assert stats["events_dropped"] > 0 and stats["events_pending"] == 4
        fams = families(metrics.render(c, extra_labels={"model": "m"}))
        for key in ("onboard_pages", "offload_bytes", "writeback_pages", "transfers",
                    "onboard_seconds", "offload_seconds", "offload_queued_bytes",
                    "events_dropped", "events_pending", "host_pages_used",
                    "host_pages_free", "transfers_failed", "transfers_in_flight"):
            spec = metrics.METRICS[key]
            assert fams[spec.name].type == spec.type
            assert value(fams[spec.name], spec.name, cache="default", model="m") == \
                pytest.approx(stats[key])
        assert value(fams["hstu_kvcache_onboard_seconds_total"],
                     "hstu_kvcache_onboard_seconds_total") > 0
        assert value(fams["hstu_kvcache_offload_queued_bytes"]) == 0   # CPU: synchronous
        for key in ("onboard_latency", "offload_latency"):
            name = metrics.METRICS[key].name
            assert value(fams[name], name + "_count") == stats[key]["count"] > 0
        c.drain_events()
        fams = families(metrics.render(c))
        assert value(fams["hstu_kvcache_events_pending"]) == 0
        assert value(fams["hstu_kvcache_events_dropped_total"]) == stats["events_dropped"]
    finally:
        c.close()


def test_render_format_details(cache):
    text = metrics.render(cache)
    assert text.endswith("\n") and "\n\n" not in text
    lines = text.splitlines()
    helps = [ln.split()[2] for ln in lines if ln.startswith("# HELP ")]
    types = [ln.split()[2] for ln in lines if ln.startswith("# TYPE ")]
    assert len(helps) == len(set(helps)) and helps == types
    # counters keep their _total name in the TYPE line (format 0.0.4)
    assert "# TYPE hstu_kvcache_lookups_total counter" in lines
    assert "# TYPE hstu_kvcache_lookup_latency_seconds histogram" in lines
    # every sample belongs to the family declared last
    current = None
    for ln in lines:
        if ln.startswith("# TYPE "):
            current = ln.split()[2]
        elif not ln.startswith("#"):
            assert ln.startswith(current), ln
    # integer counters are written exactly
    assert re.search(r'^hstu_kvcache_lookups_total\{cache="default"\} 3$', text, re.M)


def test_histograms_monotonic_and_inf_equals_count(cache):
    fams = families(metrics.render(cache))
    hists = [f for f in fams.values() if f.type == "histogram"]
    assert {f.name for f in hists} >= {"hstu_kvcache_lookup_latency_seconds",
                                       "hstu_kvcache_allocate_latency_seconds"}
    for fam in hists:
        buckets = [s for s in fam.samples if s.name == fam.name + "_bucket"]
        les = [float(s.labels["le"]) for s in buckets]
        counts = [s.value for s in buckets]
        assert les == sorted(les) and len(set(les)) == len(les)
        assert counts == sorted(counts), "cumulative buckets must not decrease"
        assert buckets[-1].labels["le"] == "+Inf" and math.isinf(les[-1])
        count = value(fam, fam.name + "_count")
        assert counts[-1] == count
        # transfer histograms stay empty without a host tier
        assert count > 0 or fam.name in (metrics.METRICS["onboard_latency"].name,
                                         metrics.METRICS["offload_latency"].name)
        assert (value(fam, fam.name + "_sum") > 0) == (count > 0)
    assert value(fams["hstu_kvcache_lookup_latency_seconds"],
                 "hstu_kvcache_lookup_latency_seconds_count") == 3
    assert value(fams["hstu_kvcache_allocate_latency_seconds"],
                 "hstu_kvcache_allocate_latency_seconds_count") == 2


def test_label_escaping(cache):
    name = 'we"ird\\name\nwith newline'
    extra = {"model": 'a\\b"c\nd', "zone": "eu-1"}
    text = metrics.render({name: cache}, extra_labels=extra)
    assert '\\"' in text and "\\\\" in text and "\\n" in text
    fams = families(text)
    labels = dict(cache=name, **extra)
    assert value(fams["hstu_kvcache_up"], **labels) == 1
    assert value(fams["hstu_kvcache_pages_capacity"], **labels) == 32
    # no raw newline leaked into a sample line
    assert all(ln.startswith(("#", "hstu_kvcache_")) for ln in text.splitlines())


def test_extra_labels_validated(cache):
    for bad in ({"le": "x"}, {"cache": "x"}, {"1abc": "x"}, {"a-b": "x"}, {"__x": "y"}):
        with pytest.raises(InvalidArgumentError):
            metrics.render(cache, extra_labels=bad)
    with pytest.raises(InvalidArgumentError):
        metrics.render(cache, extra_labels=[("a", "b")])


def test_bad_caches_argument():
    for bad in (None, 3, "cache", {"a": object()}):
        with pytest.raises(InvalidArgumentError):
            metrics.render(bad)


def test_several_caches(cache):
    other = make(num_pages=16)
    try:
        drive(other, [7], [6])
        text = metrics.render({"ranking": cache, "retrieval": other})
        fams = families(text)
        for fam in fams.values():
            assert {s.labels["cache"] for s in fam.samples} == {"ranking", "retrieval"}
        assert value(fams["hstu_kvcache_pages_capacity"], cache="ranking") == 32
        assert value(fams["hstu_kvcache_pages_capacity"], cache="retrieval") == 16
        assert value(fams["hstu_kvcache_lookups_total"], cache="retrieval") == 1
        assert text.count("# TYPE hstu_kvcache_pages_capacity gauge") == 1
    finally:
        other.close()


def test_unknown_keys_pass_through(cache, monkeypatch):
    real = cache.stats

    def stats():
        s = real()
        s["disk_pages_free"] = 11                 # a gauge the table does not know
        s["weird-key.x"] = 2.5                    # sanitised into a valid name
        s["flag"] = True                          # bools count as numbers
        s["label"] = "text"                       # not a number: left out
        s["nested"] = {"a": 1}                    # not a histogram: left out
        s["up"] = 7                               # would clash with hstu_kvcache_up
        s["onboard_latency"] = {"buckets": [(0.001, 1), (0.01, 3)], "count": 4, "sum": 0.5}
        s["copy_latency"] = {"buckets": [(0.5, 2), (float("inf"), 2)], "count": 2, "sum": 0.25}
        s["broken_latency"] = {"buckets": [(1.0, "x")], "count": 1, "sum": 1.0}
        return s

    monkeypatch.setattr(cache, "stats", stats)
    fams = families(metrics.render(cache))
    fam = fams["hstu_kvcache_disk_pages_free"]
    assert fam.type == "gauge" and value(fam) == 11 and "disk_pages_free" in fam.documentation
    assert value(fams["hstu_kvcache_weird_key_x"]) == 2.5
    assert value(fams["hstu_kvcache_flag"]) == 1
    assert "hstu_kvcache_label" not in fams and "hstu_kvcache_nested" not in fams
    assert value(fams["hstu_kvcache_up"]) == 1
    # a table histogram (reserved name) and an undocumented one
    onboard = fams["hstu_kvcache_onboard_latency_seconds"]
    assert onboard.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in onboard.samples if s.name.endswith("_bucket")]
    assert buckets == [("0.001", 1), ("0.01", 3), ("+Inf", 4)]   # +Inf added from count
    copy = fams["hstu_kvcache_copy_latency_seconds"]
    assert copy.type == "histogram" and value(copy, copy.name + "_count") == 2
    assert "hstu_kvcache_broken_latency_seconds" not in fams


def test_hit_ratio_derived_when_stats_lack_it(cache, monkeypatch):
    real = cache.stats

    def stats():
        s = real()
        s.pop("hit_rate", None)
        return s

    monkeypatch.setattr(cache, "stats", stats)
    s = real()
    fams = families(metrics.render(cache))
    assert value(fams["hstu_kvcache_hit_ratio"]) == pytest.approx(
        s["hit_tokens"] / (s["hit_tokens"] + s["missed_tokens"]))


def test_closed_cache(cache):
    closed = make()
    closed.close()
    with pytest.raises(KVCacheError):
        closed.stats()
    text = metrics.render({"live": cache, "closed": closed})
    fams = families(text)
    assert value(fams["hstu_kvcache_up"], cache="closed") == 0
    assert value(fams["hstu_kvcache_up"], cache="live") == 1
    assert 'cache="closed"' not in text.replace('hstu_kvcache_up{cache="closed"} 0', "")
    # only closed caches: just the up gauge
    fams = families(metrics.render(closed))
    assert list(fams) == ["hstu_kvcache_up"] and value(fams["hstu_kvcache_up"]) == 0


def test_failing_stats_does_not_break_scrape(cache, monkeypatch):
    other = make()
    try:
        def boom():
            raise RuntimeError("boom")
        monkeypatch.setattr(other, "stats", boom)
        fams = families(metrics.render({"ok": cache, "bad": other}))
        assert value(fams["hstu_kvcache_up"], cache="bad") == 0
        assert value(fams["hstu_kvcache_lookups_total"], cache="ok") == 3
    finally:
        other.close()


# ---------------------------------------------------------------------------
# collector

def test_collector_matches_render(cache):
    from prometheus_client import CollectorRegistry, generate_latest

    reg = CollectorRegistry()
    reg.register(metrics.collector({"a": cache}, extra_labels={"zone": "x"}))
    ours = families(metrics.render({"a": cache}, extra_labels={"zone": "x"}))
    theirs = families(generate_latest(reg).decode())
    assert set(ours) == set(theirs)
    for name, fam in ours.items():
        other = theirs[name]
        assert (other.type, other.documentation) == (fam.type, fam.documentation)
        # cache.stats() moves between the two calls only if someone uses it
        assert sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in other.samples) \
            == sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in fam.samples)


def test_collector_without_prometheus_client(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ImportError, match="prometheus_client") as info:
        metrics.collector(cache)
    assert isinstance(info.value, KVCacheError)


# ---------------------------------------------------------------------------
# HTTP endpoint (127.0.0.1, ephemeral port)

def fetch(url):
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        return resp.status, resp.headers.get("Content-Type"), resp.read().decode("utf-8")


def check_server(server, cache):
    assert server.host == "127.0.0.1" and server.port > 0
    status, ctype, body = fetch(server.url)
    assert status == 200
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    fams = families(body)
    assert value(fams["hstu_kvcache_lookups_total"], cache="main") == cache.stats()["lookups"]
    assert value(fams["hstu_kvcache_up"], cache="main") == 1
    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(server.url.replace("/metrics", "/other"))
    assert info.value.code == 404


def test_serve_with_prometheus_client(cache):
    caches = {"main": cache}
    server = metrics.serve(caches, port=0)
    try:
        assert server.backend == "prometheus_client"
        check_server(server, cache)
        # a scraper asking for OpenMetrics gets it (prometheus_client negotiates)
        from prometheus_client.openmetrics.parser import \
            text_string_to_metric_families as openmetrics_families
        req = urllib.request.Request(server.url, headers={
            "Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            om = {f.name: f for f in openmetrics_families(resp.read().decode())}
        assert om["hstu_kvcache_lookups"].type == "counter"
        assert om["hstu_kvcache_lookup_latency_seconds"].unit == "seconds"
        # the mapping is read at every scrape
        extra = make()
        caches["extra"] = extra
        fams = families(fetch(server.url)[2])
        assert value(fams["hstu_kvcache_pages_capacity"], cache="extra") == 32
        extra.close()
        fams = families(fetch(server.url)[2])
        assert value(fams["hstu_kvcache_up"], cache="extra") == 0
    finally:
        server.close()
    assert server.closed
    server.close()   # idempotent
    with pytest.raises(urllib.error.URLError):
        fetch(server.url)


def test_serve_fallback_without_prometheus_client(cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with metrics.serve({"main": cache}, port=0, addr="127.0.0.1") as server:
        assert server.backend == "http.server"
        check_server(server, cache)
    assert server.closed


def test_serve_arguments(cache):
    for port in (-1, 65536, "9400", 1.5, True):
        with pytest.raises(InvalidArgumentError):
            metrics.serve(cache, port=port)
    with pytest.raises(InvalidArgumentError):
        metrics.serve(object(), port=0)


# ---------------------------------------------------------------------------
# Grafana dashboard

def test_dashboard_uses_rendered_metrics(cache):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    query = variables["cache"]["query"]
    query = query["query"] if isinstance(query, dict) else query
    assert query == "label_values(hstu_kvcache_pages_capacity, cache)"

    fams = families(metrics.render(cache))
    produced = set()
    for name, fam in fams.items():
        produced.add(name)
        produced.update(s.name for s in fam.samples)
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert exprs and all(p.get("targets") for p in dash["panels"] if p["type"] != "row")
    used = set()
    for expr in exprs:
        names = re.findall(r"hstu_kvcache_[a-z_]+", expr)
        assert names, expr
        for name in names:
            assert name in produced, f"{name} in {expr!r} is not rendered"
        used.update(names)
    # the panels the dashboard promises
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for word in ("hit ratio", "lookups", "tokens", "pages", "evictions", "open batches",
                 "lookup latency", "allocate latency"):
        assert word in titles, word
    assert {"hstu_kvcache_lookup_latency_seconds_bucket",
            "hstu_kvcache_allocate_latency_seconds_bucket"} <= used
    # lookup, allocate, onboard, offload: p50 and p99 each
    assert sum("histogram_quantile(0.99" in e for e in exprs) == 4
    assert sum("histogram_quantile(0.5" in e for e in exprs) == 4
    # the host tier and the events
    for word in ("host pages", "onboard / offload bytes", "transfers", "queued offload bytes",
                 "events dropped"):
        assert word in titles, word
    assert {"hstu_kvcache_host_pages_used", "hstu_kvcache_host_pages_free",
            "hstu_kvcache_onboard_bytes_total", "hstu_kvcache_offload_bytes_total",
            "hstu_kvcache_transfers_in_flight", "hstu_kvcache_transfers_failed_total",
            "hstu_kvcache_offload_queued_bytes", "hstu_kvcache_events_dropped_total"} <= used
    # panels do not overlap on the 24-column grid
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, p["title"]
                cells.add((x, y))
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
