"""A run's evaluation: metrics, confusion matrices, curves, predictions, per-patient tables and summary.json of one
checkpoint (best.pt by default, loaded weights_only) at the size it was trained at. `train.evaluate` calls it, and so
does the end of every training run."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import torch

from models import build_model
from pipeline.store import MANIFEST, CacheReader
from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.augment import GpuAugment
from train.engine.config import TrainConfig
from train.engine.distributed import Dist
from train.engine.loop import Precision, predict_split
from train.engine.run_folder import read_run_config
from train.data.loader import loader_for
from train.evaluation.metrics import classification_report, patient_summary, patient_table
from train.evaluation.mistakes import write_mistakes
from train.evaluation.report import plot_confusion, plot_curves, write_predictions, write_table
from train.evaluation.tta import DihedralTTA

log = logging.getLogger(__name__)


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
                 batch_size: int | None = None, checkpoint: str = rf.BEST, tta: bool = False,
                 strict: bool = False) -> dict:
    """Evaluate `checkpoint` of a run on `splits`; rank 0 writes the reports. Returns the summary.

    A split the cache does not have is skipped (a cache may have no test split), or with `strict` (splits the user
    named) refused before anything is written. With `tta` each split is also evaluated on the mean softmax over the
    8 dihedral views of the centre crop; the summary keeps both (`splits` plain, `tta` beside it)."""
    run_dir = Path(run_dir)
    folder = rf.RunFolder(run_dir)
    config = read_run_config(run_dir)
    state = ckpt.load(folder.checkpoint(checkpoint))
    ckpt.check_compatible(state, config.model, config.cache_key, folder.checkpoint(checkpoint))
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
    if "all" not in class_names:
        raise ValueError(f"the run's cache {config.cache_dir} names its classes {', '.join(class_names)}, none of "
                         f"them `all`; the reports give the probability of `all`: use a C-NMC cache")
    all_index = class_names.index("all")  # the model's output column of `all`, as the predictor finds it
    results, tta_results, patients = {}, {}, {}
    for split in splits:
        if split not in reader.manifest["splits"]:
            log.info("no %s split in the cache; skipped", split)
            continue
        loader = loader_for(reader, stage.size, split, batch_size or stage.batch_size, config.fold, device=dev,
                            rank=dist.rank, world_size=dist.world_size)
        probs, labels = predict_split(model, loader, augment, precision, dev, dist)
        labelled = bool(len(labels)) and bool((labels >= 0).all())
        report = classification_report(labels, probs.argmax(1), class_names) if labelled else None
        results[split] = report
        tta_probs = None
        if tta:
            tta_probs, _ = predict_split(DihedralTTA(model), loader, augment, precision, dev, dist)
            tta_results[split] = classification_report(labels, tta_probs.argmax(1), class_names) \
                if labelled else None
        table = patient_table(loader.patients, probs[:, all_index], labels if labelled else None)
        patients[split] = patient_summary(table)
        if not dist.is_main:
            continue
        write_predictions(loader.paths, probs[:, all_index], folder.predictions(split), patients=loader.patients,
                          probs_all_tta=None if tta_probs is None else tta_probs[:, all_index])
        write_table(table, folder.patients(split))
        if report is not None:
            plot_confusion(report["confusion"], f"{config.model} - {split} ({len(labels)} images, acc "
                           f"{report['accuracy']:.4f})", folder.confusion(split))
            write_mistakes(loader, probs[:, all_index], labels, folder.mistakes(split),
                           f"{config.model} {checkpoint} (epoch {state['epoch'] + 1}, {stage.size} px), {split}")
    summary = {}
    if dist.is_main:
        previous = rf.read_summary(run_dir)
        # evaluating one split keeps the others' figures for the same checkpoint
        if previous and (previous.get("checkpoint"), previous.get("checkpoint_epoch")) == (checkpoint,
                                                                                             state["epoch"] + 1):
            results = {**(previous.get("splits") or {}), **results}
            patients = {**(previous.get("patients") or {}), **patients}
            tta_results = {**(previous.get("tta") or {}).get("splits", {}), **tta_results}
        metrics = rf.read_metrics(run_dir)
        summary = _summary(metrics, config, state, results, checkpoint, patients, tta_results)
        rf.write_summary(run_dir, summary)
        if len(metrics):
            plot_curves(metrics, f"{config.model}: accuracy and loss per epoch", folder.curves)
    return summary


def _summary(metrics: pd.DataFrame, config: TrainConfig, state: dict, results: dict, checkpoint: str,
             patients: dict, tta_results: dict) -> dict:
    valid, test = results.get("valid"), results.get("test")
    finished = len(metrics) >= config.total_epochs
    return rf.summary_record(
        # unfinished: evaluated before the run's last epoch (a stopped run); train.compare leaves it out
        rf.COMPLETE if finished else rf.UNFINISHED, config.model, epochs_done=int(len(metrics)),
        checkpoint=checkpoint,
        checkpoint_epoch=state["epoch"] + 1,
        checkpoint_size=config.stages[state["stage"]].size,
        best_valid_acc=valid["accuracy"] if valid else None,
        test_acc=test["accuracy"] if test else None,
        test_f1_weighted=test["f1_weighted"] if test else None,
        epochs=int(len(metrics)),
        train_seconds=round(float(metrics["epoch_s"].sum()), 3) if len(metrics) else 0.0,
        seconds_per_epoch=round(float(metrics["epoch_s"].mean()), 3) if len(metrics) else None,
        max_valid_acc_any_stage=_nan_to_none(float(metrics["valid_acc"].max())) if len(metrics) else None,
        splits=results,
        # per split: patients, mean / worst / best per-patient accuracy, accuracy of the majority call per patient
        patients=patients,
        # the same figures for the mean softmax over the 8 dihedral views (train.evaluate --tta), beside the plain
        # ones; None when TTA was not run for this checkpoint
        tta=_tta_summary(tta_results) if tta_results else None,
    )


def _tta_summary(results: dict) -> dict:
    valid, test = results.get("valid"), results.get("test")
    return {"valid_acc": valid["accuracy"] if valid else None, "test_acc": test["accuracy"] if test else None,
            "test_f1_weighted": test["f1_weighted"] if test else None, "splits": results}
