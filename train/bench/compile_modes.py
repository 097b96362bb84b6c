"""The GPU check's `compile-modes` part: training steps with the model eager, compiled (`--compile`) and compiled
with CUDA graphs (`--compile --compile-mode reduce-overhead`), on a resident batch.

Why: at batch 64 an eager ResNet step on an H200 is bound by the host's kernel launches (the GPU check's training
part), so the data share depends on how the model runs as much as on the data. The steps are built as train.run
builds them: the trainer's static-shape compile options and `compile_mode_options`, the `Precision` the trainer
makes (with `cuda_graphs` set for the modes with CUDA graphs, so `train_step` marks each step with
`mark_graph_step`), the report recipe's optimizer from `build_optimizer` (fused on CUDA), the input in the step's
dtype as the augmentation writes it. Each (model, batch size) builds its variants from the same initial weights,
times them in alternating rounds (medians, as the training part does), then drops them and Dynamo's caches (the
CUDA graphs' memory pools with them) before the next.

`compile_s` is the time of the untimed first steps: the compile, the CUDA graphs' warm-up and capture, cuDNN's
kernel search (the eager row has only the last, so the difference is what compiling costs once per stage).
`cudagraph_skips` counts the graphs Inductor ran without CUDA graphs in a row with CUDA graphs (it falls back, with a
warning, e.g. on an op it cannot capture): a row with skips measured less than CUDA graphs.
"""
from __future__ import annotations

import itertools
import statistics
import time
from types import SimpleNamespace

import torch

from models import build_model
from train.bench.loader import sync, time_steps
from train.bench.record import attempt, error_of, free
from train.engine.loop import Precision, train_step
from train.engine.optim import build_optimizer
from train.engine.options import RECIPES
from train.engine.config import compile_mode_options, uses_cuda_graphs
from train.engine.graph_skips import cudagraph_skips
from train.engine.trainer import COMPILE_OPTIONS

EAGER = "eager"  # the model not compiled; any other mode is a --compile-mode value


def skip_reason(mode: str, device: torch.device) -> str | None:
    """Why a mode is not measured on `device` (None: it is)."""
    if mode == "reduce-overhead" and device.type != "cuda":
        return "CUDA graphs need a CUDA device (train.run compiles without them on a CPU)"
    return None


def _step(name: str, mode: str, device: torch.device):
    """A training step of `name` as train.run makes it under `--compile-mode mode` (or eager), and its precision."""
    precision = Precision.for_device(device, amp=True)
    precision.cuda_graphs = uses_cuda_graphs(mode, device)  # as the Trainer sets it (the eager row: no graphs)
    torch.manual_seed(0)  # every variant starts from the same weights
    net = build_model(name).to(device, memory_format=torch.channels_last if precision.channels_last
                               else torch.contiguous_format)
    net.train()
    recipe = SimpleNamespace(**RECIPES["report"])  # train.run's default recipe: its optimizer settings
    optimizer = build_optimizer(net, recipe, recipe.lr, fused=device.type == "cuda")
    model = net if mode == EAGER else torch.compile(net, **COMPILE_OPTIONS, **compile_mode_options(mode))

    def step(batch):
        x, y = batch
        train_step(model, x, y, optimizer, precision, device)
        return len(y)
    return step, precision


def _group(plan, device: torch.device, name: str, batch_size: int) -> list[dict]:
    """The rows of one model at one batch size: each mode's warm-up, then `plan.cm_rounds` alternating rounds."""
    size = plan.cm_size
    out_dtype = Precision.for_device(device, amp=True).out_dtype
    # (B, 3, S, S) in the step's dtype, channels_last, as the augmentation hands it to the model; two classes
    batch = (torch.randn(batch_size, 3, size, size, device=device, dtype=out_dtype)
             .contiguous(memory_format=torch.channels_last), torch.randint(0, 2, (batch_size,), device=device))
    rows, steps = {}, {}
    for mode in plan.cm_modes:
        row = rows[mode] = {"model": name, "batch_size": batch_size, "mode": mode, "size": size}
        reason = skip_reason(mode, device)
        if reason:
            row["skipped"] = reason
            continue

        def warm_up(mode=mode):
            step, precision = _step(name, mode, device)
            skips = cudagraph_skips()
            sync(device)
            start = time.perf_counter()
            for _ in range(plan.cm_warmup_steps):
                step(batch)
            sync(device)
            steps[mode] = step
            return {"compile_s": time.perf_counter() - start, "cuda_graphs": precision.cuda_graphs,
                    # graphs Inductor ran without CUDA graphs (it says why in a warning): 0 when they all replay
                    "cudagraph_skips": cudagraph_skips() - skips if precision.cuda_graphs else None,
                    "amp_dtype": str(precision.amp_dtype).replace("torch.", "") if precision.amp_dtype else None}
        attempt(row, warm_up, device)
    rates = {mode: [] for mode in steps}
    for _ in range(plan.cm_rounds):
        for mode in list(steps):
            try:
                count, seconds = time_steps(steps[mode], itertools.repeat(batch), plan.cm_steps, 0, device)
                rates[mode].append(count / seconds)
            except Exception as err:  # recorded in its row; the other modes go on
                rows[mode].update(error_of(err))
                del steps[mode]
    eager = statistics.median(rates[EAGER]) if rates.get(EAGER) and EAGER in steps else None
    for mode in steps:
        rate = statistics.median(rates[mode])
        rows[mode].update(imgs_per_s=rate, rounds=rates[mode], spread=(max(rates[mode]) - min(rates[mode])) / rate,
                          ratio_to_eager=rate / eager if eager else None)
    return list(rows.values())


def check_compile_modes(plan, device: torch.device) -> dict:
    rows = []
    for name in plan.cm_models:
        for batch_size in plan.cm_batches:
            try:
                rows += _group(plan, device, name, batch_size)
            except Exception as err:  # e.g. the batch itself does not fit: every mode of the group says so
                rows += [{"model": name, "batch_size": batch_size, "mode": mode, **error_of(err)}
                         for mode in plan.cm_modes]
            finally:
                torch._dynamo.reset()  # its compiled graphs and CUDA graph pools go before the next group's
                free(device)
    return {"size": plan.cm_size, "steps": plan.cm_steps, "rounds": plan.cm_rounds, "rows": rows}
