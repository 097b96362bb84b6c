"""Benchmarks, each printing figures and ratios measured in one run (speed targets live here, never in tests).

    python -m pipeline.bench build [--images 1024] [--sizes 128 224]   the cache build against bare OpenCV
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build cost against bare OpenCV; --jobs 2 against --jobs 1")
    b.add_argument("--images", type=int, default=1024, help="images in the generated source")
    b.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    b.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    if args.command == "build":
        from pipeline import bench_build
        # The copied sample has too few patients for a grouped split; the build's warning says so each run.
        logging.getLogger("pipeline.split").setLevel(logging.ERROR)
        result = bench_build.run(images=args.images, sizes=args.sizes)
        print(bench_build.report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
