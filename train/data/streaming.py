"""The selected rows read window by window while the loader runs: `StreamingSource`.

For rows that do not fit the memory budget. A background thread reads each window of the epoch plan (contiguous
blocks of shard rows, `plan.Window`) into one array, takes the window's rows in the plan's order and gathers them
into batches; one window and a few batches exist at once, so memory stays bounded whatever the cache size. On CUDA
the batches are gathered straight into reusable pinned buffers and copied on a side stream (`staging.Staging`);
on a CPU device each batch is a fresh array the consumer keeps.

h5py files are opened in the thread that reads them and closed after each read pass, never carried across fork:
one file open at a time, without HDF5's chunk cache (1 MiB per open file by default), since blocks are read whole
and never twice, and memory must not grow with the number of shards.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import closing

import numpy as np
import torch

from pipeline.store import CacheReader
from train.data.plan import EpochPlan, Window
from train.data.rows import SourceShard
from train.data.staging import Staging, produced_batches


class StreamingSource:
    """Batches (images (B, S, S, 3) uint8, labels (B,) int64) on `device`, read from the cache's `shards` as the
    plan's windows say; `labels` (n,) int64 are the selected rows' (indexed by the plan's subset indices)."""

    def __init__(self, reader: CacheReader, size: int, shards: list[SourceShard], stored_size: int,
                 labels: np.ndarray, device: torch.device):
        self.reader, self.size, self.shards, self.stored_size = reader, size, shards, stored_size
        self.labels, self.device = labels, device

    def batches(self, plan: EpochPlan, staged: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        assert plan.windows is not None, "a streamed epoch needs a plan of windows (BlockOrder)"
        shape = (self.stored_size, self.stored_size, 3)
        staging = Staging(plan.batch_size, shape, self.device) if staged else None
        yield from produced_batches(lambda put, stop: self._produce(plan, staging, put, stop), staging)

    def _produce(self, plan: EpochPlan, staging: Staging | None, put, stop: threading.Event) -> None:
        """Producer thread: read each window, take its rows in the plan's order, and gather them into batches.

        A batch may take rows from two windows; only an evaluation plan ends with a partial batch. With staging the
        rows go straight into a pinned buffer; without, into a fresh array per batch (the consumer keeps it)."""
        batch_size = plan.batch_size
        slot, images, labels, filled = None, None, None, 0
        with closing(self._read_windows(plan.windows, stop)) as reads:  # closes the open shard on any exit
            for window_images, window in reads:
                # rows read but not selected are never taken: `positions` index only the selected ones
                take, take_rows = window.positions, window.rows
                pos = 0
                while pos < len(take):
                    if images is None:  # start a batch
                        if staging is not None:
                            slot = staging.acquire(stop)
                            if slot is None:
                                return
                            images, labels = staging.images[slot].numpy(), staging.labels[slot].numpy()
                        else:
                            images = np.empty((batch_size,) + window_images.shape[1:], np.uint8)
                            labels = np.empty(batch_size, np.int64)
                    end = pos + batch_size - filled
                    part = take[pos:end]
                    # mode="clip": the rows are in range, and "raise" would gather into a temporary first
                    np.take(window_images, part, axis=0, out=images[filled:filled + len(part)], mode="clip")
                    labels[filled:filled + len(part)] = self.labels[take_rows[pos:end]]
                    filled += len(part)
                    pos += len(part)
                    if filled == batch_size:
                        if not put((slot, filled) if staging is not None else (images, labels)):
                            return
                        slot, images, labels, filled = None, None, None, 0
                del window_images
        if filled:  # the last, partial batch of an evaluation plan
            put((slot, filled) if staging is not None else (images[:filled], labels[:filled]))

    def _read_windows(self, windows: tuple[Window, ...], stop: threading.Event):
        """(images (k, S, S, 3) uint8, window) per window, k its rows read: one contiguous read per block; files are
        opened in the thread that reads them and closed here."""
        open_shard, f = -1, None
        try:
            for window in windows:
                if stop.is_set():
                    return
                images = np.empty((window.rows_read, self.stored_size, self.stored_size, 3), np.uint8)
                at = 0
                for b in window.blocks:
                    if b.shard != open_shard:
                        if f is not None:
                            f.close()
                        # checked against its sha256 (once per process), named if HDF5 cannot open it
                        shard = self.shards[b.shard]
                        f = self.reader.open_shard(self.size, shard.split, shard.index, rdcc_nbytes=0)
                        open_shard = b.shard
                    f["images"].read_direct(images, np.s_[b.start:b.stop], np.s_[at:at + len(b)])
                    at += len(b)
                yield images, window
                del images
        finally:
            if f is not None:
                f.close()
