"""TensorBoard event files of a run (`--tensorboard`), so a run can be watched while it trains where most PyTorch
users watch training, instead of in curves.png, drawn at the end.

What a run writes into its run folder's `tensorboard/` (a cross-validation: each fold is a run folder with its own,
so `tensorboard --logdir CV_DIR` shows the folds side by side):
- per epoch, step = the global epoch (1-based, metrics.csv's `epoch`): one scalar per other metrics.csv column,
  under the tag `tag_of(column)` gives (grouped: loss/, accuracy/, schedule/, speed/);
- at the first epoch of each stage: the first training batch's first VIEWS images after augmentation, as the model
  got them, un-normalised for viewing (`stage_tag`);
- at the end, after evaluation: the run's settings in the HParams tab with its final figures (FINAL_PREFIX tags, as
  scalars too), and config.json's `config` as text.

The figures are the metrics row the trainer already read once per epoch; the images are a copy of one batch per
stage (see `FirstBatch`). So the board makes no training step wait for the device.

`--resume` writes a new event file into the same folder, and only epochs this process trains. Its writer purges
(SummaryWriter's `purge_step`) every event an earlier process wrote at or after the first epoch this one trains: an
epoch logged just before a kill that last.pt did not keep yet is trained again and must not show twice, just as
metrics.csv drops its rows after last.pt.

The package is optional (`pip install -e '.[tb]'`); `require` says how to install it, before a run starts.
"""
from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from train.augment import GpuAugment
from train.engine import run_folder as rf

log = logging.getLogger(__name__)
FOLDER = rf.TENSORBOARD  # inside the run folder
INSTALL = "pip install -e '.[tb]' (or pip install tensorboard)"
VIEWS = 16  # training views shown per stage: 2 rows of 8
FINAL_PREFIX = "final/"
# summary.json's figures shown in the HParams tab (and as scalars), beside each split's accuracy and weighted F1
FINAL_FIGURES = ("best_valid_acc", "test_acc", "test_f1_weighted", "max_valid_acc_any_stage", "checkpoint_epoch",
                 "train_seconds", "seconds_per_epoch")
# metrics.csv column -> tag; a column not listed here keeps its own name (every column is logged whatever its name)
TAGS = {"train_loss": "loss/train", "valid_loss": "loss/valid", "train_acc": "accuracy/train",
        "valid_acc": "accuracy/valid", "lr": "schedule/lr", "stage": "schedule/stage", "size": "schedule/size_px",
        "epoch_s": "speed/epoch_s", "imgs_per_s": "speed/imgs_per_s", "data_wait": "speed/data_wait",
        "augment_share": "speed/augment_share"}
STEP_COLUMN = "epoch"  # the step of every other column, not a scalar of its own


class TensorBoardMissing(ImportError):
    """--tensorboard without the tensorboard package; the message says how to install it."""


def require():
    """torch's SummaryWriter, or TensorBoardMissing naming the install command. Imported on each call (cached by
    Python after the first), so that a run without --tensorboard never imports the package."""
    try:
        return importlib.import_module("torch.utils.tensorboard").SummaryWriter
    except ImportError as err:
        raise TensorBoardMissing(f"--tensorboard needs the tensorboard package, which cannot be imported here "
                                 f"({err}); install it with {INSTALL}, or drop --tensorboard") from None


def tag_of(column: str) -> str:
    """The scalar tag of a metrics.csv column."""
    return TAGS.get(column, column)


def stage_tag(stage: int, size: int) -> str:
    """The image tag of a stage's training views (`stage` 1-based, as metrics.csv's `stage`)."""
    return f"train_views/stage_{stage}_{size}px"


def hparam_value(value):
    """A config value as the HParams tab takes it: numbers and text as they are, on/off for booleans (else shown as
    1 and 0), lists and dicts as compact text; None stays None (the cell is left empty)."""
    if value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    if isinstance(value, bool):
        return "on" if value else "off"
    return json.dumps(value, separators=(",", ":"))


def hparams_of(config: Mapping) -> dict:
    """The HParams tab's columns from a config's `as_dict()`: every setting but the cache's folder (a path on one
    machine; `cache_key` names the data), stages as SIZE:EPOCHS:BATCH items, a CV fold as 'SCHEME INDEX/FOLDS'."""
    values = dict(config)
    values.pop("cache_dir", None)
    values["stages"] = " ".join(f"{s['size']}:{s['epochs']}:{s['batch_size']}" for s in config["stages"])
    fold = config.get("fold")
    values["fold"] = f"{fold['scheme']} {fold['index']}/{fold['folds']}" if fold else None
    return {name: hparam_value(value) for name, value in values.items()}


def final_figures(summary: Mapping) -> dict[str, float]:
    """{tag: value} of a summary's figures: FINAL_FIGURES and each split's top-level numbers (final/valid/accuracy,
    final/valid/f1_weighted, ...); unknown (None) figures are left out."""
    def numeric(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    figures = {f"{FINAL_PREFIX}{name}": float(summary[name]) for name in FINAL_FIGURES if numeric(summary.get(name))}
    for split, report in (summary.get("splits") or {}).items():
        figures.update({f"{FINAL_PREFIX}{split}/{name}": float(value) for name, value in (report or {}).items()
                        if numeric(value)})
    return figures


class FirstBatch:
    """A training loader that yields what `loader` yields and keeps a copy of its first batch's images.

    The copy is queued on the device like the step's own work, so the host does not wait for it; it is a copy
    because a loader may hand out the same memory again (staging buffers). Only the board reads it, after the
    epoch, once per stage: the per-step path gains one device-side copy in one step of a stage, and no read."""

    def __init__(self, loader):
        self.loader = loader
        self.images: torch.Tensor | None = None  # (B, 3, S_stored, S_stored) uint8, on the loader's device

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name):  # anything else the loop asks of a loader
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in self.loader:
            if self.images is None:
                self.images = images.clone()
            yield images, labels


class Board:
    """No board: what a run without --tensorboard (and every DDP rank but 0) gets; every method does nothing."""
    enabled = False

    def epoch(self, row: Mapping) -> None:
        """One metrics.csv row."""

    def train_views(self, step: int, stage: int, size: int, images: torch.Tensor, augment: GpuAugment,
                    generator: torch.Generator) -> None:
        """A stage's first training batch (uint8, as the loader gave it) after augmentation, the parameters drawn
        from `generator`: a new one seeded as the epoch's was, so the views are exactly those trained on."""

    def final(self, config: Mapping, summary: Mapping, step: int) -> None:
        """The run's config (`TrainConfig.as_dict()`) and its evaluated summary, at global epoch `step`."""

    def close(self) -> None:
        pass


class TensorBoard(Board):
    """The event files of one run, in RUN_DIR/tensorboard/. `first_step`: the first global epoch (1-based) this
    process trains; events of an earlier process at or after it are purged (see the module's docstring)."""
    enabled = True

    def __init__(self, run_dir: Path, first_step: int):
        self.path = Path(run_dir) / FOLDER
        self.writer = require()(log_dir=str(self.path), purge_step=first_step)

    def epoch(self, row: Mapping) -> None:
        step = int(row[STEP_COLUMN])
        for column, value in row.items():
            if column != STEP_COLUMN:
                self.writer.add_scalar(tag_of(column), float(value), step)
        self.writer.flush()  # one epoch is worth seeing at once; a flush per epoch costs nothing

    @torch.no_grad()
    def train_views(self, step: int, stage: int, size: int, images: torch.Tensor, augment: GpuAugment,
                    generator: torch.Generator) -> None:
        # the whole batch replayed (augmentation parameters are drawn on the CPU, so the replay is exact): the
        # shape a compiled augmentation was built for
        views = augment.apply(images, augment.sample(len(images), generator))[:VIEWS]
        shown = (views.float() * augment.std + augment.mean).clamp(0, 1).cpu()  # the one host copy, once per stage
        self.writer.add_images(stage_tag(stage, size), shown, step, dataformats="NCHW")
        self.writer.flush()

    def final(self, config: Mapping, summary: Mapping, step: int) -> None:
        figures = final_figures(summary)
        # the HParams tab's three records, in this run's own folder: SummaryWriter.add_hparams would put them
        # into a new sub-folder named by the time, which TensorBoard shows as a second run
        from torch.utils.tensorboard.summary import hparams
        for record in hparams(hparams_of(config), figures):
            self.writer.file_writer.add_summary(record, step)
        for tag, value in figures.items():
            self.writer.add_scalar(tag, value, step)
        # indented: a markdown code block, shown as written
        text = "\n".join("    " + line for line in json.dumps(dict(config), indent=2).splitlines())
        self.writer.add_text("config", text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_board(run_dir: Path, on: bool, first_step: int) -> Board:
    """The run's board: a TensorBoard when `on` (raises TensorBoardMissing without the package), else no board."""
    return TensorBoard(run_dir, first_step) if on else Board()
