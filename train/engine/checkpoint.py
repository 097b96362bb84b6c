"""Checkpoints: written atomically (optionally in a background thread), read with weights_only=True."""
from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import torch

from models import load_error_reason

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
        raise CheckpointError(f"{path}: cannot be loaded safely ({load_error_reason(err)})") from err
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


def check_run_state(state: dict, path: Path) -> None:
    """CheckpointError unless `state` has what every checkpoint of train.run has: `model` weights, the `config` it
    was trained with, its `epoch` and `stage` (a bare state_dict, e.g. torchvision's weights, has none of them)."""
    missing = [k for k in ("model", "config", "epoch", "stage") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint of python -m train.run (no {', '.join(map(repr, missing))} "
                              f"in it); pass a run's best.pt or last.pt")
    if not isinstance(state["config"], dict) or type(state["epoch"]) is not int or type(state["stage"]) is not int:
        raise CheckpointError(f"{path}: not a checkpoint of python -m train.run (its `config`, `epoch` or `stage` is "
                              f"of the wrong type); the file was edited or damaged")


def check_stage(state: dict, stages, path: Path) -> int:
    """The checkpoint's stage index, refused (CheckpointError) when it is not one of the run's `stages`
    (TrainConfig.stages) or was trained at another size there: the checkpoint then belongs to another run."""
    index = state["stage"]
    if not 0 <= index < len(stages):
        raise CheckpointError(f"{path}: stage {index!r} is not one of the run's {len(stages)} stages; the checkpoint "
                              f"does not belong to this run")
    own = state["config"].get("stages")  # the stages the checkpoint was trained with
    own_size = own[index].get("size") if isinstance(own, list) and index < len(own) and isinstance(
        own[index], dict) else None
    if own_size is not None and own_size != stages[index].size:
        raise CheckpointError(f"{path}: trained at {own_size} px in stage {index + 1}, but the run's stage {index + 1} "
                              f"is {stages[index].size} px; the checkpoint belongs to another run")
    return index


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def load_weights(model: torch.nn.Module, weights, path: Path, model_name: str) -> None:
    """A checkpoint's `model` weights into `model` (the run's `model_name`), refused (CheckpointError naming the
    file and the first difference) when they are of another architecture, rather than load_state_dict's traceback
    listing every mismatch."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: its `model` entry is not a model's weights (a {type(weights).__name__}); "
                              f"the file was edited or damaged")
    expected = model.state_dict()
    difference = None
    for key, tensor in expected.items():
        if key not in weights:
            difference = f"no {key} in the file"
        elif weights[key].shape != tensor.shape:
            difference = f"{key} {_shape(weights[key])} vs {_shape(tensor)}"
        if difference:
            break
    else:
        extra = [k for k in weights if k not in expected]
        difference = f"{extra[0]} in the file is not in {model_name}" if extra else None
    if difference:
        raise CheckpointError(f"{path} holds weights of another architecture than the run's {model_name} (first "
                              f"mismatch: {difference}); it does not belong to this run: use the run folder it "
                              f"came from, or another checkpoint of this run")
    model.load_state_dict(weights)


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
