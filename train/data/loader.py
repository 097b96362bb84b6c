"""Batches of cached uint8 images on the training device: `CacheLoader`.

The rows: one split, or several concatenated in the order given, optionally narrowed to a subset of rows (`rows=`,
global indices into that concatenation; the `rows` module), e.g. one fold of a patient-grouped cross-validation
over train + valid without rebuilding the cache. `n`, `labels`, `paths`, `patients` and every index the loader hands
out refer to the selected rows in ascending source order; `source_rows` maps them back.

The loader joins two separate pieces, as FFCV keeps its traversal orders apart from its memory managers:
- the traversal (the `plan` module): which rows this rank yields in an epoch, in which order, in which batches - one
  `EpochPlan` per epoch, which both the iteration and `epoch_indices` read, so they cannot disagree;
- the memory that serves it, chosen once per loader:
  - resident (default when the selected rows fit the memory budget; `ResidentSource`): read once, in one contiguous
    read per shard, into one tensor - on the GPU when the device is CUDA and it fits there (placement "device"),
    else in ordinary host memory (placement "host") - and each batch is an index slice of a per-epoch permutation
    (airbench-style; no per-image Python work at all);
  - streaming (when they do not fit, or when asked; `StreamingSource`): contiguous blocks of shard rows in a
    per-epoch random order, read by a background thread into windows of a bounded size, each window's selected
    rows shuffled and cut into batches in that thread. One window and a few batches exist at once, so memory stays
    bounded whatever the cache size.
On CUDA a host batch (resident "host", or streaming) is gathered by a background thread into one of three reusable
pinned buffers and copied non_blocking on a side stream (`staging.Staging`): the training loop never waits for it.

The order depends only on (seed, epoch) (and rank): permutations are drawn with CPU generators, then moved to the
device, so a seed means the same order on any device. With world_size > 1 each rank gets a disjoint, equally sized
part of the same epoch plan; evaluation (train=False) gives every selected image exactly once, in source order,
split into contiguous per-rank parts, with `epoch_indices()` naming the image behind every row.

h5py files are opened in the thread that reads them and closed after each read pass, never carried across fork.
Each shard is checked against the manifest's sha256 the first time this process reads it (when the loader is made:
its labels are read then); a damaged or missing shard stops the run with a CacheError naming it and the command that
rebuilds it.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import closing
from typing import Protocol

import numpy as np
import torch

from pipeline.store import CacheReader
from train.data.folds import CV_SPLITS, fold_rows
from train.data.plan import BlockOrder, EpochPlan, RowOrder
from train.data.resident import ResidentSource
from train.data.rows import plan_blocks, select_rows, source_shards, split_names
from train.data.staging import STAGING_BUFFERS  # noqa: F401 (re-exported: how many host batches are in flight)
from train.data.streaming import StreamingSource

log = logging.getLogger(__name__)
MODES = ("auto", "resident", "streaming")
PLACEMENTS = ("auto", "device", "host")


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class BatchSource(Protocol):
    """Where an epoch plan's rows come from (`ResidentSource`, `StreamingSource`)."""

    def batches(self, plan: EpochPlan, staged: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images (B, S, S, 3) uint8, labels (B,) int64) on the device, one per batch of `plan`, in order; host
        batches through `staging.Staging` buffers when `staged`."""
        ...


class CacheLoader:
    """Iterates (images uint8 (B, 3, S, S) on `device`, labels int64 (B,) on `device`) over rows of a cache.

    `split` is a split name or a sequence of them (their rows concatenated in that order); `rows` the global source
    indices to use (any order, no duplicates; None: all). `images` is the NHWC cache row viewed as NCHW
    (`permute`), i.e. a channels_last tensor.
    """

    def __init__(self, cache: str | os.PathLike | CacheReader, size: int, split: str | Sequence[str],
                 batch_size: int, *, rows: np.ndarray | Sequence[int] | None = None,
                 device: str | torch.device = "cpu", train: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, mode: str = "auto", placement: str = "auto",
                 memory_budget_bytes: int | None = None, block_images: int = 64):
        self.reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        if mode == "streaming" and placement == "device":
            raise ValueError("placement 'device' keeps the whole split on the device; streaming reads it in windows "
                             "(use mode='resident' or placement='host')")
        self.size, self.split, self.batch_size = size, split, batch_size
        self.splits = split_names(split)
        self.device = torch.device(device)
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.stored_size = self.reader.size_info(size)["stored_size"]
        shards = source_shards(self.reader, size, self.splits)  # every shard of the source, in source order
        self.shard_paths = [path for s in self.splits for path in self.reader.shard_paths(size, s)]
        self.shard_counts = [s.count for s in shards]  # source rows per shard, selected or not
        self.source_rows = select_rows(rows, sum(self.shard_counts))  # (n,) int64, ascending
        self.n = len(self.source_rows)
        metas = [self.reader.read_meta(size, s) for s in self.splits]
        meta = {k: np.concatenate([m[k] for m in metas])[self.source_rows] for k in ("labels", "paths", "patients")}
        self.labels, self.paths, self.patients = meta["labels"].astype(np.int64), meta["paths"], meta["patients"]
        self.image_bytes = self.stored_size ** 2 * 3
        self.epoch = 0
        host_budget = memory_budget_bytes if memory_budget_bytes is not None else available_host_bytes() // 2
        self.mode, self.placement = self._choose_mode(mode, placement, host_budget, memory_budget_bytes)
        # A window is at most a third of the budget: the one being cut, the staged batches and the reader's
        # allocations stay well inside it.
        self.window_images = max(batch_size, host_budget // (3 * self.image_bytes))
        self.block_images = min(block_images, self.window_images)
        order = dict(batch_size=batch_size, train=train, seed=seed, rank=rank, world_size=world_size)
        self.traversal: RowOrder | BlockOrder
        self.source: BatchSource
        if self.mode == "resident":
            self.traversal = RowOrder(self.n, **order)
            self.source = ResidentSource(self.reader, size, shards, self.source_rows, self.stored_size, self.labels,
                                         self.device, self.placement)
        else:
            blocks = tuple(plan_blocks(shards, self.source_rows, self.block_images))
            self.traversal = BlockOrder(blocks, self.source_rows, self.window_images, **order)
            self.source = StreamingSource(self.reader, size, shards, self.stored_size, self.labels, self.device)
        self._plan: EpochPlan | None = None  # the last epoch's plan, kept: it is asked for more than once an epoch
        # Host batches travel through reusable buffers and a side stream on CUDA (a CPU test may switch it on).
        self.use_staging = self.device.type == "cuda" and self.placement == "host"
        if train and self.rows_per_rank() < batch_size:
            chosen = f"split {split!r}" + ("" if rows is None else f" (rows: {self.n} selected)")
            raise ValueError(f"{chosen} gives {self.rows_per_rank()} images per rank, fewer than one batch of "
                             f"{batch_size}; lower --batch-size")

    def _choose_mode(self, mode: str, placement: str, host_budget: int,
                     given_budget: int | None) -> tuple[str, str]:
        """(mode, placement): resident on the device or in host memory, or streaming (through host memory)."""
        total = self.n * self.image_bytes
        if self.device.type == "cuda" and mode != "streaming" and placement != "host":
            free, _ = torch.cuda.mem_get_info(self.device)
            device_budget = given_budget if given_budget is not None else free // 3  # leave room for the model
            if total <= device_budget:
                return "resident", "device"
            if placement == "device":
                raise ValueError(f"placement 'device' needs {total / 2**30:.2f} GiB on {self.device}, over its "
                                 f"budget of {device_budget / 2**30:.2f} GiB; use placement='host' or 'auto'")
        if mode == "resident" or (mode == "auto" and total <= host_budget):
            if mode == "resident" and total > host_budget:
                log.warning("resident mode asked for %.1f GiB, over the %.1f GiB budget", total / 2**30,
                            host_budget / 2**30)
            return "resident", "host"
        return "streaming", "host"

    # ------------------------------------------------------------------ the epoch plan

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan of `epoch` (default: the current one): made once, then shared by every caller."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan is None or self._plan.epoch != epoch:
            self._plan = self.traversal.plan(epoch)
        return self._plan

    def rows_per_rank(self, epoch: int | None = None) -> int:
        """How many rows this rank yields in `epoch` (train: whole batches only)."""
        return len(self.plan(epoch).indices)

    def __len__(self) -> int:
        return len(self.plan())

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """Index into the selected rows (`labels`, `paths`, `patients`, `source_rows`) of every row this rank yields
        in `epoch`, in order."""
        return self.plan(epoch).indices.copy()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # closed with this generator, so that an early break stops a producer thread and closes its file at once
        with closing(self.source.batches(self.plan(), self.use_staging)) as batches:
            for images, labels in batches:
                yield images.permute(0, 3, 1, 2), labels


def loader_for(reader: CacheReader, size: int, split: str, batch_size: int, fold: dict | None = None,
               **kwargs) -> CacheLoader:
    """The loader of a run's `split` at `size`: the cache's own split, or for a cross-validation fold (`fold`, the
    run's `TrainConfig.fold`) its train or valid part of the cache's train + valid rows. The trainer and the
    evaluation both take their loaders from here, so a fold means the same rows in training and in its evaluation."""
    if fold is None or split not in CV_SPLITS:
        return CacheLoader(reader, size, split, batch_size, **kwargs)
    train_rows, valid_rows = fold_rows(reader, size, fold)
    return CacheLoader(reader, size, CV_SPLITS, batch_size, rows=train_rows if split == "train" else valid_rows,
                       **kwargs)
