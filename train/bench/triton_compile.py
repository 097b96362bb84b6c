"""The Triton backend's two kernels compiled for NVIDIA GPUs on a machine without one (`compile_for`).

Triton compiles ahead of time for a named target (`triton.compile(ASTSource, target=GPUTarget("cuda", 90, 32))`:
its IR, PTX, and the cubin from the ptxas that ships with it), so the kernels' code for an H100/H200 (sm_90) or an
A100 (sm_80) can be built and inspected here: whether it compiles at all (the CPU tests run the kernels under
Triton's interpreter, which accepts code the compiler may not), and the resources that decide how many programs a
multiprocessor runs at once: registers per thread, spilled (local) bytes, shared memory; read from the cubin with
the cuobjdump that ships with Triton. The argument types are those a launch from `triton_backend.apply_packed`
passes: uint8 images, float32 tables, the output in each dtype the trainer asks for.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from train.augment import torch_backend as tb
from train.augment import triton_backend

TARGETS = {"sm_80": 80, "sm_90": 90}  # A100; H100/H200
OUT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_INTS = ("size", "stored", "sb", "sc", "sh", "sw", "ob", "oc", "oh", "ow", "blocks")
_USAGE = re.compile(r"Function (\w+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _signature(kernel, out_type: str) -> tuple[dict, dict]:
    names = kernel.arg_names
    constexprs = {"COLUMNS": tb.FIRST_PASS_COLUMNS, "HUE_COL": tb.HUE_COLUMN, "BLOCK": triton_backend.BLOCK_PIXELS,
                  "FIRST_COL": tb.BEFORE_CONTRAST_COLUMNS.start, "HUE_FIRST_COL": tb.HUE_BEFORE_CONTRAST_COLUMN,
                  "BLEND_COL": tb.BLEND_COLUMNS.start}
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "img_ptr":
            signature[name] = "*u8"
        elif name == "out_ptr":
            signature[name] = f"*{out_type}"
        elif name.endswith("_ptr"):
            signature[name] = "*fp32"
        elif name in _INTS:
            signature[name] = "i32"
        else:  # the grey weights
            signature[name] = "fp32"
    return signature, {k: v for k, v in constexprs.items() if k in names}


def compile_for(target: str = "sm_90", out_dtype: str = "bfloat16") -> list[dict]:
    """Each kernel compiled for `target` (a TARGETS key) writing `out_dtype`: its name and resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton_backend.triton is None:
        raise RuntimeError("the triton package is not installed")
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for kernel in (triton_backend.mean_kernel, triton_backend.chain_kernel):
        signature, constexprs = _signature(kernel, OUT_DTYPES[out_dtype])
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                                  target=GPUTarget("cuda", TARGETS[target], 32))
        with tempfile.TemporaryDirectory() as tmp:
            cubin = Path(tmp) / "kernel.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                                   text=True, check=True).stdout
        match = _USAGE.search(usage)
        if match is None:
            raise RuntimeError(f"cuobjdump printed no resource usage for {kernel.__name__}: {usage[-500:]}")
        rows.append({"kernel": match.group(1), "target": target, "out_dtype": out_dtype,
                     "warps": compiled.metadata.num_warps, "registers": int(match.group(2)),
                     "stack_bytes": int(match.group(3)), "shared_bytes": int(match.group(4)),
                     "local_bytes": int(match.group(5)), "ptx_lines": compiled.asm["ptx"].count("\n")})
    return rows
