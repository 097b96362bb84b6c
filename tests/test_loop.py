"""The training loop's per-step path: no host reads per step, truthful timing shares, no eval recompile."""
import torch
import torch._dynamo.testing

from models import build_model
from pipeline import store
from tests.helpers import SIZE
from tests.train_helpers import CountReads
from train.augment import GpuAugment
from train.engine.distributed import Dist
from train.data.loader import CacheLoader
from train.engine.loop import Precision, predict_split, train_one_epoch
from train.engine.timing import EpochTimer

CPU = torch.device("cpu")


def _tiny_model():
    """The loop does not care what it trains; a small net keeps the dispatch-mode counting quick."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, 2))


def _epoch(cache_dir, batch_size, progress=False, refresh_s=1.0):
    torch.manual_seed(0)
    model = _tiny_model()
    loader = CacheLoader(cache_dir, SIZE, "train", batch_size, train=True)
    augment = GpuAugment.from_manifest(store.read_manifest(cache_dir), SIZE, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with CountReads() as reads:
        stats = train_one_epoch(model, loader, augment, opt, Precision.for_device(CPU, False), CPU, Dist(),
                                torch.Generator().manual_seed(0), progress=progress, refresh_s=refresh_s)
    return stats, reads.reads, len(loader)


def test_an_epoch_reads_values_back_once_at_its_end_not_per_step(cache_dir):
    few, reads_few, steps_few = _epoch(cache_dir, 16)
    many, reads_many, steps_many = _epoch(cache_dir, 4)
    assert steps_many >= 3 * steps_few
    assert reads_many == reads_few <= 3  # loss and accuracy sums at the end, whatever the number of steps
    # a progress bar reads the loss at most once per refresh interval (here: only at its last step)
    _, reads_bar, _ = _epoch(cache_dir, 4, progress=True, refresh_s=3600)
    assert reads_bar == reads_many + 1


def test_epoch_shares_cover_loader_and_augmentation(cache_dir):
    stats, _, _ = _epoch(cache_dir, 8)
    assert 0 < stats.augment_share <= stats.data_wait < 1


def test_timer_marks_split_the_epoch():
    timer = EpochTimer(CPU)
    spin = lambda n: sum(range(n))  # noqa: E731 (work between marks)
    for _ in range(3):
        timer.data_start()
        spin(20000)
        timer.batch_ready()
        spin(20000)
        timer.augmented()
        spin(40000)  # the training step
    timer.data_start()
    timer.discard_step()  # the loader had nothing left
    data, augment = timer.finish()
    assert 0 < augment < data < 1


def test_the_last_partial_eval_batch_does_not_recompile(cache_dir):
    counter = torch._dynamo.testing.CompileCounter()
    model = torch.compile(build_model("resnet18"), backend=counter)
    loader = CacheLoader(cache_dir, SIZE, "train", 7)  # eval: 7 does not divide the split
    assert loader.n % 7 and len(loader) > 1
    augment = GpuAugment.from_manifest(store.read_manifest(cache_dir), SIZE)
    probs, labels = predict_split(model, loader, augment, Precision.for_device(CPU, False), CPU, Dist())
    assert counter.frame_count == 1 and len(probs) == len(labels) == loader.n
    eager, _ = predict_split(model._orig_mod, loader, augment, Precision.for_device(CPU, False), CPU, Dist())
    torch.testing.assert_close(torch.from_numpy(probs), torch.from_numpy(eager))
