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


def check_numbers(lr: float, momentum: float, seed: int) -> None:
    """The optimiser's numbers and the seed, each named by its flag; called before anything else is done."""
    # `not (... > 0)` rather than `<= 0`: NaN fails every comparison, so it must fail the check too
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {lr}")
    if not (math.isfinite(momentum) and 0 <= momentum < 1):
        raise ValueError(f"--momentum must be a finite number in [0, 1), got {momentum}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed}")


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
    # a cross-validation fold's record (train/folds.py; made by train.cv), or None: the cache's own train and valid
    fold: dict | None = None

    def __post_init__(self):
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        check_numbers(self.lr, self.momentum, self.seed)
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
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d["stages"] = tuple(Stage(**s) for s in d["stages"])
        d["lr_drop_epochs"] = tuple(d.get("lr_drop_epochs", ()))
        return cls(**d)
