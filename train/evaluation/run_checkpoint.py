"""The checkpoint `train.evaluate` and `train.predict` use, found and loaded with an answer for each way it can be
wrong.

A run is evaluated with its own checkpoints only: a file outside the run folder is refused, so that no run's reports
hold another model's figures. A missing checkpoint lists the ones the folder has; a damaged or foreign one (another
model, cache, stage size or architecture) is named, and when another checkpoint of the run loads, the message says
to pass it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from models import build_model
from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.engine.config import TrainConfig


def checkpoint_name(run_dir: Path, given: str | os.PathLike) -> str:
    """The file name in the run folder that `--checkpoint` names: a plain name (best.pt), or a path whose folder is
    the run folder (relative to the current folder, or to the run folder as a plain name would be). Refused
    (CheckpointError, before anything is read or written) for a file in any other folder."""
    run_dir, given = Path(run_dir), os.fspath(given)
    path = Path(given)
    if path.name == given:
        return given
    for candidate in (path, run_dir / path):
        if candidate.parent.resolve() == run_dir.resolve():
            return candidate.name
    owner = path.parent
    belongs = f"; it belongs to the run folder {owner}: pass that folder" if (owner / rf.CONFIG).is_file() else ""
    raise ckpt.CheckpointError(f"--checkpoint {given} is not in the run folder {run_dir}: a run is evaluated and "
                               f"predicted with its own checkpoints only (best.pt, last.pt), so that its reports are "
                               f"its own{belongs}; nothing was evaluated or changed")


def _load(path: Path, config: TrainConfig) -> dict:
    state = ckpt.load(path)  # CheckpointError when damaged, unsafe, or of an unknown format version
    ckpt.check_run_state(state, path)
    ckpt.check_compatible(state, config.model, config.cache_key, path)
    ckpt.check_stage(state, config.stages, path)
    return state


def _usable_other(run_dir: Path, name: str, config: TrainConfig, model: torch.nn.Module) -> str | None:
    """Another checkpoint of the run that loads and fits (last.pt before best.pt), as a hint; None when none does."""
    others = sorted((p for p in Path(run_dir).glob("*.pt") if p.name != name and p.is_file()),
                    key=lambda p: (p.name != rf.LAST, p.name != rf.BEST, p.name))
    for path in others:
        try:
            state = _load(path, config)
            ckpt.load_weights(model, state["model"], path, config.model)
        except ckpt.CheckpointError:
            continue
        return f"{path.name} loads: pass --checkpoint {path.name} (its weights are of epoch {state['epoch'] + 1})"
    return None


def load_run_checkpoint(run_dir: Path, given: str | os.PathLike,
                        config: TrainConfig) -> tuple[str, dict, torch.nn.Module]:
    """(the checkpoint's file name in the run folder, its state loaded weights_only, the run's model built with its
    weights, on the CPU). CheckpointError naming the file and what to do when any of it is wrong."""
    run_dir = Path(run_dir)
    name = checkpoint_name(run_dir, given)
    path = rf.RunFolder(run_dir).checkpoint(name)
    if not path.is_file():
        have = sorted(p.name for p in run_dir.glob("*.pt") if p.is_file())
        what = (f"pass --checkpoint {' or '.join(have)}" if have else
                "the run is still in its first epoch, stopped before it ended, or its checkpoints were removed")
        raise ckpt.CheckpointError(f"{path}: no such checkpoint (the run folder has: {', '.join(have) or 'none'}); "
                                   f"{what}")
    model = build_model(config.model, stem=config.stem)  # no pretrained weights: the checkpoint replaces them all
    try:
        state = _load(path, config)
        ckpt.load_weights(model, state["model"], path, config.model)
    except ckpt.CheckpointError as err:
        other = _usable_other(run_dir, name, config, build_model(config.model, stem=config.stem))
        if other is None:
            raise
        raise ckpt.CheckpointError(f"{err}; {other}") from None
    return name, state, model
