"""The optimizer (SGD or AdamW, weight decay on the right parameters) and the learning-rate schedule of a stage.

Names and meanings follow timm (`--opt`, `--weight-decay`, `--sched`, `--min-lr`, `--warmup-epochs`,
`--warmup-lr`), except that `sgd` is the report's plain momentum SGD (timm's `sgd` is Nesterov's; here that is
`--nesterov`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train.engine.config import TrainConfig


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's `param_groups_weight_decay`: norm layers' parameters and biases (every parameter of one dimension or
    less) get no weight decay, conv and linear weights get `weight_decay`. One group when there is no decay at all,
    so a report-recipe optimizer is exactly the one it always was (and its old checkpoints still load)."""
    params = [p for p in net.parameters() if p.requires_grad]
    if not weight_decay:
        return [{"params": params, "weight_decay": 0.0}]
    no_decay = [p for name, p in net.named_parameters() if p.requires_grad and (p.ndim <= 1 or name.endswith(".bias"))]
    ids = {id(p) for p in no_decay}
    decay = [p for p in params if id(p) not in ids]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(net: torch.nn.Module, config: TrainConfig, lr: float, fused: bool) -> torch.optim.Optimizer:
    """`--opt sgd` (momentum `--momentum`, Nesterov with `--nesterov`) or `--opt adamw` (torch's default betas
    0.9, 0.999 and eps 1e-8; decoupled decay). `fused` (CUDA): one kernel for the whole update, and with fp16 the
    grad scaler's inf check stays on the device (the unfused path reads it back with .item() every step)."""
    groups = param_groups(net, config.weight_decay)
    if config.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov, fused=fused)


@dataclass(frozen=True)
class Schedule:
    """The learning rate within a stage, as a function of the epochs since the stage started.

    Every stage restarts it (each stage starts with a fresh optimizer at the base lr, as the report's second stage
    did). `t` counts fractional epochs: step i of the n steps of the stage's epoch e is at t = e + i / n, so warmup
    and cosine move every step, and a resumed run (which always restarts at an epoch's first step) recomputes the
    same lr from its epoch alone.

    - step / plateau: the current level, i.e. the base lr divided by 10 once per `--lr-drop` epoch passed and per
      plateau (the trainer keeps the level; it is saved in every checkpoint). Constant within an epoch.
    - cosine: from the base lr at the end of the warmup down to `min_lr` at the end of the stage (the stage's last
      epoch ends just above it, as timm's per-epoch cosine does).
    - warmup (any schedule): the first `warmup_epochs` of the stage go linearly from `warmup_lr` to the lr the
      schedule starts from (the base lr for cosine, the current level for step / plateau).
    """
    kind: str
    base_lr: float
    min_lr: float = 0.0
    warmup_epochs: int = 0
    warmup_lr: float = 1e-5

    @classmethod
    def from_config(cls, config: TrainConfig) -> "Schedule":
        return cls(config.sched, config.lr, config.min_lr, config.warmup_epochs, config.warmup_lr)

    @property
    def per_step(self) -> bool:
        """Whether the lr changes within an epoch (then the trainer sets it before every step)."""
        return self.kind == "cosine" or self.warmup_epochs > 0

    def lr(self, t: float, stage_epochs: int, level: float) -> float:
        """The lr at `t` epochs into a stage of `stage_epochs` epochs, with the step/plateau level `level`."""
        start = self.base_lr if self.kind == "cosine" else level
        if t < self.warmup_epochs:
            return self.warmup_lr + (start - self.warmup_lr) * t / self.warmup_epochs
        if self.kind != "cosine":
            return level
        progress = (t - self.warmup_epochs) / max(stage_epochs - self.warmup_epochs, 1)
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """A host float into every group: nothing is read back from the device."""
    for group in optimizer.param_groups:
        group["lr"] = lr
