"""CacheLoader: order, coverage, DDP partitions, resident/streaming equivalence, bounded windows, file handles."""
import numpy as np
import pytest
import torch

from pipeline import store
from pipeline.config import PreprocessConfig
from train.data.loader import CacheLoader
from tests.helpers import MODES, SIZE, SPLITS, all_images, open_h5_files, row_of, source, subset
from tests.train_helpers import collect


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
def test_eval_covers_every_image_once_in_order_with_aligned_labels(cache_dir, kw):
    loader = CacheLoader(cache_dir, SIZE, "train", 8, **kw)
    assert loader.mode == kw["mode"]
    images, labels = collect(loader)
    np.testing.assert_array_equal(images, all_images(cache_dir))
    np.testing.assert_array_equal(labels, loader.labels)
    np.testing.assert_array_equal(loader.epoch_indices(), np.arange(loader.n))
    meta = store.CacheReader(cache_dir).read_meta(SIZE, "train")
    assert list(loader.paths) == list(meta["paths"])
    assert all(("_all" in p) == (y == 1) for p, y in zip(loader.paths, labels))  # labels follow paths
    assert len(loader) == -(-loader.n // 8)


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
def test_train_order_depends_only_on_seed_and_epoch(cache_dir, kw):
    def order(seed, epoch):
        loader = CacheLoader(cache_dir, SIZE, "train", 8, train=True, seed=seed, **kw)
        loader.set_epoch(epoch)
        images, labels = collect(loader)
        idx = loader.epoch_indices()
        np.testing.assert_array_equal(images, all_images(cache_dir)[idx])  # rows are what epoch_indices says
        np.testing.assert_array_equal(labels, loader.labels[idx])
        assert len(labels) % 8 == 0 and len(labels) == len(loader) * 8  # drop_last
        assert len(set(idx)) == len(idx)
        return idx
    a = order(0, 0)
    np.testing.assert_array_equal(a, order(0, 0))
    assert not np.array_equal(a, order(0, 1)) and not np.array_equal(a, order(1, 0))
    assert not np.array_equal(np.sort(a), a)  # shuffled


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_parts_of_one_plan(cache_dir, kw, world_size):
    parts = []
    for rank in range(world_size):
        loader = CacheLoader(cache_dir, SIZE, "train", 4, train=True, seed=5, rank=rank, world_size=world_size, **kw)
        loader.set_epoch(2)
        _, labels = collect(loader)
        parts.append(loader.epoch_indices())
        assert len(labels) == len(parts[-1])
    assert len({len(p) for p in parts}) == 1 and len(parts[0]) > 0
    flat = np.concatenate(parts)
    assert len(set(flat)) == len(flat)
    evals = [CacheLoader(cache_dir, SIZE, "train", 4, rank=r, world_size=world_size, **kw).epoch_indices()
             for r in range(world_size)]
    np.testing.assert_array_equal(np.concatenate(evals), np.arange(CacheLoader(cache_dir, SIZE, "train", 4).n))


def test_streaming_windows_respect_the_memory_budget(cache_dir):
    image_bytes = PreprocessConfig().geometry(SIZE).stored_size ** 2 * 3
    budget = 3 * 8 * image_bytes
    loader = CacheLoader(cache_dir, SIZE, "train", 4, train=True, mode="auto", memory_budget_bytes=budget,
                         block_images=20)
    assert loader.mode == "streaming" and loader.n > 8  # the split is over the budget
    windows = [w.blocks for w in loader.plan(0).windows]
    assert max(sum(len(b) for b in w) for w in windows) <= 8 and len(windows) > 2
    assert 3 * max(sum(len(b) for b in w) for w in windows) * image_bytes <= budget


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
def test_no_file_stays_open_even_after_an_early_break(cache_dir, kw):
    loader = CacheLoader(cache_dir, SIZE, "train", 4, train=True, **kw)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    import gc
    gc.collect()
    assert open_h5_files() == []
    collect(loader)  # and it iterates again from the start
    assert open_h5_files() == []


def test_errors_name_the_value(cache_dir):
    with pytest.raises(ValueError, match="lower --batch-size"):
        CacheLoader(cache_dir, SIZE, "test", 500, train=True)
    with pytest.raises(ValueError, match="mode must be"):
        CacheLoader(cache_dir, SIZE, "train", 4, mode="fast")
    with pytest.raises(store.CacheError, match="size 99 is not cached"):
        CacheLoader(cache_dir, 99, "train", 4)
    with pytest.raises(store.CacheError, match="no split 'prelim'"):
        CacheLoader(cache_dir, SIZE, "prelim", 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_cuda_batches_are_on_the_device(cache_dir, mode):
    loader = CacheLoader(cache_dir, SIZE, "train", 8, device="cuda", train=True, mode=mode)
    images, labels = next(iter(loader))
    assert images.is_cuda and labels.is_cuda and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert loader.placement == ("device" if mode == "resident" else "host")


def test_the_benchmarks_training_steps_run(cache_dir):
    """The benchmark's training-step timing (used on CUDA) runs end to end; here on the CPU, one model."""
    from train.augment import GpuAugment
    from train.bench.loader import time_training
    loader = CacheLoader(cache_dir, SIZE, "train", 8, train=True)
    augment = GpuAugment.from_manifest(store.read_manifest(cache_dir), SIZE).train()
    # more steps than an epoch has batches: the fed loop must go on into the next epoch
    steps = loader.n // 8 + 2
    result = time_training(loader, augment, torch.device("cpu"), models=("resnet18",), steps=steps, warmup_steps=1,
                           rounds=3)
    r = result["resnet18"]
    # medians of alternating rounds, and the resident rounds' spread beside them
    assert len(r["resident_rounds"]) == len(r["fed_rounds"]) == 3
    assert r["resident_imgs_per_s"] == sorted(r["resident_rounds"])[1]
    assert r["fed_imgs_per_s"] == sorted(r["fed_rounds"])[1]
    rates = r["resident_rounds"]
    assert r["resident_spread"] == pytest.approx((max(rates) - min(rates)) / r["resident_imgs_per_s"])
    assert len(loader) < steps and r["images"] == steps * 8 and r["batch_size"] == 8 and r["size"] == SIZE
    assert np.isfinite(r["resident_imgs_per_s"]) and r["resident_imgs_per_s"] > 0
    assert np.isfinite(r["fed_imgs_per_s"]) and r["fed_imgs_per_s"] > 0
    assert r["data_share"] == pytest.approx(1 - r["fed_imgs_per_s"] / r["resident_imgs_per_s"])
    assert r["data_share"] < 1


# ---------------------------------------------------------------------- subsets of rows, across splits

def staged(loader: CacheLoader, on: bool) -> CacheLoader:
    loader.use_staging = on  # the CUDA staging protocol, run on the CPU (as tests/test_staging.py does)
    return loader


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_one_split_as_a_tuple_and_all_rows_equal_the_plain_loader(cache_dir, kw, train):
    n = store.CacheReader(cache_dir).count(SIZE, "train")
    for epoch in (0, 1):
        loaders = [CacheLoader(cache_dir, SIZE, "train", 8, train=train, seed=2, **kw),
                   CacheLoader(cache_dir, SIZE, ("train",), 8, train=train, seed=2, **kw),
                   CacheLoader(cache_dir, SIZE, ["train"], 8, rows=np.arange(n)[::-1], train=train, seed=2, **kw)]
        for loader in loaders:
            loader.set_epoch(epoch)
        plain = collect(loaders[0])
        for other in loaders[1:]:
            np.testing.assert_array_equal(other.epoch_indices(), loaders[0].epoch_indices())
            np.testing.assert_array_equal(other.source_rows, np.arange(n))
            images, labels = collect(other)
            np.testing.assert_array_equal(images, plain[0])
            np.testing.assert_array_equal(labels, plain[1])


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
@pytest.mark.parametrize("on", [False, True], ids=["plain", "staged"])
def test_eval_over_a_subset_of_two_splits_yields_the_selected_rows_once_in_order(cache_dir, kw, on):
    rows = subset(cache_dir)
    chosen = np.sort(rows)
    images, meta = source(cache_dir)
    loader = staged(CacheLoader(cache_dir, SIZE, SPLITS, 8, rows=rows, **kw), on)
    assert loader.mode == kw["mode"] and loader.n == len(rows) == 30
    np.testing.assert_array_equal(loader.source_rows, chosen)
    got, labels = collect(loader)
    np.testing.assert_array_equal(got, images[chosen])
    np.testing.assert_array_equal(labels, meta["labels"][chosen])
    np.testing.assert_array_equal(loader.labels, meta["labels"][chosen])
    assert list(loader.paths) == list(meta["paths"][chosen])
    assert list(loader.patients) == list(meta["patients"][chosen])
    np.testing.assert_array_equal(loader.epoch_indices(), np.arange(30))
    assert len(loader) == -(-30 // 8)
    # two ranks: contiguous parts that together are every selected row once, in order
    parts = []
    for rank in range(2):
        part = CacheLoader(cache_dir, SIZE, SPLITS, 4, rows=rows, rank=rank, world_size=2, **kw)
        got, _ = collect(staged(part, on))
        np.testing.assert_array_equal(got, images[chosen[part.epoch_indices()]])
        parts.append(part.epoch_indices())
    np.testing.assert_array_equal(np.concatenate(parts), np.arange(30))


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
@pytest.mark.parametrize("on", [False, True], ids=["plain", "staged"])
def test_train_over_a_subset_uses_only_its_rows_in_an_order_set_by_seed_and_epoch(cache_dir, kw, on):
    rows = subset(cache_dir)
    images, meta = source(cache_dir)

    def epoch_rows(epoch, rank=0, world_size=1, batch_size=4):
        loader = CacheLoader(cache_dir, SIZE, SPLITS, batch_size, rows=rows, train=True, seed=3, rank=rank,
                             world_size=world_size, **kw)
        loader.set_epoch(epoch)
        got, labels = collect(staged(loader, on))
        found = row_of(got, images)  # by content, not by what the loader says
        assert len(found) == len(loader) * batch_size == loader.rows_per_rank()
        np.testing.assert_array_equal(found, loader.source_rows[loader.epoch_indices()])
        np.testing.assert_array_equal(labels, meta["labels"][found])
        assert set(found) <= set(rows) and len(set(found)) == len(found)
        return found
    a = epoch_rows(0)
    assert len(a) == 30 // 4 * 4 and not np.array_equal(a, np.sort(a))
    np.testing.assert_array_equal(a, epoch_rows(0))  # a second loader, the same order
    assert not np.array_equal(a, epoch_rows(1))
    r0, r1 = epoch_rows(2, 0, 2, 3), epoch_rows(2, 1, 2, 3)
    assert len(r0) == len(r1) > 0 and not set(r0) & set(r1)


def test_streaming_a_subset_in_small_windows_reads_only_its_blocks_and_matches_resident(cache_dir):
    rows = subset(cache_dir)
    images, _ = source(cache_dir)
    image_bytes = PreprocessConfig().geometry(SIZE).stored_size ** 2 * 3
    streaming = CacheLoader(cache_dir, SIZE, SPLITS, 5, rows=rows, train=True, mode="streaming", block_images=3,
                            memory_budget_bytes=3 * 8 * image_bytes)
    resident = CacheLoader(cache_dir, SIZE, SPLITS, 5, rows=rows, train=True, mode="resident")
    windows = [w.blocks for w in streaming.plan(0).windows]
    assert len(windows) > 2 and max(sum(len(b) for b in w) for w in windows) <= 8
    # blocks start and end on selected rows, and hold each selected row exactly once
    blocks = streaming.traversal.blocks
    selected = set(rows)
    read = np.concatenate([np.arange(b.offset, b.offset + len(b)) for b in blocks])
    assert {b.offset for b in blocks} <= selected
    assert {b.offset + len(b) - 1 for b in blocks} <= selected
    assert selected <= set(read) and len(set(read)) == len(read) and not set(range(21, 28)) & set(read)
    assert sum(b.count for b in blocks) == 30 and len(read) > 30  # some rows read only to be dropped
    for epoch in (0, 1):
        streaming.set_epoch(epoch)
        resident.set_epoch(epoch)
        a, b = row_of(collect(streaming)[0], images), row_of(collect(resident)[0], images)
        assert len(a) == 30  # a batch size that divides the subset: nothing dropped
        np.testing.assert_array_equal(np.sort(a), np.sort(b))
        np.testing.assert_array_equal(np.sort(a), np.sort(rows))


def test_a_patient_fold_and_its_complement_split_the_rows(cache_dir):
    _, meta = source(cache_dir)
    fold = np.isin(meta["patients"], ["1", "H1"])  # one patient of each split
    held = CacheLoader(cache_dir, SIZE, SPLITS, 4, rows=np.flatnonzero(fold))
    rest = CacheLoader(cache_dir, SIZE, SPLITS, 4, rows=np.flatnonzero(~fold), train=True)
    assert set(held.patients) == {"1", "H1"} and not set(held.patients) & set(rest.patients)
    assert sorted(list(held.paths) + list(rest.paths)) == sorted(meta["paths"])
    assert held.n + rest.n == len(meta["paths"])


def test_subset_errors_name_the_value(cache_dir):
    def make(split=SPLITS, rows=None, batch_size=4, **kw):
        return CacheLoader(cache_dir, SIZE, split, batch_size, rows=rows, **kw)
    with pytest.raises(ValueError, match=r"no split 'prelim' \(splits: \['test', 'train', 'valid'\]\)"):
        make(("train", "prelim"))
    with pytest.raises(ValueError, match="non-empty sequence"):
        make(())
    with pytest.raises(ValueError, match="split names a split twice"):
        make(("train", "train"))
    with pytest.raises(ValueError, match="rows is empty"):
        make(rows=[])
    with pytest.raises(ValueError, match=r"rows: 9 appears more than once"):
        make(rows=[3, 9, 1, 9])
    with pytest.raises(ValueError, match=r"rows: 56 is out of range \[0, 56\)"):
        make(rows=[0, 56])
    with pytest.raises(ValueError, match=r"rows: -1 is out of range \[0, 56\)"):
        make(rows=np.array([-1, 5]))
    with pytest.raises(ValueError, match=r"rows: 34 is out of range \[0, 34\)"):
        make("train", rows=[33, 34])  # the range is the source's, here one split
    with pytest.raises(ValueError, match="integer source indices, got dtype bool"):
        make(rows=np.ones(56, bool))
    with pytest.raises(ValueError, match="1-D"):
        make(rows=np.zeros((2, 2), int))
    with pytest.raises(ValueError, match=r"\(rows: 3 selected\) gives 0 images per rank.*lower --batch-size"):
        make(rows=[0, 40, 50], train=True)
    with pytest.raises(ValueError, match="gives 0 images per rank.*lower --batch-size"):
        make(rows=[0, 1, 40, 50, 51], batch_size=3, train=True, world_size=2, rank=1)
