"""A whole run: stages (progressive resizing), the learning-rate schedule, checkpoints, metrics, resume.

Each stage after the first starts from the best-valid weights of the stage before (best.pt) with a fresh optimizer
at the base learning rate (and a fresh schedule: warmup and cosine run within a stage), as the report continued its
128 px models at 224 px. best.pt holds the best-valid weights of the current stage; last.pt the end of the last
finished epoch, and the stage's best weights as well (`best_model`, unless they are the epoch's own), so that last.pt
alone is enough to continue: a kill between the two writes (best.pt is written first) can leave best.pt one epoch
ahead of last.pt, never behind it, and resume rewrites best.pt from last.pt whenever the two disagree. Only rank 0
writes files.

A checkpoint's `model` is always the weights that validation measured: with `--ema-decay` the EMA weights (so
train.evaluate and anything else reading best.pt's `model` gets them), and the raw training weights are in
`train_model` (None without EMA), which resume loads back into the trained network.
"""
from __future__ import annotations

import logging
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models import build_model
from pipeline.store import CacheReader
from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.augment import GpuAugment
from train.engine.config import TrainConfig, compile_mode_options, uses_cuda_graphs
from train.engine.distributed import Dist
from train.engine.ema import ModelEma
from train.engine.graph_skips import cudagraph_skips, warn_cuda_graph_skips
from train.data.loader import loader_for
from train.data.seeds import augment_generator
from train.engine.loop import Precision, loss_and_acc, predict_split, train_one_epoch
from train.engine.optim import Schedule, build_optimizer, set_lr
from train.engine.tensorboard import Board, FirstBatch

log = logging.getLogger(__name__)

# Static shapes: each stage of progressive resizing compiles its own graph (train and eval). The default (dynamic=None)
# recompiles the second size with symbolic shapes instead: on an H200 the 96 px stage of the GPU check's demo run took
# 66.6 s against 25.7 s for the first, static, stage (torch 2.11). A stage's batch shape never changes (the last
# partial training batch is dropped, the last eval batch padded), so static graphs are never rebuilt within a stage.
COMPILE_OPTIONS = {"dynamic": False}


class TrainingDiverged(RuntimeError):
    """The loss stopped being a number; nothing of the failing epoch was saved."""


# The checkpoint key of ScheduleState, named before the class was (checkpoints of every version carry it).
SCHEDULE_KEY = "progress"


@dataclass
class ScheduleState:
    """What the schedule needs to continue exactly - the lr level, the stage's best epoch and the plateau counter -
    saved in every checkpoint (under SCHEDULE_KEY)."""
    epoch: int = -1  # last finished global epoch, 0-based
    lr: float = 0.0  # the step/plateau level: base lr / 10 per drop so far (warmup and cosine are computed from it)
    best_acc: float = -1.0  # best valid accuracy of the current stage
    best_epoch: int = -1
    since_improve: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def library_versions() -> dict:
    import h5py
    import kornia
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "kornia": kornia.__version__, "h5py": h5py.__version__, "numpy": np.__version__}


def preprocess_record(manifest: dict, sizes) -> dict:
    """What turns a raw image into the model's input, from the cache's manifest: the preprocessing parameters, the
    class names and, per trained size, the stored size and the normalisation. Saved in config.json, so that
    `train.predict` preprocesses new images exactly as the cache did even when the cache folder is gone. Shaped like
    the manifest's own fields, so `GpuAugment.from_manifest(record, size)` reads it too."""
    keep = ("stored_size", "mean", "std")
    return {"cache_key": manifest["key"], "config": manifest["config"],
            "classes": list(manifest.get("classes", ("hem", "all"))),
            "sizes": {str(s): {k: manifest["sizes"][str(s)][k] for k in keep} for s in sorted(set(sizes))}}


def rng_states(device: torch.device) -> dict:
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


@dataclass
class Trainer:
    config: TrainConfig
    run_dir: Path
    dist: Dist = field(default_factory=Dist)
    progress: bool = True
    board: Board = field(default_factory=Board)  # TensorBoard's event files (--tensorboard); no board by default

    def __post_init__(self):
        self.device = torch.device(self.config.device)
        if self.device.type == "cuda" and self.dist.enabled:
            self.device = torch.device("cuda", self.dist.local_rank)
        self.reader = CacheReader(self.config.cache_dir)
        self.precision = Precision.for_device(self.device, self.config.amp)
        self.precision.cuda_graphs = self.config.compile and uses_cuda_graphs(self.config.compile_mode, self.device)
        self.writer = ckpt.AsyncWriter()
        torch.manual_seed(self.config.seed)  # the initial weights depend on the seed only
        self.net = build_model(self.config.model, stem=self.config.stem, pretrained=self.config.pretrained)
        self.net.to(self.device, memory_format=torch.channels_last if self.precision.channels_last
                    else torch.contiguous_format)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # a stage's shapes are fixed: pick the fastest kernels once
        self.model = self.net
        if self.dist.enabled:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        # the EMA copy is a plain module on every rank: DDP keeps the ranks' weights and buffers equal, so their EMAs
        # stay equal too, and validation runs on it instead of the trained network
        self.ema = ModelEma(self.net, self.config.ema_decay, self.config.ema_warmup) if self.config.ema_decay else None
        self.eval_model = self.ema.module if self.ema else self.model
        if self.config.compile:
            # DDP first, then compile: the compiled graph is split at DDP's buckets, so each bucket's gradient
            # all-reduce starts while the rest of the backward pass is still running.
            compile_options = {**COMPILE_OPTIONS, **compile_mode_options(self.config.compile_mode)}
            self.model = torch.compile(self.model, **compile_options)
            self.eval_model = torch.compile(self.eval_model, **compile_options) if self.ema else self.model
        self.schedule = Schedule.from_config(self.config)
        self.optimizer = self._new_optimizer(self.config.lr)
        self.folder = rf.RunFolder(self.run_dir)
        self.state = ScheduleState(lr=self.config.lr)
        self.best_weights: dict | None = None  # best-valid weights of the current stage, on the CPU
        self._stage_cache: dict[int, tuple] = {}

    # ------------------------------------------------------------------ pieces

    def _new_optimizer(self, lr: float):
        return build_optimizer(self.net, self.config, lr, fused=self.device.type == "cuda")

    def _lr(self, epoch: int, step: int = 0, steps: int = 1) -> float:
        """The lr of step `step` of `steps` in global epoch `epoch` (0-based)."""
        index = self.config.stage_of(epoch)
        t = epoch - self.config.stage_start(index) + step / steps
        return self.schedule.lr(t, self.config.stages[index].epochs, self.state.lr)

    def _stage_data(self, index: int):
        """(train loader, valid loader, augment) of a stage, made once."""
        if index not in self._stage_cache:
            self._stage_cache.clear()  # one stage's resident data at a time
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # so that the new loaders see the old stage's memory as free
            stage = self.config.stages[index]
            common = dict(device=self.device, rank=self.dist.rank, world_size=self.dist.world_size,
                          seed=self.config.seed)
            train = loader_for(self.reader, stage.size, "train", stage.batch_size, self.config.fold, train=True, **common)
            valid = loader_for(self.reader, stage.size, "valid", stage.batch_size, self.config.fold, **common)
            # written in the step's dtype (bf16/fp16 under AMP, channels_last): half the bytes, no separate cast
            augment = GpuAugment.from_manifest(self.reader.manifest, stage.size, out_dtype=self.precision.out_dtype,
                                               backend=self.config.augment_backend).to(self.device)
            if self.config.compile:
                augment.compile()  # the torch backend's device part; the OpenCV backend (CPU) is not compiled
            self._stage_cache[index] = (train, valid, augment)
        return self._stage_cache[index]

    def _checkpoint_state(self, stage: int, with_best: bool = False) -> dict:
        best_is_current = self.state.best_epoch == self.state.epoch
        return {
            "version": ckpt.CHECKPOINT_VERSION,
            "model": self.ema.state_dict() if self.ema else self.net.state_dict(),  # what validation measured
            "train_model": self.net.state_dict() if self.ema else None,
            "ema_updates": self.ema.updates if self.ema else None,  # the EMA warmup's position
            "best_model": self.best_weights if with_best and not best_is_current else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.precision.scaler.state_dict() if self.precision.scaler else None,
            "epoch": self.state.epoch,
            "stage": stage,
            SCHEDULE_KEY: self.state.as_dict(),
            "rng": rng_states(self.device),
            "config": self.config.as_dict(),
        }

    def _load_checkpoint(self, path: Path) -> dict:
        state = ckpt.load(path)
        ckpt.check_compatible(state, self.config.model, self.config.cache_key, path)
        return state

    def _load_training_state(self, state: dict, path: Path) -> None:
        """The trained network's weights, and the EMA's, from a checkpoint to continue from."""
        if self.ema is None:
            self.net.load_state_dict(state["model"])
            return
        if state.get("train_model") is None:
            raise ckpt.CheckpointError(f"{path} holds no EMA state (`train_model`), but the run's config has "
                                       f"--ema-decay {self.config.ema_decay}; start a new run")
        self.net.load_state_dict(state["train_model"])
        self.ema.load_state_dict(state["model"], updates=state.get("ema_updates") or 0)

    # ------------------------------------------------------------------ files

    def write_config(self) -> None:
        """config.json, before the first epoch: what train.evaluate, train.predict and --resume read back."""
        data = {"config": self.config.as_dict(),
                "preprocess": preprocess_record(self.reader.manifest, [s.size for s in self.config.stages]),
                "versions": library_versions(),
                "world_size": self.dist.world_size,
                "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"}
        rf.write_config(self.run_dir, data)

    # ------------------------------------------------------------------ resume

    def resume(self) -> None:
        """Continue from last.pt: weights (and EMA), optimizer (with SGD's momentum or AdamW's moments), scaler,
        schedule level and plateau counter (warmup and cosine follow from the epoch), RNG, the stage's best
        weights; metrics after it are dropped, a half-written checkpoint is deleted, and best.pt is rewritten if it
        disagrees with last.pt."""
        path = self.folder.last
        for leftover in ckpt.remove_leftovers(self.run_dir) if self.dist.is_main else []:
            log.info("removed %s, left by an interrupted checkpoint write", leftover.name)
        state = self._load_checkpoint(path)
        self._load_training_state(state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.precision.scaler is not None and state["scaler"] is not None:
            self.precision.scaler.load_state_dict(state["scaler"])
        self.state = ScheduleState(**state[SCHEDULE_KEY])
        torch.set_rng_state(state["rng"]["torch"])
        self._restore_best(state)
        if self.dist.is_main:
            rf.truncate_metrics(self.run_dir, self.state.epoch + 1)

    def _restore_best(self, last: dict) -> None:
        """The stage's best weights from last.pt (version 2) or best.pt (version 1), and best.pt made to match."""
        if self.state.best_epoch < 0:  # no epoch of this stage finished yet
            return
        if self.state.best_epoch == self.state.epoch:
            self.best_weights = ckpt.cpu_copy(last["model"])
        elif ckpt.version_of(last) >= 2:
            if last.get("best_model") is None:
                raise ckpt.CheckpointError(
                    f"{self.folder.last}: a version {ckpt.version_of(last)} checkpoint without the stage's best "
                    f"weights (`best_model`, epoch {self.state.best_epoch + 1}); the file is damaged: start a new run")
            self.best_weights = last["best_model"]
        else:  # version 1: the best weights are in best.pt only
            best = ckpt.load(self.folder.best)
            if best["epoch"] != self.state.best_epoch:
                raise ckpt.CheckpointError(
                    f"{self.run_dir}: last.pt records the best epoch {self.state.best_epoch + 1}, but best.pt holds "
                    f"epoch {best['epoch'] + 1} (an older checkpoint format, killed between its writes); start a "
                    f"new run")
            self.best_weights = best["model"]
            return
        best_path = self.folder.best
        on_disk = ckpt.load(best_path) if best_path.is_file() else None
        if on_disk is None or on_disk["epoch"] != self.state.best_epoch or on_disk["stage"] != last["stage"]:
            if self.dist.is_main:
                log.info("best.pt %s; rewriting it from last.pt (epoch %d)",
                         "is missing" if on_disk is None else f"holds epoch {on_disk['epoch'] + 1}",
                         self.state.best_epoch + 1)
                best_state = {**self._checkpoint_state(last["stage"]), "model": self.best_weights,
                              "train_model": None, "ema_updates": None, "epoch": self.state.best_epoch,
                              SCHEDULE_KEY: {**self.state.as_dict(), "epoch": self.state.best_epoch}}
                ckpt.save(ckpt.cpu_copy(best_state), best_path)

    # ------------------------------------------------------------------ the run

    def fit(self, stop_after_epoch: int | None = None) -> None:
        """Train from the epoch after `state.epoch` to the end (or to global epoch `stop_after_epoch`, 1-based: none
        when a resumed run has passed it already)."""
        cfg = self.config
        end = cfg.total_epochs if stop_after_epoch is None else min(cfg.total_epochs, stop_after_epoch)
        skips_before = cudagraph_skips() if self.precision.cuda_graphs else None  # a per-process count
        for epoch in range(self.state.epoch + 1, end):
            index = cfg.stage_of(epoch)
            stage = cfg.stages[index]
            if epoch == cfg.stage_start(index) and index > 0:
                self.start_stage(index)
            if epoch + 1 in cfg.lr_drop_epochs:
                self.state.lr /= 10
            train_loader = valid_loader = augment = tap = None  # no reference to the last stage's data while switching
            train_loader, valid_loader, augment = self._stage_data(index)
            train_loader.set_epoch(epoch)
            # the stage's first batch, kept for the board's view of what the model trains on
            tap = FirstBatch(train_loader) if self.board.enabled and epoch == cfg.stage_start(index) else None
            train_loader = train_loader if tap is None else tap
            steps = len(train_loader)
            lr = self._lr(epoch)  # the epoch's first step's; metrics.csv's lr
            set_lr(self.optimizer, lr)
            # warmup and cosine: every step's own lr, a host float (the epoch is resumed at its first step only)
            before_step = ((lambda i: set_lr(self.optimizer, self._lr(epoch, i, steps))) if self.schedule.per_step
                           else None)
            # Augmentation parameters depend on (seed, epoch, rank) only, so a resumed run replays them exactly.
            generator = augment_generator(cfg.seed, epoch, self.dist.rank)
            stats = train_one_epoch(self.model, train_loader, augment, self.optimizer, self.precision, self.device,
                                    self.dist, generator, desc=f"epoch {epoch + 1}/{cfg.total_epochs} "
                                    f"{stage.size}px", progress=self.progress and self.dist.is_main,
                                    label_smoothing=cfg.label_smoothing, before_step=before_step, ema=self.ema,
                                    ahead=cfg.ahead)
            valid_loss, valid_acc = loss_and_acc(*predict_split(self.eval_model, valid_loader, augment, self.precision,
                                                          self.device, self.dist))
            self._check_finite(epoch, stage.size, lr, stats.loss, valid_loss, valid_acc)
            self.end_epoch(epoch, index, stage.size, lr, stats, valid_loss, valid_acc)
            if skips_before is not None:  # after this call's first epoch, which captured the graphs
                warn_cuda_graph_skips(cfg.compile_mode, self.dist, cudagraph_skips() - skips_before)
                skips_before = None
            if tap is not None and tap.images is not None:  # after the epoch, once per stage: no step waits for it
                self.board.train_views(epoch + 1, index + 1, stage.size, tap.images, augment,
                                       augment_generator(cfg.seed, epoch, self.dist.rank))
        self.writer.wait()
        if self.dist.enabled:
            torch.distributed.barrier()  # every rank may read best.pt once rank 0 has written it

    def _check_finite(self, epoch: int, size: int, lr: float, train_loss: float, valid_loss: float,
                      valid_acc: float) -> None:
        """Stop on a NaN or infinite loss (read once per epoch, so no extra wait), before anything is saved."""
        bad = [(name, value) for name, value in (("training", train_loss), ("validation", valid_loss))
               if not math.isfinite(value) and not (name == "validation" and math.isnan(valid_acc))]
        if bad:
            name, value = bad[0]
            raise TrainingDiverged(
                f"epoch {epoch + 1} ({size} px): the {name} loss became {value} at lr {lr:g}; the run stops "
                f"here and nothing of this epoch was saved. Start again with a lower --lr (last.pt holds the epoch "
                f"before, for --resume), or check the cache with python -m pipeline.cache verify")

    def start_stage(self, index: int) -> None:
        if self.best_weights is not None:
            self.net.load_state_dict(self.best_weights)
        else:  # resumed from a version 1 checkpoint exactly at a stage boundary: the previous stage's best is on disk
            self.net.load_state_dict(self._load_checkpoint(self.folder.best)["model"])
        if self.ema is not None:
            self.ema.restart()  # the EMA of the new stage starts from the weights it starts from
        log.info("stage %d: %d px, starting from the best-valid weights of the stage before (epoch %d, acc %.4f)",
                 index + 1, self.config.stages[index].size, self.state.best_epoch + 1, self.state.best_acc)
        self.optimizer = self._new_optimizer(self.config.lr)
        if self.precision.scaler is not None:
            self.precision.scaler = torch.amp.GradScaler("cuda")
        self.state = ScheduleState(epoch=self.state.epoch, lr=self.config.lr)
        self.best_weights = None

    def end_epoch(self, epoch: int, index: int, size: int, lr: float, stats, valid_loss: float,
                     valid_acc: float) -> None:
        s = self.state
        s.epoch = epoch
        improved = valid_acc > s.best_acc
        if improved:
            s.best_acc, s.best_epoch, s.since_improve = valid_acc, epoch, 0
            # Every rank sees the same reduced accuracy, so every rank keeps the same best weights (no shared
            # file system needed for the next stage's start).
            self.best_weights = ckpt.cpu_copy(self.ema.state_dict() if self.ema else self.net.state_dict())
        else:
            s.since_improve += 1
        if self.config.lr_drop_patience and s.since_improve >= self.config.lr_drop_patience:
            log.info("valid accuracy has not improved for %d epochs: lr %.2g -> %.2g", s.since_improve, s.lr,
                     s.lr / 10)
            s.lr /= 10
            s.since_improve = 0
        if self.dist.is_main:
            state = self._checkpoint_state(index, with_best=True)
            # best.pt first: a kill between the two writes leaves best.pt ahead of last.pt, which resume repairs
            items = ([(state, self.folder.best)] if improved else []) + [(state, self.folder.last)]
            self.writer.submit(items)
            row = {"epoch": epoch + 1, "stage": index + 1, "size": size, "lr": lr,
                   "train_loss": round(stats.loss, 6), "train_acc": round(stats.acc, 6),
                   "valid_loss": round(valid_loss, 6), "valid_acc": round(valid_acc, 6),
                   "epoch_s": round(stats.seconds, 3), "imgs_per_s": round(stats.imgs_per_s, 1),
                   "data_wait": round(stats.data_wait, 4), "augment_share": round(stats.augment_share, 4)}
            rf.append_metrics(self.run_dir, row)
            self.board.epoch(row)  # the row's host floats, read once per epoch already: nothing waits
            log.info("epoch %d/%d (%d px): train loss %.4f acc %.4f, valid loss %.4f acc %.4f, %.1f s, %.0f img/s",
                     epoch + 1, self.config.total_epochs, size, stats.loss, stats.acc, valid_loss, valid_acc,
                     stats.seconds, stats.imgs_per_s)
