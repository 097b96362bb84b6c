"""A run's evaluation: metrics, confusion matrices, curves, predictions, per-patient tables and summary.json of one
checkpoint (best.pt by default, loaded weights_only) at the size it was trained at. `train.evaluate` calls it, and so
does the end of every training run."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd
import torch

from models import build_model
from pipeline.store import MANIFEST, CacheReader
from train.engine import checkpoint as ckpt
from train.augment import GpuAugment
from train.engine.config import TrainConfig
from train.engine.distributed import Dist
from train.engine.loop import Precision, predict
from train.data.loader import loader_for
from train.evaluation.metrics import classification_report, patient_summary, patient_table
from train.evaluation.report import plot_confusion, plot_curves, split_result_lines, write_predictions, write_table
from train.evaluation.tta import DihedralTTA

log = logging.getLogger(__name__)


def read_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / "config.json"
    if not path.is_file():
        if (run_dir / "cv.json").is_file():
            raise FileNotFoundError(f"{run_dir} is a cross-validation folder (train.cv); pass one of its runs, e.g. "
                                    f"{run_dir / 'fold-0'}")
        raise FileNotFoundError(f"{run_dir}: no config.json; is it a run folder made by python -m train.run?")
    return TrainConfig.from_dict(json.loads(path.read_text())["config"])


def open_run_cache(config: TrainConfig, run_dir: Path) -> CacheReader:
    """The run's cache, refusing one whose key is no longer the key the run was trained on."""
    reader = CacheReader(config.cache_dir) if (Path(config.cache_dir) / MANIFEST).is_file() else None
    key = reader.manifest["key"] if reader else None
    if key != config.cache_key:
        raise ckpt.CheckpointError(f"{run_dir} was trained on cache {config.cache_key} at {config.cache_dir}, which "
                                   f"now holds {key or 'no complete cache'}; rebuild that cache to use the run")
    return reader


def _nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate_run(run_dir: Path, splits=("valid", "test"), device: str | None = None, dist: Dist = Dist(),
                 batch_size: int | None = None, checkpoint: str = "best.pt", tta: bool = False,
                 strict: bool = False) -> dict:
    """Evaluate `checkpoint` of a run on `splits`; rank 0 writes the reports. Returns the summary.

    A split the cache does not have is skipped (a cache may have no test split), or with `strict` (splits the user
    named) refused before anything is written. With `tta` each split is also evaluated on the mean softmax over the
    8 dihedral views of the centre crop; the summary keeps both (`splits` plain, `tta` beside it)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    state = ckpt.load(run_dir / checkpoint)
    ckpt.check_compatible(state, config.model, config.cache_key, run_dir / checkpoint)
    reader = open_run_cache(config, run_dir)
    unknown = [split for split in splits if split not in reader.manifest["splits"]]
    if strict and unknown:
        raise ValueError(f"the run's cache {config.cache_dir} has no split {', '.join(map(repr, unknown))} (it has: "
                         f"{', '.join(sorted(reader.manifest['splits']))}); nothing was evaluated or changed")
    dev = torch.device(device or config.device)
    if dev.type == "cuda" and dist.enabled:
        dev = torch.device("cuda", dist.local_rank)
    stage = config.stages[state["stage"]]
    model = build_model(config.model, stem=config.stem)
    model.load_state_dict(state["model"])
    precision = Precision.for_device(dev, config.amp)
    model.to(dev, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
    augment = GpuAugment.from_manifest(reader.manifest, stage.size).to(dev)
    class_names = tuple(reader.manifest.get("classes", ("hem", "all")))
    results, tta_results, patients = {}, {}, {}
    for split in splits:
        if split not in reader.manifest["splits"]:
            log.info("no %s split in the cache; skipped", split)
            continue
        loader = loader_for(reader, stage.size, split, batch_size or stage.batch_size, config.fold, device=dev,
                            rank=dist.rank, world_size=dist.world_size)
        probs, labels = predict(model, loader, augment, precision, dev, dist)
        labelled = bool(len(labels)) and bool((labels >= 0).all())
        report = classification_report(labels, probs.argmax(1), class_names) if labelled else None
        results[split] = report
        tta_probs = None
        if tta:
            tta_probs, _ = predict(DihedralTTA(model), loader, augment, precision, dev, dist)
            tta_results[split] = classification_report(labels, tta_probs.argmax(1), class_names) \
                if labelled else None
        table = patient_table(loader.patients, probs[:, 1], labels if labelled else None)
        patients[split] = patient_summary(table)
        if not dist.is_main:
            continue
        write_predictions(loader.paths, probs[:, 1], run_dir / f"predictions_{split}.csv", patients=loader.patients,
                          probs_all_tta=None if tta_probs is None else tta_probs[:, 1])
        write_table(table, run_dir / f"patients_{split}.csv")
        if report is not None:
            plot_confusion(report["confusion"], f"{config.model} - {split} ({len(labels)} images, acc "
                           f"{report['accuracy']:.4f})", run_dir / f"confusion_{split}.png", )
    summary = {}
    if dist.is_main:
        previous_path = run_dir / "summary.json"
        if previous_path.is_file():  # evaluating one split keeps the others' figures for the same checkpoint
            previous = json.loads(previous_path.read_text())
            if (previous.get("checkpoint"), previous.get("checkpoint_epoch")) == (checkpoint, state["epoch"] + 1):
                results = {**previous.get("splits", {}), **results}
                patients = {**previous.get("patients", {}), **patients}
                tta_results = {**(previous.get("tta") or {}).get("splits", {}), **tta_results}
        summary = _summary(run_dir, config, state, results, checkpoint, patients, tta_results)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        metrics = run_dir / "metrics.csv"
        if metrics.exists() and len(pd.read_csv(metrics)):
            plot_curves(pd.read_csv(metrics), f"{config.model}: accuracy and loss per epoch", run_dir / "curves.png")
    return summary


def _summary(run_dir: Path, config: TrainConfig, state: dict, results: dict, checkpoint: str, patients: dict,
             tta_results: dict) -> dict:
    metrics_path = run_dir / "metrics.csv"
    metrics = pd.read_csv(metrics_path) if metrics_path.exists() else pd.DataFrame()
    valid, test = results.get("valid"), results.get("test")
    finished = len(metrics) >= config.total_epochs
    return {
        # "unfinished": evaluated before the run's last epoch (a stopped run); train.compare leaves it out
        "status": "complete" if finished else "unfinished",
        "model": config.model,
        "checkpoint": checkpoint,
        "checkpoint_epoch": state["epoch"] + 1,
        "checkpoint_size": config.stages[state["stage"]].size,
        "best_valid_acc": valid["accuracy"] if valid else None,
        "test_acc": test["accuracy"] if test else None,
        "test_f1_weighted": test["f1_weighted"] if test else None,
        "epochs": int(len(metrics)),
        "train_seconds": round(float(metrics["epoch_s"].sum()), 3) if len(metrics) else 0.0,
        "seconds_per_epoch": round(float(metrics["epoch_s"].mean()), 3) if len(metrics) else None,
        "max_valid_acc_any_stage": _nan_to_none(float(metrics["valid_acc"].max())) if len(metrics) else None,
        "splits": results,
        # per split: patients, mean / worst / best per-patient accuracy, accuracy of the majority call per patient
        "patients": patients,
        # the same figures for the mean softmax over the 8 dihedral views (train.evaluate --tta), beside the plain
        # ones; None when TTA was not run for this checkpoint
        "tta": _tta_summary(tta_results) if tta_results else None,
    }


def _tta_summary(results: dict) -> dict:
    valid, test = results.get("valid"), results.get("test")
    return {"valid_acc": valid["accuracy"] if valid else None, "test_acc": test["accuracy"] if test else None,
            "test_f1_weighted": test["f1_weighted"] if test else None, "splits": results}
