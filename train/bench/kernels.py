"""Passes over the batch of each form of the augmentation (`python -m train.bench kernels`).

For each form of GpuAugment's training transform on the same uint8 batch, in one run:
- the torch backend's eager formulation compiled as it is (what `--compile` compiled before the planes form),
- the planes formulation compiled (what `GpuAugment.compile` compiles now),
- the Triton backend's two hand-written kernels (CUDA only),
it reports what decides the speed on a GPU, read from the code itself rather than timed:
- `inductor_kernels`: the kernels Inductor generated for the graph (its own counter,
  `torch._inductor.metrics.generated_kernel_count`: Triton kernels on CUDA, C++ loop kernels on the CPU);
- `intermediate_mb_per_image`: the buffers the generated code allocates besides its output (each one written and
  read back at least once), per image; with the uint8 input and the output, `moved_mb_per_image` is the least the
  batch costs in memory traffic (each intermediate counted written once and read once);
- on CUDA, `cuda_kernels_per_batch`: what one call runs on the device (kernels, and the parameter table's copy),
  counted by torch.profiler;
- `ms_per_image`: one figure timed here (synchronised before and after the calls, never per call), for the ratio in
  the same run on the same machine;
each of `GpuAugment.apply`, the call train.run makes (host packing included), compiled by `GpuAugment.compile`.
and, on any machine, the Triton kernels compiled ahead of time for an A100 (sm_80) and an H100/H200 (sm_90) in the
dtype asked (the triton_compile part): registers per thread, spilled bytes, shared memory.
"""
from __future__ import annotations

import math
import re
import time

import torch

from train.augment import GpuAugment
from train.bench.loader import sync
from train.bench.record import attempt, error_of

FORMS = {
    "stacked": "torch backend, eager formulation compiled (one (B, 3, H, W) tensor, a mean per slot)",
    "planes": "torch backend, planes formulation compiled (GpuAugment.compile)",
    "triton": "Triton backend, two hand-written kernels (CUDA)",
}
_ALLOC = re.compile(r"^\s*(buf\d+) = empty_strided_\w+\(\(([\d, ]*)\), \([\d, ]*\), torch\.(\w+)\)", re.M)
_RETURN = re.compile(r"^\s*return \((.*)\)\s*$", re.M)


def allocations(code: str) -> tuple[int, int]:
    """(bytes of the intermediate buffers, bytes of the returned ones) that Inductor's generated `code` allocates."""
    returned = set()
    for line in _RETURN.findall(code):
        returned.update(re.findall(r"buf\d+", line))
    inner = outer = 0
    for name, shape, dtype in _ALLOC.findall(code):
        numel = math.prod(int(d) for d in shape.replace(" ", "").split(",") if d)
        size = numel * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        if name in returned:
            outer += size
        else:
            inner += size
    return inner, outer


def _cuda_kernels(fn, device: torch.device) -> int:
    from torch.profiler import ProfilerActivity, profile
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def measure(form: str, images: torch.Tensor, size: int, out_dtype: torch.dtype, calls: int) -> dict:
    """One form's row: kernels, bytes per image and ms per image of `GpuAugment.apply` on `images` (uint8, on their
    device), the call train.run makes: host packing and the table's copy included, as for every form."""
    from torch._inductor import metrics
    from torch._inductor.utils import run_and_get_code

    device, n, stored = images.device, images.shape[0], images.shape[-1]
    augment = GpuAugment(size, stored, [0.5] * 3, [0.25] * 3, backend="triton" if form == "triton" else "torch",
                         out_dtype=out_dtype).to(device).train()
    params = augment.sample(n, torch.Generator().manual_seed(0))

    def call():
        return augment.apply(images, params)

    row = {}
    if form != "triton":
        torch._dynamo.reset()
        metrics.reset()
        augment.compile(planes=form == "planes")
        _, codes = run_and_get_code(call)  # the first call compiles: Inductor's code for this form
        inner, outer = allocations("\n".join(codes))
        row.update(inductor_kernels=metrics.generated_kernel_count,
                   intermediate_mb_per_image=inner / n / 1e6,
                   moved_mb_per_image=(2 * inner + outer + images[0].numel()) / n / 1e6)
    call()  # warm-up (Triton: the kernels' compile)
    if device.type == "cuda":
        row["cuda_kernels_per_batch"] = _cuda_kernels(call, device)
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    sync(device)
    row["ms_per_image"] = (time.perf_counter() - start) / calls / n * 1e3
    return row


def run(device: str = "cpu", size: int = 224, batch_size: int = 16, calls: int = 3,
        out_dtype: torch.dtype = torch.float32) -> dict:
    device_ = torch.device(device)
    stored = size + 2 * round(0.1 * size)  # a margin as the cache's (the exact one changes nothing here)
    images = torch.randint(0, 256, (batch_size, 3, stored, stored), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    images = images.contiguous(memory_format=torch.channels_last).to(device_)  # as the loader yields it
    rows = []
    for form, label in FORMS.items():
        row = {"form": form, "label": label}
        if form == "triton" and device_.type != "cuda":
            rows.append({**row, "skipped": "the Triton backend runs on CUDA"})
            continue
        rows.append(attempt(row, lambda: measure(form, images, size, out_dtype, calls), device_))
    dtype_name = str(out_dtype).replace("torch.", "")
    try:
        from train.bench import triton_compile
        compiled = [row for target in triton_compile.TARGETS for row in triton_compile.compile_for(target, dtype_name)]
    except Exception as err:  # recorded, as a failed row is
        compiled = [{"kernel": "both", **error_of(err)}]
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), "size": size,
            "stored_size": stored, "batch_size": batch_size, "out_dtype": dtype_name, "calls": calls, "rows": rows,
            "triton_compiled": compiled}


def report(result: dict) -> str:
    lines = [f"augmentation passes, {result['size']} px (stored {result['stored_size']}), batch "
             f"{result['batch_size']}, {result['out_dtype']} out, {result['device']}, torch {result['torch']}, "
             f"{result['threads']} threads",
             "",
             "| form | Inductor kernels | intermediate MB/img | moved MB/img (at least) | CUDA kernels/batch | "
             "ms/img |",
             "|---|---|---|---|---|---|"]

    def cell(row, key, fmt):
        return fmt.format(row[key]) if row.get(key) is not None else "-"

    for row in result["rows"]:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['label']} | {row.get('skipped') or row['error']} | | | | |")
            continue
        lines.append(f"| {row['label']} | {cell(row, 'inductor_kernels', '{}')} | "
                     f"{cell(row, 'intermediate_mb_per_image', '{:.2f}')} | "
                     f"{cell(row, 'moved_mb_per_image', '{:.2f}')} | {cell(row, 'cuda_kernels_per_batch', '{}')} | "
                     f"{cell(row, 'ms_per_image', '{:.3f}')} |")
    lines += ["", f"Triton backend compiled ahead of time ({result['out_dtype']} out; no GPU needed):", "",
              "| kernel | target | warps | registers/thread | spilled (local) bytes | shared bytes |",
              "|---|---|---|---|---|---|"]
    for row in result["triton_compiled"]:
        if "error" in row:
            lines.append(f"| {row['kernel']} | {row['error']} | | | | |")
            continue
        lines.append(f"| {row['kernel']} | {row['target']} | {row['warps']} | {row['registers']} | "
                     f"{row['local_bytes']} | {row['shared_bytes']} |")
    return "\n".join(lines)
