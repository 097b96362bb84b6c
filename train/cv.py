"""`python -m train.cv MODEL --folds K|kaggle [any train.run option]`: cross-validation on one cache.

    python -m train.cv resnet18 --folds 3 --stages 64:6 96:3 --batch-size 16
    python -m train.cv resnet18 --folds kaggle --recipe modern      the Kaggle layout's fold_0/1/2 folders
    python -m train.cv resnet18 --resume runs/cv-resnet18-20261126-120000

Patient-grouped, class-stratified K-fold over the cache's train + valid images (see train.data.folds); the test split is
never trained or validated on. No rebuild: each fold's loaders take a subset of the cache's rows. Each fold is a
normal run folder (`fold-0`, `fold-1`, ...) inside `<--out>/cv-<model>-<timestamp>/`, usable by train.evaluate,
train.predict and train.compare. `cv_summary.json` holds per fold its patients and figures, their mean and standard
deviation (sample, ddof=1), and `ensemble`: the test figures of the K models' averaged probabilities. An interrupted
CV continues with --resume at the fold where it stopped (a fold in the middle of training resumes from its last.pt).
The last line printed is the CV folder.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from pipeline.store import write_json_atomic
from train.data.folds import FoldError
from train.engine.distributed import broadcast_object, setup, teardown
from train.experiment.crossval import PLAN, SUMMARY, build_parser, open_plan, run_fold, summarise, table
from train.engine.run_folder import new_run_dir
from train.experiment.session import USER_ERRORS


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(__doc__.splitlines()[0], __doc__).parse_args(argv)
    dist, cv_dir = None, None
    try:
        plan, config, args, cv_dir = open_plan(args, argv)
        resumed = cv_dir is not None
        dist = setup(torch.device(config.device).type)
        if cv_dir is None:
            # cv-<model>-<timestamp>, made as a run folder is: never an existing one
            cv_dir = Path(broadcast_object(new_run_dir(args.out, f"cv-{plan['model']}") if dist.is_main
                                           else None, dist))
            if dist.is_main:
                write_json_atomic(cv_dir / PLAN, plan)
        summaries = []
        for index in range(len(plan["folds"])):
            summary = run_fold(plan, config, index, cv_dir, dist, args.progress, saved=resumed,
                               tensorboard=args.tensorboard)
            if summary is None:
                return 0  # a fold stopped early; --resume continues it
            summaries.append(summary)
        result = summarise(cv_dir, plan, summaries) if dist.is_main else None
        if dist.is_main:
            write_json_atomic(cv_dir / SUMMARY, result)
    except (*USER_ERRORS, FoldError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: finished folds and the interrupted fold's last.pt stay; say how to go on
        if dist is None or dist.is_main:
            print("\ninterrupted" + (f"; continue with python -m train.cv {args.model} --resume {cv_dir}"
                                      if cv_dir is not None else ""), file=sys.stderr)
        return 130
    finally:
        if dist is not None:
            teardown(dist)
    if dist.is_main:
        print(table(result))
        print(cv_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
