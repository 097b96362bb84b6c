"""Checkpoints: written atomically (optionally in a background thread), read with weights_only=True."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unsafe, or belongs to another model or cache."""


def cpu_copy(obj):
    """Detach every tensor of a nested state to the CPU, so a background write sees a frozen copy."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def save(state: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # several exception types for unsafe or damaged files
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(err).__name__}: {err})") from err


def check_compatible(state: dict, model: str, cache_key: str, path: Path) -> None:
    config = state.get("config", {})
    if config.get("model") != model:
        raise CheckpointError(f"{path} holds a {config.get('model')!r} model, not {model!r}")
    if config.get("cache_key") != cache_key:
        raise CheckpointError(f"{path} was trained on cache {config.get('cache_key')!r}, not {cache_key!r}; "
                              f"pass the run's own cache (--cache) or start a new run")


class AsyncWriter:
    """One write in flight at a time: the training loop copies state to the CPU and goes on while it is saved.

    On a GPU an epoch of C-NMC lasts seconds; a synchronous ResNet152 checkpoint (~470 MB with momentum) would
    be a large share of it."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, items: list[tuple[dict, Path]]) -> None:
        self.wait()
        frozen = [(cpu_copy(state), path) for state, path in items]

        def work():
            try:
                for state, path in frozen:
                    save(state, path)
            except BaseException as err:  # re-raised in the training thread by wait()
                self._error = err

        self._thread = threading.Thread(target=work, name="checkpoint-writer", daemon=False)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
