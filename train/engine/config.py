"""A training run's resolved settings: one frozen value, saved as config.json beside every checkpoint."""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from models import MODEL_NAMES

# The report's recipe per model: (size, epochs, batch size) stages. ResNet50/152: 550 epochs at 128 px, then the
# best-valid weights continue at 224 px; ResNet18 at 224 px throughout; ResNet152 at 224 used batch 32 for memory.
PRESETS = {
    "resnet18": ((224, 100, 64),),
    "resnet50": ((128, 550, 64), (224, 100, 64)),
    "resnet152": ((128, 550, 64), (224, 100, 32)),
}
_PLATEAU = re.compile(r"^plateau:(\d+)$")

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "plateau")
# The training options a recipe sets; an explicit flag overrides its value. `report` is the report's recipe and the
# defaults of TrainConfig (a config.json written before recipes existed loads as `report`).
RECIPES = {
    "report": {"opt": "sgd", "lr": 0.005, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
               "label_smoothing": 0.0, "sched": "step", "min_lr": 0.0, "warmup_epochs": 0, "warmup_lr": 1e-5,
               "ema_decay": None, "ema_warmup": False},
    # Today's usual ResNet practice, kept close to the report where the report's value is known to work on C-NMC:
    # - SGD with Nesterov momentum 0.9 at the report's lr 0.005 (batch 64): SGD is still the usual optimizer for
    #   ResNets (adaptive methods tend to generalise worse on them), the lr is the one known to be stable on this
    #   data, and Nesterov (timm's default `sgd`) costs nothing;
    # - weight decay 5e-4 (the small-data ResNet value, e.g. CIFAR) on conv/linear weights only: 8k training images
    #   for 11-58M parameters need the regularisation more than ImageNet's 1e-4;
    # - cosine decay to 0 within each stage, after 1 epoch of per-step linear warmup from 1e-5: each stage starts
    #   with a fresh optimizer (empty momentum) and a new image size, so a short warmup avoids the first steps' jolt;
    # - label smoothing 0.1: penalises over-confident logits, which C-NMC's ambiguous cells do not deserve;
    # - EMA of the weights, decay 0.998 per step: a horizon of ~500 steps (~4 C-NMC epochs at batch 64), short
    #   enough for stages of tens of epochs; its weights are what validation and best.pt see, which makes the best
    #   epoch's choice less noisy on a 1.6k-image valid split. With timm's EMA warmup: without it, a short run is
    #   measured on weights still close to the initial ones (the README's demo, 13 steps per epoch, stayed at chance
    #   in every epoch with a fixed 0.998; see train/ema.py).
    "modern": {"opt": "sgd", "lr": 0.005, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
               "label_smoothing": 0.1, "sched": "cosine", "min_lr": 0.0, "warmup_epochs": 1, "warmup_lr": 1e-5,
               "ema_decay": 0.998, "ema_warmup": True},
}
# `--recipe modern --opt adamw`: these replace the SGD values. AdamW's update is scaled per parameter, so it wants a
# lower lr, and its decoupled decay (p -= lr * wd * p, not through the gradient) a weight decay ~100x SGD's coupled
# one (DeiT's AdamW recipe in timm uses 0.05).
MODERN_ADAMW = {"lr": 0.001, "weight_decay": 0.05}


@dataclass(frozen=True)
class Stage:
    size: int
    epochs: int
    batch_size: int


def parse_stages(texts: list[str], default_batch_size: int) -> tuple[Stage, ...]:
    """`SIZE:EPOCHS[:BATCH]` items, e.g. ["128:550", "224:100:32"]."""
    stages = []
    for text in texts:
        parts = text.split(":")
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) not in (2, 3) or min(numbers) < 1:
            raise ValueError(f"--stages item {text!r} is not SIZE:EPOCHS or SIZE:EPOCHS:BATCH with positive "
                             f"integers, e.g. 128:550 224:100")
        stages.append(Stage(numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else default_batch_size))
    if not stages:
        raise ValueError("--stages needs at least one SIZE:EPOCHS item")
    return tuple(stages)


def parse_lr_drop(texts: list[str] | None) -> tuple[tuple[int, ...], int | None]:
    """`--lr-drop 300 500` (global epochs, 1-based) and/or `--lr-drop plateau:20` (patience in epochs)."""
    epochs, patience = [], None
    for text in texts or []:
        match = _PLATEAU.match(text)
        if match:
            patience = int(match.group(1))
        elif text.isdigit() and int(text) > 0:
            epochs.append(int(text))
        else:
            raise ValueError(f"--lr-drop item {text!r} is neither an epoch number nor plateau:PATIENCE")
    return tuple(sorted(epochs)), patience


def check_numbers(lr: float, momentum: float, seed: int, *, weight_decay: float = 0.0, label_smoothing: float = 0.0,
                  ema_decay: float | None = None, warmup_epochs: int = 0, warmup_lr: float = 1e-5,
                  min_lr: float = 0.0) -> None:
    """The optimiser's numbers and the seed, each named by its flag; called before anything else is done."""
    # `not (... > 0)` rather than `<= 0`: NaN fails every comparison, so it must fail the check too
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {lr}")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ValueError(f"--momentum must be a finite number in [0, 1), got {momentum}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {weight_decay}")
    if not (math.isfinite(label_smoothing) and 0 <= label_smoothing < 1):
        raise ValueError(f"--label-smoothing must be a number in [0, 1), got {label_smoothing}")
    if ema_decay is not None and not (math.isfinite(ema_decay) and 0 < ema_decay < 1):
        raise ValueError(f"--ema-decay must be off or a number in (0, 1), e.g. 0.998, got {ema_decay}")
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"--warmup-epochs must be an integer >= 0, got {warmup_epochs}")
    if not (math.isfinite(warmup_lr) and warmup_lr >= 0):
        raise ValueError(f"--warmup-lr must be a finite number >= 0, got {warmup_lr}")
    if not (math.isfinite(min_lr) and 0 <= min_lr <= lr):
        raise ValueError(f"--min-lr must be a finite number in [0, --lr {lr:g}], got {min_lr}")


def check_choices(recipe: str, opt: str, nesterov: bool, momentum: float, sched: str,
                  drop_epochs: tuple[int, ...], patience: int | None) -> None:
    """The named choices and how they fit together, each named by its flag."""
    for flag, value, choices in (("--recipe", recipe, tuple(RECIPES)), ("--opt", opt, OPTIMIZERS),
                                 ("--sched", sched, SCHEDULES)):
        if value not in choices:
            raise ValueError(f"{flag} {value!r} is not one of {', '.join(choices)}")
    if nesterov and opt != "sgd":
        raise ValueError(f"--nesterov is for --opt sgd; --opt {opt} has its own momentum (AdamW: betas 0.9, 0.999)")
    if nesterov and momentum == 0:
        raise ValueError("--nesterov needs a --momentum > 0")
    if sched == "cosine" and (drop_epochs or patience is not None):
        raise ValueError("--sched cosine does not take --lr-drop (its lr follows the cosine); drop --lr-drop, or use "
                         "--sched step / plateau")
    if sched == "plateau" and patience is None:
        raise ValueError("--sched plateau needs its patience: add --lr-drop plateau:N (N epochs without a better "
                         "valid accuracy)")
    if sched == "step" and patience is not None:
        raise ValueError("--sched step conflicts with --lr-drop plateau:N; use --sched plateau (it applies "
                         "--lr-drop epochs too)")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    cache_dir: str
    cache_key: str
    stages: tuple[Stage, ...]
    lr: float = 0.005
    momentum: float = 0.9
    lr_drop_epochs: tuple[int, ...] = ()
    lr_drop_patience: int | None = None
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    compile: bool = False
    stem: str = "standard"
    pretrained: str | None = None
    # the training options (defaults: the report's recipe; see RECIPES and `python -m train.run --help`)
    recipe: str = "report"
    opt: str = "sgd"
    nesterov: bool = False
    weight_decay: float = 0.0  # conv/linear weights only; norm parameters and biases get none (timm's convention)
    label_smoothing: float = 0.0  # the training loss only
    sched: str | None = None  # None: from the lr drops (plateau with a patience, else step)
    min_lr: float = 0.0  # cosine's end
    warmup_epochs: int = 0  # per stage, linear per step from warmup_lr
    warmup_lr: float = 1e-5
    ema_decay: float | None = None  # per optimizer step; None: no EMA
    ema_warmup: bool = False  # timm's EMA warmup: decay min(ema_decay, 1 - k ** -2/3) at the k-th update
    # a cross-validation fold's record (train/folds.py; made by train.cv), or None: the cache's own train and valid
    fold: dict | None = None

    def __post_init__(self):
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.sched is None:
            object.__setattr__(self, "sched", "plateau" if self.lr_drop_patience is not None else "step")
        check_numbers(self.lr, self.momentum, self.seed, weight_decay=self.weight_decay,
                      label_smoothing=self.label_smoothing, ema_decay=self.ema_decay,
                      warmup_epochs=self.warmup_epochs, warmup_lr=self.warmup_lr, min_lr=self.min_lr)
        check_choices(self.recipe, self.opt, self.nesterov, self.momentum, self.sched, self.lr_drop_epochs,
                      self.lr_drop_patience)
        if self.ema_warmup and self.ema_decay is None:
            raise ValueError("--ema-warmup needs an EMA: give --ema-decay too")
        if not self.stages:
            raise ValueError("a run needs at least one stage")
        for stage in self.stages:
            for name, value in (("size", stage.size), ("epochs", stage.epochs), ("batch size", stage.batch_size)):
                if value < 1:
                    raise ValueError(f"stage {stage.size}:{stage.epochs}:{stage.batch_size}: {name} must be >= 1, "
                                     f"got {value}")
        if any(e < 1 for e in self.lr_drop_epochs):
            raise ValueError(f"--lr-drop epochs must be >= 1, got {list(self.lr_drop_epochs)}")
        if self.lr_drop_patience is not None and self.lr_drop_patience < 1:
            raise ValueError(f"--lr-drop plateau:N needs N >= 1, got {self.lr_drop_patience}")

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for s in self.stages)

    def stage_of(self, epoch: int) -> int:
        """Index of the stage that global epoch `epoch` (0-based) belongs to."""
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.epochs
            if epoch < end:
                return i
        raise IndexError(epoch)

    def stage_start(self, index: int) -> int:
        return sum(s.epochs for s in self.stages[:index])

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stages"] = [dataclasses.asdict(s) for s in self.stages]
        d["lr_drop_epochs"] = list(self.lr_drop_epochs)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """From config.json; a run saved before the training options existed gets the report's recipe (the defaults),
        with its schedule named from its lr drops."""
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d["stages"] = tuple(Stage(**s) for s in d["stages"])
        d["lr_drop_epochs"] = tuple(d.get("lr_drop_epochs", ()))
        return cls(**d)
