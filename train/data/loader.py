"""Batches of cached uint8 images on the training device: `CacheLoader`.

The rows: one split, or several concatenated in the order given, optionally narrowed to a subset of rows (`rows=`,
global indices into that concatenation; train/rows.py), e.g. one fold of a patient-grouped cross-validation over
train + valid without rebuilding the cache. `n`, `labels`, `paths`, `patients` and every index the loader hands out
refer to the selected rows in ascending source order; `source_rows` maps them back.

Two modes, one order:
- resident (default when the selected rows fit the memory budget): they are read once, in one contiguous read per
  shard, into one tensor - on the GPU when the device is CUDA and it fits there (placement "device"), else in
  ordinary host memory (placement "host") - and each batch is an index slice of a per-epoch permutation
  (airbench-style; no per-image Python work at all).
- streaming (when they do not fit, or when asked): contiguous blocks of shard rows in a per-epoch random order, read
  by a background thread into windows of a bounded size, each window's selected rows shuffled and cut into batches
  in that thread. One window and a few batches exist at once, so memory stays bounded whatever the cache size.
On CUDA a host batch (resident "host", or streaming) is gathered by a background thread into one of three reusable
pinned buffers and copied non_blocking on a side stream (train/staging.py): the training loop never waits for it.

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
import queue
import threading
from collections.abc import Sequence
from contextlib import closing

import numpy as np
import torch

from pipeline.store import CacheReader
from train.data.folds import CV_SPLITS, fold_rows
from train.data.rows import Block, plan_blocks, select_rows, source_shards, split_names, window_selection
from train.data.staging import Staging

log = logging.getLogger(__name__)
MODES = ("auto", "resident", "streaming")
PLACEMENTS = ("auto", "device", "host")
STAGING_BUFFERS = 3  # pinned batches in flight on CUDA: one being filled, one queued, one being copied


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _epoch_generator(seed: int, epoch: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank])


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
        self._shards = source_shards(self.reader, size, self.splits)  # every shard of the source, in source order
        self.shard_paths = [path for s in self.splits for path in self.reader.shard_paths(size, s)]
        self.shard_counts = [s.count for s in self._shards]  # source rows per shard, selected or not
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
        self._blocks = plan_blocks(self._shards, self.source_rows, self.block_images)  # streaming's reads
        self._data: torch.Tensor | None = None  # resident images (n, S, S, 3) uint8, the selected rows
        self._labels_dev = torch.from_numpy(self.labels).to(self.device)
        # Host batches travel through reusable buffers and a side stream on CUDA (a CPU test may switch it on).
        self._use_staging = self.device.type == "cuda" and self.placement == "host"
        if train and self.rows_per_rank() < batch_size:
            chosen = f"split {split!r}" + ("" if rows is None else f" (rows: {self.n} selected)")
            raise ValueError(f"{chosen} gives {self.rows_per_rank()} images per rank, fewer than one batch of "
                             f"{batch_size}; lower --batch-size")

    # ------------------------------------------------------------------ mode and plan

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

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_blocks(self, epoch: int) -> tuple[list[Block], int]:
        """This rank's blocks for streaming, in read order, and how many (selected) rows it uses."""
        blocks = self._blocks
        if not self.train:
            parts = np.array_split(np.arange(len(blocks)), self.world_size)
            mine = [blocks[i] for i in parts[self.rank]]
            return mine, sum(b.count for b in mine)
        order = _epoch_generator(self.seed, epoch).permutation(len(blocks))
        per_rank = [[blocks[i] for i in order[r::self.world_size]] for r in range(self.world_size)]
        rows = min(sum(b.count for b in part) for part in per_rank)  # equal across ranks
        return per_rank[self.rank], rows // self.batch_size * self.batch_size

    def rows_per_rank(self, epoch: int | None = None) -> int:
        """How many rows this rank yields in `epoch`, from the plan alone (no index arrays built)."""
        if self.mode == "streaming":
            return self._rank_blocks(self.epoch if epoch is None else epoch)[1]
        if self.train:
            return self.n // self.world_size // self.batch_size * self.batch_size
        return self.n // self.world_size + (self.rank < self.n % self.world_size)  # np.array_split's part sizes

    def __len__(self) -> int:
        rows = self.rows_per_rank()
        return rows // self.batch_size if self.train else -(-rows // self.batch_size)

    def epoch_indices(self, epoch: int | None = None) -> np.ndarray:
        """Index into the selected rows (`labels`, `paths`, `patients`, `source_rows`) of every row this rank yields
        in `epoch`, in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.mode == "resident":
            if not self.train:
                return np.array_split(np.arange(self.n), self.world_size)[self.rank]
            perm = _epoch_generator(self.seed, epoch).permutation(self.n)
            return perm[self.rank::self.world_size][:self.rows_per_rank(epoch)]
        blocks, rows = self._rank_blocks(epoch)
        parts = [window_selection(w, self.source_rows)[1][self._window_order(w, epoch)] for w in self._windows(blocks)]
        return np.concatenate(parts or [np.empty(0, np.int64)])[:rows]

    def _windows(self, blocks: list[Block]) -> list[list[Block]]:
        """Consecutive blocks grouped so that each group's rows read (selected or not) fit in `window_images`."""
        windows, current, count = [], [], 0
        for block in blocks:
            if current and count + len(block) > self.window_images:
                windows.append(current)
                current, count = [], 0
            current.append(block)
            count += len(block)
        return windows + ([current] if current else [])

    def _window_order(self, window: list[Block], epoch: int) -> np.ndarray:
        """Positions within the window's selected rows, in the order they are yielded."""
        count = sum(b.count for b in window)
        if not self.train:
            return np.arange(count)
        # A window's shuffle depends on (seed, epoch) and where it starts, not on what came before.
        return _epoch_generator(self.seed, epoch, window[0].offset + 1).permutation(count)

    # ------------------------------------------------------------------ iteration

    def __iter__(self):
        if self.mode == "resident":
            yield from self._iter_resident()
        else:
            yield from self._iter_streaming()

    def _load_resident(self) -> torch.Tensor:
        """The selected rows (n, S, S, 3) uint8, in subset order: one contiguous read per shard that holds any.

        A fully selected shard is read straight into place (host) or into one shard-sized host array (device). A
        partly selected one is read from its first to its last selected row into a temporary array and its selected
        rows gathered from it, so peak memory is the selected rows plus one shard: contiguous reads are much faster
        than HDF5 point selections, and reading whole splits before selecting would hold every unselected row too."""
        shape = (self.n, self.stored_size, self.stored_size, 3)
        # Ordinary memory: batches are gathered into a few pinned buffers, so the rows themselves need no pinning.
        data = torch.empty(shape, dtype=torch.uint8, device=self.device if self.placement == "device" else "cpu")
        for block in plan_blocks(self._shards, self.source_rows):  # one block per shard with selected rows
            shard, rows = self._shards[block.shard], slice(block.first, block.first + block.count)
            out = data.numpy()[rows] if self.placement == "host" else np.empty((block.count,) + shape[1:], np.uint8)
            with self.reader.open_shard(self.size, shard.split, shard.index) as f:  # checked against its sha256
                if block.count == len(block):
                    f["images"].read_direct(out, np.s_[block.start:block.stop])
                else:
                    span = np.empty((len(block),) + shape[1:], np.uint8)
                    f["images"].read_direct(span, np.s_[block.start:block.stop])
                    np.take(span, window_selection([block], self.source_rows)[0], axis=0, out=out, mode="clip")
                    del span
            if self.placement == "device":
                data[rows].copy_(torch.from_numpy(out))
        return data

    def _batch_starts(self, rows: int) -> range:
        """First row of every batch this rank yields (train: full batches only)."""
        return range(0, rows - self.batch_size + 1 if self.train else rows, self.batch_size)

    def _iter_resident(self):
        if self._data is None:
            self._data = self._load_resident()
        idx = torch.from_numpy(self.epoch_indices())
        if self._use_staging:
            yield from self._consume(self._produce_resident, idx)
            return
        # Once per epoch; from pinned memory so that even this copy does not wait for queued work.
        idx_dev = idx.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else idx
        for start in self._batch_starts(len(idx)):
            sel_dev = idx_dev[start:start + self.batch_size]
            images = torch.index_select(self._data, 0, sel_dev)  # device gather, or host gather on a CPU device
            yield images.permute(0, 3, 1, 2), torch.index_select(self._labels_dev, 0, sel_dev)

    def _produce_resident(self, staging, put, stop, idx: torch.Tensor) -> None:
        """Producer thread: gather each batch of the resident host split into a staging buffer."""
        labels = torch.from_numpy(self.labels)
        for start in self._batch_starts(len(idx)):
            sel = idx[start:start + self.batch_size]
            slot = staging.acquire(stop)
            if slot is None:
                return
            torch.index_select(self._data, 0, sel, out=staging.images[slot][:len(sel)])
            torch.index_select(labels, 0, sel, out=staging.labels[slot][:len(sel)])
            if not put((slot, len(sel))):
                return

    def _iter_streaming(self):
        blocks, rows = self._rank_blocks(self.epoch)
        yield from self._consume(self._produce_streaming, self._windows(blocks), rows)

    def _consume(self, produce, *args):
        """Run `produce(staging, put, stop, *args)` in a thread; yield the batches it puts, on the device."""
        shape = (self.stored_size, self.stored_size, 3)
        staging = Staging(self.batch_size, shape, self.device, STAGING_BUFFERS) if self._use_staging else None
        q: queue.Queue = queue.Queue(maxsize=STAGING_BUFFERS - 1)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        # CUDA's current device is per thread and starts at 0: without this, the producer's event waits would open
        # a context on GPU 0 from every DDP rank (as torch's own pin-memory thread, which sets it too).
        device_index = None
        if staging is not None and self.device.type == "cuda":
            device_index = torch.cuda.current_device() if self.device.index is None else self.device.index

        def run() -> None:
            try:
                if device_index is not None:
                    torch.cuda.set_device(device_index)
                produce(staging, put, stop, *args)
                put(done)
            except BaseException as err:  # handed to the consumer, which re-raises it
                put(err)

        thread = threading.Thread(target=run, daemon=True, name="cache-batches")
        thread.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                if staging is not None:
                    images, labels = staging.send(*item)
                else:  # a fresh host batch, already where a CPU device wants it
                    images, labels = (torch.from_numpy(a) for a in item)
                yield images.permute(0, 3, 1, 2), labels
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def _produce_streaming(self, staging, put, stop, windows: list[list[Block]], rows: int) -> None:
        """Producer thread: read each window, shuffle its selected rows, and gather them into batches.

        A batch may take rows from two windows. With staging the rows go straight into a pinned buffer; without,
        into a fresh array per batch (the consumer keeps it)."""
        slot, images, labels, filled, emitted = None, None, None, 0, 0
        with closing(self._read_windows(windows, stop)) as reads:  # closes the open shard on any exit
            for window_images, window in reads:
                # rows read but not selected are never taken: `take` indexes only the selected ones
                positions, subset = window_selection(window, self.source_rows)
                order = self._window_order(window, self.epoch)[:max(0, rows - emitted)]
                take, take_rows = positions[order], subset[order]
                emitted += len(take)
                pos = 0
                while pos < len(take):
                    if images is None:  # start a batch
                        if staging is not None:
                            slot = staging.acquire(stop)
                            if slot is None:
                                return
                            images, labels = staging.images[slot].numpy(), staging.labels[slot].numpy()
                        else:
                            images = np.empty((self.batch_size,) + window_images.shape[1:], np.uint8)
                            labels = np.empty(self.batch_size, np.int64)
                    end = pos + self.batch_size - filled
                    part = take[pos:end]
                    # mode="clip": the rows are in range, and "raise" would gather into a temporary first
                    np.take(window_images, part, axis=0, out=images[filled:filled + len(part)], mode="clip")
                    labels[filled:filled + len(part)] = self.labels[take_rows[pos:end]]
                    filled += len(part)
                    pos += len(part)
                    if filled == self.batch_size:
                        if not put((slot, filled) if staging is not None else (images, labels)):
                            return
                        slot, images, labels, filled = None, None, None, 0
                del window_images
        if filled and not self.train:  # the last, partial batch of an evaluation pass
            put((slot, filled) if staging is not None else (images[:filled], labels[:filled]))
        elif slot is not None:
            staging.release(slot)

    def _read_windows(self, windows: list[list[Block]], stop: threading.Event):
        """(images (k, S, S, 3) uint8, window) per window, k its rows read: one contiguous read per block.

        One file open at a time, without HDF5's chunk cache (1 MiB per open file by default): blocks are read whole
        and never twice, and memory must not grow with the number of shards. Files are opened in the thread that
        reads them and closed here."""
        open_shard, f = -1, None
        try:
            for window in windows:
                if stop.is_set():
                    return
                images = np.empty((sum(len(b) for b in window), self.stored_size, self.stored_size, 3), np.uint8)
                at = 0
                for b in window:
                    if b.shard != open_shard:
                        if f is not None:
                            f.close()
                        # checked against its sha256 (once per process), named if HDF5 cannot open it
                        shard = self._shards[b.shard]
                        f = self.reader.open_shard(self.size, shard.split, shard.index, rdcc_nbytes=0)
                        open_shard = b.shard
                    f["images"].read_direct(images, np.s_[b.start:b.stop], np.s_[at:at + len(b)])
                    at += len(b)
                yield images, window
                del images
        finally:
            if f is not None:
                f.close()


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
