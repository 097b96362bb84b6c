"""A training run's resolved settings: one frozen value, saved as config.json beside every checkpoint."""
from __future__ import annotations

import dataclasses
from dataclasses import InitVar, dataclass

from models import MODEL_NAMES
from train.augment.batch import BACKENDS
from train.engine.ahead import ahead_default
from train.engine import options
from train.engine.options import RECIPES, sched_for_drops

REPORT = RECIPES["report"]  # TrainConfig's defaults: a config.json written before recipes existed loads as `report`

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# The modes whose Inductor options turn CUDA graphs on ("triton.cudagraphs" in torch._inductor.list_mode_options;
# max-autotune too, its graph-free twin being max-autotune-no-cudagraphs). A test holds this to torch's own table.
CUDA_GRAPH_MODES = frozenset({"reduce-overhead", "max-autotune"})


def compile_mode_options(mode: str) -> dict:
    """torch.compile's keyword for `--compile-mode` (none for the default)."""
    return {} if mode == "default" else {"mode": mode}


def uses_cuda_graphs(mode: str, device) -> bool:
    """Whether a model compiled with `--compile-mode mode` on `device` (a torch.device) runs as CUDA graphs, so each
    step must be marked (`loop.mark_graph_step`); Inductor captures graphs on CUDA only."""
    return mode in CUDA_GRAPH_MODES and device.type == "cuda"


# The report's recipe per model: (size, epochs, batch size) stages. ResNet50/152: 550 epochs at 128 px, then the
# best-valid weights continue at 224 px; ResNet18 at 224 px throughout; ResNet152 at 224 used batch 32 for memory.
PRESETS = {
    "resnet18": ((224, 100, 64),),
    "resnet50": ((128, 550, 64), (224, 100, 64)),
    "resnet152": ((128, 550, 64), (224, 100, 32)),
}


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


def check_seed(seed: int) -> None:
    """The seed is no training option (no recipe sets it) but is checked as early, by its flag."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"--seed must be an integer in [0, 2**32), got {seed}")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    cache_dir: str
    cache_key: str
    stages: tuple[Stage, ...]
    lr: float = REPORT["lr"]
    momentum: float = REPORT["momentum"]
    lr_drop_epochs: tuple[int, ...] = ()
    lr_drop_patience: int | None = None
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    compile: bool = False
    # torch.compile's mode for the model: "reduce-overhead" replays each stage's step as CUDA graphs (one launch
    # instead of hundreds: eager steps of a small model are launch-bound), "max-autotune" also benchmarks kernels
    compile_mode: str = "default"
    # augment batch i+1 on a side stream while step i runs (train.engine.ahead); None: on for CUDA
    augment_ahead: bool | None = None
    # GpuAugment's backend (train.augment.BACKENDS): auto = OpenCV for a CPU, torch for CUDA
    augment_backend: str = "auto"
    stem: str = "standard"
    pretrained: str | None = None
    # the training options (train.engine.options: their flags, checks and the recipes' values)
    recipe: str = "report"
    opt: str = REPORT["opt"]
    nesterov: bool = REPORT["nesterov"]
    weight_decay: float = REPORT["weight_decay"]  # conv/linear weights only; norm parameters and biases get none
    label_smoothing: float = REPORT["label_smoothing"]  # the training loss only
    sched: str | None = None  # None: from the lr drops (plateau with a patience, else step)
    min_lr: float = REPORT["min_lr"]  # cosine's end
    warmup_epochs: int = REPORT["warmup_epochs"]  # per stage, linear per step from warmup_lr
    warmup_lr: float = REPORT["warmup_lr"]
    ema_decay: float | None = REPORT["ema_decay"]  # per optimizer step; None: no EMA
    ema_warmup: bool = REPORT["ema_warmup"]  # timm's: decay min(ema_decay, 1 - k ** -2/3) at the k-th update
    # a cross-validation fold's record (train.data.folds; made by train.cv), or None: the cache's own train and valid
    fold: dict | None = None
    # settings saved before (config.json, a cross-validation's plan): a check added since they were saved warns
    # instead of refusing them (train.engine.options.RULES_SINCE_SAVED); not a field, so never saved itself
    saved: InitVar[bool] = False

    def __post_init__(self, saved: bool):
        if self.model not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.sched is None:
            object.__setattr__(self, "sched", sched_for_drops(self.lr_drop_patience))
        options.check(vars(self), saved=saved)
        check_seed(self.seed)
        if self.augment_backend not in BACKENDS:
            raise ValueError(f"--augment-backend must be one of {', '.join(BACKENDS)}, got {self.augment_backend!r}")
        wants = {"triton": "cuda", "opencv": "cpu"}.get(self.augment_backend)
        if wants and not self.device.startswith(wants):
            raise ValueError(f"--augment-backend {self.augment_backend} runs on {wants} only, and the run's device is "
                             f"{self.device}; use --augment-backend auto")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        if not self.stages:
            raise ValueError("a run needs at least one stage")
        for stage in self.stages:
            for name, value in (("size", stage.size), ("epochs", stage.epochs), ("batch size", stage.batch_size)):
                if value < 1:
                    raise ValueError(f"stage {stage.size}:{stage.epochs}:{stage.batch_size}: {name} must be >= 1, "
                                     f"got {value}")

    @property
    def ahead(self) -> bool:
        """Whether batches are augmented one batch ahead: `augment_ahead`, or for None (a run saved before the flag,
        or not given) the device's default."""
        return ahead_default(self.device) if self.augment_ahead is None else self.augment_ahead

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
        """From config.json (or a checkpoint's `config`), as saved settings: a run saved before the training options
        existed gets the report's recipe (the defaults), with its schedule named from its lr drops."""
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d["stages"] = tuple(Stage(**s) for s in d["stages"])
        d["lr_drop_epochs"] = tuple(d.get("lr_drop_epochs", ()))
        return cls(**d, saved=True)
