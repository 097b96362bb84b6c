"""New cell images through a trained run, as its cache saw them (`python -m train.predict`).

Each image goes through the build's own preprocessing with the parameters saved in the run's config.json (the cache
folder may be gone), then the evaluation's centre crop and normalisation, at the size the checkpoint was trained at;
the per-image and per-patient tables are written atomically, never over an earlier file."""
from __future__ import annotations

import argparse
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import manifest as manifest_numbers
from pipeline import parallel, sources, store
from pipeline.config import PreprocessConfig
from pipeline.progress import progress_bar
from pipeline.sources import IMAGE_SUFFIXES, UNKNOWN_LABEL, UNKNOWN_PATIENT, patient_of, printable
from train.engine import run_folder as rf
from train.evaluation import metrics
from train.augment import AugConfig, GpuAugment
from train.engine.config import TrainConfig
from train.engine.loop import Precision
from train.engine.trainer import preprocess_record
from train.evaluation.run_checkpoint import load_run_checkpoint
from train.evaluation.tta import tta_probs

log = logging.getLogger(__name__)


class PredictError(ValueError):
    """A missing or unusable run, input or output; the message names it and says what to do."""


@dataclass(frozen=True)
class Entry:
    """One image to predict."""
    file: str  # what is opened (may hold undecodable bytes as surrogates)
    path: str  # what the CSVs show: `file` as valid UTF-8 that names this file only (csv_path)
    patient: str
    label: int  # 0 hem, 1 all, -1 unknown (only a source layout gives labels)


# ----------------------------------------------------------------------------- the run


@dataclass
class Predictor:
    """A run's checkpoint, ready to turn stored uint8 images into probabilities of `all`."""
    model: torch.nn.Module
    augment: GpuAugment
    precision: Precision
    device: torch.device
    config: TrainConfig
    preprocess: PreprocessConfig
    size: int  # the checkpoint's stage size: the model's input side in px
    stored_size: int  # the cache's stored side for that size (the crop's context margin included)
    batch_size: int  # the checkpoint stage's batch size
    epoch: int  # 1-based epoch of the checkpoint
    all_index: int  # the class index of `all` in the model's output
    checkpoint: str = rf.BEST  # its file name in the run folder

    @torch.no_grad()
    def probs_all(self, stored: list[np.ndarray], tta: bool = False) -> torch.Tensor:
        """(B,) float32 probabilities of `all` on the device for B stored images (S, S, 3) uint8; no host wait."""
        images = torch.from_numpy(np.stack(stored)).to(self.device).permute(0, 3, 1, 2)  # (B, 3, S, S) uint8
        x = self.augment.eval_transform(images)  # centre `size` window, normalised: (B, 3, size, size) float32
        if tta:
            return tta_probs(self.model, x, self.precision, self.device)[:, self.all_index]
        with self.precision.autocast(self.device):
            logits = self.model(self.precision.prepare(x))
        return torch.softmax(logits.float(), 1)[:, self.all_index]


def _preprocess_record(run_dir: Path, data: dict, config: TrainConfig) -> dict:
    """The run's preprocessing record: from config.json, or for a run made before config.json held one, from its
    cache's manifest when that cache still exists with the run's key."""
    path = rf.RunFolder(run_dir).config
    record = data.get("preprocess")
    if record is not None:
        if record.get("cache_key") != config.cache_key:
            raise PredictError(f"{path}: its preprocessing record is of cache "
                               f"{record.get('cache_key')}, but the run was trained on cache {config.cache_key}; "
                               f"the file was edited or damaged")
        return record
    try:
        manifest = store.read_manifest(config.cache_dir)
        found = f"now holds cache {manifest['key']}"
    except store.CacheError as err:
        manifest, found = None, f"cannot be used ({err})"
    if manifest is not None and manifest["key"] == config.cache_key:
        log.info("%s has no preprocessing record (a run made before config.json held one); using the manifest of "
                 "its cache %s", path, config.cache_dir)
        return preprocess_record(manifest, [s.size for s in config.stages])
    raise PredictError(
        f"{path} has no preprocessing record (the run was made before train.run saved one), and "
        f"its cache {config.cache_dir} {found}. Predicting needs that cache's parameters and normalisation: build "
        f"cache {config.cache_key} again at {config.cache_dir} (python -m pipeline.build with the same source and "
        f"parameters), or use a run made by the current python -m train.run")


def _check_record(record: dict, size: int, checkpoint: str, config: TrainConfig, path: Path) -> None:
    """PredictError naming config.json and the entry when the preprocessing record cannot preprocess images for a
    checkpoint trained at `size` px: no entry for that size, a normalisation that is not three finite means and
    three finite stds > 0 (a std of 0 gives NaN probabilities, every image called hem), no class `all`."""
    damaged = "the file was edited or damaged: restore config.json from a copy of the run folder"
    sizes = record.get("sizes") if isinstance(record.get("sizes"), dict) else {}
    info = sizes.get(str(size))
    if not isinstance(info, dict):
        try:
            manifest = store.read_manifest(config.cache_dir)
        except store.CacheError:
            manifest = None
        fallback = (f", or delete its `preprocess` entry: predict then uses the run's cache {config.cache_dir}, which "
                    f"still holds {size} px") if manifest and manifest["key"] == config.cache_key and \
            str(size) in manifest["sizes"] else ""
        have = ", ".join(f"{s} px" for s in sorted(sizes, key=lambda s: int(s) if s.isdigit() else 0)) or "none"
        raise PredictError(f"{path}: its preprocessing record has no entry for {size} px, the size {checkpoint} was "
                           f"trained at (it has: {have}); {damaged}{fallback}")
    try:  # the cache's own check, for this copy of its numbers
        manifest_numbers.check_normalisation(info.get("mean"), info.get("std"), f"{path}: preprocess.sizes.{size}",
                                             damaged)
    except ValueError as err:
        raise PredictError(str(err)) from None
    stored = info.get("stored_size")
    if isinstance(stored, bool) or not isinstance(stored, int) or stored < size:
        raise PredictError(f"{path}: preprocess.sizes.{size}: `stored_size` must be a whole number of pixels >= "
                           f"{size}, got {stored!r}; {damaged}")
    classes = record.get("classes", sources.CLASS_NAMES)
    if not isinstance(classes, (list, tuple)) or "all" not in classes:
        raise PredictError(f"{path}: preprocess.classes is {classes!r}, with no class `all`, whose probability "
                           f"predict gives; {damaged}")
    if not isinstance(record.get("config"), dict):
        raise PredictError(f"{path}: preprocess.config is not the cache's preprocessing parameters; {damaged}")


def load_predictor(run_dir: Path, checkpoint: str = "best.pt", device: str = "cpu") -> Predictor:
    """The run's model with `checkpoint`'s weights (loaded weights_only) and the preprocessing of its cache."""
    run_dir = Path(run_dir)
    config, data = rf.read_config(run_dir)  # RunFolderError naming what is wrong with the folder or its config.json
    record = _preprocess_record(run_dir, data, config)
    name, state, model = load_run_checkpoint(run_dir, checkpoint, config)
    stage = config.stages[state["stage"]]
    _check_record(record, stage.size, name, config, rf.RunFolder(run_dir).config)
    try:
        preprocess = PreprocessConfig.from_dict(record["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise PredictError(f"{rf.RunFolder(run_dir).config}: preprocess.config is not the cache's preprocessing "
                           f"parameters ({type(err).__name__}: {err}); the file was edited or damaged: restore "
                           f"config.json from a copy of the run folder") from None
    # eval never rotates, so the cache's rotation margin (checked for training by from_manifest) does not matter here
    augment = GpuAugment.from_manifest(record, stage.size, AugConfig(max_rotation_deg=0.0))
    stored = preprocess.geometry(stage.size).stored_size
    if stored != augment.stored_size:
        raise PredictError(f"the run's cache stored {stage.size} px images at {augment.stored_size} px, but this "
                           f"version of pipeline.config gives {stored} px for the same parameters; predictions would "
                           f"not match the training input. Use the code version that built the cache")
    classes = list(record.get("classes", sources.CLASS_NAMES))
    dev = torch.device(device)
    precision = Precision.for_device(dev, config.amp)
    model.to(dev, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format).eval()
    return Predictor(model, augment.to(dev), precision, dev, config, preprocess, stage.size, stored,
                     stage.batch_size, state["epoch"] + 1, classes.index("all"), name)


# ----------------------------------------------------------------------------- the images


def _images_under(folder: Path) -> list[Path]:
    """Files with an image suffix (any case) anywhere under `folder`, sorted; links to folders are not followed."""
    def unlistable(err: OSError):
        raise PredictError(f"{printable(err.filename)} cannot be listed ({err.strerror})")
    found = []
    for parent, _, names in os.walk(folder, onerror=unlistable):
        found += [Path(parent) / n for n in names if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
    return sorted(found)


def csv_path(path: str | os.PathLike) -> str:
    """A path as the CSVs write it: valid UTF-8 text that names one file only. A byte that is no UTF-8 is written
    `\\xNN`, as `pipeline.sources.printable` shows it, and a backslash is doubled, so that a name holding the
    characters `\\xff` stays apart from one holding the byte 0xff; a path with neither is written as it is.
    `codecs.escape_decode` reads one back to the path's bytes."""
    return os.fsencode(path).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def _entry(file: Path, patient: str | None = None, label: int = UNKNOWN_LABEL) -> Entry:
    return Entry(os.fspath(file), csv_path(file), patient_of(file.name) if patient is None else patient, label)


def gather(inputs, on_error: str | None = "fail") -> tuple[list[Entry], list[dict]]:
    """The images named by `inputs` (files, folders, source layouts), in order, each once; and the images a source
    layout's lists left out (`on_error="skip"`) as {path, reason}. A SourceError for a bad list row with "fail" (or
    None: the same for a command with no --on-error flag, whose messages must not suggest one)."""
    entries, skipped, seen = [], [], set()
    for given in map(Path, inputs):
        if not os.path.lexists(given):
            raise PredictError(f"input {printable(given)} does not exist; pass image files or folders of images")
        if not given.is_dir():
            found = [_entry(given)]  # named explicitly: read whatever it is (the read says if it is no image)
        elif sources.detect_layout(given) is not None:
            source = sources.discover(given, on_error=on_error)
            log.info("%s: source layout %s, %d images", printable(given), source.layout, len(source.items))
            found = [_entry(Path(os.path.normpath(given / it.path)), it.patient, it.label) for it in source.items]
            skipped += [{"path": csv_path(given / s.path), "reason": s.reason} for s in source.skipped]
        else:
            found = [_entry(p) for p in _images_under(given)]
            if not found:
                log.warning("%s: no image files (%s) in it or below", printable(given), " ".join(IMAGE_SUFFIXES))
        for entry in found:
            key = os.path.abspath(entry.file)
            if key in seen:
                log.info("%s is named more than once; predicted once", entry.path)
                continue
            seen.add(key)
            entries.append(entry)
    if not entries:
        raise PredictError(f"no images found in {' '.join(printable(i) for i in inputs)}; pass image files or folders "
                           f"holding {', '.join(IMAGE_SUFFIXES)} files")
    return entries, skipped


def predict_images(predictor: Predictor, entries: list[Entry], batch_size: int, tta: bool = False,
                   on_error: str | None = "fail", progress="off", jobs: int = -1,
                   window: int | None = None) -> tuple[list[Entry], np.ndarray, list[dict]]:
    """(entries predicted, their probabilities of `all` (N,) float64, {path, reason} of the images left out).

    Images are read and preprocessed by the build's own worker (`pipeline.parallel`, threads) in windows of at most
    `window` images - by default as many as fit the build's result budget, at most 512 - while the model runs on
    the batches already made; so at most one window of stored images plus one batch is in memory, whatever the
    number of images. Every batch, the last one too, has `batch_size` images (`_forward` pads it), at most one
    window's. A bad image stops everything (PredictError naming it) with on_error "fail" (None: the same, without
    suggesting --on-error skip, for a command that has no such flag), or is left out with "skip"."""
    task_bytes = predictor.stored_size ** 2 * 3
    default_window, workers = parallel.window_for(task_bytes, parallel.workers(jobs))
    window = window or default_window
    if batch_size > window:  # a batch is gathered in memory: no larger than the images read at a time
        log.info("batches of %d images (the images read at a time) rather than --batch-size %d", window, batch_size)
        batch_size = window
    tasks = [(e.file, (predictor.size,)) for e in entries]
    kept, skipped, probs, batch = [], [], [], []
    bar = progress_bar(progress, len(tasks), "predict", "img", log)
    outputs = parallel.results(tasks, predictor.preprocess, "threads", workers, None, window)
    try:
        for entry, (ok, value) in zip(entries, outputs):
            if not ok:
                if on_error != "skip":
                    skip = ", or pass --on-error skip to leave it out" if on_error == "fail" else \
                        ", or leave it out of the INPUTs"
                    raise PredictError(f"{entry.path}: {value}. Fix or remove the file{skip}; nothing was written")
                log.warning("skipping %s: %s", entry.path, value)
                skipped.append({"path": entry.path, "reason": value})
                bar.update()
                continue
            kept.append(entry)
            batch.append(value[predictor.size])  # (S, S, 3) uint8
            if len(batch) == batch_size:
                probs.append(_forward(predictor, batch, tta, batch_size))
                bar.update(len(batch))
                batch = []
        if batch:
            probs.append(_forward(predictor, batch, tta, batch_size))
            bar.update(len(batch))
    finally:
        outputs.close()  # waits for the images being read, so no worker outlives a failure
        bar.close()
    p = torch.cat(probs).cpu().numpy().astype(np.float64) if probs else np.empty(0)  # one read-back, at the end
    return kept, p, skipped


def _forward(predictor: Predictor, batch: list[np.ndarray], tta: bool, batch_size: int) -> torch.Tensor:
    """`probs_all` of one batch, padded with black images to `batch_size`: the convolution kernels see one shape
    whatever the number of images, so an image's probability does not depend on the other images given with it
    (alone or among many: the same bits on the CPU; a different --batch-size moves it by rounding only, the README's
    bound). Running out of memory is a PredictError saying to pass a smaller --batch-size."""
    n = len(batch)
    try:
        return predictor.probs_all(batch + [np.zeros_like(batch[0])] * (batch_size - n), tta)[:n]
    except RuntimeError as err:  # torch.OutOfMemoryError on CUDA; the CPU allocator's failure is a RuntimeError
        if not isinstance(err, torch.OutOfMemoryError) and "can't allocate memory" not in str(err):
            raise
        raise PredictError(f"out of memory on {predictor.device} predicting a batch of {batch_size} images at "
                           f"{predictor.size} px{' with 8-view TTA' if tta else ''}: pass a smaller --batch-size "
                           f"(e.g. {max(1, batch_size // 4)}); nothing was written") from None


# ----------------------------------------------------------------------------- the files


def companions(out: Path) -> tuple[Path, Path]:
    """The patients and skipped CSVs beside `out`: `<stem>_patients.csv`, `<stem>_skipped.csv`."""
    return out.with_name(f"{out.stem}_patients.csv"), out.with_name(f"{out.stem}_skipped.csv")


def out_file_type(example: str):
    """The argparse type of an --out that names a file, `example` the name suggested inside a folder given instead
    (its suffix names the format): `dir/` or an existing folder would otherwise become a file named like the folder."""
    kind = Path(example).suffix.lstrip(".").upper()

    def out_file(text: str) -> Path:
        if text.endswith(("/", os.sep)) or Path(text).is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder; --out takes a {kind} file name, e.g. "
                                             f"{Path(text) / example}")
        return Path(text)
    return out_file


def check_out_folder(out: Path) -> None:
    """PredictError unless `out`'s folder exists and is writable."""
    folder = out.parent
    if not folder.is_dir():
        raise PredictError(f"cannot write {out}: folder {folder} does not exist; create it or pass another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PredictError(f"cannot write {out}: folder {folder} is not writable; pass --out in a writable folder")


def check_out(out: Path) -> None:
    """PredictError unless every file this command may write is new and its folder writable (checked before any
    image is read, so no work is lost to it)."""
    for path in (out, *companions(out)):
        if os.path.lexists(path):
            raise PredictError(f"{path} already exists; predict never replaces an earlier prediction: pass another "
                               f"--out (or move that file away)")
    if os.path.lexists(out.parent) and not out.parent.is_dir():
        raise PredictError(f"cannot write {out}: {out.parent} is a file, not a folder; pass another --out")
    check_out_folder(out)


def _natural(patient: str):
    """`H2` before `H10`, digits-only ids before lettered ones (C-NMC: 1..N, then H1..HN)."""
    match = re.fullmatch(r"([A-Za-z]*)(\d+)", patient)
    return (match.group(1), int(match.group(2)), "") if match else ("~", 0, patient)


def prediction_table(entries: list[Entry], probs_all: np.ndarray) -> pd.DataFrame:
    table = pd.DataFrame({
        "path": [e.path for e in entries],
        "patient": [e.patient for e in entries],
        "prob_all": np.round(probs_all, 6),
        "predicted_label": metrics.predicted_labels(probs_all),
    })
    if any(e.label != UNKNOWN_LABEL for e in entries):
        table["label"] = [e.label for e in entries]  # -1 where the image had no label
    return table


def patient_table(entries: list[Entry], probs_all: np.ndarray) -> pd.DataFrame:
    """Per known patient: cells, the share predicted `all`, the mean probability of `all` (images without a
    patient id are not in it); the figures of train.evaluate's patients_<split>.csv, in natural patient order."""
    known = [i for i, e in enumerate(entries) if e.patient != UNKNOWN_PATIENT]
    table = metrics.patient_table([entries[i].patient for i in known], np.asarray(probs_all)[known])
    table = table[["patient", "cells", "predicted_all_share", "mean_prob_all"]].round(6)
    order = sorted(range(len(table)), key=lambda i: _natural(table["patient"].iloc[i]))
    return table.iloc[order].reset_index(drop=True)


def write_outputs(files: list[tuple[Path, pd.DataFrame]]) -> None:
    """Each table to `<name>.tmp`, then each renamed into place in the order given (the predictions CSV last, so
    its presence means the others are there); nothing half-written is left behind, and when a later file cannot be
    put in place the ones this call already put there are taken back (a rerun with the same --out then works)."""
    tmps, placed = [], []
    try:
        for path, table in files:
            tmps.append(path.with_name(path.name + ".tmp"))
            table.to_csv(tmps[-1], index=False)
        for (path, _), tmp in zip(files, tmps):
            if os.path.lexists(path):  # made by something else while we predicted: still not ours to replace
                raise PredictError(f"{path} appeared while predicting and was left as it is; pass another --out")
            os.replace(tmp, path)
            placed.append(path)
        placed = []  # all in place: nothing to take back
    except OSError as err:
        raise PredictError(f"cannot write {err.filename}: {err.strerror}; pass --out in a writable folder with "
                           f"free space") from None
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        for path in placed:  # a failure after some were renamed: these are this call's, never an earlier file
            path.unlink(missing_ok=True)
