"""`python -m train.evaluate RUN_DIR [--split test]`: metrics, confusion matrices, curves, predictions, summary.

Runs at the end of every training run too. Loads the run's best.pt (weights_only) at the size it was trained at and
writes the run folder's reports; another checkpoint of the run (--checkpoint last.pt) writes its own in
RUN_DIR/eval-last/, so the run's figures stay best.pt's. The last line printed is the folder of the reports.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from train.engine import checkpoint as ckpt
from train.engine.distributed import resolve_device, setup, teardown
from train.engine.run_folder import reports_dir
from train.evaluation.evaluator import evaluate_run
from train.evaluation.report import split_result_lines


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--split", nargs="+", action="extend",
                   help="splits to evaluate (default: valid and test, those the cache has); given twice, both count")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: auto)")
    p.add_argument("--checkpoint", default="best.pt",
                   help="a checkpoint in the run folder: best.pt (the run's reports) or last.pt (reports in "
                        "RUN_DIR/eval-last/); one from another folder is refused")
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
    except KeyboardInterrupt:  # Ctrl-C: every report is written whole and summary.json last, so say so, not a traceback
        if dist.is_main:
            print(f"\ninterrupted; no report was half-written (each is written whole, summary.json last): run the "
                  f"same command again to evaluate {args.run_dir}", file=sys.stderr)
        return 130
    finally:
        teardown(dist)
    if dist.is_main:
        for split, report in summary["splits"].items():
            if report is not None:
                print(f"{split}: " + ", ".join(f"{name} precision {v['precision']:.4f} recall {v['recall']:.4f}"
                                               for name, v in report["per_class"].items()))
        print("\n".join(split_result_lines(summary)))
        print(reports_dir(args.run_dir, summary["checkpoint"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
