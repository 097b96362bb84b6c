"""One epoch of training, and prediction over a split: plain functions, readable top to bottom."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from train.augment import GpuAugment
from train.engine.ahead import augmented_batches
from train.engine.distributed import Dist, all_sum, gather_rows
from train.data.loader import CacheLoader
from train.engine.timing import EpochTimer


@dataclass
class Precision:
    """How the forward pass runs: autocast dtype (None = fp32), a grad scaler for fp16, channels_last inputs."""
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False
    cuda_graphs: bool = False  # the model is compiled with CUDA graphs (config.CUDA_GRAPH_MODES, on CUDA)

    @property
    def out_dtype(self) -> torch.dtype:
        """The dtype the augmentation writes for the step: the autocast dtype (the first convolution takes it
        without a cast), else float32."""
        return self.amp_dtype or torch.float32

    @classmethod
    def for_device(cls, device: torch.device, amp: bool) -> "Precision":
        if device.type != "cuda":
            # channels_last on the CPU too: the augmentation's output already is, and oneDNN was ~10% faster with it
            # (ResNet18, 96 px, batch 32, 2-core dev machine); it also keeps DDP's gradient buckets aligned.
            return cls(channels_last=True)
        if not amp:
            return cls(channels_last=True)
        if torch.cuda.is_bf16_supported():
            return cls(torch.bfloat16, None, True)
        return cls(torch.float16, torch.amp.GradScaler("cuda"), True)

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def mark_graph_step() -> None:
    """A new step for CUDA graphs: the previous replay's outputs (already used) may now be overwritten. Only with
    CUDA graphs: its first call imports Inductor (~7 s on the 2-core dev machine)."""
    torch.compiler.cudagraph_mark_step_begin()


@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    seconds: float
    data_wait: float  # share of the epoch spent producing batches: waiting for the loader, plus augmentation
    augment_share: float  # augmentation's part of it

    @property
    def imgs_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_step(model, x: torch.Tensor, labels: torch.Tensor, optimizer, precision: Precision,
               device: torch.device, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a prepared batch; returns (loss, logits), still on the device. The loss is the one
    optimised: cross-entropy with `label_smoothing` (validation's loss is always the plain one)."""
    if precision.cuda_graphs:
        mark_graph_step()
    with precision.autocast(device):
        logits = model(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if precision.scaler is not None:
        precision.scaler.scale(loss).backward()
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, logits


class LossReadout:
    """The loss for a progress bar, brought back from the device without making the host wait.

    On CUDA a refresh queues a non_blocking copy of the current loss into a pinned scalar and shows the value of an
    earlier refresh's copy once its event has completed (`Event.query` does not wait), so the bar's loss is at most
    one refresh old. On the CPU the value is simply read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.host = torch.zeros((), pin_memory=True) if self.cuda else None
        self.copied: torch.cuda.Event | None = None
        self.value: float | None = None

    def update(self, loss: torch.Tensor) -> float | None:
        if not self.cuda:
            self.value = loss.item()
            return self.value
        if self.copied is not None and self.copied.query():
            self.value, self.copied = float(self.host), None  # host memory: nothing waits
        if self.copied is None:
            self.host.copy_(loss.detach().float(), non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(torch.cuda.current_stream(self.device))
        return self.value


def train_one_epoch(model, loader: CacheLoader, augment: GpuAugment, optimizer, precision: Precision,
                    device: torch.device, dist: Dist, generator: torch.Generator, desc: str = "train",
                    progress: bool = True, refresh_s: float = 1.0, label_smoothing: float = 0.0,
                    before_step: Callable[[int], None] | None = None, ema=None, ahead: bool = False) -> EpochStats:
    """One pass over `loader`. Nothing here makes the host wait for the device until the epoch ends; the progress
    bar's loss comes back at most every `refresh_s` seconds without a wait (LossReadout), never with progress off.
    `ahead`: each batch is augmented one batch ahead, on a side stream on CUDA (train.engine.ahead); the same
    tensors either way.

    `before_step(i)` runs before step i of the epoch (the schedule setting that step's lr, host floats only);
    `ema.update()` after every step (a moving average of the weights, queued on the device)."""
    model.train()
    augment.train()
    loss_sum = torch.zeros((), dtype=torch.float32, device=device)  # device-side sums: no sync per step
    correct = torch.zeros((), dtype=torch.int64, device=device)
    images = steps = 0
    timer = EpochTimer(device)
    readout = LossReadout(device) if progress else None
    start = last_refresh = time.perf_counter()
    bar = tqdm(total=len(loader), desc=desc, unit="batch", disable=not progress, leave=False)
    for x, labels in augmented_batches(loader, augment, generator, precision.prepare, timer, device, ahead):
        if before_step is not None:
            before_step(steps)
        loss, logits = train_step(model, x, labels, optimizer, precision, device, label_smoothing)
        if ema is not None:
            ema.update()
        loss_sum += loss.detach().float() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        images += len(labels)
        steps += 1
        bar.update()
        now = time.perf_counter()
        if progress and (now - last_refresh >= refresh_s or bar.n == bar.total):
            shown = readout.update(loss)
            bar.set_postfix(loss="..." if shown is None else f"{shown:.4f}", img_s=f"{images / (now - start):.0f}")
            last_refresh = now
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    data_share, augment_share = timer.finish()
    loss_total, correct_total, count = all_sum([loss_sum.item(), float(correct.item()), float(images)], dist, device)
    return EpochStats(loss_total / max(count, 1), correct_total / max(count, 1), int(count), seconds,
                      data_share, augment_share)


@torch.no_grad()
def predict_split(model, loader: CacheLoader, augment: GpuAugment, precision: Precision, device: torch.device,
            dist: Dist) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities (N, C) float64 and labels (N,) for the whole split, in cache order, on every rank."""
    model.eval()
    augment.eval()
    probs, labels = [], []
    for uint8_images, y in loader:
        x = precision.prepare(augment(uint8_images))
        n = len(y)
        if n < loader.batch_size:  # the last batch: padded to the usual shape, so a compiled model is not rebuilt
            x = precision.prepare(torch.cat([x, x.new_zeros((loader.batch_size - n, *x.shape[1:]))]))
        if precision.cuda_graphs:
            mark_graph_step()
        with precision.autocast(device):
            logits = model(x)[:n]  # eval-mode BatchNorm: padding rows change nothing in the others
        probs.append(torch.softmax(logits.float(), 1))
        labels.append(y)
    c = model.module.fc.out_features if hasattr(model, "module") else model.fc.out_features
    mine = torch.cat(probs) if probs else torch.empty(0, c, dtype=torch.float32, device=device)
    mine_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.int64, device=device)
    return (gather_rows(mine, dist).cpu().numpy().astype(np.float64),  # float64 on the host only
            gather_rows(mine_labels, dist).cpu().numpy())


def loss_and_acc(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Cross-entropy and accuracy over labelled rows (label >= 0)."""
    known = labels >= 0
    if not known.any():
        return float("nan"), float("nan")
    p = probs[known, labels[known]].clip(1e-12, 1)
    return float(-np.log(p).mean()), float((probs[known].argmax(1) == labels[known]).mean())
