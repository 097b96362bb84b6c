"""Which rows a loader yields in one epoch, in which order, cut into which batches, for one rank: `EpochPlan`.

The traversal order is kept apart from the memory that serves it (as FFCV keeps its traversal orders apart from its
memory managers): a traversal (`RowOrder` or `BlockOrder`) makes one `EpochPlan` per epoch, and the same plan
both drives the iteration and answers `CacheLoader.epoch_indices`, so the two cannot disagree.

- `RowOrder` (resident rows): a training epoch is one permutation of all selected rows (airbench-style), rank r
  taking every world_size-th entry from r and whole batches only; evaluation is every row once, in source order,
  split into contiguous per-rank parts (`np.array_split`).
- `BlockOrder` (streamed rows): the rows are read as contiguous blocks of shard rows (`rows.plan_blocks`); a
  training epoch shuffles the blocks, deals them to the ranks in turn, groups each rank's blocks into windows of
  at most `window_images` rows read, and shuffles the selected rows inside each window. Memory stays bounded by a
  window whatever the cache size, and reads stay contiguous (one read per block). Every rank yields as many rows as
  the rank with the fewest, in whole batches, so DDP ranks step together; windows past that point are not read.
  Evaluation deals contiguous runs of blocks to the ranks and yields every row once, in source order.

The order depends only on (seed, epoch) (and rank): every permutation is drawn from a CPU generator seeded with
them, so a seed means the same order on any device. A window's shuffle depends on (seed, epoch) and where the
window starts, not on what came before it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from train.data.rows import Block, window_selection
from train.data.seeds import epoch_generator


def _frozen(a: np.ndarray) -> np.ndarray:
    """`a` as int64, read-only: a plan is shared by the iteration and every caller of `epoch_indices`."""
    a = np.array(a, dtype=np.int64)
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class Window:
    """One streamed read: `blocks` read in order into one array of `rows_read` rows. `positions` (k,) int64 are the
    rows it yields, as positions in that array, in yield order; `rows` (k,) int64 are their subset indices."""
    blocks: tuple[Block, ...]
    positions: np.ndarray
    rows: np.ndarray

    @property
    def rows_read(self) -> int:  # memory, not rows yielded: unselected rows inside a block are read too
        return sum(len(b) for b in self.blocks)


@dataclass(frozen=True)
class EpochPlan:
    """One rank's epoch: `indices` (rows,) int64, the subset index of every row it yields, in order, cut into
    batches of `batch_size` (a training plan holds whole batches only; an evaluation plan may end with a partial
    one). `windows`: for streamed rows, where each row is read (their `rows` concatenated are `indices`); None for
    resident rows, which are gathered by `indices` directly."""
    epoch: int
    batch_size: int
    indices: np.ndarray
    windows: tuple[Window, ...] | None = None

    def __len__(self) -> int:  # batches
        return -(-len(self.indices) // self.batch_size)

    def batch_slices(self) -> Iterator[slice]:
        """Each batch's span of `indices`."""
        for start in range(0, len(self.indices), self.batch_size):
            yield slice(start, start + self.batch_size)


@dataclass(frozen=True)
class RowOrder:
    """The traversal of rows that are all at hand (resident): `n` selected rows."""
    n: int
    batch_size: int
    train: bool
    seed: int
    rank: int = 0
    world_size: int = 1

    def plan(self, epoch: int) -> EpochPlan:
        if not self.train:
            indices = np.array_split(np.arange(self.n), self.world_size)[self.rank]
        else:
            rows = self.n // self.world_size // self.batch_size * self.batch_size  # equal across ranks
            indices = epoch_generator(self.seed, epoch).permutation(self.n)[self.rank::self.world_size][:rows]
        return EpochPlan(epoch, self.batch_size, _frozen(indices))


@dataclass(frozen=True)
class BlockOrder:
    """The traversal of rows read in blocks (streaming): `blocks` (every selected row in exactly one) over the
    sorted subset `source_rows`, windows of at most `window_images` rows read."""
    blocks: tuple[Block, ...]
    source_rows: np.ndarray
    window_images: int
    batch_size: int
    train: bool
    seed: int
    rank: int = 0
    world_size: int = 1

    def plan(self, epoch: int) -> EpochPlan:
        blocks, rows = self._rank_blocks(epoch)
        windows, taken = [], 0
        for group in self._windows(blocks):
            if taken == rows:  # past this rank's share: not read at all
                break
            positions, subset = window_selection(group, self.source_rows)
            order = self._window_order(group, epoch, len(subset))[:rows - taken]
            windows.append(Window(tuple(group), _frozen(positions[order]), _frozen(subset[order])))
            taken += len(order)
        indices = np.concatenate([w.rows for w in windows]) if windows else np.empty(0, np.int64)
        return EpochPlan(epoch, self.batch_size, _frozen(indices), tuple(windows))

    def _rank_blocks(self, epoch: int) -> tuple[list[Block], int]:
        """This rank's blocks, in read order, and how many of their selected rows it yields."""
        blocks = self.blocks
        if not self.train:
            mine = [blocks[i] for i in np.array_split(np.arange(len(blocks)), self.world_size)[self.rank]]
            return mine, sum(b.count for b in mine)
        order = epoch_generator(self.seed, epoch).permutation(len(blocks))
        per_rank = [[blocks[i] for i in order[r::self.world_size]] for r in range(self.world_size)]
        rows = min(sum(b.count for b in part) for part in per_rank)  # equal across ranks
        return per_rank[self.rank], rows // self.batch_size * self.batch_size

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

    def _window_order(self, window: list[Block], epoch: int, count: int) -> np.ndarray:
        """Positions within the window's selected rows, in the order they are yielded."""
        if not self.train:
            return np.arange(count)
        # the stream is where the window starts (+1: stream 0 is the block shuffle's)
        return epoch_generator(self.seed, epoch, window[0].offset + 1).permutation(count)
