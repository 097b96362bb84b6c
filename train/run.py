"""`python -m train.run MODEL`: train ResNet18/50/152 from the cache with the report's recipe, then evaluate.

    python -m train.run resnet18 --stages 64:2 96:1           a short run
    python -m train.run resnet152                             the report's recipe (128:550 then 224:100:32)
    python -m train.run resnet50 --stages 128:40 224:10 --recipe modern   today's usual options (--recipe)
    torchrun --nproc_per_node 4 -m train.run resnet50         DistributedDataParallel, one process per GPU
The last line printed is the run folder.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch

from train.engine.distributed import Dist, broadcast_object, setup, teardown
from train.engine.run_folder import RunFolder, new_run_dir
from train.evaluation.report import result_line
from train.experiment.session import (USER_ERRORS, check_cpu_recipe, check_resume, parse_args,
                                      resolve_config, train_and_evaluate)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv, __doc__.splitlines()[0], __doc__)
    dist = Dist()
    summary = None  # the final evaluation's figures, when the run finishes
    run_dir = None
    try:
        if args.resume:
            config, run_dir = check_resume(args), args.resume
        else:
            config, full_recipe = resolve_config(args)
            if full_recipe and config.device == "cpu" and not args.force:
                check_cpu_recipe(config)
        dist = setup(torch.device(config.device).type)
        if not args.resume:
            run_dir = broadcast_object(new_run_dir(args.out, config.model) if dist.is_main else None, dist)
        summary = train_and_evaluate(config, Path(run_dir), dist, resume=bool(args.resume),
                                     stop_after=args.stop_after, progress=args.progress,
                                     tensorboard=args.tensorboard)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the last finished epoch is in last.pt; say how to go on, not a traceback
        if dist.is_main:
            resumable = run_dir is not None and RunFolder(run_dir).last.is_file()
            print("\ninterrupted" + (f"; continue with python -m train.run {args.model} --resume {run_dir}"
                                      if resumable else " before the first epoch ended: nothing to resume"),
                  file=sys.stderr)
        return 130
    finally:
        teardown(dist)
    if dist.is_main:
        if summary:
            print(result_line(summary))
        print(Path(run_dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
