"""The epoch plan: one per (epoch, rank), read alike by the iteration and by `epoch_indices`, in every mode."""
import numpy as np
import pytest
import torch

from train.data.loader import CacheLoader
from train.data.plan import BlockOrder, EpochPlan, RowOrder, Window
from train.data.rows import SourceShard, plan_blocks
from tests.helpers import MODES, SIZE, SPLITS, row_of, source, subset


def _loaders(cache_dir, kw, train, world_size, rows, batch_size=4, epoch=1):
    out = []
    for rank in range(world_size):
        loader = CacheLoader(cache_dir, SIZE, SPLITS, batch_size, rows=rows, train=train, seed=6, rank=rank,
                             world_size=world_size, **kw)
        loader.set_epoch(epoch)
        out.append(loader)
    return out


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("chosen", ["all", "subset"])
def test_iteration_yields_exactly_the_plan_and_epoch_indices_name_it(cache_dir, kw, train, world_size, chosen):
    rows = None if chosen == "all" else subset(cache_dir)
    images, meta = source(cache_dir)
    seen = []
    for loader in _loaders(cache_dir, kw, train, world_size, rows):
        plan = loader.plan()
        batches = list(loader)
        found = row_of(torch.cat([x for x, _ in batches]).permute(0, 2, 3, 1).numpy(), images)  # by content
        np.testing.assert_array_equal(found, loader.source_rows[plan.indices])
        np.testing.assert_array_equal(loader.epoch_indices(), plan.indices)
        np.testing.assert_array_equal(torch.cat([y for _, y in batches]).numpy(), meta["labels"][found])
        # cut where the plan says: whole batches in training, one partial batch at most at the end of evaluation
        assert [len(y) for _, y in batches] == [len(plan.indices[s]) for s in plan.batch_slices()]
        assert len(loader) == len(plan) == len(batches) and loader.rows_per_rank() == len(plan.indices) > 0
        if train:
            assert len(plan.indices) % loader.batch_size == 0
        if loader.mode == "streaming":  # the producer's windows hold the same rows, in the same order
            np.testing.assert_array_equal(np.concatenate([w.rows for w in plan.windows]), plan.indices)
        else:
            assert plan.windows is None
        seen.append(found)
    flat = np.concatenate(seen)
    if train:  # disjoint, equal parts
        assert len({len(s) for s in seen}) == 1 and len(set(flat)) == len(flat)
    else:  # every selected row exactly once across the ranks, in source order
        np.testing.assert_array_equal(flat, loader.source_rows)


class _Fixed:
    """A traversal that hands out one given plan, whatever the epoch."""

    def __init__(self, plan: EpochPlan):
        self.given = plan

    def plan(self, epoch: int) -> EpochPlan:
        return self.given


class _Counting:
    """A traversal that counts the plans asked of it."""

    def __init__(self, traversal):
        self.traversal, self.calls = traversal, 0

    def plan(self, epoch: int) -> EpochPlan:
        self.calls += 1
        return self.traversal.plan(epoch)


def _reversed(plan: EpochPlan) -> EpochPlan:
    if plan.windows is None:
        return EpochPlan(plan.epoch, plan.batch_size, plan.indices[::-1].copy())
    windows = tuple(Window(w.blocks, w.positions[::-1].copy(), w.rows[::-1].copy()) for w in plan.windows[::-1])
    return EpochPlan(plan.epoch, plan.batch_size, np.concatenate([w.rows for w in windows]), windows)


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_iteration_takes_its_rows_from_the_plan_object(cache_dir, kw, train):
    """A plan that no traversal would make (every row's order reversed) is what the loader then yields and names:
    nothing recomputes the order beside the plan."""
    images, _ = source(cache_dir)
    loader = _loaders(cache_dir, kw, train, 1, subset(cache_dir), batch_size=5, epoch=3)[0]
    real = loader.traversal.plan(3)
    given = _reversed(real)
    assert not np.array_equal(given.indices, real.indices)
    loader.traversal = _Fixed(given)
    found = row_of(torch.cat([x for x, _ in loader]).permute(0, 2, 3, 1).numpy(), images)
    np.testing.assert_array_equal(found, loader.source_rows[given.indices])
    np.testing.assert_array_equal(loader.epoch_indices(), given.indices)


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
def test_one_plan_per_epoch_serves_every_caller(cache_dir, kw):
    loader = _loaders(cache_dir, kw, True, 1, None, epoch=2)[0]
    loader.traversal = counting = _Counting(loader.traversal)
    for _ in range(2):
        len(loader), loader.rows_per_rank(), loader.epoch_indices(), list(loader)
    assert counting.calls == 1
    loader.set_epoch(3)
    list(loader)
    assert counting.calls == 2 and loader.plan().epoch == 3
    kept = loader.epoch_indices()
    kept[:] = -1  # the caller's copy: the plan itself does not change
    assert (loader.epoch_indices() >= 0).all()


# ---------------------------------------------------------------------- the traversals alone, no cache

def _block_order(world_size=1, rank=0, train=True, seed=0, batch_size=4, selected=0.6, window_images=10):
    """Blocks of 3 over shards of 7, 5, 9 and 1 rows, a random subset of them selected."""
    counts = [7, 5, 9, 1]
    shards = [SourceShard("train", i, c, sum(counts[:i])) for i, c in enumerate(counts)]
    rng = np.random.default_rng(11)
    source_rows = np.flatnonzero(rng.random(sum(counts)) < selected)
    blocks = tuple(plan_blocks(shards, source_rows, 3))
    return BlockOrder(blocks, source_rows, window_images, batch_size, train, seed, rank, world_size)


def _same(a: EpochPlan, b: EpochPlan) -> bool:
    if not np.array_equal(a.indices, b.indices) or (a.windows is None) != (b.windows is None):
        return False
    return a.windows is None or all(
        wa.blocks == wb.blocks and np.array_equal(wa.positions, wb.positions) and np.array_equal(wa.rows, wb.rows)
        for wa, wb in zip(a.windows, b.windows, strict=True))


@pytest.mark.parametrize("make", [lambda **kw: RowOrder(40, **kw), lambda **kw: _block_order(**kw)],
                         ids=["rows", "blocks"])
def test_a_plan_depends_on_seed_and_epoch_only(make):
    kw = dict(batch_size=4, train=True, rank=0, world_size=1)
    a = make(seed=3, **kw).plan(5)
    assert _same(a, make(seed=3, **kw).plan(5))  # another traversal object, the same plan
    assert not _same(a, make(seed=3, **kw).plan(6)) and not _same(a, make(seed=4, **kw).plan(5))
    assert not np.array_equal(np.sort(a.indices), a.indices)  # shuffled
    with pytest.raises(ValueError):
        a.indices[0] = 0  # shared by every caller: read-only


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_block_plans_cover_the_rows_and_their_windows_read_them(world_size, epoch):
    for train in (True, False):
        plans = [_block_order(world_size, r, train, batch_size=2).plan(epoch) for r in range(world_size)]
        order = _block_order(world_size, 0, train, batch_size=2)
        for plan in plans:
            for w in plan.windows:
                assert w.rows_read <= order.window_images
                read = np.concatenate([np.arange(b.offset, b.offset + len(b)) for b in w.blocks])  # source rows
                np.testing.assert_array_equal(read[w.positions], order.source_rows[w.rows])
            np.testing.assert_array_equal(np.concatenate([w.rows for w in plan.windows]), plan.indices)
        flat = np.concatenate([p.indices for p in plans])
        if train:
            assert len({len(p.indices) for p in plans}) == 1 and len(plans[0].indices) % 2 == 0
            assert len(set(flat)) == len(flat) and len(plans[0].indices) > 0
        else:
            np.testing.assert_array_equal(flat, np.arange(len(order.source_rows)))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_row_plans_cover_the_rows(world_size):
    n, batch_size = 23, 3
    evals = [RowOrder(n, batch_size, False, 0, r, world_size).plan(0) for r in range(world_size)]
    np.testing.assert_array_equal(np.concatenate([p.indices for p in evals]), np.arange(n))
    trains = [RowOrder(n, batch_size, True, 0, r, world_size).plan(0) for r in range(world_size)]
    flat = np.concatenate([p.indices for p in trains])
    assert len(set(flat)) == len(flat) and {len(p.indices) for p in trains} == {n // world_size // 3 * 3}
