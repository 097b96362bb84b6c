"""The one-command GPU check (`python -m train.bench gpu`): what needs CUDA, by default in one run of under 8 minutes.

Parts (`--part NAME ...`; the first five by default, `--part all` for every one):
1. tests: the CUDA tests (`pytest -m gpu`) in a subprocess;
2. augmentation: GpuAugment images/s (torch backend, training mode) at 128 and 224 px, batch 64 and 256, eager and
   compiled, writing float32; and compiled at batch 256 writing bf16, as train.run's AMP step now asks for
   (`Precision.out_dtype`); on a resident uint8 channels_last batch;
3. loader: the cached loader's images/s resident on the device, resident in host memory, and streaming;
4. training: ResNet18/50/152 training steps (AMP, channels_last, 224 px, batch 64) on a resident synthetic batch,
   fed inline (float32 augmentation before each step, as before) and fed ahead (bf16 augmentation one batch ahead
   on a side stream, train.engine.ahead, as train.run does on CUDA), and each feed's data share 1 - fed / resident
   (the loader part's `time_training`, its alternating rounds);
5. demo: a two-stage demo run with --compile in a subprocess, its metrics.csv and summary.json figures, and its
   config.json's augment_ahead;
6. compile-modes: ResNet18/50 training steps at batch 64 and 256, eager against `--compile` and `--compile-mode
   reduce-overhead` (CUDA graphs), built as train.run builds them (the compile_modes part);
7. consistency: train.run with the modern recipe (SGD and AdamW), a 2-fold train.cv, train.evaluate --tta and
   train.predict --tta on the device against the CPU, each within a stated tolerance (the consistency part);
8. kernels: the augmentation's passes over the batch, `python -m train.bench kernels` at 224 px, batch 256, bf16
   out: the eager formulation compiled against the planes formulation and the Triton backend, each one's Inductor
   kernels, intermediate bytes, CUDA kernels per batch (torch.profiler) and ms per image (the kernels part).
The loader and training parts share a benchmark cache, built first (the `cache` stage) when either runs.

Every part, and every row within one, is recorded whether or not the others fail: a failure keeps its error text in
the result and the table, and `ok` is False (the recording is the record part's). `--device cpu --quick` runs the
same wiring at tiny sizes on a CPU; what cannot run there (a device-resident loader, CUDA graphs, the CUDA tests)
records `skipped` with the reason. The markdown tables come from `report` (the gpu_report part).
"""
from __future__ import annotations

import csv
import json
import logging
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.bench_build import bench_source
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.progress import progress_bar
from pipeline.store import CacheReader
from train.augment import GpuAugment
from train.bench.compile_modes import check_compile_modes
from train.bench.consistency import check_consistency
from train.bench import kernels as bench_kernels
from train.bench.gpu_report import report  # noqa: F401  (the CLI prints train.bench.gpu.report(result))
from train.bench.loader import Feed, sync, time_augment, time_cached, time_training
from train.bench.record import ROOT, TAIL_CHARS, attempt as _attempt, free as _free, run_command as _run
from train.bench.record import stage as _stage
from train.data.loader import CacheLoader
from train.engine import run_folder as rf
from train.engine.loop import Precision

log = logging.getLogger(__name__)
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # synthetic input: any normalisation costs the same
# The parts in the order they run; `--part` picks some (DEFAULT_PARTS when none is given, `all` for every one).
PARTS = ("tests", "augmentation", "loader", "training", "demo", "compile-modes", "consistency", "kernels")
DEFAULT_PARTS = ("tests", "augmentation", "loader", "training", "demo")  # one call of under 8 minutes on an H200


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one check; `QUICK` is the CPU wiring check."""
    aug_sizes: tuple[int, ...] = (128, 224)
    aug_batches: tuple[int, ...] = (64, 256)
    aug_calls: int = 40
    aug_warmup_calls: int = 5
    aug_compiled: tuple[bool, ...] = (False, True)
    aug_bf16_batches: tuple[int, ...] = (256,)  # rows writing bf16 (each size), compiled as train.run --compile
    aug_bf16_compiled: tuple[bool, ...] = (True,)
    aug_triton_batches: tuple[int, ...] = (256,)  # the Triton backend (CUDA only), writing bf16, each size
    size: int = 224  # px, for the loader and the training steps
    batch_size: int = 64
    source_images: int = 1024
    loader_images: int = 8192  # per loader measurement, over several epochs
    streaming_budget_bytes: int = 256 * 2**20  # windows of a third of it: several per epoch
    models: tuple[str, ...] = ("resnet18", "resnet50", "resnet152")
    train_steps: int = 30
    train_warmup_steps: int = 10  # cudnn.benchmark tries its kernels in the first steps
    pytest: bool = True
    pytest_timeout_s: int = 180
    demo: bool = True
    demo_sizes: tuple[int, ...] = (64, 96)
    demo_stages: tuple[str, ...] = ("64:2", "96:1")
    demo_batch_size: int = 32
    demo_compile: bool = True
    demo_timeout_s: int = 300
    cm_models: tuple[str, ...] = ("resnet18", "resnet50")  # the compile-modes part
    cm_batches: tuple[int, ...] = (64, 256)
    cm_modes: tuple[str, ...] = ("eager", "default", "reduce-overhead")  # eager, or a --compile-mode
    cm_size: int = 224
    cm_steps: int = 20  # per round
    cm_warmup_steps: int = 5  # untimed: the compile, CUDA graphs' warm-up and capture, cuDNN's search
    cm_rounds: int = 3
    consistency_stage: str = "64:2"  # the consistency part: one stage of the demo cache
    consistency_batch_size: int = 32
    consistency_opts: tuple[str, ...] = ("sgd", "adamw")
    consistency_folds: int = 2
    consistency_timeout_s: int = 300  # per command
    kernels_size: int = 224  # the kernels part
    kernels_batch: int = 256
    kernels_calls: int = 20


QUICK = Plan(aug_sizes=(64,), aug_batches=(8,), aug_calls=2, aug_warmup_calls=1, aug_bf16_batches=(8,),
             aug_triton_batches=(8,), size=64,
             batch_size=8, source_images=256, loader_images=256, streaming_budget_bytes=2**20, models=("resnet18",),
             train_steps=3, train_warmup_steps=2, pytest=False, demo_sizes=(64,), demo_stages=("64:1",),
             demo_batch_size=16, demo_compile=False, demo_timeout_s=120, cm_models=("resnet18",), cm_batches=(4,),
             cm_size=32, cm_steps=2, cm_warmup_steps=1, cm_rounds=2, consistency_stage="64:1",
             consistency_opts=("sgd",), kernels_size=16, kernels_batch=2, kernels_calls=1)


# ---------------------------------------------------------------------- the parts


def check_tests(plan: Plan) -> dict:
    if not plan.pytest:
        return {"skipped": "--quick"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=plan.pytest_timeout_s)
    out = proc.stdout + proc.stderr
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", out)}
    row = {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0),
           "skipped": counts.get("skipped", 0), "errors": counts.get("error", 0) + counts.get("errors", 0),
           "returncode": proc.returncode}
    if proc.returncode != 0:
        row.update(error=f"pytest exited {proc.returncode}", output_tail=out[-TAIL_CHARS:])
    return {"command": " ".join(cmd[1:]), "rows": [row]}


def _augment_rate(plan: Plan, size: int, batch_size: int, compiled: bool, device: torch.device,
                  out_dtype: torch.dtype = torch.float32, backend: str = "torch") -> dict:
    stored = PreprocessConfig().geometry(size).stored_size
    augment = GpuAugment(size, stored, MEAN, STD, backend=backend, out_dtype=out_dtype).to(device).train()
    # (B, 3, S_stored, S_stored) uint8, channels_last as the loader yields it, already on the device
    images = torch.randint(0, 256, (batch_size, 3, stored, stored), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    compile_s = None
    if compiled or backend == "triton":  # Triton: the first call compiles the two kernels
        torch._dynamo.reset()  # a compile of its own for this shape, as one training stage gets
        if compiled:
            augment.compile()
        start = time.perf_counter()
        augment.apply(images, augment.sample(batch_size, generator))
        sync(device)
        compile_s = time.perf_counter() - start
    s_per_call = time_augment(augment, images, plan.aug_calls, plan.aug_warmup_calls, device, generator)
    return {"stored_size": stored, "imgs_per_s": batch_size / s_per_call, "ms_per_batch": s_per_call * 1e3,
            "compile_s": compile_s}


def check_augmentation(plan: Plan, device: torch.device) -> dict:
    cases = [(size, batch_size, compiled, torch.float32) for size in plan.aug_sizes for batch_size in plan.aug_batches
             for compiled in plan.aug_compiled]
    cases += [(size, batch_size, compiled, torch.bfloat16) for size in plan.aug_sizes
              for batch_size in plan.aug_bf16_batches for compiled in plan.aug_bf16_compiled]
    cases = [(*case, "torch") for case in cases]
    # the hand-fused Triton kernels beside the compiled torch backend, same batch, same dtype: what `auto` should pick
    cases += [(size, batch_size, False, torch.bfloat16, "triton") for size in plan.aug_sizes
              for batch_size in plan.aug_triton_batches]
    rows = []
    for size, batch_size, compiled, out_dtype, backend in cases:
        row = {"size": size, "batch_size": batch_size, "compiled": compiled, "backend": backend,
               "out_dtype": str(out_dtype).replace("torch.", "")}
        if backend == "triton" and device.type != "cuda":
            rows.append({**row, "skipped": "the Triton backend runs on CUDA"})
            continue
        rows.append(_attempt(row, lambda: _augment_rate(plan, size, batch_size, compiled, device, out_dtype,
                                                        backend), device))
    return {"backend": "torch, triton", "calls": plan.aug_calls, "rows": rows}


def check_kernels(plan: Plan, device: torch.device) -> dict:
    """The kernels benchmark's result (its rows and the Triton kernels compiled ahead of time), bf16 out as the AMP
    step asks for."""
    result = bench_kernels.run(device=str(device), size=plan.kernels_size, batch_size=plan.kernels_batch,
                               calls=plan.kernels_calls, out_dtype=torch.bfloat16)
    result["rows"] = result["rows"] + [row for row in result["triton_compiled"] if "error" in row]
    return result


def build_cache(plan: Plan, work: Path) -> dict:
    source, origin = bench_source(work / "source", plan.source_images, work / "demo-source")
    report_ = build(PreprocessConfig(split_fractions=(0.98, 0.01, 0.01)),
                    BuildOptions(sizes=(plan.size,), source=source, cache_root=work / "cache", progress=False))
    return {"cache_dir": str(report_.cache_dir), "origin": origin, "images": report_.images}


def _loader_rate(plan: Plan, reader: CacheReader, device: torch.device, kwargs: dict) -> dict:
    loader = CacheLoader(reader, plan.size, "train", plan.batch_size, device=device, train=True, **kwargs)
    asked = kwargs.get("placement")
    if asked is not None and loader.placement != asked:  # a figure under the wrong name would mislead
        raise ValueError(f"asked for placement {asked!r}, the loader chose {loader.placement!r}")
    rate = time_cached(loader, plan.loader_images, device)
    return {"loader": f"{loader.mode}/{loader.placement}", "split_images": loader.n,
            "window_images": loader.window_images if loader.mode == "streaming" else None, "imgs_per_s": rate}


def check_loader(plan: Plan, device: torch.device, reader: CacheReader | None) -> dict:
    if reader is None:
        raise RuntimeError("no benchmark cache (see the cache stage's error)")
    cases = [("resident, device", dict(mode="resident", placement="device")),
             ("resident, host", dict(mode="resident", placement="host")),
             ("streaming", dict(mode="streaming", memory_budget_bytes=plan.streaming_budget_bytes))]
    rows = []
    for name, kwargs in cases:
        row = {"asked": name}
        if kwargs.get("placement") == "device" and device.type != "cuda":
            rows.append({**row, "skipped": f"the device is {device.type}: the data lives in host memory"})
            continue
        rows.append(_attempt(row, lambda: _loader_rate(plan, reader, device, kwargs), device))
    return {"size": plan.size, "batch_size": plan.batch_size, "images": plan.loader_images, "rows": rows}


def check_training(plan: Plan, device: torch.device, reader: CacheReader | None) -> dict:
    if reader is None:
        raise RuntimeError("no benchmark cache (see the cache stage's error)")
    loader = CacheLoader(reader, plan.size, "train", plan.batch_size, device=device, train=True)  # as train.run
    out_dtype = Precision.for_device(device, amp=True).out_dtype  # what the trainer asks the augmentation for
    inline = GpuAugment.from_manifest(reader.manifest, plan.size).to(device).train()
    ahead = GpuAugment.from_manifest(reader.manifest, plan.size, out_dtype=out_dtype).to(device).train()
    compiled = device.type == "cuda"  # the torch backend, compiled as train.run --compile does (the CPU: OpenCV)
    if compiled:
        torch._dynamo.reset()
        inline.compile()
        ahead.compile()
    # `fed`: the augmentation in float32 on the compute stream before each step (train.run before the side stream);
    # `ahead`: in the step's dtype, one batch ahead (on a side stream on CUDA), as train.run now feeds its steps
    feeds = {"fed": Feed(inline, ahead=False), "ahead": Feed(ahead, ahead=True)}
    rows = []
    for name in plan.models:
        rows.append(_attempt({"model": name}, lambda: time_training(
            loader, inline, device, models=(name,), steps=plan.train_steps, warmup_steps=plan.train_warmup_steps,
            feeds=feeds)[name], device))
    return {"size": plan.size, "batch_size": plan.batch_size, "loader": f"{loader.mode}/{loader.placement}",
            "augment_backend": inline.backend_for(device) + (", compiled" if compiled else ""),
            "feeds": {"fed": "inline, float32", "ahead": "one batch ahead" + (
                " on a side stream" if device.type == "cuda" else " (in order: a CPU has no second stream)")
                + f", {str(out_dtype).replace('torch.', '')}"},
            "rows": rows}


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return text


def read_run(run_dir: Path) -> dict:
    """A run folder's per-epoch figures (metrics.csv, `augment_share` when the trainer writes it) and summary."""
    with open(run_dir / "metrics.csv", newline="") as f:
        epochs = [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]
    summary = json.loads((run_dir / "summary.json").read_text())
    keys = ("best_valid_acc", "test_acc", "test_f1_weighted", "epochs", "train_seconds", "seconds_per_epoch")
    return {"rows": epochs, "summary": {k: summary.get(k) for k in keys}}


def check_demo(plan: Plan, device: torch.device, work: Path) -> dict:
    if not plan.demo:
        return {"skipped": "not in this plan"}
    cache, runs = work / "demo-cache", work / "demo-runs"
    build_cmd = [sys.executable, "-m", "pipeline.build", "--demo", "--sizes", *map(str, plan.demo_sizes),
                 "--cache-dir", str(cache), "--no-progress"]
    run_cmd = [sys.executable, "-m", "train.run", "resnet18", "--cache-root", str(cache), "--stages",
               *plan.demo_stages, "--batch-size", str(plan.demo_batch_size), "--device", str(device),
               "--out", str(runs), "--no-progress"] + (["--compile"] if plan.demo_compile else [])
    result = {"command": " ".join(["python"] + run_cmd[1:])}
    procs = {}
    for step, cmd in (("build", build_cmd), ("run", run_cmd)):
        procs[step], wall_s = _run(cmd, plan.demo_timeout_s)
        result[f"{step}_returncode"], result[f"{step}_wall_s"] = procs[step].returncode, wall_s
        if procs[step].returncode != 0:
            return {**result, "error": f"{step} exited {procs[step].returncode}",
                    "output_tail": (procs[step].stdout + procs[step].stderr)[-TAIL_CHARS:]}
    run_dir = Path(procs["run"].stdout.strip().splitlines()[-1])  # train.run prints the run folder last
    # whether the run's batches were augmented one batch ahead (on by default on CUDA), as its config.json says
    saved = rf.read_run_config(run_dir)
    return {**result, "run_dir": str(run_dir), "augment_ahead": saved.augment_ahead,
            "compile_mode": saved.compile_mode if saved.compile else None, **read_run(run_dir)}


# ---------------------------------------------------------------------- the whole check


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    else:
        info.update(device_name=f"CPU ({platform.processor() or platform.machine()}, "
                                f"{torch.get_num_threads()} threads)")
    return info


def parts_asked(names) -> tuple[str, ...]:
    """`--part` values -> the parts to run, in the check's order (DEFAULT_PARTS for none; `all` for every one)."""
    names = list(names or DEFAULT_PARTS)
    unknown = [n for n in names if n not in (*PARTS, "all")]
    if unknown:
        raise ValueError(f"unknown part {', '.join(unknown)}; the parts are {', '.join(PARTS)} (or all)")
    return PARTS if "all" in names else tuple(p for p in PARTS if p in names)


def run(device: str = "cuda", quick: bool = False, work_dir: Path | None = None, plan: Plan | None = None,
        progress="off", on_stage=None, parts=DEFAULT_PARTS) -> dict:
    """The check's `parts` (names of PARTS; the `cache` stage comes with loader or training). `on_stage(result)` is
    called after each part, so a check stopped by a time limit still leaves the parts it finished (the CLI rewrites
    --json and logs one line per part)."""
    device = torch.device(device)
    plan = plan or (QUICK if quick else Plan())
    parts = parts_asked(parts)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as in a training stage
    start = time.perf_counter()
    result = {**device_info(device), "quick": quick, "parts": list(parts), "plan": asdict(plan), "stages": {}}
    stages = result["stages"]
    needs_cache = {"loader", "training"} & set(parts)
    bar = progress_bar(progress, len(parts) + bool(needs_cache), "gpu check", "part", log)

    def staged(name, fn, *args):
        if name not in parts and name != "cache":
            return
        stages[name] = _stage(fn, *args)
        bar.update()
        if on_stage is not None:
            on_stage(result)

    staged("tests", check_tests, plan)  # first, while this process holds no device memory
    staged("augmentation", check_augmentation, plan, device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=work_dir) as tmp:
        work = Path(tmp)
        reader = None
        if needs_cache:
            staged("cache", build_cache, plan, work)
            reader = CacheReader(stages["cache"]["cache_dir"]) if stages["cache"]["status"] == "ok" else None
        staged("loader", check_loader, plan, device, reader)
        staged("training", check_training, plan, device, reader)
        _free(device)  # the demo run is another process on the same device
        staged("demo", check_demo, plan, device, work)
        staged("compile-modes", check_compile_modes, plan, device)
        _free(device)  # as for the demo: the consistency part's commands are other processes
        staged("consistency", check_consistency, plan, device, work)
    staged("kernels", check_kernels, plan, device)
    bar.close()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["failed"] = [name for name, s in stages.items() if s["status"] == "failed"]
    result["ok"] = not result["failed"]
    return result
