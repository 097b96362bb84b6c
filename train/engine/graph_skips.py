"""Compiled graphs Inductor ran without CUDA graphs (`cudagraph_skips`), and what a DDP run is told about them.

With a compile mode that captures CUDA graphs, Inductor falls back to plain compiled kernels for a graph it cannot
capture (it says why in a warning of its own) and counts it. Under DDP every ResNet here hits a known upstream case,
open when last checked (pytorch/pytorch#139207): BatchNorm's running statistics are inputs the graph mutates, so the
graphs are skipped and each step keeps its launch overhead. The run is still right, only slower than the mode
promises, so the trainer says so once, after the first epoch (`warn_cuda_graph_skips`).
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def cudagraph_skips() -> int:
    """How many compiled graphs Inductor has run without CUDA graphs in this process (0 before any)."""
    from torch._dynamo.utils import counters  # Inductor's own counters; imported only where graphs are in use
    return int(counters["inductor"].get("cudagraph_skips", 0))


def cuda_graph_skips_warning(mode: str, ddp: bool, skips: int) -> str | None:
    """The warning for a run under `--compile-mode mode` whose first epoch skipped `skips` graphs (None: none)."""
    if not ddp or skips == 0:
        return None
    return (f"--compile-mode {mode} under DDP: Inductor ran {skips} compiled graph(s) without CUDA graphs in the "
            f"first epoch (BatchNorm under DDP, pytorch/pytorch#139207), so the steps keep their launch overhead; "
            f"training is unaffected; compare its speed with --compile-mode default")


def warn_cuda_graph_skips(mode: str, dist, skips: int) -> None:
    """Log `cuda_graph_skips_warning` once, on the main rank of a DDP run (`dist`, a distributed.Dist)."""
    message = cuda_graph_skips_warning(mode, dist.enabled, skips)
    if message and dist.is_main:
        log.warning(message)
