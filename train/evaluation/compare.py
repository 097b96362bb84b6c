"""Runs side by side, as the report compared its models: a markdown table (model, best valid acc, test acc, test F1,
seconds per epoch) and the valid-accuracy curves in one figure (`python -m train.compare`).

A cross-validation folder (train.cv, with cv_summary.json) is one row of mean +- standard deviation over its folds,
and one curve: the folds' mean valid accuracy per epoch."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pandas as pd

from train.augment.figure_file import check_out, write_figure
from train.engine import run_folder as rf
from train.evaluation.report import plot_compare


def _fmt(value, digits=4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _pm(stat: dict, digits=4) -> str:
    if stat is None or stat.get("mean") is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f} +- {stat['std']:.{digits}f}"


def _label(model: str, run_dir: Path) -> str:
    """`model` with its --recipe, which is what a comparison of recipes must tell apart."""
    return f"{model} ({rf.read_run_config(run_dir).recipe})"


def _cv_summary(cv_dir: Path) -> dict:
    path = cv_dir / rf.CV_SUMMARY
    try:
        summary = json.loads(path.read_text())
        for key in ("model", "k", "folds", "best_valid_acc", "test_acc", "test_f1_weighted", "seconds_per_epoch"):
            summary[key]
        summary["folds"][0]["run_dir"]
    except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
        raise rf.RunFolderError(f"{path}: not a cross-validation summary ({type(err).__name__}: {err}); the file was "
                                f"edited or damaged: continue the cross-validation (python -m train.cv MODEL --resume "
                                f"{cv_dir}) after deleting it, which writes it again") from None
    return summary


def _cv_row(cv_dir: Path) -> tuple[str, tuple[str, pd.DataFrame]]:
    summary = _cv_summary(cv_dir)
    metrics = pd.concat([rf.read_metrics(cv_dir / f["run_dir"]) for f in summary["folds"]])
    mean_curve = metrics.groupby("epoch", as_index=False)["valid_acc"].mean()
    scheme = " (Kaggle folds)" if summary.get("scheme") == "kaggle" else ""
    name = f"{_label(summary['model'], cv_dir / summary['folds'][0]['run_dir'])} {summary['k']}-fold CV{scheme}"
    row = (f"| {name} | {cv_dir.name} | {_pm(summary['best_valid_acc'])} | {_pm(summary['test_acc'])} | "
           f"{_pm(summary['test_f1_weighted'])} | {_pm(summary['seconds_per_epoch'], 2)} |")
    return row, (f"{name} ({cv_dir.name}), mean of folds", mean_curve)


def _no_curve(run: Path, metrics: pd.DataFrame) -> bool:
    """Whether a finished run has no epoch to draw (its metrics.csv emptied or cut); said, not silently left out."""
    if len(metrics) and {"epoch", "valid_acc"} <= set(metrics.columns):
        return False
    print(f"note: {run}: {rf.METRICS} holds no epochs (the file was emptied or damaged); its row is in the table, but "
          f"the figure has no curve for it", file=sys.stderr)
    return True


def _given_twice(run_dirs: list[Path]) -> None:
    seen: dict[Path, int] = {}
    for run in run_dirs:
        key = Path(run).resolve()
        seen[key] = seen.get(key, 0) + 1
    for path, count in seen.items():
        if count > 1:
            print(f"note: {path} is given {count} times; each is a row of the table (the same run)", file=sys.stderr)


def compare(run_dirs: list[Path], out: Path, overwrite: bool = False) -> str:
    """The runs' table (returned) and their valid-accuracy curves (written to `out`, a new file unless `overwrite`:
    train.augment.figure_file's rule, checked before any run is read)."""
    check_out(out, overwrite)
    _given_twice(run_dirs)
    rows, curves = [], []
    for run in run_dirs:
        run = Path(run)
        if not run.is_dir():
            raise FileNotFoundError(f"{run}: {'not a folder' if os.path.lexists(run) else 'no such folder'}; pass "
                                    f"run folders (train.run) or cross-validation folders (train.cv)")
        if rf.reports_owner(run) is not None:  # train.evaluate's eval-<stem>/: its summary is not a run's
            raise FileNotFoundError(rf.reports_owner_hint(run, checkpoint_flag=False))
        if (run / rf.CV_SUMMARY).is_file():
            row, curve = _cv_row(run)
            rows.append(row)
            if not _no_curve(run, curve[1]):
                curves.append(curve)
            continue
        if rf.is_cv_folder(run):
            print(f"skipped {run}: the cross-validation has not finished (continue it with python -m train.cv "
                  f"MODEL --resume {run})", file=sys.stderr)
            continue
        folder = rf.RunFolder(run)
        summary = rf.read_summary(run)
        if summary is None:
            if not folder.config.is_file():
                raise FileNotFoundError(f"{run}: neither a run folder (train.run) nor a cross-validation folder "
                                        f"(train.cv)")
            print(f"skipped {run}: the run has not finished (no {rf.SUMMARY}); continue it with python -m "
                  f"train.run MODEL --resume {run}", file=sys.stderr)
            continue
        status = summary["status"]
        if status == rf.UNFINISHED:  # evaluated before its last epoch: not a result of its recipe
            print(f"skipped {run}: evaluated after {summary.get('epochs')} epochs, before the run finished; "
                  f"continue it with python -m train.run MODEL --resume {run}", file=sys.stderr)
            continue
        if status != rf.COMPLETE:  # a failed run holds no result to compare
            print(f"skipped {run}: the run {status} ({summary.get('error') or 'no reason recorded'})",
                  file=sys.stderr)
            continue
        if not folder.metrics.is_file():
            raise FileNotFoundError(f"{run}: no {rf.METRICS} beside its {rf.SUMMARY}")
        metrics = rf.read_metrics(run)
        label = _label(summary["model"], run)
        if not _no_curve(run, metrics):
            curves.append((f"{label} {run.name}", metrics))
        rows.append(f"| {label} | {run.name} | {_fmt(summary.get('best_valid_acc'))} | "
                    f"{_fmt(summary.get('test_acc'))} | {_fmt(summary.get('test_f1_weighted'))} | "
                    f"{_fmt(summary.get('seconds_per_epoch'), 2)} |")
    if not rows:
        raise FileNotFoundError("none of the runs finished with a result to compare")
    write_figure(out, lambda path: plot_compare(curves, path), overwrite)
    header = ["| model | run | best valid acc | test acc | test F1 (weighted) | s/epoch |",
              "|---|---|---|---|---|---|"]
    return "\n".join(header + rows)
