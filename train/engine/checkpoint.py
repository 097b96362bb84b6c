"""Checkpoints: written atomically (optionally in a background thread), read with weights_only=True."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

# The checkpoint format, saved as `version` and read back by `load`, which refuses a version it does not know.
# 1: best.pt alone holds the stage's best weights. 2: last.pt carries them too (`best_model`, None when they are the
# epoch's own), so resume needs last.pt only. A checkpoint without `version` is read as version 1.
CHECKPOINT_VERSION = 2
KNOWN_VERSIONS = (1, 2)
# Fault injection for the kill tests only: "<name>@<epoch>" (e.g. "best.pt@3") makes the process SIGKILL itself right
# after writing that file for that (1-based) epoch; "<name>.tmp@<epoch>" right before renaming it into place.
KILL_AT_ENV = "CNMC_TEST_KILL_AT"


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
    _maybe_killed(tmp.name, state)
    os.replace(tmp, path)
    _maybe_killed(path.name, state)


def _maybe_killed(name: str, state: dict) -> None:
    point = os.environ.get(KILL_AT_ENV)
    if point and point == f"{name}@{state.get('epoch', -2) + 1}":
        os.kill(os.getpid(), signal.SIGKILL)


def remove_leftovers(run_dir: Path) -> list[Path]:
    """Delete `*.pt.tmp` files of a write that was interrupted (they never replace a finished checkpoint)."""
    leftovers = sorted(Path(run_dir).glob("*.pt.tmp"))
    for path in leftovers:
        path.unlink()
    return leftovers


def load(path: Path) -> dict:
    """A checkpoint, loaded weights_only; refused (CheckpointError naming the file) when missing, unsafe, damaged, or
    of a format version this code does not know."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # several exception types for unsafe or damaged files
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(err).__name__}: {err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint of python -m train.run (it holds a {type(state).__name__})")
    check_version(state, path)
    return state


def version_of(state: dict) -> int:
    """The format version of a loaded checkpoint (1 when it has none)."""
    return state.get("version", 1)


def check_version(state: dict, path: Path) -> None:
    version = version_of(state)
    if type(version) is not int or version not in KNOWN_VERSIONS:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r}, which this code does not know (it reads versions "
            f"{', '.join(map(str, KNOWN_VERSIONS))}); it was written by another version of cnmc-pipeline: use that "
            f"version to evaluate or resume it, or start a new run")


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
