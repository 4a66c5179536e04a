"""The C core's own tests (tests/c), built and run under AddressSanitizer
and UndefinedBehaviorSanitizer."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent / "c"


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None,
                    reason="needs make and gcc")
def test_c_core_under_asan_and_ubsan():
    proc = subprocess.run(["make", "-C", str(ROOT), "test"], capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " 0 failed" in proc.stdout, tail


@pytest.mark.skipif(shutil.which("make") is None or shutil.which("gcc") is None,
                    reason="needs make and gcc")
def test_c_core_threads_under_tsan():
    proc = subprocess.run(["make", "-C", str(ROOT), "tsan"], capture_output=True, text=True,
                          timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, tail
    assert " 0 failed" in proc.stdout and "ThreadSanitizer" not in proc.stdout + proc.stderr, tail
