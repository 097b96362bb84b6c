"""A training run from the command line's arguments to its result: the resolved config (recipe, options, cache),
the run folder, resume checks, training then evaluation, and the marks a failed or interrupted run leaves.
`train.run` and `train.cv` share it."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


from models import MODEL_NAMES, STEMS, ModelError, build_model
from pipeline.progress import add_progress_flags, bars
from pipeline.store import MANIFEST, CacheError, read_manifest, rebuild_command
from train.engine import checkpoint as ckpt
from train.engine import options
from train.engine import run_folder as rf
from train.engine import tensorboard as tb
from train.augment.batch import BACKENDS
from train.engine.ahead import ahead_default
from train.engine.config import COMPILE_MODES, PRESETS, Stage, TrainConfig, check_seed, parse_stages
from train.engine.distributed import Dist, resolve_device
from train.evaluation.evaluator import evaluate_run, open_run_cache
from train.experiment import resume
from train.engine.estimate import estimate_seconds
from train.engine.trainer import Trainer, TrainingDiverged

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
        if manifest.parent.is_symlink():  # as pipeline.cache list/prune: a link is not a cache folder of this root
            log.warning("not choosing %s: a symbolic link, not a cache folder; pass --cache %s to use what it links "
                        "to", manifest.parent, manifest.parent)
            continue
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


_NOT_GIVEN = object()


class RunParser(argparse.ArgumentParser):
    """train.run's and train.cv's parser. Its namespace also holds `given`: {dest: value} of every argument the
    command line gave. What was typed decides, not whether a value differs from its default: the recipe yields only
    to options given, and --resume refuses `--batch-size 64` on a batch-16 run although 64 is the default."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, rest = super().parse_known_args(args, namespace)
        # again, over a namespace where every dest is already set: argparse then fills in no default, so what
        # still holds the marker was not on the command line
        unset = argparse.Namespace(**{dest: _NOT_GIVEN for dest in vars(parsed)})
        again, _ = super().parse_known_args(args, unset)
        parsed.given = {dest: value for dest, value in vars(again).items() if value is not _NOT_GIVEN}
        return parsed, rest


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
    options.add_training_options(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("runs"), help="folder of run folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, metavar=resume_metavar, help=resume_help)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="mixed precision on CUDA (default on; bf16 where supported, else fp16 + grad scaler)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model and the augmentation (CUDA: its torch backend)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode for the model (implies --compile): reduce-overhead replays each step "
                        "as CUDA graphs (steps of a small model are bound by kernel launches), max-autotune also "
                        "benchmarks kernels (longer compile)")
    p.add_argument("--augment-ahead", action=argparse.BooleanOptionalAction, default=None,
                   help="augment the next batch on a second CUDA stream while the step runs (default: on for CUDA; "
                        "the same parameters and results either way)")
    p.add_argument("--augment-backend", choices=BACKENDS, default="auto",
                   help="the augmentation's backend: auto (OpenCV for a CPU, torch for CUDA), torch, opencv (CPU), "
                        "triton (CUDA: two hand-fused kernels)")
    p.add_argument("--stem", choices=STEMS, default="standard",
                   help="seed: no max-pool after conv1, as the report's code")
    p.add_argument("--pretrained", type=Path, help="initial weights from a local file (head replaced)")
    p.add_argument("--stop-after", type=int, metavar="EPOCH",
                   help="stop cleanly after this global epoch (1-based); continue later with --resume" if stop_after
                   else argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="run a full recipe on a CPU even if it takes days")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files into the run folder's tensorboard/ (every metrics.csv "
                        "column per epoch, each stage's augmented training views, the settings and final figures); "
                        f"needs {tb.INSTALL}")
    add_progress_flags(p)


def build_parser(description: str | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """train.run's parser (the command passes its docstring for --help)."""
    p = RunParser(prog="python -m train.run", description=description, epilog=epilog,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    return p


def parse_args(argv, description: str | None = None, epilog: str | None = None):
    parser = build_parser(description, epilog)
    args = parser.parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after must be an epoch >= 1, got {args.stop_after}")  # exit 2, as every bad value
    return args


# On --resume the saved config decides. Every other flag is either compared with the run's saved value (a flag
# given with the saved value is fine) or cannot apply to a resumed run. train.cv's --resume allows the same few.
RESUME_MAY_CHANGE = ("stop_after", "progress", "tensorboard")  # they change nothing that is trained
RUN_SETTINGS = ("seed", "stem", "amp", "compile", "compile_mode", "augment_ahead", "augment_backend", "pretrained",
                "device")  # TrainConfig fields of the same name
STAGE_FLAGS = ("stages", "epochs", "batch_size")  # compared with the saved stages together
COMPARED_ON_RESUME = (*options.OPTION, *RUN_SETTINGS, *STAGE_FLAGS)
NOT_ON_RESUME = {"out": "a resumed run stays in its own folder", "force": "a resumed run has already started",
                 "cache": "a resumed run reads the cache it started on", "cache_root": "a resumed run reads the "
                 "cache it started on"}


def flag_of(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _option_conflict(row: options.Option, value, config: TrainConfig) -> str | None:
    """A training option given on --resume, against the saved value."""
    kept = row.saved(vars(config))
    try:
        mine = row.from_given(value)
    except ValueError:  # e.g. a bad --lr-drop item: not the saved value either
        return f"{row.flag} {' '.join(value)} (the run keeps {row.as_given(kept, bare=True)})"
    return None if mine == kept else f"{row.as_given(mine)} (the run keeps {row.as_given(kept, bare=True)})"


def _setting_conflict(name: str, value, config: TrainConfig) -> str | None:
    """A run setting given on --resume (seed, stem, amp, compile, compile mode, augment ahead, pretrained,
    device), against the saved value."""
    kept, mine = getattr(config, name), value
    if name == "augment_ahead":  # a run saved before the flag had the device's default
        kept = config.ahead
    if name == "device":
        try:
            mine = resolve_device(value)  # auto is the device it picks here
        except ValueError:  # no such device here: not the saved one either
            pass
    elif name == "pretrained":
        mine = str(value)
    if mine == kept:
        return None
    typed = (flag_of(name) if value else f"--no-{name}") if isinstance(value, bool) else f"{flag_of(name)} {value}"
    return f"{typed} (the run keeps {('on' if kept else 'off') if isinstance(kept, bool) else kept})"


def _stage_conflicts(args, config: TrainConfig) -> list[str]:
    """--stages, --epochs and --batch-size (the stages' default batch size) against the saved stages."""
    given, kept = args.given, " ".join(f"{s.size}:{s.epochs}:{s.batch_size}" for s in config.stages)
    conflicts = []
    if "stages" in given:
        try:
            stages = parse_stages(given["stages"], args.batch_size)
        except ValueError:
            stages = None
        if stages != config.stages:
            conflicts.append(f"--stages {' '.join(given['stages'])} (the run keeps {kept})")
    if "epochs" in given:
        (first, *more) = config.stages
        if more or (first.epochs, first.batch_size) != (given["epochs"], args.batch_size):
            conflicts.append(f"--epochs {given['epochs']} (the run keeps {kept})")
    if "batch_size" in given and not {"stages", "epochs"} & set(given):
        batches = sorted({s.batch_size for s in config.stages})
        if batches != [given["batch_size"]]:
            conflicts.append(f"--batch-size {given['batch_size']} (the run keeps {', '.join(map(str, batches))})")
    return conflicts


def resume_conflicts(args, config: TrainConfig) -> list[str]:
    """The flags given with --resume that the resumed run cannot follow: a value other than the saved one (named
    with the value the run keeps), or a flag that cannot apply to a resumed run. `args.given` tells what was typed,
    so a flag given with its default's value is compared too."""
    conflicts = [f"model {args.model} (the run trains {config.model})"] if args.model != config.model else []
    for name, value in args.given.items():
        if name in ("model", "resume", *STAGE_FLAGS, *RESUME_MAY_CHANGE):
            continue
        if name in options.OPTION:
            conflicts.append(_option_conflict(options.OPTION[name], value, config))
        elif name in RUN_SETTINGS:
            conflicts.append(_setting_conflict(name, value, config))
        else:
            conflicts.append(f"{flag_of(name)} ({NOT_ON_RESUME.get(name, 'a resumed run keeps its saved settings')})")
    conflicts = [c for c in conflicts if c is not None]
    return conflicts + _stage_conflicts(args, config)


def resolve_options(args, saved: bool = False) -> dict:
    """The training options' values: the recipe's, replaced by the flags given; checked by flag name (`saved`: the
    flags of a saved plan, checked as a config.json is)."""
    return options.resolve({name: value for name, value in args.given.items() if name in options.OPTION},
                           saved=saved)


def check_extras(args) -> None:
    """The optional packages the flags given need, there before anything starts (TensorBoardMissing names the
    install command)."""
    if getattr(args, "tensorboard", False):
        tb.require()


def resolve_config(args, saved: bool = False) -> tuple[TrainConfig, bool]:
    """The run's config, and whether it is a model's full preset recipe. `saved`: `args` are a saved plan's (a
    resumed cross-validation), whose settings were accepted when it was made (train.engine.options.check)."""
    check_extras(args)
    if args.model not in MODEL_NAMES:
        raise RunError(f"unknown model {args.model!r}; choose one of {', '.join(MODEL_NAMES)}")
    training = resolve_options(args, saved)
    check_seed(args.seed)
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
        if "batch_size" in getattr(args, "given", {}):  # typed: every preset stage takes it (it was ignored)
            stages = tuple(Stage(s.size, s.epochs, args.batch_size) for s in stages)
            log.info("the %s preset with --batch-size %d in every stage", args.model, args.batch_size)
    cache = args.cache or find_cache(args.cache_root, [s.size for s in stages] if stages else None)
    manifest = read_manifest(cache)
    if stages is None:
        stages = (Stage(max(int(s) for s in manifest["sizes"]), args.epochs, args.batch_size),)
    missing = [s.size for s in stages if str(s.size) not in manifest["sizes"]]
    if missing:
        # the cache's own root and parameters: the default --cache-dir would build a second cache elsewhere (a build
        # keeps the sizes a cache has, so naming the missing ones is enough)
        raise RunError(f"cache {cache} has sizes {sorted(int(s) for s in manifest['sizes'])}, not {missing}; add "
                       f"them with {rebuild_command(cache, manifest, missing)}")
    if args.pretrained is not None and not saved:
        # loaded once here, before a run folder is made: a bad file is a named error, not a failed run folder
        build_model(args.model, stem=args.stem, pretrained=args.pretrained)
    config = TrainConfig(model=args.model, cache_dir=str(Path(cache).resolve()), cache_key=manifest["key"],
                         stages=stages, seed=args.seed, device=device,
                         amp=device.startswith("cuda") if args.amp is None else args.amp,
                         compile=args.compile or args.compile_mode != "default", compile_mode=args.compile_mode,
                         augment_backend=args.augment_backend,
                         augment_ahead=(ahead_default(device) if args.augment_ahead is None
                                        else args.augment_ahead),
                         stem=args.stem, pretrained=str(args.pretrained) if args.pretrained else None, **training,
                         saved=saved)
    return config, not (args.stages or args.epochs is not None)


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
                       stop_after: int | None = None, progress: str = "auto", tensorboard: bool = False
                       ) -> dict | None:
    """Train (or, with `resume`, continue from last.pt) and evaluate; the final summary, or None when stopped early
    (after global epoch `stop_after`, 1-based). A failure marks the run. `tensorboard`: rank 0 also writes
    TensorBoard event files of the epochs trained here and, once evaluated, of the settings and final figures."""
    trainer = None
    board = tb.Board()
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
        # opened once the first epoch to train is known: a resumed run's board starts there
        board = trainer.board = tb.open_board(run_dir, tensorboard and dist.is_main,
                                              first_step=trainer.state.epoch + 2)
        trainer.fit(stop_after_epoch=stop_after)
        if trainer.state.epoch + 1 >= config.total_epochs:
            summary = evaluate_run(run_dir, device=str(trainer.device), dist=dist)
            board.final(config.as_dict(), summary, step=config.total_epochs)
            return summary
        if dist.is_main:
            print(f"stopped after epoch {trainer.state.epoch + 1} of {config.total_epochs}; continue with "
                  f"python -m train.run {config.model} --resume {run_dir}")
        return None
    except BaseException as err:
        if dist.is_main:
            mark_unfinished(run_dir, config.model, err, trainer.state.epoch + 1 if trainer else 0)
        raise
    finally:
        board.close()


def check_resume(args) -> TrainConfig:
    """The saved config of `args.resume`, refused (RunError naming the flags) when a flag given would change it, when
    the run has nothing left to train, or when the folder cannot be resumed (train.experiment.resume says what holds).
    A missing config.json is restored from last.pt, once every check has passed."""
    check_extras(args)
    run_dir = args.resume
    config, last, restore = resume.resume_point(run_dir)
    conflicts = resume_conflicts(args, config)
    if conflicts:
        raise RunError(f"--resume continues {run_dir} with its saved settings, but these flags would change "
                       f"it: {'; '.join(conflicts)}. Drop them (with --resume a flag may repeat the run's "
                       f"saved value, and {', '.join(map(flag_of, RESUME_MAY_CHANGE))} may change), or start a "
                       f"new run")
    done = last["epoch"] + 1
    summary = rf.read_summary(run_dir) if not restore else None
    if done >= config.total_epochs and summary is not None and summary["status"] == rf.COMPLETE:
        epochs = f"all {config.total_epochs} epochs" if config.total_epochs > 1 else "its 1 epoch"
        raise RunError(f"{run_dir} has finished: {epochs} trained and evaluated "
                       f"({rf.SUMMARY}: {rf.COMPLETE}), so there is nothing to resume. Its figures are in "
                       f"{rf.SUMMARY}; python -m train.evaluate {run_dir} evaluates it again; to train longer, start a "
                       f"new run")
    if args.stop_after is not None and args.stop_after <= done:
        raise RunError(f"--stop-after {args.stop_after}: {run_dir} has already finished epoch {done} ({rf.LAST}); "
                       f"give a later epoch (up to {config.total_epochs}), or drop --stop-after")
    reader = open_run_cache(config, run_dir)
    # one writer under torchrun: its process group is not up yet, but its RANK says which process is the first
    if restore and os.environ.get("RANK", "0") == "0":
        resume.restore_config(run_dir, config, reader.manifest, last)
    return config


# what train.run and train.cv turn into exit code 2 with the message: bad input, never a bug
USER_ERRORS = (RunError, ModelError, CacheError, ckpt.CheckpointError, ValueError, FileNotFoundError,
               TrainingDiverged, tb.TensorBoardMissing)
