"""The training run folder's files, writers and readers side by side (as `pipeline.store` owns the cache's format), so
that every command names, reads and writes them the same way.

A run folder (`python -m train.run` makes one, `train.cv` one per fold inside a cross-validation folder) holds:

    config.json      the resolved TrainConfig, the preprocessing record, library versions (written before training)
    best.pt last.pt  checkpoints (their format: `train.engine.checkpoint`)
    metrics.csv      one row per finished epoch, appended; cut back to the epochs kept when a run resumes
    summary.json     one layout whatever the status: a finished, stopped, failed or interrupted run has the same keys
    predictions_<split>.csv, patients_<split>.csv, confusion_<split>.png, mistakes_<split>.png, curves.png
                     the evaluation's reports

Every write that replaces a file goes through a temporary file and a rename (a kill leaves the old file or the new
one, never half of one); metrics.csv grows by whole lines. Every reader raises `RunFolderError` with what is wrong and
what to do.
"""
from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.store import write_json_atomic
from train.engine.config import TrainConfig

CONFIG = "config.json"
BEST = "best.pt"
LAST = "last.pt"
METRICS = "metrics.csv"
SUMMARY = "summary.json"
CURVES = "curves.png"
TENSORBOARD = "tensorboard"  # the event files of `--tensorboard` (train.engine.tensorboard writes them)
# a cross-validation folder (train.cv): its plan marks it, its summary ends it; its runs are fold-0, fold-1, ...
# the reports of a checkpoint other than best.pt (`train.evaluate --checkpoint last.pt`): eval-last/ in the run folder
EVAL_PREFIX = "eval-"
CV_PLAN = "cv.json"
CV_SUMMARY = "cv_summary.json"

METRIC_COLUMNS = ["epoch", "stage", "size", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc", "epoch_s",
                  "imgs_per_s", "data_wait", "augment_share"]

# summary.json's `status`: evaluated after the last epoch, evaluated before it (a stopped run: not a result of its
# recipe), stopped by an error, stopped by Ctrl-C. The last two carry no figures.
COMPLETE, UNFINISHED, FAILED, INTERRUPTED = "complete", "unfinished", "failed", "interrupted"
STOPPED_ON_ERROR = (FAILED, INTERRUPTED)
SUMMARY_FIGURES = ("checkpoint", "checkpoint_epoch", "checkpoint_size", "best_valid_acc", "test_acc",
                   "test_f1_weighted", "epochs", "train_seconds", "seconds_per_epoch", "max_valid_acc_any_stage",
                   "splits", "patients", "tta")
SUMMARY_KEYS = ("status", "model", "error", "epochs_done", *SUMMARY_FIGURES)


class RunFolderError(ValueError):
    """A run folder, or one of its files, that is missing or unusable; the message says what to do."""


@dataclass(frozen=True)
class RunFolder:
    """The path of every file of one run folder."""
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY

    @property
    def curves(self) -> Path:
        return self.path / CURVES

    def checkpoint(self, name: str) -> Path:
        return self.path / name

    def predictions(self, split: str) -> Path:
        return self.path / f"predictions_{split}.csv"

    def patients(self, split: str) -> Path:
        return self.path / f"patients_{split}.csv"

    def confusion(self, split: str) -> Path:
        return self.path / f"confusion_{split}.png"

    def mistakes(self, split: str) -> Path:
        return self.path / f"mistakes_{split}.png"


def reports_dir(run_dir: Path, checkpoint: str) -> Path:
    """Where the evaluation of `checkpoint` (a file name in the run folder) writes its reports and summary.json: the
    run folder itself for best.pt - the run's result, which train.run's own evaluation writes and train.compare
    reads - and `eval-<stem>/` inside it for any other checkpoint (eval-last/ for last.pt), so that evaluating
    another checkpoint never replaces the run's figures."""
    run_dir = Path(run_dir)
    return run_dir if checkpoint == BEST else run_dir / f"{EVAL_PREFIX}{Path(checkpoint).stem}"


def reports_owner(path: Path) -> Path | None:
    """The run folder whose `eval-<stem>/` reports folder `path` is (`reports_dir` of a checkpoint other than
    best.pt), or None: the folder train.evaluate printed last is easily taken for a run folder."""
    path = Path(path)
    owner = path.parent
    return owner if path.name.startswith(EVAL_PREFIX) and (owner / CONFIG).is_file() else None


def reports_owner_hint(path: Path, checkpoint_flag: bool = True) -> str:
    """What to pass instead of a reports folder `path` (see `reports_owner`), for a command with a --checkpoint flag
    or (`checkpoint_flag` False) without one; empty when it is none."""
    owner = reports_owner(path)
    if owner is None:
        return ""
    checkpoint = Path(path).name.removeprefix(EVAL_PREFIX) + ".pt"
    flag = f" with --checkpoint {checkpoint}" if checkpoint_flag else ""
    return (f"{path} holds the reports of {checkpoint} of the run folder {owner} (made by python -m train.evaluate "
            f"--checkpoint {checkpoint}), not a run folder: pass {owner}{flag}")


def new_run_dir(out: Path, model: str) -> Path:
    """runs/<model>-<timestamp>; never an existing folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = out / (f"{model}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:  # read-only, full, a file in the way, no permission
        raise RunFolderError(f"cannot make a run folder under {out} ({err.strerror or err}); pass --out a writable "
                       f"folder") from err
    raise RunFolderError(f"could not make a new run folder under {out}")


def fold_dir(cv_dir: Path, index: int) -> Path:
    """The run folder of fold `index` (0-based) of a cross-validation folder."""
    return Path(cv_dir) / f"fold-{index}"


def is_cv_folder(path: Path) -> bool:
    return (Path(path) / CV_PLAN).is_file()


# ----------------------------------------------------------------------------- config.json


def read_config(run_dir: Path) -> tuple[TrainConfig, dict]:
    """(the run's TrainConfig, the whole of config.json: `preprocess`, `versions`, ...)."""
    folder = RunFolder(run_dir)
    run_dir, path = folder.path, folder.config
    if not run_dir.is_dir():
        what = "is not a folder" if run_dir.exists() else "does not exist"
        raise RunFolderError(f"run folder {run_dir} {what}; pass the folder that python -m train.run printed last "
                             f"(runs/<model>-<timestamp>)")
    if not path.is_file():
        if is_cv_folder(run_dir):
            raise RunFolderError(f"{run_dir} is a cross-validation folder (train.cv); pass one of its runs, e.g. "
                                 f"{fold_dir(run_dir, 0)}")
        if reports_owner(run_dir) is not None:
            raise RunFolderError(reports_owner_hint(run_dir))
        if folder.last.is_file():
            raise RunFolderError(f"{run_dir}: no {CONFIG}, though it holds {LAST}: the run's settings file is gone "
                                 f"and the checkpoint alone cannot be evaluated or resumed; restore {CONFIG} from a "
                                 f"copy of the folder, or start a new run")
        raise RunFolderError(f"{run_dir}: no {CONFIG}; is it a run folder made by python -m train.run?")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise RunFolderError(f"{path}: cannot be read ({err}); the run folder is damaged: restore {CONFIG} from a "
                             f"copy of the folder, or start a new run") from None
    try:
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise TypeError("no `config` object in it")
        config = TrainConfig.from_dict(data["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise RunFolderError(f"{path}: not a run's config ({type(err).__name__}: {err}); the file was edited or "
                             f"damaged: restore it from a copy of the folder, or start a new run") from None
    return config, data


def read_run_config(run_dir: Path) -> TrainConfig:
    return read_config(run_dir)[0]


def write_config(run_dir: Path, data: dict) -> None:
    """config.json, replaced whole (temporary file and rename), so a reader never sees half of it."""
    assert isinstance(data.get("config"), dict), "config.json holds the run's TrainConfig under `config`"
    write_json_atomic(RunFolder(run_dir).config, data)


# ----------------------------------------------------------------------------- summary.json


def summary_record(status: str, model: str, epochs_done: int, error: str | None = None, **figures) -> dict:
    """summary.json's one layout: every key of SUMMARY_KEYS, the figures not given None."""
    unknown = sorted(set(figures) - set(SUMMARY_FIGURES))
    if unknown:
        raise TypeError(f"not summary.json figures: {', '.join(unknown)}")
    return {"status": status, "model": model, "error": error, "epochs_done": epochs_done,
            **{name: figures.get(name) for name in SUMMARY_FIGURES}}


def stopped_summary(model: str, err: BaseException, epochs_done: int) -> dict:
    """The summary of a run that stopped on an error: failed (or interrupted, on Ctrl-C) with the error, no figures,
    so that no later step (train.compare, a reader of the folder) takes the folder for a result."""
    return summary_record(INTERRUPTED if isinstance(err, KeyboardInterrupt) else FAILED, model, epochs_done,
                          error=f"{type(err).__name__}: {err}")


def write_summary(run_dir: Path, summary: dict) -> None:
    """summary.json, replaced whole (temporary file and rename): a kill leaves the old summary or the new one."""
    assert tuple(summary) == SUMMARY_KEYS, f"summary.json's layout is SUMMARY_KEYS, got {tuple(summary)}"
    write_json_atomic(RunFolder(run_dir).summary, summary)


def read_summary(run_dir: Path) -> dict | None:
    """summary.json, or None when the run has none (it has not finished, or is still going on)."""
    path = RunFolder(run_dir).summary
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path}: cannot be read ({err}); evaluate the run again (python -m train.evaluate "
                             f"{Path(run_dir)}) to rewrite it, or delete it") from None
    if not isinstance(summary, dict):
        raise RunFolderError(f"{path}: not a run's summary (it holds a {type(summary).__name__}); evaluate the run "
                             f"again (python -m train.evaluate {Path(run_dir)}) to rewrite it, or delete it")
    summary.setdefault("status", COMPLETE)  # written before `status` existed: only a finished run had a summary
    return summary


def remove_summary(run_dir: Path) -> None:
    RunFolder(run_dir).summary.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- metrics.csv


def append_metrics(run_dir: Path, row: dict) -> None:
    """One epoch's row (the header first when the file is new), written with one call and flushed to disk, so a
    kill leaves whole lines behind (a line cut by a power loss is dropped by `truncate_metrics`)."""
    path = RunFolder(run_dir).metrics
    text = io.StringIO()
    writer = csv.DictWriter(text, METRIC_COLUMNS, lineterminator="\n")
    if not path.exists():
        writer.writeheader()
    writer.writerow(row)
    with open(path, "a", newline="") as f:
        f.write(text.getvalue())
        f.flush()
        os.fsync(f.fileno())


def truncate_metrics(run_dir: Path, last_epoch: int) -> None:
    """Keep the rows of epochs 1..`last_epoch` (1-based; the epochs a resumed run keeps), replacing the file whole
    (temporary file and rename). The lines kept are copied as they are; a last line without its newline (cut by a
    crash) is dropped, and a header cut the same way leaves no file (the next append writes a new one)."""
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if not lines or not lines[0].endswith("\n"):
        path.unlink()
        return
    header, rows = lines[0], lines[1:]
    if rows and not rows[-1].endswith("\n"):
        rows.pop()
    columns = next(csv.reader([header]))
    if "epoch" not in columns:
        raise RunFolderError(f"{path}: no `epoch` column in its header ({header.strip()}); the file is damaged: "
                             f"delete it (its figures are lost) and resume again")
    at = columns.index("epoch")
    kept = []
    for number, line in enumerate(rows, start=2):
        try:
            epoch = int(next(csv.reader([line]))[at])
        except (ValueError, IndexError, StopIteration):
            raise RunFolderError(f"{path}: line {number} is not an epoch's row ({line.strip()!r}); the file is "
                                 f"damaged: delete that line and resume again") from None
        if epoch <= last_epoch:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(header + "".join(kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metrics(run_dir: Path) -> pd.DataFrame:
    """metrics.csv as a table; no rows (the columns only) when the run has not finished an epoch."""
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return pd.DataFrame(columns=METRIC_COLUMNS)
    try:
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame(columns=METRIC_COLUMNS)
    except (OSError, ValueError) as err:  # pandas' ParserError is a ValueError
        raise RunFolderError(f"{path}: cannot be read ({err}); the file is damaged") from None
