"""Batches of cached uint8 images on the training device: `CacheLoader`.

Two modes, one order:
- resident (default when the split fits the memory budget): the split is read once, in one contiguous read per
  shard, into one tensor - on the GPU when the device is CUDA and it fits there, else in (pinned) host memory - and
  each batch is an index slice of a per-epoch permutation (airbench-style; no per-image Python work at all).
- streaming (when it does not fit, or when asked): contiguous blocks of rows in a per-epoch random order, read by a
  background thread into windows of a bounded size, each window shuffled and cut into batches; pinned staging and
  non_blocking copies on CUDA. At most three windows exist at once, so memory stays bounded whatever the cache size.

The order depends only on (seed, epoch) (and rank): permutations are drawn with CPU generators, then moved to the
device, so a seed means the same order on any device. With world_size > 1 each rank gets a disjoint, equally sized
part of the same epoch plan; evaluation (train=False) gives every image exactly once, in cache order, split into
contiguous per-rank parts, with `epoch_indices()` naming the image behind every row.

h5py files are opened in the thread that reads them and closed after each read pass, never carried across fork.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from pipeline.store import CacheReader

log = logging.getLogger(__name__)
MODES = ("auto", "resident", "streaming")


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


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of one shard; `offset` is the global index of row `start`."""
    shard: int
    start: int
    stop: int
    offset: int

    def __len__(self) -> int:
        return self.stop - self.start


def _window_rows(window: list[Block]) -> np.ndarray:
    """Global indices of a window's rows, in read order."""
    return np.concatenate([np.arange(b.offset, b.offset + len(b)) for b in window])


class CacheLoader:
    """Iterates (images uint8 (B, 3, S, S) on `device`, labels int64 (B,) on `device`) over one split of a cache.

    `images` is the NHWC cache row viewed as NCHW (`permute`), i.e. a channels_last tensor.
    """

    def __init__(self, cache: str | os.PathLike | CacheReader, size: int, split: str, batch_size: int, *,
                 device: str | torch.device = "cpu", train: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, mode: str = "auto", memory_budget_bytes: int | None = None,
                 block_images: int = 64):
        self.reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.size, self.split, self.batch_size = size, split, batch_size
        self.device = torch.device(device)
        self.train, self.seed, self.rank, self.world_size = train, seed, rank, world_size
        self.stored_size = self.reader.size_info(size)["stored_size"]
        self.shard_paths = self.reader.shard_paths(size, split)
        self.shard_counts = [s["count"] for s in self.reader.shards(size, split)]
        self.n = sum(self.shard_counts)
        meta = self.reader.read_meta(size, split)
        self.labels, self.paths = meta["labels"].astype(np.int64), meta["paths"]
        self.image_bytes = self.stored_size ** 2 * 3
        self.epoch = 0
        host_budget = memory_budget_bytes if memory_budget_bytes is not None else available_host_bytes() // 2
        self.mode, self.placement = self._choose_mode(mode, host_budget, memory_budget_bytes)
        # Three windows exist at most (being read, queued, being cut into batches).
        self.window_images = max(batch_size, host_budget // (3 * self.image_bytes))
        self.block_images = min(block_images, self.window_images)
        self._data: torch.Tensor | None = None  # resident images (N, S, S, 3) uint8
        self._labels_dev = torch.from_numpy(self.labels).to(self.device)
        if train and self.rows_per_rank() < batch_size:
            raise ValueError(f"split {split!r} gives {self.rows_per_rank()} images per rank, fewer than one batch of "
                             f"{batch_size}; lower --batch-size")

    # ------------------------------------------------------------------ mode and plan

    def _choose_mode(self, mode: str, host_budget: int, given_budget: int | None) -> tuple[str, str]:
        """(mode, placement): resident on the device, in pinned or plain host memory, or streaming."""
        total = self.n * self.image_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            device_budget = given_budget if given_budget is not None else free // 3  # leave room for the model
            if mode in ("auto", "resident") and total <= device_budget:
                return "resident", "device"
        if mode == "resident" or (mode == "auto" and total <= host_budget):
            if mode == "resident" and total > host_budget:
                log.warning("resident mode asked for %.1f GiB, over the %.1f GiB budget", total / 2**30,
                            host_budget / 2**30)
            return "resident", "pinned" if self.device.type == "cuda" else "host"
        return "streaming", "pinned" if self.device.type == "cuda" else "host"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _blocks(self) -> list[Block]:
        blocks, offset = [], 0
        for shard, count in enumerate(self.shard_counts):
            for start in range(0, count, self.block_images):
                blocks.append(Block(shard, start, min(start + self.block_images, count), offset + start))
            offset += count
        return blocks

    def _rank_blocks(self, epoch: int) -> tuple[list[Block], int]:
        """This rank's blocks for streaming, in read order, and how many rows it uses."""
        blocks = self._blocks()
        if not self.train:
            parts = np.array_split(np.arange(len(blocks)), self.world_size)
            mine = [blocks[i] for i in parts[self.rank]]
            return mine, sum(len(b) for b in mine)
        order = _epoch_generator(self.seed, epoch).permutation(len(blocks))
        per_rank = [[blocks[i] for i in order[r::self.world_size]] for r in range(self.world_size)]
        rows = min(sum(len(b) for b in part) for part in per_rank)  # equal across ranks
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
        """Global index (into `labels`/`paths`) of every row this rank yields in `epoch`, in order."""
        epoch = self.epoch if epoch is None else epoch
        if self.mode == "resident":
            if not self.train:
                return np.array_split(np.arange(self.n), self.world_size)[self.rank]
            perm = _epoch_generator(self.seed, epoch).permutation(self.n)
            return perm[self.rank::self.world_size][:self.rows_per_rank(epoch)]
        blocks, rows = self._rank_blocks(epoch)
        parts = [_window_rows(w)[self._window_order(w, epoch)] for w in self._windows(blocks)]
        return np.concatenate(parts or [np.empty(0, np.int64)])[:rows]

    def _windows(self, blocks: list[Block]) -> list[list[Block]]:
        windows, current, count = [], [], 0
        for block in blocks:
            if current and count + len(block) > self.window_images:
                windows.append(current)
                current, count = [], 0
            current.append(block)
            count += len(block)
        return windows + ([current] if current else [])

    def _window_order(self, window: list[Block], epoch: int) -> np.ndarray:
        """Positions within the window, in the order they are yielded."""
        count = sum(len(b) for b in window)
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
        shape = (self.n, self.stored_size, self.stored_size, 3)
        if self.placement == "device":
            data = torch.empty(shape, dtype=torch.uint8, device=self.device)
            offset = 0
            for path, count in zip(self.shard_paths, self.shard_counts):
                host = np.empty((count,) + shape[1:], np.uint8)
                with h5py.File(path, "r") as f:
                    f["images"].read_direct(host)
                data[offset:offset + count].copy_(torch.from_numpy(host))
                offset += count
            return data
        data = torch.empty(shape, dtype=torch.uint8, pin_memory=self.placement == "pinned")
        self.reader.read_images_into(self.size, self.split, data.numpy())
        return data

    def _iter_resident(self):
        if self._data is None:
            self._data = self._load_resident()
        idx = torch.from_numpy(self.epoch_indices())
        idx_dev = idx.to(self.device)
        for start in range(0, len(idx), self.batch_size):
            if self.train and start + self.batch_size > len(idx):
                break
            sel, sel_dev = idx[start:start + self.batch_size], idx_dev[start:start + self.batch_size]
            if self.placement == "device":
                images = self._data[sel_dev]
            else:
                images = self._to_device(torch.index_select(self._data, 0, sel))
            yield images.permute(0, 3, 1, 2), self._labels_dev[sel_dev]

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return batch
        # A fresh pinned buffer per batch: the async copy may still read it after we return.
        return batch.pin_memory().to(self.device, non_blocking=True)

    def _iter_streaming(self):
        blocks, rows = self._rank_blocks(self.epoch)
        windows = self._windows(blocks)
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()
        thread = threading.Thread(target=self._read_windows, args=(windows, q, stop), daemon=True,
                                  name="cache-reader")
        thread.start()
        try:
            pending = None  # (images (k, S, S, 3), labels (k,)), k < batch_size: rows carried into the next window
            emitted = 0
            for w_index in range(len(windows)):
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                window_images, window_rows = item
                take = self._window_order(windows[w_index], self.epoch)[:max(0, rows - emitted)]
                emitted += len(take)
                start = 0
                if pending is not None:  # complete the carried partial batch first
                    start = self.batch_size - len(pending[1])
                    part = take[:start]
                    pending = (np.concatenate([pending[0], window_images[part]]),
                               np.concatenate([pending[1], self.labels[window_rows[part]]]))
                    if len(pending[1]) < self.batch_size:
                        continue
                    yield self._batch(*pending)
                    pending = None
                for begin in range(start, len(take), self.batch_size):
                    part = take[begin:begin + self.batch_size]
                    images, labels = window_images[part], self.labels[window_rows[part]]
                    if len(part) < self.batch_size:
                        pending = (images, labels)
                        break
                    yield self._batch(images, labels)
                del window_images
            if pending is not None and not self.train:
                yield self._batch(*pending)
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(0.05)

    def _batch(self, images: np.ndarray, labels: np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        y = torch.from_numpy(labels).to(self.device, non_blocking=True)
        return x.permute(0, 3, 1, 2), y

    def _read_windows(self, windows: list[list[Block]], q: queue.Queue, stop: threading.Event) -> None:
        """Reader thread: one contiguous read per block into a window array; files opened here, closed here."""
        # One file open at a time, without HDF5's chunk cache (1 MiB per open file by default): blocks are read
        # whole and never twice, and memory must not grow with the number of shards.
        open_shard, f = -1, None
        try:
            for window in windows:
                rows = _window_rows(window)
                images = np.empty((len(rows), self.stored_size, self.stored_size, 3), np.uint8)
                at = 0
                for b in window:
                    if b.shard != open_shard:
                        if f is not None:
                            f.close()
                        f, open_shard = h5py.File(self.shard_paths[b.shard], "r", rdcc_nbytes=0), b.shard
                    f["images"].read_direct(images, np.s_[b.start:b.stop], np.s_[at:at + len(b)])
                    at += len(b)
                while not stop.is_set():
                    try:
                        q.put((images, rows), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as err:  # handed to the consumer, which re-raises it
            q.put(err)
        finally:
            if f is not None:
                f.close()
