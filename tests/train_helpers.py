"""Torch-side helpers shared by several test modules (kept apart from `tests.helpers`, which imports no torch)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


# Ops that make the host wait for the device, or whose output shape depends on values, or a (checked) inverse.
FORBIDDEN = {"nonzero", "masked_select", "_local_scalar_dense", "item", "unique", "_unique", "_unique2",
             "unique_dim", "unique_consecutive", "is_nonzero", "equal", "inverse", "linalg_inv", "linalg_inv_ex",
             "_linalg_check_errors", "linalg_solve", "linalg_solve_ex", "_assert_async", "nonzero_static"}


class RecordOps(TorchDispatchMode):
    """Every aten op run inside, with the dtypes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.output_dtypes: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops[func.overloadpacket.__name__] += 1
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.output_dtypes.add(t.dtype)
        return out


class CountReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (`.item()`, `float(t)`, `bool(t)`...)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "is_nonzero", "nonzero", "equal"):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def collect(loader) -> tuple[np.ndarray, np.ndarray]:
    """Every batch of one pass of `loader`, as (N, H, W, C) images and labels; checks the batch sizes on the way."""
    xs, ys = zip(*list(loader))
    sizes = [len(y) for y in ys]
    assert all(n == loader.batch_size for n in sizes[:-1]) and 0 < sizes[-1] <= loader.batch_size
    if loader.train:
        assert sizes[-1] == loader.batch_size  # drop_last
    return torch.cat(xs).permute(0, 2, 3, 1).numpy(), torch.cat(ys).numpy()
