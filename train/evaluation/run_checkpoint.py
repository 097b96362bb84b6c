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


def _refuse_outside(what: str, where: Path) -> None:
    """CheckpointError for a checkpoint file `where` outside the run folder (`what` says so), naming the run folder
    it belongs to when its folder is one."""
    owner = Path(os.path.abspath(where.parent))
    belongs = f"; it belongs to the run folder {owner}: pass that folder" if (owner / rf.CONFIG).is_file() else ""
    raise ckpt.CheckpointError(f"{what}: a run is evaluated and predicted with its own checkpoints only (best.pt, "
                               f"last.pt), so that its reports are its own{belongs}; nothing was evaluated or changed")


def _own(run_dir: Path, path: Path) -> bool:
    """`path` is a checkpoint file of the run folder: not a link to a file elsewhere."""
    return path.is_file() and path.resolve().parent == Path(run_dir).resolve()


def checkpoint_name(run_dir: Path, given: str | os.PathLike) -> str:
    """The file name in the run folder that `--checkpoint` names: a plain name (best.pt), or a path whose folder is
    the run folder (relative to the current folder, or - when it names nothing from the current folder - to the run
    folder, as a plain name is). Refused (CheckpointError, before anything is read or written) for a file in any other
    folder, and for a link in the run folder to a file outside it (best.pt linked to another run's best.pt would
    otherwise give the run that run's figures)."""
    run_dir, given = Path(run_dir), os.fspath(given)
    if not given.strip():
        raise ckpt.CheckpointError("--checkpoint is empty; pass best.pt or last.pt (a checkpoint in the run folder)")
    path = Path(given)
    if path.name == given:
        name = given
    else:
        # `./best.pt` typed in another run's folder names that run's file: never swap in this run's file of that name
        candidates = (path,) if os.path.lexists(path) else (path, run_dir / path)
        inside = [c for c in candidates if c.parent.resolve() == run_dir.resolve()]
        if not inside:
            _refuse_outside(f"--checkpoint {given} is not in the run folder {run_dir}", path)
        name = inside[0].name
    target = (run_dir / name).resolve()
    if (run_dir / name).is_symlink() and target.parent != run_dir.resolve():
        _refuse_outside(f"{run_dir / name} is a link to {target}, outside the run folder", target)
    return name


def _load(path: Path, config: TrainConfig) -> dict:
    state = ckpt.load(path)  # CheckpointError when damaged, unsafe, or of an unknown format version
    ckpt.check_run_state(state, path)
    ckpt.check_compatible(state, config.model, config.cache_key, path)
    ckpt.check_stage(state, config.stages, path)
    return state


def _usable_other(run_dir: Path, name: str, config: TrainConfig, model: torch.nn.Module) -> str | None:
    """Another checkpoint of the run that loads and fits (last.pt before best.pt), as a hint; None when none does."""
    others = sorted((p for p in Path(run_dir).glob("*.pt") if p.name != name and _own(run_dir, p)),
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
        have = sorted(p.name for p in run_dir.glob("*.pt") if _own(run_dir, p))
        what = (f"pass --checkpoint {' or '.join(have)}" if have else
                "the run is still in its first epoch, stopped before it ended, or its checkpoints were removed")
        missing = "a folder, not a checkpoint file" if path.is_dir() else "no such checkpoint"
        raise ckpt.CheckpointError(f"{path}: {missing} (the run folder has: {', '.join(have) or 'none'}); {what}")
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
