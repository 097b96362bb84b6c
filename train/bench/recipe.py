"""The report's recipe at the dataset's scale (`python -m train.bench recipe`): what a whole run costs, end to end.

On a synthetic source of the Kaggle download's shape (the recipe_source part of this package: 10,661 training-fold
images, 1,867 prelim and 2,586 final, 450 px), it times
1. the cache build of the recipe's sizes (`pipeline.build.build`, as `python -m pipeline.build` runs it);
2. the model's preset recipe (`train.engine.config.PRESETS`, the stages train.run runs without `--stages`; options of
   `--recipe`), its config resolved by train.run's own parser and `resolve_config`, trained by its `Trainer` and
   evaluated by `evaluate_run` - the calls `train_and_evaluate` makes. With `epochs` only the first N epochs of each
   stage are trained;
3. the same training pass fed by the report's per-image DataLoader (`ReportDataset`, one worker per core), per stage.

Projection (every projected figure is marked so): a stage's seconds = its steady seconds per epoch x the recipe's
epochs of the stage + the extra of its first epoch (the stage's data load and, compiled, the compile), where steady
means the median of the epochs after the first when two or more were measured, else the first. With `scale` < 1 the
source holds that fraction of the images and the per-image costs (build, epochs, evaluation) are divided by it; the
first epoch's extra is not. A stage whose every epoch was measured at scale 1 counts its measured seconds instead.
total = build + the stages + evaluation. Compiled, each stage measures at least two epochs (the compile is then the
first epoch's extra, counted once per stage).

Every part is recorded whether or not the others fail (the GPU check's `_stage`/`_attempt`): a failed part keeps its
error text, and the totals name the parts they miss.
"""
from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from models import MODEL_NAMES, build_model
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.progress import bars, progress_bar
from pipeline.store import CacheReader
from train.bench import recipe_source
from train.bench.record import attempt as _attempt, free as _free, stage as _stage
from train.bench.loader import ReportDataset, sync
from train.engine import run_folder as rf
from train.engine.config import PRESETS, TrainConfig
from train.engine.distributed import Dist
from train.engine.loop import Precision, train_step
from train.engine.optim import build_optimizer
from train.engine.options import RECIPE_NAMES
from train.engine.trainer import Trainer
from train.evaluation.evaluator import evaluate_run
from train.engine.run_folder import new_run_dir
from train.experiment.session import parse_args, resolve_config

log = logging.getLogger(__name__)
WARMUP_STEPS = 2  # before the report-fed pass
SYNTHETIC = ("the images are synthetic (a few drawn cells, the other files hard links to them): timings are those "
             "of the dataset's counts and pixels, accuracies say nothing about C-NMC")


@dataclass(frozen=True)
class Plan:
    """What one benchmark builds and trains; `QUICK` is the CPU wiring check (tiny images and sizes, 1 epoch)."""
    source: recipe_source.SourceShape = recipe_source.CNMC
    size_of: dict = field(default_factory=dict)  # the recipe's size -> the size built and trained (quick: smaller)
    batch_size: int | None = None  # None: each stage's own
    epochs: int | None = None  # per stage; None: the recipe's
    build_sizes: tuple[int, ...] = (128, 224)  # what the README's build makes for every model (through `size_of`)


QUICK = Plan(source=recipe_source.QUICK, size_of={128: 32, 224: 48}, batch_size=8, epochs=1)


def cores() -> int:
    """The cores this process may use: the report's loader gets one worker per core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def stages_of(model: str, plan: Plan, epochs: int | None, compiled: bool = False) -> list[dict]:
    """The preset's stages, each with the size and batch trained here and the epochs measured: compiled, at least
    two, so that the compile in the first epoch is told apart and not projected into every epoch."""
    rows = []
    for size, recipe_epochs, batch_size in PRESETS[model]:
        measured = min(max(epochs or plan.epochs or recipe_epochs, 2 if compiled else 1), recipe_epochs)
        rows.append({"recipe_size": size, "size": plan.size_of.get(size, size), "recipe_epochs": recipe_epochs,
                     "batch_size": plan.batch_size or batch_size, "epochs_measured": measured})
    return rows


# ---------------------------------------------------------------------- the parts


def make_source(plan: Plan, scale: float, folder: Path) -> dict:
    return recipe_source.ensure_source(folder, plan.source.scaled(scale))


def build_cache(source: dict, sizes: tuple[int, ...], cache_root: Path, progress) -> dict:
    start = time.perf_counter()
    report_ = build(PreprocessConfig(), BuildOptions(sizes=sizes, source=Path(source["root"]), cache_root=cache_root,
                                                     progress=progress))
    build_s = time.perf_counter() - start
    splits = CacheReader(report_.cache_dir).manifest["splits"]
    return {"build_s": build_s, "sizes": list(sizes), "images": report_.images, "cache_dir": str(report_.cache_dir),
            "splits": {name: info.get("count") for name, info in splits.items()}}


def resolve(model: str, stages: list[dict], cache_dir: str, device: str, recipe: str, compile_: bool,
            out: Path) -> TrainConfig:
    """The config train.run would resolve for these stages: its own parser and resolution."""
    argv = [model, "--cache", cache_dir, "--out", str(out), "--device", device, "--recipe", recipe, "--stages",
            *(f"{s['size']}:{s['epochs_measured']}:{s['batch_size']}" for s in stages)]
    config, _ = resolve_config(parse_args(argv + (["--compile"] if compile_ else [])))
    return config


def _steady(values: list[float]) -> float:
    return statistics.median(values[1:]) if len(values) > 1 else values[0]


def stage_figures(stage: dict, walls: list[float], rows: list[dict], compiled: bool) -> dict:
    """One stage's measured epochs (wall seconds, metrics.csv's training pass and data shares) and its s/epoch."""
    s_per_epoch = _steady(walls)
    extra = walls[0] - s_per_epoch if len(walls) > 1 else 0.0
    passes = [r["epoch_s"] for r in rows]
    return {**stage, "epoch_wall_s": walls, "s_per_epoch": s_per_epoch, "first_epoch_extra_s": extra,
            "steady": len(walls) > 1,  # False: one epoch, whose warm-up and data load every projected epoch repeats
            "compile_s": extra if compiled and len(walls) > 1 else None,
            "train_pass_s": passes, "train_pass_s_per_epoch": _steady(passes),
            **{k: _steady([r[k] for r in rows]) for k in ("imgs_per_s", "data_wait", "augment_share")},
            "valid_acc": rows[-1]["valid_acc"]}


def train_stages(model: str, stages: list[dict], build_part: dict, device: str, recipe: str, compile_: bool,
                 out: Path, progress) -> dict:
    if "cache_dir" not in build_part:
        raise RuntimeError("no cache (see the build part's error)")
    config = resolve(model, stages, build_part["cache_dir"], device, recipe, compile_, out)
    run_dir = new_run_dir(out, model)
    trainer = Trainer(config, run_dir, Dist(), progress=bars(progress))
    trainer.write_config()
    marks = []
    end_epoch = trainer.end_epoch

    def timed_end_epoch(*args, **kwargs):  # an epoch's wall time: training, validation, the checkpoint queued
        end_epoch(*args, **kwargs)
        marks.append(time.perf_counter())

    trainer.end_epoch = timed_end_epoch
    start = time.perf_counter()
    trainer.fit()
    marks[-1] = time.perf_counter()  # the last epoch ends when its checkpoint is written (fit waits for it)
    walls = [b - a for a, b in zip([start, *marks], marks)]
    metrics = rf.read_metrics(run_dir).to_dict("records")
    figures, first = [], 0
    for stage in stages:
        n = stage["epochs_measured"]
        figures.append(stage_figures(stage, walls[first:first + n], metrics[first:first + n], config.compile))
        first += n
    return {"run_dir": str(run_dir), "device": str(trainer.device), "compiled": config.compile,
            "amp": config.amp, "recipe": config.recipe, "training_s": marks[-1] - start, "stages": figures}


def evaluate(training: dict) -> dict:
    if "run_dir" not in training:
        raise RuntimeError("no trained run (see the training part's error)")
    start = time.perf_counter()
    summary = evaluate_run(Path(training["run_dir"]), device=training["device"], dist=Dist())
    return {"evaluation_s": time.perf_counter() - start, "splits": ["valid", "test"],
            "best_valid_acc": summary.get("best_valid_acc"), "test_acc": summary.get("test_acc"),
            "note": "accuracies of synthetic images"}


def time_report_epoch(paths: list[Path], size: int, batch_size: int, workers: int, config: TrainConfig,
                      device: torch.device, images: int | None = None) -> dict:
    """One training pass fed by the report's per-image DataLoader (`ReportDataset`: read, CLAHE, unsharp, PIL
    transforms, every epoch; `workers` processes, started anew each epoch as the report's loader did), the model
    stepping as the cached run's does (same model, optimizer, precision). With `images`, only the first batches
    holding that many are timed and the pass is projected to the whole split."""
    loader = torch.utils.data.DataLoader(ReportDataset(paths, size), batch_size=batch_size, shuffle=True,
                                         num_workers=workers, drop_last=True, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))
    if len(loader) == 0:
        raise ValueError(f"{len(paths)} training images give no batch of {batch_size}")
    precision = Precision.for_device(device, config.amp)
    net = build_model(config.model, stem=config.stem).to(
        device, memory_format=torch.channels_last if precision.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(net, config, config.lr, fused=device.type == "cuda")
    # untimed steps on a random batch: lazy initialisation and kernel choice (cuDNN's; oneDNN's on a CPU, where the
    # second step was still 2-4x slower than the third) are not the loader's cost
    x = precision.prepare(torch.randn(batch_size, 3, size, size, device=device))  # (B, 3, S, S) float32
    for _ in range(WARMUP_STEPS):
        train_step(net, x, torch.zeros(batch_size, dtype=torch.int64, device=device), optimizer, precision, device)
    steps = len(loader) if images is None else min(len(loader), max(1, math.ceil(images / batch_size)))
    sync(device)
    start, count = time.perf_counter(), 0
    for step, (x, y) in enumerate(loader):  # (B, 3, S, S) float32 normalised, (B,) int64
        if step == steps:
            break
        x = precision.prepare(x.to(device, non_blocking=True))
        train_step(net, x, y.to(device, non_blocking=True), optimizer, precision, device, config.label_smoothing)
        count += len(y)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images_timed": count, "seconds": seconds, "imgs_per_s": count / seconds,
            "s_per_epoch": seconds / count * len(loader) * batch_size, "projected": steps < len(loader)}


def compare_report_loader(stages: list[dict], build_part: dict, training: dict, model: str, device: str,
                          recipe: str, out: Path, images: int | None) -> dict:
    if "cache_dir" not in build_part:
        raise RuntimeError("no cache (see the build part's error)")
    reader = CacheReader(build_part["cache_dir"])
    root = Path(reader.manifest["source"]["root"])
    config = resolve(model, stages, build_part["cache_dir"], device, recipe, False, out)
    trained = {s["size"]: s for s in training.get("stages", [])}
    workers, rows = cores(), []
    for stage in stages:
        size = stage["size"]
        paths = [root / p for p in reader.read_meta(size, "train")["paths"]]

        def measure(stage=stage, paths=paths):
            row = time_report_epoch(paths, stage["size"], stage["batch_size"], workers, config,
                                    torch.device(config.device), images)
            cached = trained.get(stage["size"], {}).get("train_pass_s_per_epoch")
            return {**row, "cached_train_pass_s": cached, "cached_steady": trained.get(stage["size"], {}).get("steady"),
                    "ratio": row["s_per_epoch"] / cached if cached else None}

        rows.append(_attempt({"size": size, "batch_size": stage["batch_size"], "train_images": len(paths)},
                             measure, torch.device(config.device)))
    return {"workers": workers, "rows": rows,
            "note": "training passes only (no validation), model eager; ratio = report's s / cached run's s"}


# ---------------------------------------------------------------------- the whole benchmark


def totals(parts: dict, scale: float) -> dict:
    """Measured and projected seconds of the whole run, or None with the parts that are missing."""
    up = 1 / scale
    build_p, train_p, eval_p = (parts.get(k, {}) for k in ("build", "training", "evaluation"))
    missing = [k for k, p in (("build", build_p), ("training", train_p), ("evaluation", eval_p))
               if not p or "error" in p]
    result = {"scale": scale, "per_image_factor": up, "missing": missing}
    for stage in train_p.get("stages", []):
        stage["measured_all_epochs"] = stage["epochs_measured"] == stage["recipe_epochs"] and scale == 1
        stage["projected_s"] = (sum(stage["epoch_wall_s"]) if stage["measured_all_epochs"] else
                                stage["s_per_epoch"] * up * stage["recipe_epochs"] + stage["first_epoch_extra_s"])
    if missing:
        return {**result, "measured_s": None, "projected_s": None}
    measured = build_p["build_s"] + train_p["training_s"] + eval_p["evaluation_s"]
    projected = (build_p["build_s"] * up + sum(s["projected_s"] for s in train_p["stages"])
                 + eval_p["evaluation_s"] * up)
    return {**result, "measured_s": measured, "projected_s": projected, "projected_h": projected / 3600}


def check_arguments(model: str, epochs: int | None, scale: float, recipe: str, report_images: int | None) -> None:
    if model not in MODEL_NAMES:
        raise ValueError(f"--model {model!r} is not a model; choose one of {', '.join(MODEL_NAMES)}")
    if epochs is not None and epochs < 1:
        raise ValueError(f"--epochs must be >= 1 (epochs measured per stage), got {epochs}")
    if not 0 < scale <= 1:
        raise ValueError(f"--scale must be a fraction in (0, 1] of the dataset's images, got {scale}")
    if recipe not in RECIPE_NAMES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPE_NAMES)}, got {recipe!r}")
    if report_images is not None and report_images < 1:
        raise ValueError(f"--report-images must be >= 1, got {report_images}")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {cores()} cores, {torch.get_num_threads()} threads)"


def run(model: str = "resnet18", epochs: int | None = None, device: str = "cpu", quick: bool = False,
        work_dir: Path | None = None, scale: float = 1.0, compile_: bool | None = None, recipe: str = "report",
        report_images: int | None = None, plan: Plan | None = None, progress="off", on_part=None) -> dict:
    """The whole benchmark; `on_part(result)` after each part (the CLI rewrites --json, so a run cut short keeps
    what it measured). `compile_` None: compiled on CUDA only. ValueError for bad arguments, before any work."""
    check_arguments(model, epochs, scale, recipe, report_images)
    if work_dir is not None:
        try:
            Path(work_dir).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"--work-dir {work_dir}: cannot be made ({err.strerror or err}); pass a writable "
                             f"folder") from None
    plan = plan or (QUICK if quick else Plan())
    compile_ = device.startswith("cuda") if compile_ is None else compile_
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    stages = stages_of(model, plan, epochs, compile_)
    result = {"model": model, "recipe": recipe, "device": device, "device_name": device_name(device),
              "torch": torch.__version__, "quick": quick, "scale": scale, "compile": compile_,
              "plan": asdict(plan), "stages": stages, "synthetic": SYNTHETIC, "parts": {}}
    parts = result["parts"]
    bar = progress_bar(progress, 5, "recipe benchmark", "part", log)

    def part(name, fn, *args):
        parts[name] = _stage(fn, *args)
        _free(torch.device(device))  # the next part's loaders and model get the device memory this one held
        bar.update()
        if on_part is not None:
            on_part(result)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recipe-bench-", dir=work_dir) as tmp:
        tmp = Path(tmp)
        part("source", make_source, plan, scale, Path(work_dir) if work_dir else tmp)
        sizes = tuple(sorted({plan.size_of.get(s, s) for s in plan.build_sizes} | {s["size"] for s in stages}))
        part("build", build_cache, parts["source"], sizes, tmp / "cache", progress)
        part("training", train_stages, model, stages, parts["build"], device, recipe, compile_, tmp / "runs",
             progress)
        part("evaluation", evaluate, parts["training"])
        part("report_loader", compare_report_loader, stages, parts["build"], parts["training"], model, device,
             recipe, tmp / "runs", report_images)
    bar.close()
    result["totals"] = totals(parts, scale)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["failed"] = [name for name, p in parts.items() if p["status"] == "failed"]
    result["ok"] = not result["failed"]
    return result


# ---------------------------------------------------------------------- the report


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 600 \
        else f"{seconds:.1f} s"


def _failed(part: dict) -> str | None:
    return f"**failed**: {part['error']}" if "error" in part else None


def report(r: dict) -> str:
    """The figures as text: a markdown table of measured and projected seconds, then the data shares and the
    report's loader; a failed part shows its error in its row."""
    parts, t = r["parts"], r["totals"]
    src, built, train, ev, rep = (parts.get(k, {}) for k in ("source", "build", "training", "evaluation",
                                                              "report_loader"))
    up = "" if r["scale"] == 1 else f", per-image costs x{1 / r['scale']:.4g} (measured at scale {r['scale']:g})"
    lines = [f"recipe benchmark: {r['model']}, {r['recipe']} recipe, on {r['device_name']}"
             f"{', compiled' if r['compile'] else ', eager'}{' (--quick: tiny wiring check)' if r['quick'] else ''}"]
    if "counts" in src:
        c = src["counts"]
        lines.append(f"source: Kaggle layout, {c['training_folds']:,} training-fold images ({c['training_all']:,} all "
                     f": {c['training_hem']:,} hem), {c['prelim']:,} prelim, {c['final']:,} final, {src['image_px']} "
                     f"px; {src['distinct_images']} distinct images, the rest "
                     f"{'hard links' if src['hard_linked'] else 'copies'}: {r['synthetic']}")
    else:
        lines.append(f"source: {_failed(src)}")
    if "splits" in built:
        lines.append("splits built: " + ", ".join(f"{k} {v:,}" for k, v in built["splits"].items()))
    lines += ["", f"| part | measured | projected: the whole recipe{up} |", "|---|---|---|"]
    lines.append(f"| build {'+'.join(map(str, built.get('sizes', [])))} px | " + (
        _failed(built) or f"{_s(built['build_s'])} | {_s(built['build_s'] / r['scale'])}") + " |")
    for i, stage in enumerate(train.get("stages") or r["stages"]):
        name = f"stage {i + 1}: {stage['size']} px x {stage['recipe_epochs']} epochs, batch {stage['batch_size']}"
        if "s_per_epoch" not in stage:
            lines.append(f"| {name} | {_failed(train) or '-'} | - |")
            continue
        compile_ = f", compile {_s(stage['compile_s'])}" if stage["compile_s"] is not None else ""
        first = (f"first {_s(stage['epoch_wall_s'][0])}{compile_}" if stage["steady"]
                 else "the first epoch: warm-up and data load included")
        lines.append(f"| {name} | {stage['epochs_measured']} epoch(s): {_s(stage['s_per_epoch'])}/epoch ({first}) | "
                     f"{'measured' if stage['measured_all_epochs'] else 'projected'}: {_s(stage['projected_s'])} |")
    lines.append("| evaluation (valid, test) | " + (
        _failed(ev) or f"{_s(ev['evaluation_s'])} | {_s(ev['evaluation_s'] / r['scale'])}") + " |")
    total = (f"**{_s(t['measured_s'])}** | **{_s(t['projected_s'])}**" if t["measured_s"] is not None
             else f"missing {', '.join(t['missing'])} | -")
    lines += [f"| total | {total} |", ""]
    for i, stage in enumerate(train.get("stages", [])):
        which = "steady epoch" if stage["steady"] else "its one epoch"
        lines.append(f"stage {i + 1} training pass (metrics.csv, {which}): {_s(stage['train_pass_s_per_epoch'])}, "
                     f"{stage['imgs_per_s']:.0f} img/s, data_wait {stage['data_wait'] * 100:.1f}%, augment_share "
                     f"{stage['augment_share'] * 100:.1f}%")
    if "rows" in rep:
        lines.append(f"report's per-image DataLoader ({rep['workers']} workers), same training pass:")
        for row in rep["rows"]:
            if "error" in row:
                lines.append(f"  {row['size']} px: **failed**: {row['error']}")
                continue
            ratio = (f"{row['ratio']:.1f}x the cached run's {'steady' if row['cached_steady'] else 'first'} pass"
                     if row["ratio"] else "no cached figure to compare")
            lines.append(f"  {row['size']} px: {_s(row['s_per_epoch'])} per pass ({row['imgs_per_s']:.0f} img/s"
                         f"{', projected from ' + str(row['images_timed']) + ' images' if row['projected'] else ''})"
                         f": {ratio}")
    else:
        lines.append(f"report's per-image DataLoader: {_failed(rep)}")
    if r["failed"]:
        lines.append(f"FAILED: {', '.join(r['failed'])}")
    return "\n".join(lines)
