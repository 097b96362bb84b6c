"""Host batches through reusable staging buffers (the CUDA path's protocol, run on the CPU), and placements."""
import gc
import threading

import numpy as np
import pytest
import torch

from tests.helpers import MODES, SIZE, open_h5_files
from tests.train_helpers import collect
from train.data.loader import STAGING_BUFFERS, CacheLoader
from train.data.staging import Staging


def _staged(loader: CacheLoader) -> CacheLoader:
    """Send this CPU loader's host batches through Staging, as a CUDA device would (buffers not pinned here)."""
    loader.use_staging = True
    return loader


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
@pytest.mark.parametrize("train", [True, False])
def test_staged_batches_equal_plain_ones(cache_dir, kw, train):
    for epoch in (0, 3):
        plain = CacheLoader(cache_dir, SIZE, "train", 8, train=train, seed=4, **kw)
        staged = _staged(CacheLoader(cache_dir, SIZE, "train", 8, train=train, seed=4, **kw))
        plain.set_epoch(epoch)
        staged.set_epoch(epoch)
        a, b = collect(plain), collect(staged)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(b[1], staged.labels[staged.epoch_indices()])


@pytest.mark.parametrize("kw", MODES, ids=["resident", "streaming"])
def test_staged_batches_survive_buffer_reuse_and_early_stop(cache_dir, kw):
    """Batches kept by the consumer are copies: later batches reuse the buffers without changing them. Stopping
    early ends the producer thread and closes every file."""
    loader = _staged(CacheLoader(cache_dir, SIZE, "train", 4, train=True, **kw))
    assert len(loader) > 2 * STAGING_BUFFERS  # every buffer is reused at least twice
    kept = [(x.clone(), y.clone(), x, y) for x, y in loader]
    for copy_x, copy_y, x, y in kept:
        assert torch.equal(copy_x, x) and torch.equal(copy_y, y)
    before = threading.active_count()
    for i, _ in enumerate(loader):
        if i == 1:
            break
    gc.collect()
    assert threading.active_count() <= before and open_h5_files() == []


def test_a_producer_error_reaches_the_consumer(cache_dir):
    loader = _staged(CacheLoader(cache_dir, SIZE, "train", 4, train=True, mode="streaming", block_images=3))

    def fail(*args, **kwargs):
        raise OSError("disk went away")
    loader.reader.open_shard = fail  # the reader thread's first open fails
    with pytest.raises(OSError, match="disk went away"):
        list(loader)


def test_staging_hands_a_buffer_back_only_after_send():
    staging = Staging(2, (3, 3, 3), torch.device("cpu"), count=2)
    stop = threading.Event()
    first, second = staging.acquire(stop), staging.acquire(stop)
    assert {first, second} == {0, 1}
    stop.set()
    assert staging.acquire(stop) is None  # none free, and asked to stop: returns instead of blocking
    stop.clear()
    staging.images[first].fill_(7)
    staging.labels[first].fill_(1)
    images, labels = staging.send(first, 1)
    staging.images[first].fill_(0)  # the producer may now write into it
    assert images.shape == (1, 3, 3, 3) and int(images.min()) == 7 and labels.tolist() == [1]
    assert staging.acquire(stop) == first


def test_placement_choices(cache_dir):
    loader = CacheLoader(cache_dir, SIZE, "train", 4, placement="host")
    assert (loader.mode, loader.placement) == ("resident", "host")
    with pytest.raises(ValueError, match="placement must be one of auto, device, host"):
        CacheLoader(cache_dir, SIZE, "train", 4, placement="pinned")
    with pytest.raises(ValueError, match="placement 'device' keeps the whole split"):
        CacheLoader(cache_dir, SIZE, "train", 4, mode="streaming", placement="device")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("kw", [dict(mode="resident", placement="device"), dict(mode="resident", placement="host"),
                                dict(mode="streaming", block_images=3, memory_budget_bytes=3 * 10 * 26 * 26 * 3)],
                         ids=["device", "host", "streaming"])
def test_cuda_placements_match_the_cpu_and_never_synchronize(cache_dir, kw):
    on_cpu = collect(CacheLoader(cache_dir, SIZE, "train", 8, train=True, seed=1, **kw))
    loader = CacheLoader(cache_dir, SIZE, "train", 8, device="cuda", train=True, seed=1, **kw)
    assert loader.placement == ("device" if kw.get("placement") == "device" else "host")
    next(iter(loader))  # warm-up: the resident load and the pinned allocations happen here
    torch.cuda.synchronize()
    batches = []
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the per-batch path raises
    try:
        for images, labels in loader:
            batches.append((images.float().sum(), images, labels))  # device work on each batch
    finally:
        torch.cuda.set_sync_debug_mode(0)
    images = torch.cat([b[1] for b in batches]).permute(0, 2, 3, 1).cpu().numpy()
    labels = torch.cat([b[2] for b in batches]).cpu().numpy()
    assert batches[0][1].is_cuda and batches[0][2].is_cuda
    if loader.use_staging:  # a non_blocking copy from pageable memory could still wait; these never are pageable
        staging = Staging(8, (4, 4, 3), torch.device("cuda"))
        assert all(t.is_pinned() for t in staging.images + staging.labels)
    np.testing.assert_array_equal(images, on_cpu[0])
    np.testing.assert_array_equal(labels, on_cpu[1])
