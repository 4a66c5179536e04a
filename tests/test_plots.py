"""Plots and progress bars of the benchmarks (benchmarks/_common.py) and the
demo's --plot: PNGs drawn from the recorded results, the fallback without
matplotlib, --plot-only of the benchmark scripts, and the progress helper."""

import builtins
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import _common  # noqa: E402

mpl_image = pytest.importorskip("matplotlib.image")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RESULT_FILES = sorted((BENCH / "results").glob("*.json"))


def check_png(path, min_w=400, min_h=250):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, path
    img = mpl_image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] >= min_h and img.shape[1] >= min_w, img.shape
    assert img.std() > 0.01            # not a blank canvas
    return img


def test_every_recorded_result_has_a_plotter():
    names = {f.stem.split("_", 1)[0] for f in RESULT_FILES}
    assert {"e2e", "facade", "host", "kernels", "tiers"} <= names
    assert names <= set(_common.PLOTTERS)


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.stem)
def test_plot_recorded_results(path, tmp_path):
    doc = json.loads(path.read_text())
    out = _common.plot_results(doc, tmp_path / "sub" / (path.stem + ".png"))
    assert out == tmp_path / "sub" / (path.stem + ".png")
    check_png(out)


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: p.stem)
def test_committed_pngs_exist_next_to_results(path):
    check_png(path.with_suffix(".png"))


def test_write_results_writes_json_and_png(tmp_path, capsys):
    doc = json.loads((BENCH / "results" / "host_cpu.json").read_text())
    payload = {k: doc[k] for k in ("workload", "anchor", "results")}
    path = _common.write_results("host_test", payload, tmp_path)
    assert json.loads(path.read_text())["results"] == payload["results"]
    check_png(tmp_path / "host_test.png")
    assert "host_test.png" in capsys.readouterr().out
    # a plot that fails never loses the results
    path = _common.write_results("nosuch_bench", {"results": []}, tmp_path)
    assert path.exists() and not (tmp_path / "nosuch_bench.png").exists()
    assert "no plot written" in capsys.readouterr().out


def test_unknown_benchmark_raises(tmp_path):
    with pytest.raises(ValueError, match="no plot"):
        _common.plot_results({"benchmark": "mystery"}, tmp_path / "x.png")


def test_without_matplotlib_one_line_and_no_file(tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_mpl(name, *args, **kw):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("hidden by the test")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    doc = json.loads((BENCH / "results" / "tiers_h100.json").read_text())
    assert _common.plot_results(doc, tmp_path / "t.png") is None
    assert not (tmp_path / "t.png").exists()
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "matplotlib" in out
    from hstu_kvcache import demo
    assert demo.plot_latency([0.1], [0.2], str(tmp_path / "d.png")) is False
    assert not (tmp_path / "d.png").exists()


def test_plot_results_script(tmp_path):
    for name in ("kernels_h100.json", "host_cpu.json"):
        shutil.copy(BENCH / "results" / name, tmp_path / name)
    (tmp_path / "other_x.json").write_text("{}")
    run = subprocess.run([sys.executable, str(BENCH / "plot_results.py"),
                          *sorted(str(p) for p in tmp_path.glob("*.json"))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    check_png(tmp_path / "kernels_h100.png")
    check_png(tmp_path / "host_cpu.png")
    assert "skipped" in run.stdout and not (tmp_path / "other_x.png").exists()


@pytest.mark.parametrize("bench,result", [("bench_host.py", "host_cpu.json"),
                                          ("bench_kernels.py", "kernels_h100.json")])
def test_benchmark_plot_only(bench, result, tmp_path):
    pytest.importorskip("torch")
    src = tmp_path / result
    shutil.copy(BENCH / "results" / result, src)
    run = subprocess.run([sys.executable, str(BENCH / bench), "--plot-only", str(src)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    check_png(src.with_suffix(".png"))


def test_progress_bar():
    buf = io.StringIO()
    bar = _common.Progress(4, "t", enabled=True, stream=buf)
    for i in range(4):
        bar.update(note=f"step {i}")
    bar.close()
    bar.close()                       # idempotent
    text = buf.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and text.count("\n") == 1
    assert "4/4" in text and "[" + "#" * 30 + "]" in text and "step 3" in text
    # not a terminal: silent
    quiet = io.StringIO()
    bar = _common.Progress(3, stream=quiet)
    bar.update()
    bar.close()
    assert quiet.getvalue() == "" and bar.done == 1


def test_progress_iterable(monkeypatch, capsys):
    monkeypatch.setenv("HSTU_KVCACHE_PROGRESS", "1")
    assert list(_common.progress(iter(range(3)), "it", note=str)) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "3/3" in err and err.endswith("\n")
    monkeypatch.setenv("HSTU_KVCACHE_PROGRESS", "0")
    assert list(_common.progress([1, 2], "it")) == [1, 2]
    assert capsys.readouterr().err == ""


def test_demo_plot(tmp_path):
    pytest.importorskip("torch")
    from hstu_kvcache import demo
    out = tmp_path / "demo.png"
    rc = demo.main(["--requests", "4", "--users", "4", "--batch", "2", "--history", "32",
                    "--new-events", "2", "--layers", "1", "--d-model", "16", "--heads", "1",
                    "--head-dim", "8", "--candidates", "2", "--device", "cpu",
                    "--no-progress", "--plot", str(out)])
    assert rc == 0
    check_png(out)
