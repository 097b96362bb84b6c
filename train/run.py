"""`python -m train.run MODEL`: train ResNet18/50/152 from the cache with the report's recipe, then evaluate.

    python -m train.run resnet18 --stages 64:2 96:1           a short run
    python -m train.run resnet152                             the report's recipe (128:550 then 224:100:32)
    torchrun --nproc_per_node 4 -m train.run resnet50         DistributedDataParallel, one process per GPU
The last line printed is the run folder.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

import torch

from models import MODEL_NAMES, STEMS, ModelError
from pipeline.progress import add_progress_flags, bars
from pipeline.store import MANIFEST, CacheError, read_manifest
from train import checkpoint as ckpt
from train.config import PRESETS, Stage, TrainConfig, check_numbers, parse_lr_drop, parse_stages
from train.distributed import Dist, broadcast_object, setup, teardown
from train.evaluate import evaluate_run, open_run_cache, read_run_config
from train.report import result_line
from train.trainer import Trainer, TrainingDiverged, estimate_seconds

log = logging.getLogger(__name__)
CPU_RECIPE_LIMIT_S = 3600  # a full recipe estimated past this on a CPU stops with a suggestion instead


class RunError(ValueError):
    """Bad arguments or a missing cache; the message says what to run instead."""


def unusable_reason(manifest: dict) -> str | None:
    """Why a complete cache cannot train a model (an empty split or class), or None."""
    splits = manifest.get("splits", {})
    for split in ("train", "valid"):
        info = splits.get(split, {})
        if not info.get("count"):
            return f"its {split} split is empty"
        missing = [c for c, n in info.get("classes", {}).items() if not n]
        if missing:
            return f"its {split} split has no {' or '.join(missing)} images"
    return None


def find_cache(cache_root: Path, sizes: list[int] | None) -> Path:
    """The newest complete, usable cache under `cache_root` holding every size in `sizes` (any, if None)."""
    candidates = []
    for manifest in cache_root.glob(f"*/{MANIFEST}"):
        try:
            m = read_manifest(manifest.parent)
            reason = unusable_reason(m)
        except (CacheError, ValueError, KeyError, TypeError, AttributeError) as err:
            m, reason = None, f"its manifest cannot be read ({err})"
        if reason is not None:
            log.warning("not choosing cache %s: %s", manifest.parent, reason)
            continue
        if sizes is None or all(str(s) in m["sizes"] for s in sizes):
            candidates.append((m["created"], manifest.parent))
    if not candidates:
        wanted = " ".join(str(s) for s in sizes) if sizes else "128 224"
        raise RunError(f"no cache under {cache_root} holds sizes {wanted}; build one with\n"
                       f"  python -m pipeline.build --sizes {wanted} --source PATH   (or --demo)")
    return max(candidates)[1]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.run", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("model", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--cache", type=Path, help="cache folder (default: newest under --cache-root with the sizes)")
    p.add_argument("--cache-root", type=Path, default=Path("cache"))
    p.add_argument("--stages", nargs="+", help="SIZE:EPOCHS[:BATCH] items (default: the model's preset)")
    p.add_argument("--epochs", type=int, help="one stage of N epochs at the largest cached size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--lr-drop", nargs="+", help="epochs (1-based) at which lr /= 10, and/or plateau:PATIENCE")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder of run folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run where it stopped")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA (default on; bf16 where supported, else fp16 + grad scaler)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model and the augmentation (CUDA: its torch backend)")
    p.add_argument("--stem", choices=STEMS, default="standard",
                   help="seed: no max-pool after conv1, as the report's code")
    p.add_argument("--pretrained", type=Path, help="initial weights from a local file (head replaced)")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop cleanly after this global epoch (1-based); continue later with --resume")
    p.add_argument("--force", action="store_true", help="run a full recipe on a CPU even if it takes days")
    add_progress_flags(p)
    return p


def parse_args(argv):
    args = _parser().parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        raise SystemExit(f"python -m train.run: error: --stop-after must be an epoch >= 1, got {args.stop_after}")
    return args


# On --resume the saved config decides; these may still be given (they change nothing that was trained).
RESUME_MAY_CHANGE = ("stop_after", "progress")


def resume_conflicts(args, config: TrainConfig) -> list[str]:
    """The flags given with --resume that would change the saved run, each with the value the run keeps."""
    defaults = vars(_parser().parse_args([config.model]))
    given = {k: v for k, v in vars(args).items()
             if k not in ("model", "resume", *RESUME_MAY_CHANGE) and v != defaults.get(k)}
    conflicts = [f"model {args.model} (the run trains {config.model})"] if args.model != config.model else []
    same = {"lr": config.lr, "momentum": config.momentum, "seed": config.seed, "stem": config.stem,
            "device": config.device, "amp": config.amp, "compile": config.compile}
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if name in same:
            if value != same[name]:
                conflicts.append(f"{flag} {value} (the run keeps {same[name]})")
        elif name == "stages":
            try:
                stages = parse_stages(value, args.batch_size)
            except ValueError:
                stages = None
            if stages != config.stages:
                saved = " ".join(f"{s.size}:{s.epochs}:{s.batch_size}" for s in config.stages)
                conflicts.append(f"--stages {' '.join(value)} (the run keeps {saved})")
        elif name == "lr_drop":
            try:
                same_drop = parse_lr_drop(value) == (config.lr_drop_epochs, config.lr_drop_patience)
            except ValueError:
                same_drop = False
            if not same_drop:
                conflicts.append(f"--lr-drop {' '.join(value)} (the run keeps its own)")
        elif name == "batch_size" and args.stages:
            continue  # compared through --stages
        else:
            conflicts.append(f"{flag} (a resumed run keeps its saved {name.replace('_', ' ')})")
    return conflicts


def resolve_config(args) -> tuple[TrainConfig, bool]:
    """The run's config, and whether it is a model's full preset recipe."""
    if args.model not in MODEL_NAMES:
        raise RunError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    check_numbers(args.lr, args.momentum, args.seed)
    drop_epochs, patience = parse_lr_drop(args.lr_drop)
    if args.stages and args.epochs is not None:
        raise RunError("give --stages or --epochs, not both")
    if args.epochs is not None and args.epochs < 1:
        raise RunError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise RunError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RunError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    if args.stages:
        stages = parse_stages(args.stages, args.batch_size)
    elif args.epochs is not None:
        stages = None
    else:
        stages = tuple(Stage(*s) for s in PRESETS[args.model])
    cache = args.cache or find_cache(args.cache_root, [s.size for s in stages] if stages else None)
    manifest = read_manifest(cache)
    if stages is None:
        stages = (Stage(max(int(s) for s in manifest["sizes"]), args.epochs, args.batch_size),)
    missing = [s.size for s in stages if str(s.size) not in manifest["sizes"]]
    if missing:
        raise RunError(f"cache {cache} has sizes {sorted(int(s) for s in manifest['sizes'])}, not {missing}; add them "
                       f"with python -m pipeline.build --sizes {' '.join(map(str, missing))} --source "
                       f"{manifest['source']['root']}")
    config = TrainConfig(model=args.model, cache_dir=str(Path(cache).resolve()), cache_key=manifest["key"],
                         stages=stages, lr=args.lr, momentum=args.momentum, lr_drop_epochs=drop_epochs,
                         lr_drop_patience=patience, seed=args.seed, device=device,
                         amp=device.startswith("cuda") if args.amp is None else args.amp, compile=args.compile,
                         stem=args.stem, pretrained=str(args.pretrained) if args.pretrained else None)
    return config, not (args.stages or args.epochs is not None)


def new_run_dir(out: Path, model: str) -> Path:
    """runs/<model>-<timestamp>; never an existing folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for n in range(1000):
            path = out / (f"{model}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as err:  # read-only, full, a file in the way, no permission
        raise RunError(f"cannot make a run folder under {out} ({err.strerror or err}); pass --out a writable "
                       f"folder") from err
    raise RunError(f"could not make a new run folder under {out}")


def check_cpu_recipe(config: TrainConfig) -> None:
    seconds, lines = estimate_seconds(config)
    if seconds > CPU_RECIPE_LIMIT_S:
        recipe = " ".join(f"{s.size}:{s.epochs}:{s.batch_size}" for s in config.stages)
        raise RunError(f"the full {config.model} recipe ({recipe}) would take about {seconds / 3600:.1f} h on this "
                       f"CPU at the measured rate:\n  " + "\n  ".join(lines) +
                       "\nFor a short run try --stages 64:2 96:1 (build those sizes first), use a GPU, "
                       "or pass --force to run it anyway")


def mark_unfinished(run_dir: Path, model: str, err: BaseException, epochs_done: int) -> None:
    """summary.json of a run that stopped on an error: `status` failed (or interrupted) with the error, no figures,
    so that no later step (train.compare, a reader of the folder) takes the folder for a result."""
    summary = {"status": "interrupted" if isinstance(err, KeyboardInterrupt) else "failed", "model": model,
               "error": f"{type(err).__name__}: {err}", "epochs_done": epochs_done}
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, run_dir / "summary.json")


def train_and_evaluate(config: TrainConfig, run_dir: Path, dist: Dist, args) -> dict | None:
    """Train (or resume) and evaluate; the final summary, or None when stopped early. A failure marks the run."""
    trainer = None
    try:
        trainer = Trainer(config, run_dir, dist, progress=bars(args.progress))
        if args.resume:
            trainer.resume()
            log.info("resuming %s after epoch %d", run_dir, trainer.state.epoch + 1)
        elif dist.is_main:
            trainer.write_config()
        trainer.fit(stop_after_epoch=args.stop_after)
        if trainer.state.epoch + 1 >= config.total_epochs:
            return evaluate_run(run_dir, device=str(trainer.device), dist=dist)
        if dist.is_main:
            print(f"stopped after epoch {trainer.state.epoch + 1} of {config.total_epochs}; continue with "
                  f"python -m train.run {config.model} --resume {run_dir}")
        return None
    except BaseException as err:
        if dist.is_main:
            mark_unfinished(run_dir, config.model, err, trainer.state.epoch + 1 if trainer else 0)
        raise


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    dist = Dist()
    summary = None  # the final evaluation's figures, when the run finishes
    try:
        if args.resume:
            config = read_run_config(args.resume)
            run_dir = args.resume
            if not (run_dir / "last.pt").is_file():
                raise RunError(f"{run_dir}: no last.pt to resume from")
            conflicts = resume_conflicts(args, config)
            if conflicts:
                raise RunError(f"--resume continues {run_dir} with its saved settings, but these flags would change "
                               f"it: {'; '.join(conflicts)}. Drop them (with --resume only "
                               f"{', '.join('--' + f.replace('_', '-') for f in RESUME_MAY_CHANGE)} may be given), "
                               f"or start a new run")
            open_run_cache(config, run_dir)
        else:
            config, full_recipe = resolve_config(args)
            if full_recipe and config.device == "cpu" and not args.force:
                check_cpu_recipe(config)
        dist = setup(torch.device(config.device).type)
        if not args.resume:
            run_dir = broadcast_object(new_run_dir(args.out, config.model) if dist.is_main else None, dist)
        summary = train_and_evaluate(config, Path(run_dir), dist, args)
    except (RunError, ModelError, CacheError, ckpt.CheckpointError, ValueError, FileNotFoundError,
            TrainingDiverged) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        teardown(dist)
    if dist.is_main:
        if summary:
            print(result_line(summary))
        print(Path(run_dir).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
