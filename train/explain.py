"""`python -m train.explain RUN_DIR (INPUT... | --split NAME)`: which part of each cell made the call, as one PNG grid.

    python -m train.explain runs/resnet18-20261126-084724 --split test            the test split's most useful cells
    python -m train.explain RUN_DIR --split valid --n 24 --method gradcam++ --out valid_maps.png
    python -m train.explain RUN_DIR new_cells/ a.bmp --checkpoint last.pt         image files and folders

Per cell: the evaluation view the model was given (the run's preprocessing, centre crop, at the checkpoint's size),
a class activation map of the class it called over it (grad-cam's --method on the ResNet's last residual block),
the probability of `all`, the label when known, the patient and the file name. With --split the cells come from the
run's cache: the most confident mistakes of each class first, then the most confident correct calls, then the least
certain calls (the figure's title says how many of each). With INPUTs (files, folders, source layouts, as
train.predict takes them): all of them in the order given when there are at most --n, else chosen the same way.
A map is not proof of what the model knows: it shows where the last block's evidence for the call sits, at that
block's resolution (size/32 px; size/16 with --stem seed), scaled per cell. --out is never written over. The last
line printed is the PNG.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from train.engine.distributed import resolve_device
from train.evaluation.explain import (DEFAULT_METHOD, MAX_CELLS, METHODS, SLOW_METHODS, ExplainError, check_out,
                                      draw_explanation, explain_images, explain_split)
from train.evaluation.predictor import load_predictor, out_file_type


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.explain", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run_dir", type=Path, help="a run folder made by python -m train.run")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders of images, or source folders")
    p.add_argument("--split", help="explain cells of this split of the run's cache instead (e.g. test, valid)")
    p.add_argument("--n", type=int, default=16, help=f"cells in the grid, 1 to {MAX_CELLS} (default 16)")
    p.add_argument("--method", choices=list(METHODS), default=DEFAULT_METHOD, metavar="METHOD",
                   help=f"grad-cam's map: {', '.join(METHODS)} (default {DEFAULT_METHOD}; "
                        f"{' and '.join(SLOW_METHODS)} run the model once per channel: minutes on a CPU)")
    p.add_argument("--checkpoint", default="best.pt", help="checkpoint file in the run folder (best.pt or last.pt)")
    p.add_argument("--out", type=out_file_type("explain.png"), default=Path("explain.png"),
                   help="the PNG (must not exist)")
    p.add_argument("--batch-size", type=int, help="images per forward pass when choosing cells (default: the "
                                                  "checkpoint stage's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        if bool(args.inputs) == bool(args.split):
            raise ExplainError("pass image files or folders to explain, or --split NAME for cells of the run's cache "
                               "(one of the two)")
        if not 1 <= args.n <= MAX_CELLS:
            raise ExplainError(f"--n must be 1 to {MAX_CELLS}, got {args.n}")
        if args.batch_size is not None and args.batch_size < 1:
            raise ExplainError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = resolve_device(args.device)
        check_out(args.out)
        predictor = load_predictor(args.run_dir, args.checkpoint, device)
        if args.split:
            explanation = explain_split(predictor, args.run_dir, args.split, args.n, args.method, args.batch_size)
        else:
            explanation = explain_images(predictor, args.inputs, args.n, args.method, args.batch_size)
        draw_explanation(explanation, args.out)
    except ValueError as err:  # PredictError, ExplainError, RunFolderError, CheckpointError, CacheError, FigureOutError
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the PNG is written last, whole; say so rather than print a traceback
        print(f"\ninterrupted; nothing was written ({args.out} is written whole, at the end)", file=sys.stderr)
        return 130
    print(f"explained {len(explanation.cells)} cells with {predictor.config.model} {args.checkpoint} (epoch "
          f"{predictor.epoch}, {predictor.size} px): {args.method} on {explanation.layer}, a "
          f"{explanation.feature_hw[0]}x{explanation.feature_hw[1]} feature map")
    print(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
