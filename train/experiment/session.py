"""A training run from the command line's arguments to its result: the resolved config (recipe, options, cache),
the run folder, resume checks, training then evaluation, and the marks a failed or interrupted run leaves.
`train.run` and `train.cv` share it."""
from __future__ import annotations

import argparse
import logging
from datetime import datetime
from pathlib import Path

import torch

from models import MODEL_NAMES, STEMS, ModelError
from pipeline.progress import add_progress_flags, bars
from pipeline.store import MANIFEST, CacheError, read_manifest
from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.engine.config import (MODERN_ADAMW, OPTIMIZERS, PRESETS, RECIPES, SCHEDULES, Stage, TrainConfig, check_choices,
                          check_numbers, parse_lr_drop, parse_stages)
from train.engine.distributed import Dist, resolve_device
from train.evaluation.evaluator import evaluate_run, open_run_cache
from train.engine.trainer import Trainer, TrainingDiverged, estimate_seconds

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


def add_run_arguments(p: argparse.ArgumentParser, *, resume_metavar: str = "RUN_DIR",
                      resume_help: str = "continue a stopped run where it stopped", stop_after: bool = True) -> None:
    """Every train.run flag, on `p`; train.cv takes the same ones (its --resume names a CV folder, and a CV is
    stopped by interrupting it, so its --stop-after is hidden and refused)."""
    p.add_argument("model", help=f"one of {', '.join(MODEL_NAMES)}")
    p.add_argument("--cache", type=Path, help="cache folder (default: newest under --cache-root with the sizes)")
    p.add_argument("--cache-root", type=Path, default=Path("cache"))
    p.add_argument("--stages", nargs="+", help="SIZE:EPOCHS[:BATCH] items (default: the model's preset)")
    p.add_argument("--epochs", type=int, help="one stage of N epochs at the largest cached size")
    p.add_argument("--batch-size", type=int, default=64)
    add_training_options(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder of run folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, metavar=resume_metavar, help=resume_help)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA (default on; bf16 where supported, else fp16 + grad scaler)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model and the augmentation (CUDA: its torch backend)")
    p.add_argument("--stem", choices=STEMS, default="standard",
                   help="seed: no max-pool after conv1, as the report's code")
    p.add_argument("--pretrained", type=Path, help="initial weights from a local file (head replaced)")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop cleanly after this global epoch (1-based); continue later with --resume" if stop_after
                   else argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="run a full recipe on a CPU even if it takes days")
    add_progress_flags(p)


def build_parser(description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """train.run's parser (the command passes its docstring for --help)."""
    p = argparse.ArgumentParser(prog="python -m train.run", description=description, epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    return p


def _ema_decay(text: str) -> float | str:
    if text.lower() in ("off", "none"):
        return "off"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be off or a number in (0, 1), e.g. 0.998, got {text!r}") from None


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The recipe and the options it sets (timm's names and meanings). Each defaults to None: the recipe decides,
    and a flag given explicitly overrides the recipe's value. config.json records the resolved values."""
    def shown(value) -> str:
        if value is None or isinstance(value, bool):
            return "on" if value else "off"
        return value if isinstance(value, str) else f"{value:g}"

    def values(name):
        return ", ".join(f"{recipe} {shown(RECIPES[recipe][name])}" for recipe in RECIPES)
    g = p.add_argument_group("training options (default: the --recipe's value; given, they override it)")
    g.add_argument("--recipe", choices=tuple(RECIPES),
                   help="report (default): the report's recipe, SGD momentum 0.9, lr 0.005, no weight decay, no "
                        "label smoothing, step lr drops (--lr-drop), no warmup, no EMA. modern: SGD with Nesterov "
                        "momentum 0.9, lr 0.005, weight decay 5e-4, label smoothing 0.1, cosine to 0 after 1 "
                        "warmup epoch per stage, EMA 0.998 with warmup (with --opt adamw: lr 0.001, weight decay "
                        "0.05)")
    g.add_argument("--opt", choices=OPTIMIZERS,
                   help="sgd: the report's momentum SGD (unlike timm's `sgd`, Nesterov only with --nesterov); "
                        "adamw: AdamW with torch's default betas (0.9, 0.999) and decoupled weight decay")
    g.add_argument("--lr", type=float, help=f"base learning rate ({values('lr')}; modern with adamw 0.001)")
    g.add_argument("--momentum", type=float, help=f"SGD's momentum ({values('momentum')})")
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None,
                   help=f"Nesterov momentum for --opt sgd ({values('nesterov')})")
    g.add_argument("--weight-decay", type=float,
                   help=f"weight decay of conv and linear weights; norm layers' parameters and biases get none, as "
                        f"in timm ({values('weight_decay')}; modern with adamw 0.05)")
    g.add_argument("--label-smoothing", type=float,
                   help=f"label smoothing of the training loss, in [0, 1); the validation loss (metrics.csv "
                        f"valid_loss) stays plain cross-entropy, while train_loss is the smoothed loss trained on "
                        f"({values('label_smoothing')})")
    g.add_argument("--sched", choices=SCHEDULES,
                   help="step: lr /= 10 at the --lr-drop epochs; plateau: also whenever valid accuracy has not "
                        "improved for N epochs (--lr-drop plateau:N); cosine: from the base lr to --min-lr over each "
                        "stage, set every step. Every stage restarts the schedule at the base lr; metrics.csv's lr is "
                        "the lr of each epoch's first step. Default: plateau "
                        "when --lr-drop plateau:N is given, step with other --lr-drop, else the recipe's "
                        f"({values('sched')})")
    g.add_argument("--lr-drop", nargs="+", help="epochs (1-based) at which lr /= 10, and/or plateau:PATIENCE")
    g.add_argument("--min-lr", type=float, help="where --sched cosine ends (0)")
    g.add_argument("--warmup-epochs", type=int,
                   help=f"linear warmup over the first N epochs of each stage, set every step, from --warmup-lr to "
                        f"the lr the schedule starts from ({values('warmup_epochs')})")
    g.add_argument("--warmup-lr", type=float, help="the lr of the warmup's first step (1e-5, timm's default)")
    g.add_argument("--ema-decay", type=_ema_decay, metavar="DECAY|off",
                   help="keep an exponential moving average of the weights (BatchNorm statistics included), "
                        "updated after every optimizer step with this decay; validation, best.pt and the reports "
                        f"then use the EMA weights; each stage restarts it ({values('ema_decay')}; off turns it off)")
    g.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="timm's EMA warmup: the k-th update since the EMA (re)started uses decay min(DECAY, "
                        "1 - k^(-2/3)), so that runs of a few hundred steps are not measured on nearly initial "
                        f"weights ({values('ema_warmup')})")


def parse_args(argv, description: str | None = None, epilog: str | None = None):
    parser = build_parser(description, epilog)
    args = parser.parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after must be an epoch >= 1, got {args.stop_after}")  # exit 2, as every bad value
    return args


# On --resume the saved config decides; these may still be given (they change nothing that was trained).
RESUME_MAY_CHANGE = ("stop_after", "progress")


def _shown(flag: str, value, bare: bool = False) -> str:
    """A flag as given: --nesterov / --no-nesterov, --ema-decay off, --lr 0.1 (`bare`: the value alone)."""
    if isinstance(value, bool) and flag in ("--nesterov", "--amp", "--ema-warmup"):
        return f"--{'' if value else 'no-'}{flag[2:]}"
    value = "off" if value is None and flag == "--ema-decay" else value
    return f"{value}" if bare else f"{flag} {value}"


def resume_conflicts(args, config: TrainConfig) -> list[str]:
    """The flags given with --resume that would change the saved run, each with the value the run keeps."""
    defaults = vars(build_parser().parse_args([config.model]))
    given = {k: v for k, v in vars(args).items()
             if k not in ("model", "resume", *RESUME_MAY_CHANGE) and v != defaults.get(k)}
    conflicts = [f"model {args.model} (the run trains {config.model})"] if args.model != config.model else []
    same = {"lr": config.lr, "momentum": config.momentum, "seed": config.seed, "stem": config.stem,
            "device": config.device, "amp": config.amp, "compile": config.compile}
    same.update({name: getattr(config, name) for name in TRAINING_OPTIONS})
    for name, value in given.items():
        flag = "--" + name.replace("_", "-")
        if name == "ema_decay" and value == "off":
            value = None
        if name in same:
            if value != same[name]:
                conflicts.append(f"{_shown(flag, value)} (the run keeps {_shown(flag, same[name], bare=True)})")
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


# TrainConfig fields set by a flag of the same name, and compared by value on --resume
TRAINING_OPTIONS = ("recipe", "opt", "nesterov", "weight_decay", "label_smoothing", "sched", "min_lr", "warmup_epochs",
                    "warmup_lr", "ema_decay", "ema_warmup")


def resolve_options(args) -> dict:
    """The training options: the recipe's values, replaced by the flags given; checked by flag name."""
    recipe = args.recipe or "report"
    values = dict(RECIPES[recipe])
    opt = args.opt or values["opt"]
    if recipe == "modern" and opt == "adamw":
        values.update(MODERN_ADAMW)
    values["opt"] = opt
    drop_epochs, patience = parse_lr_drop(args.lr_drop)
    if args.lr_drop and args.sched is None:  # --lr-drop names its own schedule, over the recipe's
        values["sched"] = "plateau" if patience is not None else "step"
    for name in ("lr", "momentum", *TRAINING_OPTIONS[2:]):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    if values["ema_decay"] == "off":
        values["ema_decay"] = None
    if values["ema_decay"] is None and values["ema_warmup"]:
        if args.ema_warmup:
            raise RunError("--ema-warmup needs an EMA: give --ema-decay too")
        values["ema_warmup"] = False  # the recipe's warmup of an EMA turned off
    if opt == "adamw":
        if args.momentum is not None:
            raise RunError("--momentum is SGD's; --opt adamw uses its default betas (0.9, 0.999)")
        if args.nesterov is None:
            values["nesterov"] = False  # a recipe's Nesterov is SGD's
    if values["sched"] != "cosine" and args.min_lr is not None:
        raise RunError(f"--min-lr is where --sched cosine ends; this run's --sched is {values['sched']}")
    check_numbers(values["lr"], values["momentum"], args.seed, weight_decay=values["weight_decay"],
                  label_smoothing=values["label_smoothing"], ema_decay=values["ema_decay"],
                  warmup_epochs=values["warmup_epochs"], warmup_lr=values["warmup_lr"], min_lr=values["min_lr"])
    check_choices(recipe, opt, values["nesterov"], values["momentum"], values["sched"], drop_epochs, patience)
    return {**values, "recipe": recipe, "lr_drop_epochs": drop_epochs, "lr_drop_patience": patience}


def resolve_config(args) -> tuple[TrainConfig, bool]:
    """The run's config, and whether it is a model's full preset recipe."""
    if args.model not in MODEL_NAMES:
        raise RunError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    options = resolve_options(args)
    if args.stages and args.epochs is not None:
        raise RunError("give --stages or --epochs, not both")
    if args.epochs is not None and args.epochs < 1:
        raise RunError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        raise RunError(f"--batch-size must be >= 1, got {args.batch_size}")
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise RunError(str(err)) from None
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
                         stages=stages, seed=args.seed, device=device,
                         amp=device.startswith("cuda") if args.amp is None else args.amp, compile=args.compile,
                         stem=args.stem, pretrained=str(args.pretrained) if args.pretrained else None, **options)
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
    rf.write_summary(run_dir, rf.stopped_summary(model, err, epochs_done))


def train_and_evaluate(config: TrainConfig, run_dir: Path, dist: Dist, *, resume: bool = False,
                       stop_after: int | None = None, progress: str = "auto") -> dict | None:
    """Train (or, with `resume`, continue from last.pt) and evaluate; the final summary, or None when stopped early
    (after global epoch `stop_after`, 1-based). A failure marks the run."""
    trainer = None
    try:
        trainer = Trainer(config, run_dir, dist, progress=bars(progress))
        if resume:
            trainer.resume()
            log.info("resuming %s after epoch %d", run_dir, trainer.state.epoch + 1)
            # a failed or interrupted record no longer describes the run once it goes on
            if dist.is_main and (rf.read_summary(run_dir) or {}).get("status") in rf.STOPPED_ON_ERROR:
                rf.remove_summary(run_dir)
        elif dist.is_main:
            trainer.write_config()
        trainer.fit(stop_after_epoch=stop_after)
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


def check_resume(args) -> TrainConfig:
    """The saved config of `args.resume`, refused (RunError naming the flags) when a flag given would change it."""
    config = rf.read_run_config(args.resume)
    run_dir = args.resume
    if not rf.RunFolder(run_dir).last.is_file():
        raise RunError(f"{run_dir}: no {rf.LAST} to resume from (the run stopped before its first epoch ended); "
                       f"start a new run")
    conflicts = resume_conflicts(args, config)
    if conflicts:
        raise RunError(f"--resume continues {run_dir} with its saved settings, but these flags would change "
                       f"it: {'; '.join(conflicts)}. Drop them (with --resume only "
                       f"{', '.join('--' + f.replace('_', '-') for f in RESUME_MAY_CHANGE)} may be given), "
                       f"or start a new run")
    open_run_cache(config, run_dir)
    return config


# what train.run and train.cv turn into exit code 2 with the message: bad input, never a bug
USER_ERRORS = (RunError, ModelError, CacheError, ckpt.CheckpointError, ValueError, FileNotFoundError,
               TrainingDiverged)
