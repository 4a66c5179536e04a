"""Draw the PNG plots of recorded benchmark results (no GPU needed).

    python benchmarks/plot_results.py                      # every results/*.json
    python benchmarks/plot_results.py results/e2e_h100.json ...

Each plot is written next to its JSON file (results/e2e_h100.png, ...).
Needs matplotlib (pip install 'hstu-kvcache[bench]').
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PLOTTERS, RESULTS, plot_file  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        return 0
    files = [Path(a) for a in args] or sorted(RESULTS.glob("*.json"))
    status = 0
    for f in files:
        name = f.stem.split("_", 1)[0]
        if name not in PLOTTERS:
            print(f"skipped {f}: no plot for this benchmark")
            continue
        try:
            if plot_file(f) is None:
                return 1   # matplotlib missing: said once
        except (OSError, ValueError, KeyError) as e:
            print(f"failed {f}: {type(e).__name__}: {e}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
