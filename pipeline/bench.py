"""Build benchmark: `python -m pipeline.bench build [--images 1024] [--sizes 128 224] [--json PATH]`.

The cache build against bare OpenCV on the same images, and --jobs 2 against --jobs 1 (the bench_build module).
The benchmarks that need torch live in train/ (pipeline/ never imports it):
    python -m train.bench loader ...   the report's per-image loader against the cached loader + augmentation
    python -m train.bench scale ...    costs against data size
    python -m train.bench gpu ...      the one-command GPU check
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.progress import add_progress_flags

# Forms this command used to accept, and where they went.
MOVED = {
    "scale": "python -m train.bench scale",
    "loader": "python -m train.bench loader",
}


def _build_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline.bench build",
                                description="build cost against bare OpenCV; --jobs 2 against --jobs 1")
    p.add_argument("--images", type=int, default=1024, help="images in the generated source")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--json", type=Path, help="also write the figures here")
    add_progress_flags(p)
    return p.parse_args(argv)


def _moved_message(argv: list[str]) -> str:
    """The error for a form that moved to train.bench: the old loader form had no subcommand, only flags."""
    target = MOVED.get(argv[0]) if argv else None
    if target is None:
        target = MOVED["loader"]
        rest = argv
    else:
        rest = argv[1:]
    command = " ".join([target, *rest])
    return (f"error: this benchmark moved to train/ (it needs torch, which pipeline/ never imports); run\n"
            f"  {command}\n"
            f"`python -m pipeline.bench` keeps only `build` (python -m pipeline.bench build --help)")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] != ["build"]:
        print(_moved_message(argv), file=sys.stderr)
        return 2
    from pipeline import bench_build
    args = _build_args(argv[1:])
    # The copied sample has too few patients for a grouped split; the build's warning would repeat each run.
    logging.getLogger("pipeline.split").setLevel(logging.ERROR)
    result = bench_build.run(images=args.images, sizes=args.sizes, progress=args.progress)
    print(bench_build.report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
