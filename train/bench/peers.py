"""GpuAugment beside what a user would pick instead, in one run (`python -m train.bench peers`).

The same uint8 batch of real-looking cells (read from a tiny cache built in a temp folder, repeated to the batch
size) goes through every peer, each set to GpuAugment's own `AugConfig` (flip p, rotation range, jitter strengths),
crop size and the cache's mean/std, so they all do the same work:

- GpuAugment, torch backend eager and compiled, and the OpenCV backend (on the host);
- Kornia's `AugmentationSequential` of its nearest ops (per-sample parameters), eager and `torch.compile`d;
- torchvision's v2 transforms on device tensors: one call on the whole batch (v2 draws one parameter set per call),
  and one call per sample in a Python loop;
- the report's per-image path (read, CLAHE, unsharp, PIL transforms) through a torch DataLoader with a worker per
  core (the loader part's `ReportDataset`), plus the host-to-device copy on CUDA.

Each prints img/s and its ratio to GpuAugment (torch backend, compiled where that row ran, else eager); compiled
rows report their first call (tracing and code generation) as compile seconds, outside the timed calls. Then a
ResNet18 training step (AMP on CUDA, fp32 on the CPU) fed by each peer, against the same step on a resident batch:
images/s and the data share 1 - fed / resident. Every row is recorded whether or not the others fail: a failed row
keeps its error text (the GPU check's `_attempt`). Speed targets live in the README, never in tests. The markdown
tables come from `report` (the peers_report part).
"""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.bench_build import bench_source
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.progress import progress_bar
from pipeline.store import CacheReader
from train.augment import AugConfig, GpuAugment
from train.bench.gpu import device_info
from train.bench.record import attempt as _attempt, error_of as _error
from train.bench.loader import ReportDataset, sync, time_steps
from train.bench.peers_report import report  # noqa: F401  (the CLI prints train.bench.peers.report(result))

log = logging.getLogger(__name__)

# The rows, in print order: key -> (label, how its semantics differ from the report's per-sample transforms).
PEERS = {
    "gpuaugment-torch-eager": (
        "GpuAugment, torch backend, eager",
        "the report's semantics per sample (own flips, angle, factors and jitter order); flips + rotation + crop are "
        "one bilinear warp of the stored image; hue in float HSV (kornia.enhance.adjust_hue), no uint8 rounding"),
    "gpuaugment-torch-compiled": (
        "GpuAugment, torch backend, compiled",
        "as eager; the device part's planes form (torch_planes, the same arithmetic) compiled with fullgraph=True and "
        "static shapes"),
    "gpuaugment-opencv": (
        "GpuAugment, OpenCV backend (host)",
        "the same parameters per sample; per image on uint8 in a thread pool (warpAffine bilinear, hue in uint8 "
        "HSV as PIL does, rounding after each op); on CUDA the output is then copied to the device"),
    "kornia-eager": (
        "Kornia AugmentationSequential, eager",
        "flips, angle and jitter factors per sample, but one jitter order per batch; flips, rotation (bilinear, "
        "zeros) and crop are separate passes; hue in float HSV; every image converted to float first"),
    "kornia-compiled": (
        "Kornia AugmentationSequential, compiled",
        "as eager, under torch.compile: graph breaks, and recompiles as new branches (flip on/off, jitter order) "
        "appear, up to dynamo's recompile limit"),
    "torchvision-v2-batch": (
        "torchvision v2, one parameter set per batch",
        "one call on the batch tensor draws ONE set: every image gets the same flips, angle, factors and order; "
        "hue in float HSV"),
    "torchvision-v2-per-sample": (
        "torchvision v2, per sample in a loop",
        "the report's semantics on float tensors (own parameters and jitter order per image), one Python call per "
        "image; hue in float HSV"),
    "report-dataloader": (
        "report per-image path, DataLoader",
        "the report's own path: every image read, CLAHE'd and sharpened again, PIL uint8 ops (rounding after each), "
        "rotation nearest (torchvision's default), crop 270 of 450 then resize; workers = cores, +H2D on CUDA"),
}


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run; `plan_for` picks them per device (and `--quick`)."""
    size: int = 224  # px, output
    batch_size: int = 256
    calls: int = 30  # timed augmentation calls per row
    warmup_calls: int = 5
    compiled_warmup_calls: int = 10  # compiled Kornia recompiles while new branches appear
    train_steps: int = 30  # the "epoch": this many timed steps per row
    train_warmup_steps: int = 5
    source_images: int = 64  # distinct cells; the batch and the DataLoader repeat them
    model: str = "resnet18"


CPU = Plan(batch_size=64, calls=6, warmup_calls=2, compiled_warmup_calls=4, train_steps=3, train_warmup_steps=1)
QUICK = Plan(size=64, batch_size=8, calls=2, warmup_calls=1, compiled_warmup_calls=1, train_steps=1,
             train_warmup_steps=1, source_images=24)


def plan_for(device: str, quick: bool, size: int | None = None, batch_size: int | None = None) -> Plan:
    """The plan for `device` (QUICK with `quick`), with --size / --batch-size where given."""
    base = QUICK if quick else CPU if torch.device(device).type == "cpu" else Plan()
    if size is not None and size < 16:
        raise ValueError(f"--size {size}: use at least 16 px")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: use at least 1")
    return replace(base, size=size or base.size, batch_size=batch_size or base.batch_size)


# ---------------------------------------------------------------------- the peers' pipelines


def kornia_pipeline(size: int, mean, std, config: AugConfig) -> torch.nn.Module:
    """Kornia's nearest equivalent of GpuAugment: float [0, 1] (B, 3, S_stored, S_stored) -> normalised (B, 3, S, S)."""
    import kornia.augmentation as K
    return K.AugmentationSequential(
        K.RandomHorizontalFlip(p=config.flip_p), K.RandomVerticalFlip(p=config.flip_p),
        K.RandomRotation(config.max_rotation_deg, p=1.0), K.CenterCrop(size),
        K.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue, p=1.0),
        K.Normalize(torch.tensor(mean), torch.tensor(std)))


def torchvision_pipeline(size: int, mean, std, config: AugConfig):
    """torchvision v2's: uint8 (..., 3, S_stored, S_stored) -> normalised float (..., 3, S, S), one parameter set
    per call."""
    from torchvision.transforms import v2
    return v2.Compose([
        v2.ToDtype(torch.float32, scale=True), v2.RandomHorizontalFlip(config.flip_p),
        v2.RandomVerticalFlip(config.flip_p),
        v2.RandomRotation(config.max_rotation_deg, interpolation=v2.InterpolationMode.BILINEAR), v2.CenterCrop(size),
        v2.ColorJitter(config.brightness, config.contrast, config.saturation, config.hue),
        v2.Normalize(list(mean), list(std))])


@dataclass
class Batch:
    """The one batch every peer gets, and what the peers are built from."""
    images: torch.Tensor  # (B, 3, S_stored, S_stored) uint8 channels_last, on the device
    host_images: torch.Tensor  # the same on the host
    labels: torch.Tensor  # (B,) int64 on the device
    size: int
    mean: tuple
    std: tuple
    paths: list  # the source files behind the cache, for the report's path
    device: torch.device
    config: AugConfig = AugConfig()

    @property
    def stored_size(self) -> int:
        return self.images.shape[-1]


def _gpu_augment(batch: Batch, backend: str, compiled: bool):
    augment = GpuAugment(batch.size, batch.stored_size, batch.mean, batch.std, batch.config, backend=backend)
    augment = augment.to(batch.device).train()
    if compiled:
        augment.compile()
    generator, n = torch.Generator().manual_seed(0), len(batch.labels)
    if backend == "opencv":  # the host's work, then the copy a CUDA step needs
        cuda = batch.device.type == "cuda"

        def opencv():
            out = augment.apply(batch.host_images, augment.sample(n, generator))
            # from pinned memory and non_blocking, as a user would copy it: a copy from pageable memory waits for
            # the device to drain on every call, which the row would count against OpenCV
            return out.pin_memory().to(batch.device, non_blocking=True) if cuda else out.to(batch.device)
        return opencv
    return lambda: augment.apply(batch.images, augment.sample(n, generator))


def _kornia(batch: Batch, compiled: bool):
    pipeline = kornia_pipeline(batch.size, batch.mean, batch.std, batch.config).to(batch.device)
    if compiled:
        pipeline = torch.compile(pipeline)
    return lambda: pipeline(batch.images.float().div_(255))


def _torchvision(batch: Batch, per_sample: bool):
    pipeline = torchvision_pipeline(batch.size, batch.mean, batch.std, batch.config)
    if per_sample:
        return lambda: torch.stack([pipeline(image) for image in batch.images])
    return lambda: pipeline(batch.images)


def _report(batch: Batch):
    """Batches of the report's DataLoader, one worker per core, over the source files repeated (persistent workers:
    a new pass does not fork again), moved to the device as a training loop would."""
    workers = os.cpu_count() or 1
    n = len(batch.labels)
    paths = batch.paths * max(1, -(-4 * n // len(batch.paths)))  # a pass of at least 4 batches
    loader = torch.utils.data.DataLoader(ReportDataset(paths, batch.size), batch_size=n, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                                         pin_memory=batch.device.type == "cuda")
    batches = (x for _ in itertools.count() for x, _ in loader)
    return lambda: next(batches).to(batch.device, non_blocking=True)


MAKERS = {
    "gpuaugment-torch-eager": lambda b: _gpu_augment(b, "torch", compiled=False),
    "gpuaugment-torch-compiled": lambda b: _gpu_augment(b, "torch", compiled=True),
    "gpuaugment-opencv": lambda b: _gpu_augment(b, "opencv", compiled=False),
    "kornia-eager": lambda b: _kornia(b, compiled=False),
    "kornia-compiled": lambda b: _kornia(b, compiled=True),
    "torchvision-v2-batch": lambda b: _torchvision(b, per_sample=False),
    "torchvision-v2-per-sample": lambda b: _torchvision(b, per_sample=True),
    "report-dataloader": _report,
}
COMPILED = {"gpuaugment-torch-compiled", "kornia-compiled"}


class Peers:
    """Each peer built once, on first use, and kept for the training rows (a compiled peer is not compiled twice);
    a peer that failed to build fails again, with the same error, wherever it is asked for."""

    def __init__(self, batch: Batch):
        self.batch, self._made = batch, {}

    def get(self, name: str):
        if name not in self._made:
            try:
                self._made[name] = MAKERS[name](self.batch)
            except Exception as err:  # recorded by the caller's row, and again by the next row that asks
                self._made[name] = err
        made = self._made[name]
        if isinstance(made, Exception):
            raise made
        return made


# ---------------------------------------------------------------------- timing


def first_call(fn, batch: Batch) -> float:
    """Seconds of the first call (for a compiled peer: tracing and code generation), after checking that the peer
    yields what GpuAugment does: float (B, 3, S, S) on the device."""
    start = time.perf_counter()
    out = fn()
    sync(batch.device)
    seconds = time.perf_counter() - start
    want = (len(batch.labels), 3, batch.size, batch.size)
    if tuple(out.shape) != want or not out.is_floating_point() or out.device.type != batch.device.type:
        raise ValueError(f"the peer yields {out.dtype} {tuple(out.shape)} on {out.device}, not float {want} on "
                         f"{batch.device}")
    return seconds


def time_augmentation(name: str, peers: Peers, plan: Plan) -> dict:
    """img/s of `plan.calls` calls of peer `name` after its first call and its warm-up calls; for a compiled peer
    also the graphs dynamo compiled meanwhile (more than one: graph breaks or recompiles)."""
    fn, n = peers.get(name), plan.batch_size
    graphs_before = _graphs()
    first_s = first_call(fn, peers.batch)
    warmup = plan.compiled_warmup_calls if name in COMPILED else plan.warmup_calls
    count, seconds = time_steps(lambda _: (fn(), n)[1], itertools.repeat(None), plan.calls, warmup,
                                peers.batch.device)
    compiled = name in COMPILED
    return {"imgs_per_s": count / seconds, "ms_per_batch": seconds / plan.calls * 1e3, "first_call_s": first_s,
            "compile_s": first_s if compiled else None, "graphs": _graphs() - graphs_before if compiled else None}


def _graphs() -> int:
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


class Trainer:
    """ResNet steps as train.run takes them (AMP on CUDA, fp32 on the CPU; channels_last), one model for every row:
    the figure is the step's speed, not its accuracy."""

    def __init__(self, plan: Plan, device: torch.device):
        from models import build_model
        from train.engine.loop import Precision
        self.plan, self.device = plan, device
        self.precision = Precision.for_device(device, amp=device.type == "cuda")
        self.model = build_model(plan.model).to(device, memory_format=torch.channels_last).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.005, momentum=0.9)

    def rate(self, make_x, labels: torch.Tensor) -> float:
        from train.engine.loop import train_step

        def step(_):
            train_step(self.model, self.precision.prepare(make_x()), labels, self.opt, self.precision, self.device)
            return len(labels)
        count, seconds = time_steps(step, itertools.repeat(None), self.plan.train_steps,
                                    self.plan.train_warmup_steps, self.device)
        return count / seconds


def time_training(peers: Peers, plan: Plan, progress) -> dict:
    """Rows of img/s for a training step fed by each peer, and the resident batch's, timed before and after them
    (their mean is the reference for the data share; their spread says how noisy the machine was)."""
    batch, device = peers.batch, peers.batch.device
    table = {"model": plan.model, "precision": None, "steps": plan.train_steps}
    try:
        trainer = Trainer(plan, device)
    except Exception as err:  # no model, no training row: each keeps the reason
        progress.update(len(PEERS))
        return {**table, "resident": {"peer": "resident", **_error(err)},
                "rows": [{"peer": name, **_error(err)} for name in PEERS]}
    resident = torch.randn(plan.batch_size, 3, plan.size, plan.size, device=device)  # (B, 3, S, S) float

    def resident_rate() -> dict:
        return {"imgs_per_s": trainer.rate(lambda: resident, batch.labels)}

    before = _attempt({"peer": "resident"}, resident_rate, device)
    rows = []
    for name in PEERS:
        rows.append(_attempt({"peer": name}, lambda: {"imgs_per_s": trainer.rate(peers.get(name), batch.labels)},
                             device))
        progress.update()
    after = _attempt({"peer": "resident"}, resident_rate, device)
    rates = [r["imgs_per_s"] for r in (before, after) if "imgs_per_s" in r]
    resident_row = before
    if rates:
        mean = sum(rates) / len(rates)
        resident_row = {"peer": "resident", "imgs_per_s": mean, "rounds": rates,
                        "spread": (max(rates) - min(rates)) / mean}
    for row in rows:  # 1 - fed / resident: the share of a fed step that the data costs
        if "imgs_per_s" in row and "imgs_per_s" in resident_row:
            row["data_share"] = 1 - row["imgs_per_s"] / resident_row["imgs_per_s"]
    amp = trainer.precision.amp_dtype
    return {**table, "precision": str(amp).replace("torch.", "") if amp else "float32", "resident": resident_row,
            "rows": rows}


def add_ratios(table: dict) -> dict:
    """Each row's `ratio` = its img/s / the reference row's: GpuAugment's torch backend, compiled where that row
    ran, else eager (None when neither ran)."""
    by_name = {row["peer"]: row for row in table["rows"]}
    reference = next((k for k in ("gpuaugment-torch-compiled", "gpuaugment-torch-eager")
                      if "imgs_per_s" in by_name.get(k, {})), None)
    table["reference"] = reference
    for row in table["rows"]:
        ok = reference is not None and "imgs_per_s" in row
        row["ratio"] = row["imgs_per_s"] / by_name[reference]["imgs_per_s"] if ok else None
    return table


# ---------------------------------------------------------------------- the whole run


def make_batch(plan: Plan, device: torch.device, work: Path) -> tuple[Batch, str]:
    """A tiny cache of copied cells at `plan.size`, its train split repeated to the batch size."""
    source, origin = bench_source(work / "source", plan.source_images, work / "demo")
    built = build(PreprocessConfig(split_fractions=(0.98, 0.01, 0.01)),
                  BuildOptions(sizes=(plan.size,), source=source, cache_root=work / "cache", progress=False))
    reader = CacheReader(built.cache_dir)
    info = reader.size_info(plan.size)
    n, stored = reader.count(plan.size, "train"), info["stored_size"]
    cells = np.empty((n, stored, stored, 3), np.uint8)
    reader.read_images_into(plan.size, "train", cells)
    labels = torch.from_numpy(reader.read_meta(plan.size, "train")["labels"])
    rows = torch.arange(plan.batch_size) % n
    host = torch.from_numpy(cells)[rows].permute(0, 3, 1, 2)  # (B, 3, S_stored, S_stored) uint8, channels_last
    batch = Batch(images=host.to(device), host_images=host, labels=labels[rows].to(device), size=plan.size,
                  mean=tuple(info["mean"]), std=tuple(info["std"]), paths=sorted(source.rglob("*.bmp")),
                  device=device)
    return batch, origin


def run(device: str = "cpu", size: int | None = None, batch_size: int | None = None, quick: bool = False,
        plan: Plan | None = None, progress="off") -> dict:
    """Every row of both tables; `plan` (else `plan_for`) fixes the sizes and counts."""
    device = torch.device(device)
    plan = plan or plan_for(str(device), quick, size, batch_size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as in a training stage
    # compiles of its own: a Kornia pipeline compiled earlier in this process may have spent dynamo's recompile limit
    torch._dynamo.reset()
    start = time.perf_counter()
    bar = progress_bar(progress, 2 * len(PEERS), "peers benchmark", "row", log)
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        batch, origin = make_batch(plan, device, Path(tmp))
        peers = Peers(batch)
        rows = []
        for name in PEERS:
            rows.append(_attempt({"peer": name}, lambda: time_augmentation(name, peers, plan), device))
            bar.update()
        training = time_training(peers, plan, bar)
        del peers  # the report's persistent DataLoader workers end here, before the folder goes
    bar.close()
    import kornia
    import torchvision
    return {**device_info(device), "kornia": kornia.__version__, "torchvision": torchvision.__version__,
            "cpu_threads": torch.get_num_threads(), "workers": os.cpu_count(), "quick": quick, "plan": asdict(plan),
            "stored_size": batch.stored_size, "origin": origin,
            "peers": {name: {"label": label, "semantics": note} for name, (label, note) in PEERS.items()},
            "augmentation": add_ratios({"rows": rows}), "training": add_ratios(training),
            "seconds": round(time.perf_counter() - start, 1)}
