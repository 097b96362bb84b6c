"""What a run folder must hold to be resumed, checked before anything in it is touched, and what to do when it does
not: last.pt loads, it was trained with the config.json beside it, and config.json is there (last.pt carries the
config it was trained with, so a missing config.json is restored from it). When last.pt cannot be loaded, the message
says what still holds (best.pt, when it loads and can continue the run). `train.run --resume` and a resumed fold of
`train.cv` both go through here."""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.engine.config import TrainConfig
from train.engine.trainer import SCHEDULE_KEY, preprocess_record
from train.evaluation.evaluator import open_run_cache

log = logging.getLogger(__name__)

# config.json fields that may differ from last.pt's: where the cache lies is not what was trained (its key is
# checked against the cache), so a moved cache is followed by editing `cache_dir`
MAY_DIFFER = ("cache_dir",)


def _shown(name: str, value) -> str:
    if name == "stages":
        return " ".join(f"{s['size']}:{s['epochs']}:{s['batch_size']}" for s in value)
    return json.dumps(value)


def differences(saved: TrainConfig, trained: TrainConfig) -> list[str]:
    """The fields where config.json (`saved`) says something else than the config last.pt was trained with."""
    a, b = saved.as_dict(), trained.as_dict()
    return [f"{name} {_shown(name, a[name])} (last.pt: {_shown(name, b[name])})" for name in a
            if name not in MAY_DIFFER and a[name] != b[name]]


def trained_config(state: dict, path: Path) -> TrainConfig:
    """The config a checkpoint was trained with (its `config`)."""
    try:
        return TrainConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ckpt.CheckpointError(f"{path}: holds no usable training config ({type(err).__name__}: {err}); the "
                                   f"file is damaged or not a checkpoint of python -m train.run: start a new run"
                                   ) from None


def _best_can_continue(folder: rf.RunFolder) -> tuple[dict | None, str]:
    """(best.pt's state, how it is) when best.pt loads and holds what a resume needs, else (None, why not)."""
    if not folder.best.is_file():
        return None, f"there is no {rf.BEST} either"
    try:
        best = ckpt.load(folder.best)
        config = trained_config(best, folder.best)
    except ckpt.CheckpointError as err:
        return None, f"{rf.BEST} cannot be loaded either ({err})"
    if not all(key in best for key in ("optimizer", "epoch", "stage", SCHEDULE_KEY)):
        return None, f"{rf.BEST} lacks the training state to continue from"
    if config.ema_decay and best.get("train_model") is None:  # rewritten by a resume from last.pt's EMA weights
        return None, f"{rf.BEST} (epoch {best['epoch'] + 1}) holds the EMA weights only, not the trained ones"
    acc = best[SCHEDULE_KEY].get("best_acc")
    size = config.stages[best["stage"]].size
    return best, (f"{rf.BEST} is intact: epoch {best['epoch'] + 1} of {config.total_epochs} ({size} px"
                  + (f", valid acc {acc:.4f}" if isinstance(acc, float) and acc >= 0 else "") + ")")


def damaged_last(folder: rf.RunFolder, err: Exception) -> ckpt.CheckpointError:
    """last.pt cannot be loaded: why (torch's first sentence, not its paragraph), what still holds, and the commands
    to go on."""
    cause = err.__cause__
    what = f"{folder.last} cannot be loaded ({str(cause).split('. ')[0]})" if cause is not None else f"{err}"
    best, how = _best_can_continue(folder)
    if best is None:
        return ckpt.CheckpointError(f"{what}; {how}, so nothing in {folder.path} can continue the run: start a new "
                                    f"run (python -m train.run MODEL ...)")
    return ckpt.CheckpointError(
        f"{what}; {how}, and the run can continue from there (the epochs after {best['epoch'] + 1} are trained "
        f"again): keep the damaged file aside and copy best.pt in its place,\n"
        f"  mv {folder.last} {folder.last}.damaged && cp {folder.best} {folder.last}\n"
        f"then resume again; or start a new run")


def _loads(path: Path) -> bool:
    try:
        trained_config(ckpt.load(path), path)
        return True
    except ckpt.CheckpointError:
        return False


def resume_point(run_dir: Path) -> tuple[TrainConfig, dict, bool]:
    """(the config to resume with, last.pt's state, whether config.json is missing and must be restored from last.pt
    before the run goes on). Nothing is written here. RunFolderError / CheckpointError with what to do; a run whose
    cache no longer holds its key is refused as train.evaluate refuses it."""
    folder = rf.RunFolder(run_dir)
    missing = folder.path.is_dir() and not folder.config.is_file() and folder.last.is_file() \
        and not rf.is_cv_folder(folder.path)
    try:
        config = None if missing else rf.read_run_config(run_dir)  # its errors: not a folder, a CV folder, unreadable
    except rf.RunFolderError as err:
        if not (folder.config.is_file() and _loads(folder.last)):
            raise
        raise rf.RunFolderError(f"{err} ({rf.LAST} carries the settings it was trained with: delete {rf.CONFIG} and "
                                f"--resume writes it again from {rf.LAST})") from None
    if not folder.last.is_file():
        raise rf.RunFolderError(f"{run_dir}: no {rf.LAST} to resume from (the run stopped before its first epoch "
                                f"ended); start a new run")
    try:
        last = ckpt.load(folder.last)
    except ckpt.CheckpointError as err:
        raise damaged_last(folder, err) from None
    trained = trained_config(last, folder.last)
    if missing:
        return trained, last, True
    # the cache first: a cache that no longer holds the run's key says "rebuild that cache" whatever else differs
    open_run_cache(config, run_dir)
    changed = differences(config, trained)
    if changed:
        raise rf.RunFolderError(
            f"{folder.config} does not say what {rf.LAST} was trained with: {'; '.join(changed)}. A resumed run "
            f"keeps the settings it was trained with: restore {rf.CONFIG} (or delete it: --resume then writes it "
            f"again from {rf.LAST}), or start a new run with the new settings")
    return config, last, False


def restore_config(run_dir: Path, config: TrainConfig, manifest: dict, last: dict) -> None:
    """Write a missing config.json from last.pt's config and the run's cache (its preprocessing record), and say so.
    The library versions, world size and device name of the original run are not in last.pt: `restored` says so."""
    rf.write_config(run_dir, {
        "config": config.as_dict(),
        "preprocess": preprocess_record(manifest, [s.size for s in config.stages]),
        "restored": {"from": rf.LAST, "epoch": last["epoch"] + 1, "at": datetime.now(timezone.utc).isoformat(),
                     "note": "written by --resume: the original's versions, world_size and device_name are unknown"}})
    log.warning("%s had no %s: restored it from %s (epoch %d), which carries the settings the run was trained with",
                run_dir, rf.CONFIG, rf.LAST, last["epoch"] + 1)
