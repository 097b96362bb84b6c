"""Loader benchmark, one run on the same images (`python -m train.bench loader --device cpu|cuda ...`).

(a) the report's per-image pipeline (read, CLAHE, unsharp, PIL, torchvision train transforms) through a torch
    DataLoader with `workers` processes; (b) the cached loader alone; (c) the cached loader plus GpuAugment.
With CUDA it also times ResNet18/50/152 training steps (AMP, channels_last), on a resident synthetic batch and fed
by (c), and the data share 1 - fed / resident (`time_training`).

Every timed loop synchronises the device once before and once after, never per step: that is how training runs,
and the timing helpers here are shared with the GPU check (the gpu part of this package).
"""
from __future__ import annotations

import itertools
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import torch
import torchvision.transforms as T
from PIL import Image

from pipeline.bench_build import bench_source
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.preprocess import enhance, read_bgr
from pipeline.progress import progress_bar
from pipeline.store import CacheReader
from train.augment import GpuAugment
from train.data.loader import CacheLoader


log = logging.getLogger(__name__)


class ReportDataset(torch.utils.data.Dataset):
    """The report's loader: every epoch, every image read and enhanced again on the CPU."""

    def __init__(self, paths: list[Path], size: int):
        self.paths = paths
        self.config = PreprocessConfig()
        self.transform = T.Compose([
            T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.RandomRotation(20), T.CenterCrop(270),
            T.Resize(size), T.ColorJitter(brightness=0.2, contrast=1.2, saturation=1.2, hue=0.1), T.ToTensor(),
            T.Normalize([0.5] * 3, [0.25] * 3)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        cv2.setNumThreads(1)
        img = Image.fromarray(enhance(read_bgr(self.paths[i]), self.config))
        return self.transform(img), int("_all" in self.paths[i].name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cycle(loader: CacheLoader):
    """Batches from `loader` forever, one epoch after another (each with its own order)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        batches, count = iter(loader), 0
        try:
            for batch in batches:
                count += 1
                yield batch
        finally:
            batches.close()  # a streaming loader stops its reader thread here, even when we stop mid-epoch
        if count == 0:
            raise ValueError(f"the loader yields no batch of {loader.batch_size} images")
        epoch += 1


def time_report_loader(paths, size, batch_size, workers) -> float:
    loader = torch.utils.data.DataLoader(ReportDataset(paths, size), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=False)
    if len(paths) <= batch_size:
        raise ValueError(f"--images {len(paths)} gives one batch of {batch_size}; the first batch (worker start-up) "
                         f"is not timed, so pass --images of at least twice --batch-size")
    it = iter(loader)
    next(it)  # worker start-up is not counted
    start, count = time.perf_counter(), 0
    for x, _ in it:
        count += x.shape[0]
    return count / (time.perf_counter() - start)


def time_steps(step, batches, steps: int, warmup_steps: int, device: torch.device) -> tuple[int, float]:
    """(images, seconds) of `steps` calls of `step(batch)` (which returns the batch's image count), timed after
    `warmup_steps` untimed calls.

    The device is synchronised once before and once after the timed loop, never inside it: a sync per step would
    stop the host from queueing the next step's work while the device runs this one, which training never does.
    """
    for _ in range(warmup_steps):
        step(next(batches))
    sync(device)
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        images += step(next(batches))
    sync(device)
    return images, time.perf_counter() - start


def time_cached(loader: CacheLoader, images: int, device: torch.device, augment: GpuAugment | None = None,
                generator: torch.Generator | None = None) -> float:
    """Images/s of the cached loader (plus augmentation, parameters drawn per batch as training does) over at least
    `images` images, after one warm-up batch."""
    def step(batch):
        x, y = batch
        if augment is not None:
            augment.apply(x, augment.sample(len(y), generator))
        return len(y)
    batches = cycle(loader)
    try:
        count, seconds = time_steps(step, batches, max(1, -(-images // loader.batch_size)), 1, device)
    finally:
        batches.close()
    return count / seconds


def time_augment(augment: GpuAugment, images: torch.Tensor, calls: int, warmup_calls: int, device: torch.device,
                 generator: torch.Generator | None = None) -> float:
    """Seconds per call of augmentation on one resident uint8 batch (B, 3, S, S), parameters drawn per call."""
    n = images.shape[0]

    def step(x):
        augment.apply(x, augment.sample(n, generator))
        return n
    count, seconds = time_steps(step, itertools.repeat(images), calls, warmup_calls, device)
    return seconds / (count / n)


@dataclass(frozen=True)
class Feed:
    """How fed training steps get their batches: through `augment` (whose `out_dtype` they train on), inline before
    each step or one batch ahead (train.engine.ahead's `augmented_batches`, on a side stream on CUDA)."""
    augment: GpuAugment
    ahead: bool = False


def feed_keys(name: str) -> tuple[str, str, str]:
    """The result keys of a feed's figures: (images/s, data share, rounds). The inline feed `fed` keeps the names
    the figures had before there were other feeds (`fed_imgs_per_s`, `data_share`)."""
    share = "data_share" if name == "fed" else f"{name}_data_share"
    return f"{name}_imgs_per_s", share, f"{name}_rounds"


class _Epochs:
    """`loader`'s batches epoch after epoch as one iterable (augmented_batches iterates its loader once); `close`
    stops a streaming loader's reader thread even mid-epoch."""

    def __init__(self, loader: CacheLoader):
        self.loader, self.batches = loader, None

    def __iter__(self):
        self.batches = cycle(self.loader)
        return self.batches

    def close(self) -> None:
        if self.batches is not None:
            self.batches.close()


def time_training(loader: CacheLoader, augment: GpuAugment, device: torch.device,
                  models=("resnet18", "resnet50", "resnet152"), steps: int = 30, warmup_steps: int = 5,
                  seed: int = 0, rounds: int = 3, feeds: dict[str, Feed] | None = None) -> dict:
    """Per model: training-step images/s fed by the loader + augmentation, and on a resident synthetic batch
    already on the device, both measured here, and the share of the fed step's time that data costs:

        data_share = 1 - fed_imgs_per_s / resident_imgs_per_s

    AMP and channels_last as train.run uses them. The share counts loading and augmentation only where they do not
    overlap with the model's work (the device waiting, or busy augmenting); noise can make it slightly negative.

    `feeds` names the ways of feeding the step, each timed with its own figures (`feed_keys`); the default is one,
    `fed`: `augment` inline before each step. The batches come from train.engine.ahead's `augmented_batches` with
    an EpochTimer's marks, as train_one_epoch gets them, so a feed with `ahead` is what train.run does on CUDA.

    The resident step and each feed are timed in `rounds` alternating rounds of `steps` steps, and each figure is
    the median of its rounds: on an H200 an eager ResNet step at batch 64 is bound by the host's kernel launches,
    and the same resident step measured twice in one process differed by 20% (43 vs 52 ms for ResNet152), more
    than the data share itself. `resident_spread` = (slowest - fastest) / median resident round: a data share below
    it is within the noise.
    """
    from models import build_model
    from train.engine.ahead import augmented_batches
    from train.engine.loop import Precision, train_step
    from train.engine.timing import EpochTimer
    feeds = feeds or {"fed": Feed(augment)}
    precision = Precision.for_device(device, amp=True)
    generator = torch.Generator().manual_seed(seed)
    batch_size, size = loader.batch_size, augment.size
    # (B, 3, S, S) in the step's dtype, as train.run's augmentation now writes it; two classes, as the models' heads
    x_resident = precision.prepare(torch.randn(batch_size, 3, size, size, device=device, dtype=precision.out_dtype))
    y_resident = torch.randint(0, 2, (batch_size,), device=device)
    results = {}
    for name in models:
        model = build_model(name).to(device, memory_format=torch.channels_last if precision.channels_last
                                     else torch.contiguous_format)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)

        def step(batch, model=model, opt=opt):  # bound now: both are deleted after this model
            x, y = batch
            train_step(model, x, y, opt, precision, device)
            return len(y)

        rates = {"resident": [], **{feed: [] for feed in feeds}}
        images = {}
        epochs = {feed: _Epochs(loader) for feed in feeds}
        batches = {feed: augmented_batches(epochs[feed], f.augment, generator, precision.prepare, EpochTimer(device),
                                           device, f.ahead) for feed, f in feeds.items()}
        try:
            for round_ in range(rounds):
                warmup = warmup_steps if round_ == 0 else 0
                count, seconds = time_steps(step, itertools.repeat((x_resident, y_resident)), steps, warmup, device)
                rates["resident"].append(count / seconds)
                for feed in feeds:
                    images[feed], seconds = time_steps(step, batches[feed], steps, warmup, device)
                    rates[feed].append(images[feed] / seconds)
        finally:
            for feed in feeds:
                batches[feed].close()
                epochs[feed].close()
        resident = statistics.median(rates["resident"])
        row = {"resident_imgs_per_s": resident,
               "resident_spread": (max(rates["resident"]) - min(rates["resident"])) / resident,
               "rounds": rounds, "resident_rounds": rates["resident"], "batch_size": batch_size, "size": size,
               "steps": steps, "images": next(iter(images.values())),
               "amp_dtype": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else None}
        for feed in feeds:
            rate_key, share_key, rounds_key = feed_keys(feed)
            fed = statistics.median(rates[feed])
            row.update({rate_key: fed, share_key: 1 - fed / resident, rounds_key: rates[feed]})
        results[name] = row
        del model, opt, step, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def run(device: str = "cpu", size: int = 224, batch_size: int = 64, images: int = 512, workers: int = 2,
        train_models: bool = True, progress="off") -> dict:
    device = torch.device(device)
    bar = progress_bar(progress, 5 + (device.type == "cuda" and train_models), "loader benchmark", "part", log)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, origin = bench_source(tmp / "source", images, tmp / "demo")
        paths = sorted(source.rglob("*.bmp"))
        seed = time_report_loader(paths, size, batch_size, workers)
        bar.update()
        report = build(PreprocessConfig(split_fractions=(0.98, 0.01, 0.01)),
                       BuildOptions(sizes=(size,), source=source, cache_root=tmp / "cache", progress=False))
        reader = CacheReader(report.cache_dir)
        loader = CacheLoader(reader, size, "train", batch_size, device=device, train=True)
        bar.update()
        cached = time_cached(loader, images, device)
        bar.update()
        augment = GpuAugment.from_manifest(reader.manifest, size).to(device).train()
        generator = torch.Generator().manual_seed(0)
        cached_aug = time_cached(loader, images, device, augment, generator)
        bar.update()
        batches = iter(loader)
        first, _ = next(batches)  # (B, 3, S, S) uint8 on the device
        batches.close()
        aug_s_per_img = time_augment(augment, first, max(4, images // batch_size), 2, device, generator) / batch_size
        bar.update()
        threads = augment.cpu_threads if augment.backend_for(device) == "opencv" else 1
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "size": size, "batch_size": batch_size, "images": images, "workers": workers, "origin": origin,
            "loader_mode": f"{loader.mode}/{loader.placement}", "cpu_threads": torch.get_num_threads(),
            "augment_backend": augment.backend_for(device),
            "seed_imgs_per_s": seed, "cached_imgs_per_s": cached, "cached_aug_imgs_per_s": cached_aug,
            "cached_ratio": cached / seed, "cached_aug_ratio": cached_aug / seed,
            "aug_ms_per_img": aug_s_per_img * 1e3, "aug_ms_per_img_per_thread": aug_s_per_img * 1e3 * threads,
        }
        if device.type == "cuda" and train_models:
            result["training"] = time_training(loader, augment, device)
            bar.update()
    bar.close()
    return result


def report(r: dict) -> str:
    lines = [
        f"loader benchmark on {r['device']}: {r['images']} images ({r['origin']}), {r['size']} px, batch "
        f"{r['batch_size']}, cached loader {r['loader_mode']}",
        f"  {'pipeline':<52}{'images/s':>10}{'ratio':>9}",
        f"  {'(a) report per-image path, DataLoader %d workers' % r['workers']:<52}{r['seed_imgs_per_s']:>10.0f}"
        f"{1:>8.2f}x",
        f"  {'(b) cached loader':<52}{r['cached_imgs_per_s']:>10.0f}{r['cached_ratio']:>8.2f}x",
        f"  {'(c) cached loader + augmentation':<52}{r['cached_aug_imgs_per_s']:>10.0f}{r['cached_aug_ratio']:>8.2f}x",
        f"  augmentation ({r['augment_backend']}): {r['aug_ms_per_img']:.3f} ms per image, "
        f"{r['aug_ms_per_img_per_thread']:.2f} ms per image per thread",
    ]
    for name, t in r.get("training", {}).items():
        lines.append(f"  {name} training step: {t['resident_imgs_per_s']:.0f} images/s on a resident batch, "
                     f"{t['fed_imgs_per_s']:.0f} fed by (c); data share {t['data_share'] * 100:.1f}%")
    return "\n".join(lines)
