"""Where a run computes: the --device flag resolved, DistributedDataParallel set-up from torchrun's environment, and the
few collectives the loop needs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


def resolve_device(name: str | None) -> str:
    """`--device` as given (auto, cpu, cuda, cuda:N; None means auto) -> the device to use. ValueError naming the flag
    when CUDA is asked for but absent, or the name is no device; every command resolves its flag here."""
    name = "auto" if name is None else name
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return name


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str) -> Dist:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], d: Dist, device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (float64, so counts stay exact)."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def gather_rows(array: torch.Tensor, d: Dist) -> torch.Tensor:
    """Concatenate each rank's rows in rank order (ranks may hold different counts)."""
    if not d.enabled:
        return array
    parts = [None] * d.world_size
    dist.all_gather_object(parts, array.cpu())
    return torch.cat(parts)


def broadcast_object(obj, d: Dist):
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
