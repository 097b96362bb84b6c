"""The selected rows held whole, as one uint8 tensor, and batches gathered from it: `ResidentSource`.

The rows are read once, on first use, in one contiguous read per shard, into one tensor - on the GPU (placement
"device") or in ordinary host memory (placement "host") - and each batch is an index slice of the epoch plan's
permutation (airbench-style; no per-image Python work at all). On the device the gather is a device op; the plan's
indices travel there once per epoch, from pinned memory, so even that copy does not wait for queued work. From host
memory to CUDA a background thread gathers each batch into a reusable pinned buffer (`staging.Staging`).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.store import CacheReader
from train.data.plan import EpochPlan
from train.data.rows import SourceShard, plan_blocks, window_selection
from train.data.staging import Staging, produced_batches


class ResidentSource:
    """Batches (images (B, S, S, 3) uint8, labels (B,) int64) on `device` of the selected rows `source_rows` (sorted
    global source indices into `shards`), held in `placement` ("device" or "host"); `labels` (n,) int64 are
    theirs."""

    def __init__(self, reader: CacheReader, size: int, shards: list[SourceShard], source_rows: np.ndarray,
                 stored_size: int, labels: np.ndarray, device: torch.device, placement: str):
        self.reader, self.size, self.shards, self.source_rows = reader, size, shards, source_rows
        self.stored_size, self.labels, self.device, self.placement = stored_size, labels, device, placement
        self._labels_dev = torch.from_numpy(labels).to(device)
        self._data: torch.Tensor | None = None  # (n, S, S, 3) uint8, the selected rows, once read

    def batches(self, plan: EpochPlan, staged: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._data is None:
            self._data = self._load()
        idx = torch.from_numpy(plan.indices.copy())  # (rows,) int64; the plan's own array is read-only
        if staged:
            staging = Staging(plan.batch_size, self._data.shape[1:], self.device)
            yield from produced_batches(lambda put, stop: self._produce(plan, idx, staging, put, stop), staging)
            return
        # Once per epoch; from pinned memory so that even this copy does not wait for queued work.
        idx_dev = idx.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else idx
        for batch in plan.batch_slices():
            sel_dev = idx_dev[batch]
            images = torch.index_select(self._data, 0, sel_dev)  # device gather, or host gather on a CPU device
            yield images, torch.index_select(self._labels_dev, 0, sel_dev)

    def _produce(self, plan: EpochPlan, idx: torch.Tensor, staging: Staging, put, stop) -> None:
        """Producer thread: gather each batch of the resident host rows into a staging buffer."""
        labels = torch.from_numpy(self.labels)
        for batch in plan.batch_slices():
            sel = idx[batch]
            slot = staging.acquire(stop)
            if slot is None:
                return
            torch.index_select(self._data, 0, sel, out=staging.images[slot][:len(sel)])
            torch.index_select(labels, 0, sel, out=staging.labels[slot][:len(sel)])
            if not put((slot, len(sel))):
                return

    def _load(self) -> torch.Tensor:
        """The selected rows (n, S, S, 3) uint8, in subset order: one contiguous read per shard that holds any.

        A fully selected shard is read straight into place (host) or into one shard-sized host array (device). A
        partly selected one is read from its first to its last selected row into a temporary array and its selected
        rows gathered from it, so peak memory is the selected rows plus one shard: contiguous reads are much faster
        than HDF5 point selections, and reading whole splits before selecting would hold every unselected row too."""
        shape = (len(self.source_rows), self.stored_size, self.stored_size, 3)
        # Ordinary memory: batches are gathered into a few pinned buffers, so the rows themselves need no pinning.
        data = torch.empty(shape, dtype=torch.uint8, device=self.device if self.placement == "device" else "cpu")
        for block in plan_blocks(self.shards, self.source_rows):  # one block per shard with selected rows
            shard, rows = self.shards[block.shard], slice(block.first, block.first + block.count)
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
