"""The GPU check's `consistency` part: the training and evaluation commands on the device against the same commands
on the CPU with the same seed, on the demo cache (`pipeline.build --demo`), each in a subprocess as a user runs it.

Rows, each with both figures, their difference, the tolerance and whether it passed:
- `train.run --recipe modern` with `--opt sgd` (fused Nesterov SGD on CUDA) and `--opt adamw` (fused AdamW), with
  the recipe's EMA and cosine after a one-epoch warmup, one short stage: the epoch-1 train loss;
- `train.cv --folds 2`, the same recipe: each fold's epoch-1 train loss (the largest difference counts), and
  cv_summary.json's folds and ensemble;
- `train.evaluate --tta` of the device's first run, on the device and on the CPU (a copy of the run folder: an
  evaluation writes its reports into the folder): prob_all and prob_all_tta of the valid and test images;
- `train.predict --tta` of the same checkpoint on the demo source's images: prob_all.

The tolerances: the device trains and predicts under AMP (bf16 autocast, fp16 where bf16 is missing) with the
torch augmentation backend, the CPU in float32 with the OpenCV backend - the same seed, so the same initial weights,
batches and augmentation parameters, but bf16 keeps 8 bits of mantissa (a relative error of ~0.4% per value) and
the two backends interpolate differently in the last bit. The epoch-1 train loss is measured while the warmup's lr
is still small, so it depends mostly on the initial weights and the data: 5% relative is far above AMP's error and
far below what another batch order or another initialisation gives. A probability's error under bf16 is of the
order of p(1-p) times the logit's error; 2e-2 absolute leaves room for logits of a few units and eval-mode
BatchNorm on bf16 activations. A difference beyond either means something else differs (weights, data order,
preprocessing): the row fails with its figures kept, and the part goes on with the next row.

On a CPU device each command runs once and is compared with itself (difference 0): that checks the wiring only.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.demo import DEMO_FOLDER
from train.bench.record import CommandFailed, attempt, run_command
from train.engine import run_folder as rf

TRAIN_LOSS_RTOL = 0.05  # relative, the epoch-1 train loss
PROB_ATOL = 2e-2  # absolute, a probability of the same checkpoint
SEED = 0
SPLITS = ("valid", "test")


def _python(module: str, *args) -> list[str]:
    return [sys.executable, "-m", module, *map(str, args)]


def _command(what: str, cmd: list[str], timeout_s: float) -> tuple[Path, float]:
    """(the last line printed, a path for every command here; wall seconds) of `cmd`, or CommandFailed."""
    proc, wall_s = run_command(cmd, timeout_s)
    if proc.returncode != 0:
        raise CommandFailed(what, proc)
    return Path(proc.stdout.strip().splitlines()[-1]), wall_s


def compare(device_values, cpu_values, tolerance: float, relative: bool) -> dict:
    """The largest difference between two equally long sets of figures (relative to the CPU's, or absolute), and
    whether it is within `tolerance`; a failing comparison carries an `error`, so its part is marked failed."""
    a, b = np.atleast_1d(np.asarray(device_values, np.float64)), np.atleast_1d(np.asarray(cpu_values, np.float64))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"{a.size} figures on the device against {b.size} on the CPU: nothing to compare one to one")
    gap = np.abs(a - b) / np.maximum(np.abs(b), 1e-12) if relative else np.abs(a - b)
    difference = float(gap.max())
    if not np.isfinite(difference):
        difference = float("inf")  # a NaN figure never passes
    passed = difference <= tolerance
    row = {"difference": difference, "tolerance": tolerance, "relative": relative, "values": int(a.size),
           "passed": passed}
    if not passed:
        row["error"] = (f"difference {difference:.3g} exceeds the tolerance {tolerance:g}"
                        f"{' (relative)' if relative else ''}")
    return row


def _epoch1_loss(run_dir: Path) -> float:
    metrics = rf.read_metrics(run_dir)
    if metrics.empty:
        raise ValueError(f"{rf.RunFolder(run_dir).metrics} has no epoch")
    return float(metrics["train_loss"].iloc[0])


def _probabilities(files: dict[str, Path], columns: tuple[str, ...]) -> pd.DataFrame:
    """The rows of prediction CSVs ({split or name: file}; path plus `columns`) as one table indexed by (split,
    path), so that the device's and the CPU's rows are compared image by image."""
    if not files:
        raise ValueError("no predictions file to compare")
    tables = [pd.read_csv(f, usecols=["path", *columns]).assign(split=split) for split, f in files.items()]
    return pd.concat(tables).set_index(["split", "path"]).sort_index()


def _compare_tables(device: pd.DataFrame, cpu: pd.DataFrame, column: str) -> dict:
    if not device.index.equals(cpu.index):
        raise ValueError(f"the device's and the CPU's predictions name different images "
                         f"({len(device)} and {len(cpu)} rows)")
    return compare(device[column].to_numpy(), cpu[column].to_numpy(), PROB_ATOL, relative=False)


class _Runs:
    """The commands of the part on one device, their run folders kept for the rows that read them."""

    def __init__(self, plan, cache: Path, work: Path):
        self.plan, self.cache, self.work = plan, cache, work

    def train(self, device: str, opt: str) -> tuple[Path, float]:
        p = self.plan
        return _command(f"train.run on {device}", _python(
            "train.run", "resnet18", "--cache-root", self.cache, "--stages", p.consistency_stage, "--batch-size",
            p.consistency_batch_size, "--recipe", "modern", "--opt", opt, "--seed", SEED, "--device", device,
            "--out", self.work / f"runs-{opt}-{device}", "--no-progress"), p.consistency_timeout_s)

    def cv(self, device: str) -> tuple[Path, float]:
        p = self.plan
        return _command(f"train.cv on {device}", _python(
            "train.cv", "resnet18", "--folds", p.consistency_folds, "--cache-root", self.cache, "--stages",
            p.consistency_stage, "--batch-size", p.consistency_batch_size, "--recipe", "modern", "--seed", SEED,
            "--device", device, "--out", self.work / f"cv-{device}", "--no-progress"), p.consistency_timeout_s)

    def evaluate(self, run_dir: Path, device: str) -> float:
        return _command(f"train.evaluate --tta on {device}", _python(
            "train.evaluate", run_dir, "--tta", "--device", device), self.plan.consistency_timeout_s)[1]

    def predict(self, run_dir: Path, device: str) -> tuple[Path, float]:
        out = self.work / f"predictions-{device}.csv"
        return _command(f"train.predict --tta on {device}", _python(
            "train.predict", run_dir, self.cache / DEMO_FOLDER, "--tta", "--device", device, "--out", out,
            "--no-progress"), self.plan.consistency_timeout_s)


def _train_row(runs: _Runs, device: str, opt: str, same: bool, device_runs: dict) -> dict:
    run_dir, device_s = runs.train(device, opt)
    device_runs[opt] = run_dir
    cpu_dir, cpu_s = (run_dir, None) if same else runs.train("cpu", opt)
    a, b = _epoch1_loss(run_dir), _epoch1_loss(cpu_dir)
    return {"device_value": a, "cpu_value": b, "device_s": device_s, "cpu_s": cpu_s,
            "augment_ahead": rf.read_run_config(run_dir).augment_ahead,
            **compare(a, b, TRAIN_LOSS_RTOL, relative=True)}


def _cv_row(runs: _Runs, device: str, same: bool) -> dict:
    cv_dir, device_s = runs.cv(device)
    cpu_dir, cpu_s = (cv_dir, None) if same else runs.cv("cpu")
    folds = range(runs.plan.consistency_folds)
    summary = json.loads((cv_dir / rf.CV_SUMMARY).read_text())
    if len(summary["folds"]) != len(folds) or not summary.get("ensemble"):
        raise ValueError(f"{cv_dir / rf.CV_SUMMARY} has {len(summary['folds'])} folds (asked for {len(folds)}) "
                         f"and {'an' if summary.get('ensemble') else 'no'} ensemble")
    a = [_epoch1_loss(rf.fold_dir(cv_dir, i)) for i in folds]
    b = [_epoch1_loss(rf.fold_dir(cpu_dir, i)) for i in folds]
    return {"device_value": a, "cpu_value": b, "device_s": device_s, "cpu_s": cpu_s,
            **compare(a, b, TRAIN_LOSS_RTOL, relative=True)}


def check_consistency(plan, device: torch.device, work: Path) -> dict:
    size = plan.consistency_stage.split(":")[0]
    cache = work / "demo-cache"  # the demo part's, when it ran: the build finds its size there and does nothing
    _command("pipeline.build --demo", _python("pipeline.build", "--demo", "--sizes", size, "--cache-dir", cache,
                                              "--no-progress"), plan.consistency_timeout_s)
    runs, dev, same = _Runs(plan, cache, work), str(device), device.type == "cpu"
    device_runs: dict[str, Path] = {}
    rows = []
    for opt in plan.consistency_opts:
        row = {"check": f"train.run --recipe modern --opt {opt}", "figure": "epoch-1 train loss"}
        rows.append(attempt(row, lambda: _train_row(runs, dev, opt, same, device_runs), device))
    row = {"check": f"train.cv --folds {plan.consistency_folds} --recipe modern",
           "figure": "epoch-1 train loss per fold"}
    rows.append(attempt(row, lambda: _cv_row(runs, dev, same), device))

    first = plan.consistency_opts[0]
    evaluated: dict[str, pd.DataFrame] = {}

    def evaluate() -> dict:
        run_dir = device_runs.get(first)
        if run_dir is None:
            raise RuntimeError(f"no device run to evaluate (the train.run --opt {first} row failed)")
        cpu_dir = run_dir
        if not same:  # the copy first: the device's evaluation rewrites the run folder's reports
            cpu_dir = work / "evaluate-cpu" / run_dir.name
            shutil.copytree(run_dir, cpu_dir)
        device_s = runs.evaluate(run_dir, dev)
        cpu_s = None if same else runs.evaluate(cpu_dir, "cpu")
        for where, folder in (("device", run_dir), ("cpu", cpu_dir)):
            files = {s: rf.RunFolder(folder).predictions(s) for s in SPLITS}
            evaluated[where] = _probabilities({s: f for s, f in files.items() if f.is_file()},
                                              ("prob_all", "prob_all_tta"))
        return {"device_s": device_s, "cpu_s": cpu_s,
                **_compare_tables(evaluated["device"], evaluated["cpu"], "prob_all")}

    rows.append(attempt({"check": "train.evaluate --tta", "figure": "prob_all (valid, test)"}, evaluate, device))

    def evaluate_tta() -> dict:
        if not evaluated:
            raise RuntimeError("no evaluation to compare (the train.evaluate row failed)")
        return _compare_tables(evaluated["device"], evaluated["cpu"], "prob_all_tta")

    rows.append(attempt({"check": "train.evaluate --tta", "figure": "prob_all_tta, 8 views (valid, test)"},
                        evaluate_tta, device))

    def predict() -> dict:
        run_dir = device_runs.get(first)
        if run_dir is None:
            raise RuntimeError(f"no device run to predict with (the train.run --opt {first} row failed)")
        device_csv, device_s = runs.predict(run_dir, dev)
        cpu_csv, cpu_s = (device_csv, None) if same else runs.predict(run_dir, "cpu")
        return {"device_s": device_s, "cpu_s": cpu_s, **_compare_tables(
            _probabilities({"predict": device_csv}, ("prob_all",)), _probabilities({"predict": cpu_csv}, ("prob_all",)),
            "prob_all")}

    rows.append(attempt({"check": "train.predict --tta", "figure": "prob_all (demo source images)"}, predict,
                        device))
    return {"cache": str(cache), "stage": plan.consistency_stage, "batch_size": plan.consistency_batch_size,
            "seed": SEED, "counterpart": "itself (the device is the CPU)" if same else "cpu", "rows": rows}
