"""A run's evaluation: metrics, confusion matrices, curves, predictions, per-patient tables and summary.json of one
checkpoint (best.pt by default, loaded weights_only) at the size it was trained at. `train.evaluate` calls it, and so
does the end of every training run."""
from __future__ import annotations

import logging
import math
import os
from functools import partial
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from pipeline.manifest import rebuild_command
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
from train.evaluation.run_checkpoint import load_run_checkpoint
from train.evaluation.tta import DihedralTTA

log = logging.getLogger(__name__)

DEFAULT_SPLITS = ("valid", "test")


def open_run_cache(config: TrainConfig, run_dir: Path, size: int | None = None) -> CacheReader:
    """The run's cache, refusing one whose key is no longer the key the run was trained on, or (`size`) one rebuilt
    without the size the checkpoint was trained at."""
    reader = CacheReader(config.cache_dir) if (Path(config.cache_dir) / MANIFEST).is_file() else None
    key = reader.manifest["key"] if reader else None
    if key != config.cache_key:
        raise ckpt.CheckpointError(f"{run_dir} was trained on cache {config.cache_key} at {config.cache_dir}, which "
                                   f"now holds {key or 'no complete cache'}; rebuild that cache to use the run")
    if size is not None and str(size) not in reader.manifest["sizes"]:
        have = sorted(int(s) for s in reader.manifest["sizes"])
        raise ckpt.CheckpointError(
            f"the run's cache {config.cache_dir} holds {', '.join(f'{s} px' for s in have)}, not {size} px, the size "
            f"the checkpoint was trained at (it was rebuilt with other --sizes); add that size with "
            f"{rebuild_command(config.cache_dir, reader.manifest, [*have, size])}; nothing was evaluated or changed")
    return reader


def _nan_to_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def _previous(folder: rf.RunFolder, identity: tuple) -> tuple[dict | None, tuple[str, ...], bool]:
    """What an earlier evaluation left in `folder`: (its summary when its figures are of this very checkpoint, to
    keep; the splits it had figures of, when they are of another checkpoint or unreadable: these are evaluated again
    rather than dropped; whether those had TTA figures)."""
    try:
        summary = rf.read_summary(folder.path)
    except rf.RunFolderError as err:
        log.warning("%s; evaluating every split again to rewrite it", err)
        return None, DEFAULT_SPLITS, False
    if not summary or not summary.get("splits"):  # none, or a failed run's (no figures)
        return None, (), False
    if (summary.get("checkpoint"), summary.get("checkpoint_epoch"), summary.get("checkpoint_size")) == identity:
        return summary, (), False
    tta = (summary.get("tta") or {}).get("splits") or {}
    splits = tuple(dict.fromkeys([*summary["splits"], *tta]))
    log.info("%s holds figures of %s (epoch %s); evaluating %s again with %s (epoch %d), so that none is dropped",
             folder.summary, summary.get("checkpoint"), summary.get("checkpoint_epoch"), ", ".join(splits),
             identity[0], identity[1])
    return None, splits, bool(tta)


def _check_writable(folder: Path) -> None:
    existing = folder if folder.is_dir() else folder.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise rf.RunFolderError(f"cannot write the reports in {folder}: {existing} is not writable; copy the run "
                                f"folder somewhere writable and evaluate the copy; nothing was evaluated or changed")


def _write_reports(files: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Each report to a temporary file beside it (`name.tmp.csv`), then each renamed into place: a write that fails
    (disk full, no permission) replaces none of them, and no half-written file is left. RunFolderError naming the
    file; summary.json, written after these, is then left as it was."""
    tmps, path = [], None
    try:
        for path, write in files:
            path.parent.mkdir(exist_ok=True)
            tmps.append(path.with_name(f"{path.stem}.tmp{path.suffix}"))
            write(tmps[-1])
        for (path, _), tmp in zip(files, tmps):
            os.replace(tmp, path)
    except OSError as err:
        raise rf.RunFolderError(f"cannot write {path}: {err.strerror}; free space or make the folder writable (or "
                                f"evaluate a copy of the run folder); summary.json is unchanged") from None
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


def evaluate_run(run_dir: Path, splits=DEFAULT_SPLITS, device: str | None = None, dist: Dist = Dist(),
                 batch_size: int | None = None, checkpoint: str = rf.BEST, tta: bool = False,
                 strict: bool = False) -> dict:
    """Evaluate `checkpoint` of a run on `splits`; rank 0 writes the reports. Returns the summary.

    best.pt's reports are the run folder's own; another checkpoint's go to `rf.reports_dir` (eval-last/ for
    last.pt), and a checkpoint outside the run folder is refused, so no evaluation replaces the run's figures with
    another model's. Figures of the same checkpoint already in the summary are kept; those of another checkpoint (or
    an unreadable summary) are evaluated again with this one, never dropped.

    A split the cache does not have is skipped (a cache may have no test split), or with `strict` (splits the user
    named) refused before anything is written. With `tta` each split is also evaluated on the mean softmax over the
    8 dihedral views of the centre crop; the summary keeps both (`splits` plain, `tta` beside it)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    name, state, model = load_run_checkpoint(run_dir, checkpoint, config)
    stage = config.stages[state["stage"]]
    folder = rf.RunFolder(rf.reports_dir(run_dir, name))
    reader = open_run_cache(config, run_dir, stage.size)
    splits = tuple(dict.fromkeys(splits))  # each once, in the order given
    unknown = [split for split in splits if split not in reader.manifest["splits"]]
    if strict and unknown:
        raise ValueError(f"the run's cache {config.cache_dir} has no split {', '.join(map(repr, unknown))} (it has: "
                         f"{', '.join(sorted(reader.manifest['splits']))}); nothing was evaluated or changed")
    # every rank reads these (the run folder is shared), so that all evaluate the same splits
    identity = (name, state["epoch"] + 1, stage.size)
    previous, again, tta_again = _previous(folder, identity)
    splits = tuple(dict.fromkeys([*splits, *again]))
    tta = tta or tta_again
    metrics = rf.read_metrics(run_dir)  # before any work: a damaged metrics.csv stops it here
    _check_writable(folder.path)
    dev = torch.device(device or config.device)
    if dev.type == "cuda" and dist.enabled:
        dev = torch.device("cuda", dist.local_rank)
    precision = Precision.for_device(dev, config.amp)
    model.to(dev, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
    augment = GpuAugment.from_manifest(reader.manifest, stage.size).to(dev)
    class_names = tuple(reader.manifest.get("classes", ("hem", "all")))
    if "all" not in class_names:
        raise ValueError(f"the run's cache {config.cache_dir} names its classes {', '.join(class_names)}, none of "
                         f"them `all`; the reports give the probability of `all`: use a C-NMC cache")
    all_index = class_names.index("all")  # the model's output column of `all`, as the predictor finds it
    results, tta_results, patients, files = {}, {}, {}, []
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
        files.append((folder.predictions(split), partial(
            write_predictions, loader.paths, probs[:, all_index], patients=loader.patients,
            probs_all_tta=None if tta_probs is None else tta_probs[:, all_index])))
        files.append((folder.patients(split), partial(write_table, table)))
        if report is not None:
            title = f"{config.model} {name} - {split} ({len(labels)} images, acc {report['accuracy']:.4f})"
            files.append((folder.confusion(split), partial(plot_confusion, report["confusion"], title)))
            heading = f"{config.model} {name} (epoch {state['epoch'] + 1}, {stage.size} px), {split}"
            files.append((folder.mistakes(split), partial(write_mistakes, loader, probs[:, all_index], labels,
                                                          heading=heading)))
    summary = {}
    if dist.is_main:
        if previous:  # evaluating one split keeps the others' figures for the same checkpoint
            results = {**(previous.get("splits") or {}), **results}
            patients = {**(previous.get("patients") or {}), **patients}
            tta_results = {**(previous.get("tta") or {}).get("splits", {}), **tta_results}
        summary = _summary(metrics, config, state, results, name, patients, tta_results)
        if len(metrics) and name == rf.BEST:  # the run's curves, beside the run's own reports
            files.append((folder.curves, partial(plot_curves, metrics, f"{config.model}: accuracy and loss per "
                                                                       f"epoch")))
        _write_reports(files)
        try:
            rf.write_summary(folder.path, summary)  # last: the reports it describes are in place
        except OSError as err:
            raise rf.RunFolderError(f"cannot write {folder.summary}: {err.strerror}; free space or make the folder "
                                    f"writable") from None
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
