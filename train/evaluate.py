"""`python -m train.evaluate RUN_DIR [--split test]`: metrics, confusion matrices, curves, predictions, summary.

Runs at the end of every training run too. Loads the run's best.pt (weights_only) at the size it was trained at.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from train.engine import checkpoint as ckpt
from train.engine.distributed import resolve_device, setup, teardown
from train.evaluation.evaluator import evaluate_run
from train.evaluation.report import split_result_lines


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", nargs="+", help="splits to evaluate (default: valid and test, those the cache has)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: auto)")
    p.add_argument("--checkpoint", default="best.pt", help="best.pt or last.pt")
    p.add_argument("--tta", action="store_true",
                   help="also evaluate the mean softmax over the 8 dihedral views (flips and 90-degree rotations) of "
                        "the centre crop; summary.json keeps the plain and TTA figures side by side")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dist = setup(torch.device(device).type)
    try:
        summary = evaluate_run(args.run_dir, tuple(args.split or ("valid", "test")), device, dist,
                               checkpoint=args.checkpoint, tta=args.tta, strict=args.split is not None)
    except (FileNotFoundError, ckpt.CheckpointError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        teardown(dist)
    if dist.is_main:
        for split, report in summary["splits"].items():
            if report is not None:
                print(f"{split}: " + ", ".join(f"{name} precision {v['precision']:.4f} recall {v['recall']:.4f}"
                                               for name, v in report["per_class"].items()))
        print("\n".join(split_result_lines(summary)))
        print(args.run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
