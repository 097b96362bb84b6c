"""CacheLoader: order, coverage, DDP partitions, resident/streaming equivalence, bounded windows, file handles."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import store
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from train.loader import CacheLoader
from tests.conftest import patient_folders

SIZE = 16


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A cache of 60 train-ish images in shards of 7 (uneven, so blocks and shards do not line up)."""
    root = tmp_path_factory.mktemp("loader")
    patient_folders(root / "src", all_images=12, hem_images=10)
    report = build(PreprocessConfig(shard_size=7), BuildOptions(sizes=(SIZE,), source=root / "src",
                                                                cache_root=root / "cache", jobs=1, progress=False))
    return report.cache_dir


def all_images(cache_dir, split="train") -> np.ndarray:
    reader = store.CacheReader(cache_dir)
    g = PreprocessConfig().geometry(SIZE).stored_size
    out = np.empty((reader.count(SIZE, split), g, g, 3), np.uint8)
    reader.read_images_into(SIZE, split, out)
    return out


def collect(loader):
    xs, ys = zip(*list(loader))
    sizes = [len(y) for y in ys]
    assert all(n == loader.batch_size for n in sizes[:-1]) and 0 < sizes[-1] <= loader.batch_size
    if loader.train:
        assert sizes[-1] == loader.batch_size  # drop_last
    return torch.cat(xs).permute(0, 2, 3, 1).numpy(), torch.cat(ys).numpy()


MODES = [dict(mode="resident"), dict(mode="streaming", block_images=3, memory_budget_bytes=3 * 10 * 26 * 26 * 3)]


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
    windows = loader._windows(loader._rank_blocks(0)[0])
    assert max(sum(len(b) for b in w) for w in windows) <= 8 and len(windows) > 2
    assert 3 * max(sum(len(b) for b in w) for w in windows) * image_bytes <= budget


def _open_h5() -> list[str]:
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc")
    names = []
    for fd in fds.iterdir():
        try:
            names.append(os.readlink(fd))
        except OSError:
            pass
    return [n for n in names if n.endswith(".h5")]


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
def test_no_file_stays_open_even_after_an_early_break(cache_dir, kw):
    loader = CacheLoader(cache_dir, SIZE, "train", 4, train=True, **kw)
    for i, _ in enumerate(loader):
        if i == 1:
            break
    import gc
    gc.collect()
    assert _open_h5() == []
    collect(loader)  # and it iterates again from the start
    assert _open_h5() == []


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
    from train.bench_loader import time_training
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
