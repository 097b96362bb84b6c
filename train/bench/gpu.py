"""The one-command GPU check (`python -m train.bench gpu`): what needs CUDA, in one run of under 8 minutes.

1. the CUDA tests (`pytest -m gpu`) in a subprocess;
2. augmentation images/s (GpuAugment, torch backend, training mode) at 128 and 224 px, batch 64 and 256, eager and
   compiled, on a resident uint8 channels_last batch;
3. the cached loader's images/s resident on the device, resident in host memory, and streaming;
4. ResNet18/50/152 training steps (AMP, channels_last, 224 px, batch 64) on a resident synthetic batch and fed by the
   loader + augmentation, and the data share 1 - fed / resident (the loader part's `time_training`);
5. a two-stage demo run with --compile in a subprocess, and its metrics.csv and summary.json figures.

Every part, and every row within one, is recorded whether or not the others fail: a failure keeps its error text in
the result and the table, and `ok` is False. `--device cpu --quick` runs the same wiring at tiny sizes on a CPU.
The markdown tables come from `report` (the gpu_report part).
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
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline.bench_build import bench_source
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.progress import progress_bar
from pipeline.store import CacheReader
from train.augment import GpuAugment
from train.bench.gpu_report import report  # noqa: F401  (the CLI prints train.bench.gpu.report(result))
from train.bench.loader import sync, time_augment, time_cached, time_training
from train.data.loader import CacheLoader

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)  # synthetic input: any normalisation costs the same
TAIL_CHARS = 3000  # of a subprocess's output, kept in the result when it fails


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one check; `QUICK` is the CPU wiring check."""
    aug_sizes: tuple[int, ...] = (128, 224)
    aug_batches: tuple[int, ...] = (64, 256)
    aug_calls: int = 40
    aug_warmup_calls: int = 5
    aug_compiled: tuple[bool, ...] = (False, True)
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


QUICK = Plan(aug_sizes=(64,), aug_batches=(8,), aug_calls=2, aug_warmup_calls=1, size=64, batch_size=8,
             source_images=256, loader_images=256, streaming_budget_bytes=2**20, models=("resnet18",), train_steps=3,
             train_warmup_steps=2, pytest=False, demo_sizes=(64,), demo_stages=("64:1",), demo_batch_size=16,
             demo_compile=False, demo_timeout_s=120)


# ---------------------------------------------------------------------- recording failures


def _error(err: BaseException) -> dict:
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    return {"error": f"{type(err).__name__}: {err}"[:600] + where,
            "traceback": "".join(traceback.format_exception(err))[-TAIL_CHARS:]}


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _attempt(row: dict, fn, device: torch.device) -> dict:
    """`row` updated with fn()'s figures, or with the error that stopped it (the next row still runs)."""
    try:
        row.update(fn())
    except Exception as err:  # one failing measurement must not stop the check; its text is the record
        log.warning("%s failed: %s", row, err)
        row.update(_error(err))
    finally:
        _free(device)
    return row


def _stage(fn, *args) -> dict:
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as err:  # as in _attempt: recorded, and the next stage runs
        result = _error(err)
    failed = "error" in result or any("error" in row for row in result.get("rows", []))
    result["status"] = "skipped" if "skipped" in result else "failed" if failed else "ok"
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


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


def _augment_rate(plan: Plan, size: int, batch_size: int, compiled: bool, device: torch.device) -> dict:
    stored = PreprocessConfig().geometry(size).stored_size
    augment = GpuAugment(size, stored, MEAN, STD, backend="torch").to(device).train()
    # (B, 3, S_stored, S_stored) uint8, channels_last as the loader yields it, already on the device
    images = torch.randint(0, 256, (batch_size, 3, stored, stored), dtype=torch.uint8, device=device)
    images = images.contiguous(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(0)
    compile_s = None
    if compiled:
        torch._dynamo.reset()  # a compile of its own for this shape, as one training stage gets
        augment.compile()
        start = time.perf_counter()
        augment.apply(images, augment.sample(batch_size, generator))
        sync(device)
        compile_s = time.perf_counter() - start
    s_per_call = time_augment(augment, images, plan.aug_calls, plan.aug_warmup_calls, device, generator)
    return {"stored_size": stored, "imgs_per_s": batch_size / s_per_call, "ms_per_batch": s_per_call * 1e3,
            "compile_s": compile_s}


def check_augmentation(plan: Plan, device: torch.device) -> dict:
    rows = []
    for size in plan.aug_sizes:
        for batch_size in plan.aug_batches:
            for compiled in plan.aug_compiled:
                row = {"size": size, "batch_size": batch_size, "compiled": compiled}
                rows.append(_attempt(row, lambda: _augment_rate(plan, size, batch_size, compiled, device), device))
    return {"backend": "torch", "calls": plan.aug_calls, "rows": rows}


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
    augment = GpuAugment.from_manifest(reader.manifest, plan.size).to(device).train()
    compiled = device.type == "cuda"  # the torch backend, compiled as train.run --compile does (the CPU: OpenCV)
    if compiled:
        torch._dynamo.reset()
        augment.compile()
    rows = []
    for name in plan.models:
        rows.append(_attempt({"model": name}, lambda: time_training(
            loader, augment, device, models=(name,), steps=plan.train_steps,
            warmup_steps=plan.train_warmup_steps)[name], device))
    return {"size": plan.size, "batch_size": plan.batch_size, "loader": f"{loader.mode}/{loader.placement}",
            "augment_backend": augment.backend_for(device) + (", compiled" if compiled else ""), "rows": rows}


def _run(cmd: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    return proc, time.perf_counter() - start


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
    return {**result, "run_dir": str(run_dir), **read_run(run_dir)}


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


def run(device: str = "cuda", quick: bool = False, work_dir: Path | None = None, plan: Plan | None = None,
        progress="off", on_stage=None) -> dict:
    """The whole check. `on_stage(result)` is called after each part, so a check stopped by a time limit still
    leaves the parts it finished (the CLI rewrites --json and logs one line per part)."""
    device = torch.device(device)
    plan = plan or (QUICK if quick else Plan())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes, as in a training stage
    start = time.perf_counter()
    result = {**device_info(device), "quick": quick, "plan": asdict(plan), "stages": {}}
    stages = result["stages"]
    bar = progress_bar(progress, 6, "gpu check", "part", log)

    def staged(name, fn, *args):
        stages[name] = _stage(fn, *args)
        bar.update()
        if on_stage is not None:
            on_stage(result)

    staged("tests", check_tests, plan)  # first, while this process holds no device memory
    staged("augmentation", check_augmentation, plan, device)
    with tempfile.TemporaryDirectory(prefix="gpu-check-", dir=work_dir) as tmp:
        work = Path(tmp)
        staged("cache", build_cache, plan, work)
        reader = CacheReader(stages["cache"]["cache_dir"]) if stages["cache"]["status"] == "ok" else None
        staged("loader", check_loader, plan, device, reader)
        staged("training", check_training, plan, device, reader)
        _free(device)  # the demo run is another process on the same device
        staged("demo", check_demo, plan, device, work)
    bar.close()
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["failed"] = [name for name, s in stages.items() if s["status"] == "failed"]
    result["ok"] = not result["failed"]
    return result

