"""How long a training recipe would take on this machine: `estimate_seconds`, from a few timed steps per stage.

Used before a CPU run starts (a recipe meant for a GPU can take days there). On CUDA the device is synchronised
before each clock read: a step is only queued when `train_step` returns, so an unsynchronised clock would time how
fast the host queues launches and the hours would come out too low.
"""
from __future__ import annotations

import time

import torch

from models import build_model
from pipeline.store import CacheReader
from train.engine.config import TrainConfig
from train.engine.loop import Precision, train_step
from train.engine.optim import build_optimizer


def estimate_seconds(config: TrainConfig, steps: int = 2, sync=None) -> tuple[float, list[str]]:
    """Time a few training steps per stage on this machine and extrapolate to the whole recipe. `sync()` runs before
    each clock read (default: `torch.cuda.synchronize` on CUDA, nothing on a CPU)."""
    reader = CacheReader(config.cache_dir)
    torch.manual_seed(config.seed)
    model = build_model(config.model, stem=config.stem)
    device = torch.device(config.device)
    sync = sync or ((lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None))
    precision = Precision.for_device(device, config.amp)
    model.to(device, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, config, config.lr, fused=False)
    total, lines = 0.0, []
    for stage in config.stages:
        x = precision.prepare(torch.randn(stage.batch_size, 3, stage.size, stage.size, device=device))
        y = torch.zeros(stage.batch_size, dtype=torch.int64, device=device)
        for i in range(steps + 1):
            if i == 1:  # after one untimed step (its first-call costs)
                sync()
                start = time.perf_counter()
            train_step(model, x, y, optimizer, precision, device, config.label_smoothing)
        sync()
        rate = steps * stage.batch_size / (time.perf_counter() - start)
        count = reader.count(stage.size, "train") + reader.count(stage.size, "valid") / 3  # eval ~ 1/3 of a step
        seconds = stage.epochs * count / rate
        total += seconds
        lines.append(f"{stage.size} px x {stage.epochs} epochs: {rate:.1f} img/s -> {seconds / 3600:.1f} h")
    return total, lines
