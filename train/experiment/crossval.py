"""Cross-validation on one cache: the plan (folds and arguments, cv.json), one normal run folder per fold trained and
evaluated as train.run does, and cv_summary.json (per-fold figures, mean and sample std, the ensemble of the fold
models on the test split). `train.cv` is its command."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.store import CacheReader
from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.evaluation.evaluator import open_run_cache
from train.experiment import session
from train.experiment.resume import restore_config, resume_point
from train.engine.config import TrainConfig
from train.data.folds import fold_rows, make_folds, read_cv_meta
from train.evaluation.metrics import classification_report

log = logging.getLogger(__name__)
PLAN = rf.CV_PLAN  # written first: the folds and the arguments, so --resume needs nothing else
SUMMARY = rf.CV_SUMMARY
FOLD_FIGURES = ("best_valid_acc", "valid_f1_weighted", "test_acc", "test_f1_weighted")


def build_parser(description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """train.cv's parser: every train.run option, meaning the same, and --folds."""
    p = session.RunParser(prog="python -m train.cv", description=description, epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    session.add_run_arguments(p, resume_metavar="CV_DIR",
                              resume_help="continue an interrupted cross-validation where it stopped",
                              stop_after=False)
    p.add_argument("--folds", help="K (2 or more) for patient-grouped stratified folds, or kaggle for the Kaggle "
                                   "layout's fold_N folders (required unless --resume)")
    return p


def _refuse_stop_after(args) -> None:
    if args.stop_after is not None:
        raise session.RunError("--stop-after stops one run; a cross-validation is stopped by interrupting it and "
                               "continued with --resume CV_DIR")


def plan_cv(args, argv: list[str]) -> tuple[dict, session.TrainConfig]:
    """A new CV's plan (folds and arguments) and the configuration every fold shares."""
    if args.folds is None:
        raise session.RunError("give --folds K (e.g. 3) or --folds kaggle, or --resume CV_DIR")
    args.folds = args.folds.strip().lower()
    if args.folds != "kaggle" and not args.folds.isdigit():
        raise session.RunError(f"--folds must be a number of folds (2 or more) or kaggle, got {args.folds!r}")
    _refuse_stop_after(args)
    config, full_recipe = session.resolve_config(args)
    if full_recipe and config.device == "cpu" and not args.force:
        session.check_cpu_recipe(config)
    reader = CacheReader(config.cache_dir)
    folds = make_folds(reader, config.stages[0].size, args.folds, args.seed)
    plan = {"model": config.model, "argv": argv, "cache_dir": config.cache_dir, "cache_key": config.cache_key,
            "folds": folds}
    return plan, config


def run_fold(plan: dict, config, index: int, cv_dir: Path, dist, progress: str = "auto", saved: bool = False,
             tensorboard: bool = False) -> dict | None:
    """Train and evaluate fold `index`, continuing it if it was interrupted; its summary (None if stopped). `saved`:
    `config` comes from a saved plan (a resumed cross-validation)."""
    run_dir = rf.fold_dir(cv_dir, index)
    done = rf.read_summary(run_dir)
    if done is not None and done["status"] == rf.COMPLETE:
        log.info("fold %d of %d: done before, kept (%s)", index + 1, len(plan["folds"]), run_dir)
        return done
    resume = rf.RunFolder(run_dir).last.is_file()
    if resume:
        # the checks of train.run --resume: last.pt loads and matches config.json, which is restored if missing
        fold_config, last, restore = resume_point(run_dir)
        reader = open_run_cache(fold_config, run_dir)
        if restore and dist.is_main:
            restore_config(run_dir, fold_config, reader.manifest, last)
        log.info("fold %d of %d: continuing %s", index + 1, len(plan["folds"]), run_dir)
    else:
        if dist.is_main and run_dir.exists():  # stopped before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
        if dist.is_main:
            run_dir.mkdir()
        fold_config = dataclasses.replace(config, fold=plan["folds"][index], saved=saved)
        log.info("fold %d of %d: validating on %s", index + 1, len(plan["folds"]),
                 ", ".join(plan["folds"][index]["valid_groups"]))
    if dist.enabled:
        torch.distributed.barrier()  # the folder exists before any rank uses it
    return session.train_and_evaluate(fold_config, run_dir, dist, resume=resume, progress=progress,
                                      tensorboard=tensorboard)


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
    frames = [pd.read_csv(rf.RunFolder(rf.fold_dir(cv_dir, i)).predictions("test"), usecols=["path", "prob_all"])
              .set_index("path")["prob_all"] for i in range(len(plan["folds"]))]
    mean_prob = pd.concat(frames, axis=1).mean(axis=1).reindex(labels.index)
    if (labels < 0).any():
        return {"models": len(frames), "test_acc": None, "test_f1_weighted": None, "note": "test split unlabelled"}
    report = classification_report(labels.to_numpy(), (mean_prob.to_numpy() >= 0.5).astype(np.int64))
    return {"models": len(frames), "test_acc": report["accuracy"], "test_f1_weighted": report["f1_weighted"],
            "test_images": int(len(labels))}


def summarise(cv_dir: Path, plan: dict, summaries: list[dict]) -> dict:
    reader = CacheReader(plan["cache_dir"])
    config = rf.read_run_config(rf.fold_dir(cv_dir, 0))
    size = config.stages[-1].size
    meta = read_cv_meta(reader, size)
    folds = []
    for index, (record, summary) in enumerate(zip(plan["folds"], summaries)):
        train_rows, valid_rows = fold_rows(reader, size, record, meta)
        valid = summary["splits"].get("valid") or {}
        folds.append({"fold": index, "run_dir": rf.fold_dir(cv_dir, index).name, "valid_groups": record["valid_groups"],
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


def _not_a_cv_folder(cv_dir: Path) -> session.RunError:
    if not cv_dir.exists():
        what = "does not exist"
    elif not cv_dir.is_dir():
        what = "is not a folder"
    elif rf.RunFolder(cv_dir).config.is_file() or rf.RunFolder(cv_dir).last.is_file():
        return session.RunError(f"{cv_dir} is a run folder (train.run), not a cross-validation folder; continue it "
                                f"with python -m train.run MODEL --resume {cv_dir}")
    else:
        what = f"has no {PLAN}"
    return session.RunError(f"{cv_dir} {what}; pass the folder that python -m train.cv printed last "
                            f"(runs/cv-<model>-<timestamp>)")


PLAN_SHAPE = {"model": str, "argv": list, "cache_dir": str, "cache_key": str, "folds": list}


def check_plan(plan, cv_dir: Path, keys=tuple(PLAN_SHAPE)) -> None:
    """RunError unless cv.json's `keys` are there, each of its kind (`folds` not empty)."""
    wrong = [key for key in keys if not isinstance(plan, dict) or not isinstance(plan.get(key), PLAN_SHAPE[key])
             or (key == "folds" and not plan[key])]
    if wrong:
        raise session.RunError(f"{cv_dir / PLAN}: not a plan of python -m train.cv ({', '.join(wrong)} missing or "
                               f"of the wrong kind); the file was edited or damaged: start a new cross-validation")


def read_plan(cv_dir: Path) -> dict:
    """cv.json, refused (RunError) when it is unreadable or not a plan of train.cv (its model and arguments;
    `open_plan` checks the rest)."""
    path = cv_dir / PLAN
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise session.RunError(f"{path}: cannot be read ({err}); the cross-validation folder is damaged: "
                               f"start a new cross-validation") from None
    check_plan(plan, cv_dir, ("model", "argv"))
    return plan


def resume_plan(args, argv: list[str]) -> tuple[dict, argparse.Namespace]:
    cv_dir = Path(args.resume)
    if not (cv_dir / PLAN).is_file():
        raise _not_a_cv_folder(cv_dir)
    plan = read_plan(cv_dir)
    if (cv_dir / SUMMARY).is_file():
        raise session.RunError(f"{cv_dir} has finished: every fold trained and evaluated ({SUMMARY}), so there is "
                               f"nothing to resume. Its figures are in {SUMMARY}; compare it with python -m "
                               f"train.compare {cv_dir}; for another cross-validation, start a new one")
    _refuse_stop_after(args)
    # every flag but those that change nothing trained (args.given: what was typed, whatever its value)
    extra = [session.flag_of(name) for name in args.given
             if name not in ("model", "resume", *session.RESUME_MAY_CHANGE)]
    if args.model != plan["model"]:
        extra.insert(0, f"model {args.model} (the CV trains {plan['model']})")
    if extra:
        raise session.RunError(f"--resume continues {cv_dir} with its saved settings ({' '.join(plan['argv'])}); "
                               f"drop {', '.join(extra)}")
    saved = build_parser().parse_args(plan["argv"])
    saved.progress = args.progress
    saved.tensorboard = args.tensorboard  # as given now: it changes nothing trained
    return plan, saved


def open_plan(args, argv: list[str]) -> tuple[dict, TrainConfig, argparse.Namespace, Path | None]:
    """(plan, the config every fold shares, the arguments in force, the CV folder or None for a new CV): a new plan
    from `args`, or with --resume the saved one, its cache checked to be the planned one."""
    if not args.resume:
        plan, config = plan_cv(args, argv)
        return plan, config, args, None
    cv_dir = Path(args.resume)
    plan, args = resume_plan(args, argv)
    check_plan(plan, cv_dir)
    args.cache = Path(plan["cache_dir"])  # the planned cache, not whichever is newest now
    config, _ = session.resolve_config(args, saved=True)  # accepted when planned: newer checks only warn
    if config.cache_key != plan["cache_key"]:
        raise ckpt.CheckpointError(f"{cv_dir} was planned on cache {plan['cache_key']} at {plan['cache_dir']}, which "
                                   f"now holds {config.cache_key}; rebuild that cache or start a new "
                                   f"cross-validation")
    return plan, config, args, cv_dir
