"""Which cache rows a `CacheLoader` uses, and the contiguous shard reads that hold them.

The source is one or more splits concatenated in the order given (shard order within each split); a global source
index is a position in that concatenation. A subset is a sorted array of global source indices (`source_rows`);
subset index i is the i-th selected row. Because the subset is sorted, the selected rows inside any contiguous
source range are a contiguous range of subset indices, found with two binary searches: no per-row mapping is kept.

A `Block` is one contiguous read of a shard, trimmed to its first and last selected row; unselected rows inside it
are read (one contiguous read is far cheaper than many small ones) and dropped before batching.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.store import CacheReader


@dataclass(frozen=True)
class SourceShard:
    """Shard `index` of `split`, holding global source rows [offset, offset + count)."""
    split: str
    index: int
    count: int
    offset: int


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) of source shard `shard`; `offset` is the global source index of row `start`. It holds the
    selected rows with subset indices [first, first + count)."""
    shard: int
    start: int
    stop: int
    offset: int
    first: int
    count: int

    def __len__(self) -> int:  # rows read (memory), not rows selected
        return self.stop - self.start


def split_names(split: str | Sequence[str]) -> tuple[str, ...]:
    """The split names of a `split` argument: one name, or a non-empty sequence of distinct names."""
    names = (split,) if isinstance(split, str) else tuple(split)
    if not names or not all(isinstance(s, str) for s in names):
        raise ValueError(f"split must be a split name or a non-empty sequence of names, got {split!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"split names a split twice: {split!r}")
    return names


def source_shards(reader: CacheReader, size: int, splits: tuple[str, ...]) -> list[SourceShard]:
    """Every shard of `splits`, in source order (an unknown split raises the reader's CacheError, a ValueError that
    names it and lists the cache's splits)."""
    shards, offset = [], 0
    for split in splits:
        for index, entry in enumerate(reader.shards(size, split)):
            shards.append(SourceShard(split, index, entry["count"], offset))
            offset += entry["count"]
    return shards


def select_rows(rows, total: int) -> np.ndarray:
    """Sorted int64 global source indices: all `total` rows for None, else `rows` checked (non-empty, integers,
    in [0, total), no duplicates)."""
    if rows is None:
        return np.arange(total, dtype=np.int64)
    given = np.asarray(rows)
    if given.ndim != 1:
        raise ValueError(f"rows must be a 1-D array of source indices, got shape {given.shape}")
    if given.size == 0:
        raise ValueError(f"rows is empty: select at least one of the {total} source rows (or pass rows=None for all)")
    if not np.issubdtype(given.dtype, np.integer):  # a boolean mask or floats would be silently misread
        raise ValueError(f"rows must be integer source indices, got dtype {given.dtype}")
    outside = given[(given < 0) | (given >= total)]  # before any cast, so a huge unsigned value is named as given
    if outside.size:
        raise ValueError(f"rows: {outside[0]} is out of range [0, {total}) ({outside.size} value(s) out of range)")
    selected = np.sort(given).astype(np.int64)
    repeated = selected[1:][selected[1:] == selected[:-1]]
    if repeated.size:
        raise ValueError(f"rows: {repeated[0]} appears more than once ({np.unique(repeated).size} duplicated "
                         "value(s))")
    return selected


def plan_blocks(shards: list[SourceShard], source_rows: np.ndarray, block_images: int | None = None) -> list[Block]:
    """Blocks of at most `block_images` shard rows (None: whole shards) on a fixed grid per shard, each trimmed to
    its selected rows; blocks without any are left out. The grid does not depend on the subset, so with every row
    selected the blocks are exactly [0, b), [b, 2b), ... of each shard."""
    blocks = []
    for i, shard in enumerate(shards):
        step = block_images or max(shard.count, 1)
        starts = np.arange(0, shard.count, step)
        stops = np.minimum(starts + step, shard.count)
        firsts = np.searchsorted(source_rows, shard.offset + starts)
        ends = np.searchsorted(source_rows, shard.offset + stops)
        for first, end in zip(firsts.tolist(), ends.tolist()):
            if end > first:
                start = int(source_rows[first]) - shard.offset
                stop = int(source_rows[end - 1]) - shard.offset + 1
                blocks.append(Block(i, start, stop, shard.offset + start, first, end - first))
    return blocks


def window_selection(window: list[Block], source_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions of the selected rows in the window's read order, their subset indices), both (k,) int64."""
    positions, subset, at = [], [], 0
    for b in window:
        positions.append(source_rows[b.first:b.first + b.count] - b.offset + at)
        subset.append(np.arange(b.first, b.first + b.count))
        at += len(b)
    return np.concatenate(positions), np.concatenate(subset)
