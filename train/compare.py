"""`python -m train.compare RUN_DIR|CV_DIR... [--out compare.png] [--overwrite]`: the runs' valid-accuracy curves in
one figure and a markdown table (model, best valid acc, test acc, test F1, seconds per epoch), as the report compared
its models.

A cross-validation folder (train.cv, with cv_summary.json) is one row of mean +- standard deviation over its folds,
and one curve: the folds' mean valid accuracy per epoch. An existing --out is never replaced unless --overwrite is
given (the rule of every command that writes a file); the last line printed is the figure's path."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.evaluation.compare import compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR|CV_DIR",
                   help="run folders (train.run) and cross-validation folders (train.cv)")
    p.add_argument("--out", type=Path, default=Path("compare.png"),
                   help="figure of the valid-accuracy curves, .png (or .pdf, .svg ...) in an existing folder "
                        "(default: compare.png); an existing file is refused, as train.predict refuses one, unless "
                        "--overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        table = compare(args.runs, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, ValueError) as err:  # none of ours; RunFolderError: a damaged file; a refused --out
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
