"""Command line: ``python -m hstu_kvcache demo`` runs the main job;
``python -m hstu_kvcache info`` prints the build and devices."""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: python -m hstu_kvcache {demo,info} [options]

  demo   serve a stream of HSTU requests with and without the cache and
         print hit rate, latency and whether the outputs match
         (python -m hstu_kvcache demo --help for its options)
  info   print the version, whether CUDA was built in, and usable GPUs
"""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main
        return demo_main(rest)
    if cmd == "info":
        import hstu_kvcache as hk
        from . import _C
        print(f"hstu-kvcache {hk.__version__}")
        print(f"CUDA built in: {hk.cuda_built()}")
        print(f"usable GPUs:   {_C.cuda_device_count() if hk.cuda_built() else 0}")
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
