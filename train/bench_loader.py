"""Loader benchmark, one run on the same images (`python -m pipeline.bench --device cpu|cuda ...`).

(a) the report's per-image pipeline (read, CLAHE, unsharp, PIL, torchvision train transforms) through a torch
    DataLoader with `workers` processes; (b) the cached loader alone; (c) the cached loader plus GpuAugment.
With CUDA it also times ResNet18/50/152 training steps (AMP, channels_last) fed by (c) and the share of step time
spent waiting for data.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import cv2
import torch
import torchvision.transforms as T
from PIL import Image

from pipeline.bench_build import bench_source
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.preprocess import enhance, read_bgr
from pipeline.store import CacheReader
from train.augment import GpuAugment
from train.loader import CacheLoader


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def time_cached(loader: CacheLoader, images: int, device, augment: GpuAugment | None = None) -> tuple[float, float]:
    """(images/s, seconds spent in augmentation) over at least `images` images, after one warm-up batch."""
    x, _ = next(iter(loader))
    if augment is not None:
        augment(x)
    _sync(device)
    count, epoch, aug_s = 0, 1, 0.0
    start = time.perf_counter()
    while count < images:
        loader.set_epoch(epoch)
        for x, _ in loader:
            if augment is not None:
                t = time.perf_counter()
                out = augment(x)
                _sync(device)
                aug_s += time.perf_counter() - t
                del out
            count += x.shape[0]
            if count >= images:
                break
        epoch += 1
    _sync(device)
    return count / (time.perf_counter() - start), aug_s / count


def time_training(loader: CacheLoader, augment: GpuAugment, device, steps: int = 30,
                  models=("resnet18", "resnet50", "resnet152"), warmup_steps: int = 5) -> dict:
    """Training steps fed by the cached loader + augmentation: images/s and the share of time spent on data
    (waiting for the loader plus augmenting), per model. AMP and channels_last as train.run uses them."""
    from models import build_model
    from train.loop import Precision, train_step
    precision = Precision.for_device(device, amp=True)
    results = {}
    for name in models:
        model = build_model(name).to(device, memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9)
        data_s, done, images, start, epoch = 0.0, 0, 0, None, 0
        while done < steps + warmup_steps:
            loader.set_epoch(epoch)
            batches = iter(loader)
            while True:
                if done == warmup_steps:
                    _sync(device)
                    start, data_s, images = time.perf_counter(), 0.0, 0
                t0 = time.perf_counter()
                try:
                    x, y = next(batches)
                except StopIteration:
                    break
                x = precision.prepare(augment(x))
                _sync(device)
                data_s += time.perf_counter() - t0
                train_step(model, x, y, opt, precision, device)
                images += x.shape[0]
                done += 1
                if done >= steps + warmup_steps:
                    break
            epoch += 1
        _sync(device)
        total = time.perf_counter() - start
        results[name] = {"imgs_per_s": images / total, "data_wait_share": data_s / total}
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def run(device: str = "cpu", size: int = 224, batch_size: int = 64, images: int = 512, workers: int = 2,
        train_models: bool = True) -> dict:
    device = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        source, origin = bench_source(tmp / "source", images, tmp / "demo")
        paths = sorted(source.rglob("*.bmp"))
        seed = time_report_loader(paths, size, batch_size, workers)
        report = build(PreprocessConfig(split_fractions=(0.98, 0.01, 0.01)),
                       BuildOptions(sizes=(size,), source=source, cache_root=tmp / "cache", progress=False))
        reader = CacheReader(report.cache_dir)
        loader = CacheLoader(reader, size, "train", batch_size, device=device, train=True)
        cached, _ = time_cached(loader, images, device)
        augment = GpuAugment.from_manifest(reader.manifest, size).to(device).train()
        cached_aug, aug_s_per_img = time_cached(loader, images, device, augment)
        threads = augment.cpu_threads if device.type == "cpu" else 1
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "size": size, "batch_size": batch_size, "images": images, "workers": workers, "origin": origin,
            "loader_mode": f"{loader.mode}/{loader.placement}", "cpu_threads": torch.get_num_threads(),
            "seed_imgs_per_s": seed, "cached_imgs_per_s": cached, "cached_aug_imgs_per_s": cached_aug,
            "cached_ratio": cached / seed, "cached_aug_ratio": cached_aug / seed,
            "aug_ms_per_img_per_thread": aug_s_per_img * 1e3 * threads,
        }
        if device.type == "cuda" and train_models:
            result["training"] = time_training(loader, augment, device)
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
        f"  augmentation: {r['aug_ms_per_img_per_thread']:.2f} ms per image per thread",
    ]
    for name, t in r.get("training", {}).items():
        lines.append(f"  {name} training step fed by (c): {t['imgs_per_s']:.0f} images/s, "
                     f"data (load + augment) {t['data_wait_share'] * 100:.1f}% of step time")
    return "\n".join(lines)
