"""`python -m train.cv MODEL --folds K|kaggle [any train.run option]`: cross-validation on one cache.

    python -m train.cv resnet18 --folds 3 --stages 64:6 96:3 --batch-size 16
    python -m train.cv resnet18 --folds kaggle --recipe modern      the Kaggle layout's fold_0/1/2 folders
    python -m train.cv resnet18 --resume runs/cv-resnet18-20261126-120000

Patient-grouped, class-stratified K-fold over the cache's train + valid images (train/folds.py); the test split is
never trained or validated on. No rebuild: each fold's loaders take a subset of the cache's rows. Each fold is a
normal run folder (`fold-0`, `fold-1`, ...) inside `<--out>/cv-<model>-<timestamp>/`, usable by train.evaluate,
train.predict and train.compare. `cv_summary.json` holds per fold its patients and figures, their mean and standard
deviation (sample, ddof=1), and `ensemble`: the test figures of the K models' averaged probabilities. An interrupted
CV continues with --resume at the fold where it stopped (a fold in the middle of training resumes from its last.pt).
The last line printed is the CV folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from models import ModelError
from pipeline.store import CacheError, CacheReader, write_json_atomic
from train import checkpoint as ckpt
from train import run as run_cli
from train.distributed import broadcast_object, setup, teardown
from train.evaluate import read_run_config
from train.folds import FoldError, fold_rows, make_folds, read_cv_meta
from train.metrics import classification_report
from train.trainer import TrainingDiverged

log = logging.getLogger(__name__)
PLAN = "cv.json"  # written first: the folds and the arguments, so --resume needs nothing else
SUMMARY = "cv_summary.json"
FOLD_FIGURES = ("best_valid_acc", "valid_f1_weighted", "test_acc", "test_f1_weighted")
# may be given with --resume (they change nothing that is trained)
RESUME_MAY_CHANGE = ("resume", "progress", "no_progress")


def _parser() -> argparse.ArgumentParser:
    p = run_cli._parser()  # every train.run option means the same here
    p.prog, p.description, p.epilog = "python -m train.cv", __doc__.splitlines()[0], __doc__
    p.add_argument("--folds", help="K (2 or more) for patient-grouped stratified folds, or kaggle for the Kaggle "
                                   "layout's fold_N folders (required unless --resume)")
    for action in p._actions:
        if action.dest == "resume":  # the same flag, another folder
            action.metavar, action.help = "CV_DIR", "continue an interrupted cross-validation where it stopped"
        elif action.dest == "stop_after":  # one run's flag: a CV is stopped by interrupting it
            action.help = argparse.SUPPRESS
    return p


def _given_flags(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def plan_cv(args, argv: list[str]) -> tuple[dict, run_cli.TrainConfig]:
    """A new CV's plan (folds and arguments) and the configuration every fold shares."""
    if args.folds is None:
        raise run_cli.RunError("give --folds K (e.g. 3) or --folds kaggle, or --resume CV_DIR")
    args.folds = args.folds.strip().lower()
    if args.folds != "kaggle" and not args.folds.isdigit():
        raise run_cli.RunError(f"--folds must be a number of folds (2 or more) or kaggle, got {args.folds!r}")
    if args.stop_after is not None:
        raise run_cli.RunError("--stop-after stops one run; a cross-validation is stopped by interrupting it and "
                               "continued with --resume CV_DIR")
    config, full_recipe = run_cli.resolve_config(args)
    if full_recipe and config.device == "cpu" and not args.force:
        run_cli.check_cpu_recipe(config)
    reader = CacheReader(config.cache_dir)
    folds = make_folds(reader, config.stages[0].size, args.folds, args.seed)
    plan = {"model": config.model, "argv": argv, "cache_dir": config.cache_dir, "cache_key": config.cache_key,
            "folds": folds}
    return plan, config


def run_fold(plan: dict, config, index: int, cv_dir: Path, dist, args) -> dict | None:
    """Train and evaluate fold `index`, continuing it if it was interrupted; its summary (None if stopped)."""
    run_dir = cv_dir / f"fold-{index}"
    summary_path = run_dir / "summary.json"
    done = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if done is not None and done.get("status") == "complete":
        log.info("fold %d of %d: done before, kept (%s)", index + 1, len(plan["folds"]), run_dir)
        return done
    fold_args = argparse.Namespace(**vars(args))
    if (run_dir / "last.pt").is_file():
        fold_args.resume = run_dir
        fold_config = read_run_config(run_dir)
        log.info("fold %d of %d: continuing %s", index + 1, len(plan["folds"]), run_dir)
    else:
        if dist.is_main and run_dir.exists():  # stopped before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
        if dist.is_main:
            run_dir.mkdir()
        fold_args.resume = None
        fold_config = dataclasses.replace(config, fold=plan["folds"][index])
        log.info("fold %d of %d: validating on %s", index + 1, len(plan["folds"]),
                 ", ".join(plan["folds"][index]["valid_groups"]))
    if dist.enabled:
        torch.distributed.barrier()  # the folder exists before any rank uses it
    return run_cli.train_and_evaluate(fold_config, run_dir, dist, fold_args)


def _patients(meta: dict, rows: np.ndarray) -> list[str]:
    return sorted(set(meta["patients"][rows].tolist()))


def _mean_std(values: list) -> dict:
    known = [v for v in values if v is not None]
    if not known:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(known)), "std": float(np.std(known, ddof=1)) if len(known) > 1 else 0.0}


def ensemble(cv_dir: Path, plan: dict, reader: CacheReader, size: int) -> dict | None:
    """Test figures of the folds' models together: the mean of their `all` probabilities per test image."""
    if "test" not in reader.splits:
        return None
    test = reader.read_meta(size, "test")
    labels = pd.Series(test["labels"], index=test["paths"])
    frames = [pd.read_csv(cv_dir / f"fold-{i}" / "predictions_test.csv", usecols=["path", "prob_all"])
              .set_index("path")["prob_all"] for i in range(len(plan["folds"]))]
    mean_prob = pd.concat(frames, axis=1).mean(axis=1).reindex(labels.index)
    if (labels < 0).any():
        return {"models": len(frames), "test_acc": None, "test_f1_weighted": None, "note": "test split unlabelled"}
    report = classification_report(labels.to_numpy(), (mean_prob.to_numpy() >= 0.5).astype(np.int64))
    return {"models": len(frames), "test_acc": report["accuracy"], "test_f1_weighted": report["f1_weighted"],
            "test_images": int(len(labels))}


def summarise(cv_dir: Path, plan: dict, summaries: list[dict]) -> dict:
    reader = CacheReader(plan["cache_dir"])
    config = read_run_config(cv_dir / "fold-0")
    size = config.stages[-1].size
    meta = read_cv_meta(reader, size)
    folds = []
    for index, (record, summary) in enumerate(zip(plan["folds"], summaries)):
        train_rows, valid_rows = fold_rows(reader, size, record, meta)
        valid = summary["splits"].get("valid") or {}
        folds.append({"fold": index, "run_dir": f"fold-{index}", "valid_groups": record["valid_groups"],
                      "train_patients": _patients(meta, train_rows), "valid_patients": _patients(meta, valid_rows),
                      "train_images": int(len(train_rows)), "valid_images": int(len(valid_rows)),
                      "best_valid_acc": summary.get("best_valid_acc"), "valid_f1_weighted": valid.get("f1_weighted"),
                      "test_acc": summary.get("test_acc"), "test_f1_weighted": summary.get("test_f1_weighted"),
                      "seconds_per_epoch": summary.get("seconds_per_epoch")})
    return {"status": "complete", "model": plan["model"], "scheme": plan["folds"][0]["scheme"],
            "k": len(plan["folds"]), "cache_dir": plan["cache_dir"], "cache_key": plan["cache_key"],
            "argv": plan["argv"], "folds": folds,
            **{name: _mean_std([f[name] for f in folds]) for name in FOLD_FIGURES},
            "seconds_per_epoch": _mean_std([f["seconds_per_epoch"] for f in folds]),
            "ensemble": ensemble(cv_dir, plan, reader, size)}


def _fmt(stat: dict) -> str:
    return "n/a" if stat["mean"] is None else f"{stat['mean']:.4f} +- {stat['std']:.4f}"


def table(summary: dict) -> str:
    lines = ["| fold | valid patients | best valid acc | valid F1 (weighted) | test acc | test F1 (weighted) |",
             "|---|---|---|---|---|---|"]
    for f in summary["folds"]:
        cells = [f"{f[k]:.4f}" if f[k] is not None else "n/a" for k in FOLD_FIGURES]
        lines.append(f"| {f['fold']} | {', '.join(f['valid_patients'])} | " + " | ".join(cells) + " |")
    lines.append("| mean +- std | | " + " | ".join(_fmt(summary[k]) for k in FOLD_FIGURES) + " |")
    ens = summary["ensemble"]
    if ens and ens.get("test_acc") is not None:
        lines.append(f"\nensemble of the {ens['models']} fold models on the test split: acc {ens['test_acc']:.4f}, "
                     f"F1 (weighted) {ens['test_f1_weighted']:.4f}")
    return "\n".join(lines)


def _resume_plan(args, argv: list[str]) -> tuple[dict, argparse.Namespace]:
    cv_dir = Path(args.resume)
    if not (cv_dir / PLAN).is_file():
        raise run_cli.RunError(f"{cv_dir}: no {PLAN}; is it a folder made by python -m train.cv?")
    plan = json.loads((cv_dir / PLAN).read_text())
    extra = [flag for flag in _given_flags(argv) if flag.lstrip("-").replace("-", "_") not in RESUME_MAY_CHANGE]
    if args.model != plan["model"]:
        extra.insert(0, f"model {args.model} (the CV trains {plan['model']})")
    if extra:
        raise run_cli.RunError(f"--resume continues {cv_dir} with its saved settings ({' '.join(plan['argv'])}); "
                               f"drop {', '.join(extra)}")
    saved = _parser().parse_args(plan["argv"])
    saved.progress = args.progress
    return plan, saved


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    dist, cv_dir = None, None
    try:
        if args.resume:
            cv_dir = Path(args.resume)
            plan, args = _resume_plan(args, argv)
            args.cache = Path(plan["cache_dir"])  # the planned cache, not whichever is newest now
            config, _ = run_cli.resolve_config(args)
            if config.cache_key != plan["cache_key"]:
                raise ckpt.CheckpointError(f"{cv_dir} was planned on cache {plan['cache_key']} at "
                                           f"{plan['cache_dir']}, which now holds {config.cache_key}; rebuild that "
                                           f"cache or start a new cross-validation")
        else:
            plan, config = plan_cv(args, argv)
        dist = setup(torch.device(config.device).type)
        if cv_dir is None:
            # cv-<model>-<timestamp>, made as a run folder is: never an existing one
            cv_dir = Path(broadcast_object(run_cli.new_run_dir(args.out, f"cv-{plan['model']}") if dist.is_main
                                           else None, dist))
            if dist.is_main:
                write_json_atomic(cv_dir / PLAN, plan)
        summaries = []
        for index in range(len(plan["folds"])):
            summary = run_fold(plan, config, index, cv_dir, dist, args)
            if summary is None:
                return 0  # a fold stopped early; --resume continues it
            summaries.append(summary)
        result = summarise(cv_dir, plan, summaries) if dist.is_main else None
        if dist.is_main:
            write_json_atomic(cv_dir / SUMMARY, result)
    except (run_cli.RunError, ModelError, CacheError, ckpt.CheckpointError, FoldError, ValueError,
            FileNotFoundError, TrainingDiverged) as err:
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
