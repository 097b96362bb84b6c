"""The training options (timm's names and meanings), one row each: flag, parsing, check, each recipe's value, help
and how a value is shown. Everything else about an option comes from its row: the argparse flags, the one check of
a set of values (flags given, or a config.json that `TrainConfig` loads), the resolution recipe -> values with the
flags given overriding, how `--resume` names a value, and the README's options table (`markdown_table`; a test keeps
the README's copy equal to it). A new option is one row here and one `TrainConfig` field.

Why the `modern` recipe's values - today's usual ResNet practice, kept close to the report where the report's value
is known to work on C-NMC:
- SGD with Nesterov momentum 0.9 at the report's lr 0.005 (batch 64): SGD is still the usual optimizer for ResNets
  (adaptive methods tend to generalise worse on them), the lr is the one known to be stable on this data, and
  Nesterov (timm's default `sgd`) costs nothing;
- weight decay 5e-4 (the small-data ResNet value, e.g. CIFAR) on conv/linear weights only: 8k training images for
  11-58M parameters need the regularisation more than ImageNet's 1e-4;
- cosine decay to 0 within each stage, after 1 epoch of per-step linear warmup from 1e-5: each stage starts with a
  fresh optimizer (empty momentum) and a new image size, so a short warmup avoids the first steps' jolt;
- label smoothing 0.1: penalises over-confident logits, which C-NMC's ambiguous cells do not deserve;
- EMA of the weights, decay 0.998 per step: a horizon of ~500 steps (~4 C-NMC epochs at batch 64), short enough for
  stages of tens of epochs; its weights are what validation and best.pt see, which makes the best epoch's choice
  less noisy on a 1.6k-image valid split. With timm's EMA warmup: without it, a short run is measured on weights
  still close to the initial ones (the README's demo, 13 steps per epoch, stayed at chance in every epoch with a
  fixed 0.998; see the EMA's module);
- with `--opt adamw` the lr and weight decay change (the `adamw` column): AdamW's update is scaled per parameter,
  so it wants a lower lr, and its decoupled decay (p -= lr * wd * p, not through the gradient) a weight decay ~100x
  SGD's coupled one (DeiT's AdamW recipe in timm uses 0.05).
"""
from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)
RECIPE_NAMES = ("report", "modern")  # `report`: the report's recipe, the default (and an old config.json's)
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "plateau")
_SAME = object()  # an `adamw` cell left empty: modern with --opt adamw keeps the modern value
_PLATEAU = re.compile(r"^plateau:(\d+)$")


def parse_lr_drop(texts: list[str] | None) -> tuple[tuple[int, ...], int | None]:
    """`--lr-drop 300 500` (global epochs, 1-based) and/or `--lr-drop plateau:20` (patience in epochs)."""
    epochs, patience = [], None
    for text in texts or []:
        match = _PLATEAU.match(text)
        if match:
            patience = int(match.group(1))
        elif text.isdigit() and int(text) > 0:
            epochs.append(int(text))
        else:
            raise ValueError(f"--lr-drop item {text!r} is neither an epoch number nor plateau:PATIENCE")
    return tuple(sorted(epochs)), patience


def sched_for_drops(patience: int | None) -> str:
    """The schedule that lr drops name when no --sched is given (and an old config.json's): plateau with a patience,
    else step."""
    return "plateau" if patience is not None else "step"


def _ema_decay(text: str) -> float | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be off or a number in (0, 1), e.g. 0.998, got {text!r}") from None


def _number(value: float) -> str:
    """0.005, 5e-4, 1e-5: short numbers for tables and --help."""
    if 0 < abs(value) < 1e-3:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:g}"


def _drops_text(value: tuple) -> str:
    epochs, patience = value
    return " ".join([*map(str, epochs), *([f"plateau:{patience}"] if patience is not None else [])]) or "none"


def _finite(low: float, high: float = math.inf, *, low_open=False, high_open=False) -> Callable[[Any, Mapping], bool]:
    # `not (x < low)` style would let NaN through: NaN fails every comparison, so each bound is a positive test
    def valid(x, values) -> bool:
        return (math.isfinite(x) and (x > low if low_open else x >= low)
                and (high == math.inf or (x < high if high_open else x <= high)))
    return valid


@dataclass(frozen=True)
class Option:
    """One training option. `report` and `modern` are the recipes' values (`report`'s is also `TrainConfig`'s field
    default), as `TrainConfig` holds them; `adamw` replaces `modern` with --opt adamw where given."""
    flag: str
    help: str  # --help's text and the README's `meaning`; the recipes' values are added to --help
    report: Any
    modern: Any
    adamw: Any = _SAME
    parse: Callable[[str], Any] | None = None  # argparse's `type`; None: choices, or a --x/--no-x boolean
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    nargs: str | None = None
    valid: Callable[[Any, Mapping], bool] | None = None  # (value, every value) -> whether it is allowed
    must_be: str = ""  # what `valid` wants, said after "FLAG must be"; formatted with every value
    fields: tuple[str, ...] = ()  # the TrainConfig fields the flag sets, when not the one of its own name
    from_flag: Callable[[Any], Any] | None = None  # the flag's parsed value -> the value as `fields` hold it
    text: Callable[[Any], str] | None = None  # a value as shown, when not the usual way (see `show`)
    in_recipe: bool = True  # whether RECIPES lists it (not --recipe itself, not --lr-drop: no recipe drops)

    @property
    def name(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def boolean(self) -> bool:
        return isinstance(self.report, bool)

    def default(self, recipe: str, opt: str = "sgd"):
        if recipe == "modern" and opt == "adamw" and self.adamw is not _SAME:
            return self.adamw
        return self.report if recipe == "report" else self.modern

    def from_given(self, flag_value):
        """The flag's parsed value -> the option's value (as `saved` gives it)."""
        return self.from_flag(flag_value) if self.from_flag else flag_value

    def as_fields(self, value) -> dict:
        """The option's value -> {TrainConfig field: value}."""
        return dict(zip(self.fields, value)) if self.fields else {self.name: value}

    def saved(self, values: Mapping):
        """This option's value in a set of TrainConfig values (a tuple when it sets several fields)."""
        return tuple(values[f] for f in self.fields) if self.fields else values[self.name]

    def show(self, value) -> str:
        """For tables and --help: on/off for a boolean, off for no EMA, numbers short."""
        if self.text:
            return self.text(value)
        if value is None or isinstance(value, bool):
            return "on" if value else "off"
        return value if isinstance(value, str) else _number(value)

    def as_given(self, value, bare: bool = False) -> str:
        """A value as a flag given on the command line (--nesterov / --no-nesterov, --ema-decay off, --lr 0.1), for
        --resume's messages; `bare`: the value alone (a boolean stays its flag)."""
        if self.boolean:
            return f"--{'' if value else 'no-'}{self.flag[2:]}"
        text = self.text(value) if self.text else "off" if value is None else f"{value}"
        return text if bare else f"{self.flag} {text}"

    def check(self, values: Mapping) -> None:
        value = self.saved(values)
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.flag} {value!r} is not one of {', '.join(self.choices)}")
        if self.valid:
            try:
                ok = self.valid(value, values)
            except TypeError:  # a config.json holding text where a number belongs
                ok = False
            if not ok:
                raise ValueError(f"{self.flag} must be {self.must_be.format(**values)}, got "
                                 f"{self.text(value) if self.text else value}")


OPTIONS = (
    Option("--recipe", "which recipe gives every option below its default: report, the report's recipe; modern, "
                       "today's usual ResNet practice (Nesterov, weight decay, label smoothing, cosine after a "
                       "warmup, EMA); each option names its value in both", "report", "modern", choices=RECIPE_NAMES,
           in_recipe=False),
    Option("--opt", "sgd: the report's momentum SGD (unlike timm's `sgd`, Nesterov only with --nesterov); adamw: "
                    "AdamW with torch's default betas (0.9, 0.999) and decoupled weight decay; fused on CUDA for both",
           "sgd", "sgd", choices=OPTIMIZERS),
    Option("--lr", "base learning rate; every stage restarts its schedule from it", 0.005, 0.005, adamw=0.001,
           parse=float, valid=_finite(0, low_open=True), must_be="a finite number > 0"),
    Option("--momentum", "SGD's momentum (--opt adamw has its betas instead)", 0.9, 0.9, parse=float,
           valid=_finite(0, 1, high_open=True), must_be="a finite number in [0, 1)"),
    Option("--nesterov", "Nesterov momentum, for --opt sgd", False, True),
    Option("--weight-decay", "weight decay of conv and linear weights; norm layers' parameters and biases get none, "
                             "as in timm (two parameter groups)", 0.0, 5e-4, adamw=0.05, parse=float,
           valid=_finite(0), must_be="a finite number >= 0"),
    Option("--label-smoothing", "label smoothing of the training loss, in [0, 1); valid_loss stays plain "
                                "cross-entropy, while train_loss is the smoothed loss trained on", 0.0, 0.1,
           parse=float, valid=_finite(0, 1, high_open=True), must_be="a number in [0, 1)"),
    Option("--sched", "step: lr /= 10 at the --lr-drop epochs; plateau: also whenever valid accuracy has not "
                      "improved for N epochs (--lr-drop plateau:N); cosine: from the base lr to --min-lr over each "
                      "stage, set every step. Every stage restarts the schedule at the base lr; metrics.csv's lr is "
                      "the lr of each epoch's first step. --lr-drop without --sched: plateau with plateau:N, else "
                      "step", "step", "cosine", choices=SCHEDULES),
    Option("--lr-drop", "epochs (1-based, global) at which lr /= 10, and/or plateau:N for whenever valid accuracy "
                        "has not improved for N epochs of the stage; an epoch after the run's last is refused (that "
                        "drop would never come), a plateau:N no stage is long enough for is warned about once (it "
                        "would never fire, but a short trial may keep a longer recipe's flags)",
           ((), None), ((), None),
           metavar="EPOCH|plateau:N", nargs="+", fields=("lr_drop_epochs", "lr_drop_patience"),
           from_flag=parse_lr_drop, text=_drops_text, in_recipe=False,
           valid=lambda v, _: all(e >= 1 for e in v[0]) and (v[1] is None or v[1] >= 1),
           must_be="epochs >= 1 and/or plateau:N with N >= 1"),
    Option("--min-lr", "where --sched cosine ends (only with it)", 0.0, 0.0, parse=float,
           valid=lambda x, values: _finite(0, values["lr"])(x, values), must_be="a finite number in [0, --lr {lr:g}]"),
    Option("--warmup-epochs", "linear warmup over the first N epochs of each stage, set every step, from --warmup-lr "
                              "to the lr the schedule starts from; at most the shortest stage's epochs (every stage "
                              "restarts the warmup, so a longer one would end that stage before its lr is reached)",
           0, 1, parse=int,
           valid=lambda n, _: isinstance(n, int) and not isinstance(n, bool) and n >= 0,
           must_be="an integer >= 0"),
    Option("--warmup-lr", "the lr of the warmup's first step (timm's default); at most --lr, as a warmup rises "
                          "to the lr, and only with --warmup-epochs (without a warmup it is never used)", 1e-5, 1e-5,
           parse=float,
           valid=_finite(0), must_be="a finite number >= 0"),
    Option("--ema-decay", "an exponential moving average of the weights (BatchNorm statistics included), updated "
                          "after every optimizer step on the device with no host read; with it on, validation, "
                          "best.pt (its model), the reports, train.evaluate and train.predict use the EMA weights; "
                          "each stage restarts it; off turns it off", None, 0.998, parse=_ema_decay,
           metavar="DECAY|off", valid=lambda d, _: d is None or _finite(0, 1, low_open=True, high_open=True)(d, _),
           must_be="off or a number in (0, 1), e.g. 0.998"),
    Option("--ema-warmup", "timm's EMA warmup: the k-th update since the EMA (re)started uses decay min(DECAY, "
                           "1 - k^(-2/3)), without which a run of a few hundred steps is measured on weights still "
                           "close to their start", False, True),
)
OPTION = {row.name: row for row in OPTIONS}
# The recipes as {option: value}, and modern's values with --opt adamw (TrainConfig's defaults are RECIPES["report"])
RECIPES = {recipe: {row.name: row.default(recipe) for row in OPTIONS if row.in_recipe} for recipe in RECIPE_NAMES}
MODERN_ADAMW = {row.name: row.adamw for row in OPTIONS if row.adamw is not _SAME}

# How the options fit together (message formatted with every value), checked after each option's own check
RULES = (
    (lambda v: v["nesterov"] and v["opt"] != "sgd",
     "--nesterov is for --opt sgd; --opt {opt} has its own momentum (AdamW: betas 0.9, 0.999)"),
    (lambda v: v["nesterov"] and v["momentum"] == 0, "--nesterov needs a --momentum > 0"),
    (lambda v: v["sched"] == "cosine" and (v["lr_drop_epochs"] or v["lr_drop_patience"] is not None),
     "--sched cosine does not take --lr-drop (its lr follows the cosine); drop --lr-drop, or use --sched step / "
     "plateau"),
    (lambda v: v["sched"] == "plateau" and v["lr_drop_patience"] is None,
     "--sched plateau needs its patience: add --lr-drop plateau:N (N epochs without a better valid accuracy)"),
    (lambda v: v["sched"] == "step" and v["lr_drop_patience"] is not None,
     "--sched step conflicts with --lr-drop plateau:N; use --sched plateau (it applies --lr-drop epochs too)"),
    (lambda v: v["ema_warmup"] and v["ema_decay"] is None, "--ema-warmup needs an EMA: give --ema-decay too"),
)



def _warmup_above_lr(v) -> tuple[str, str] | None:
    if v["warmup_epochs"] and v["warmup_lr"] > v["lr"]:
        return (f"--warmup-lr {v['warmup_lr']:g} is above --lr {v['lr']:g}: a warmup rises from --warmup-lr to the "
                f"lr, so this one would fall instead", f"give --warmup-lr {v['lr']:g} or less, or --warmup-epochs 0")
    return None


def _warmup_longer_than_a_stage(v) -> tuple[str, str] | None:
    if not v.get("stages") or not v["warmup_epochs"]:
        return None
    index, short = min(enumerate(v["stages"]), key=lambda item: item[1].epochs)
    if v["warmup_epochs"] <= short.epochs:
        return None
    return (f"--warmup-epochs {v['warmup_epochs']} is longer than stage {index + 1} ({short.size} px, {short.epochs} "
            f"epoch{'s' if short.epochs > 1 else ''}): every stage restarts the warmup, so that stage would end "
            f"before its lr reached --lr "
            f"{v['lr']:g}", f"give --warmup-epochs {short.epochs} or less, or longer stages")


def _drop_after_the_run(v) -> tuple[str, str] | None:
    if not v.get("stages"):
        return None
    total = sum(s.epochs for s in v["stages"])
    late = [e for e in v["lr_drop_epochs"] if e > total]
    if not late:
        return None
    return (f"--lr-drop {' '.join(map(str, late))} is after the run's last epoch ({total}): the drop would never "
            f"happen", f"give drop epochs from 1 to {total}")


def _plateau_longer_than_every_stage(v) -> tuple[str, str] | None:
    patience = v["lr_drop_patience"]
    if not v.get("stages") or patience is None:
        return None
    longest = max(s.epochs for s in v["stages"])
    if patience < longest:
        return None
    # a stage's first epoch always improves on the stage's best (which starts at none), so a stage of E epochs
    # counts at most E - 1 epochs without improvement
    return (f"--lr-drop plateau:{patience} can never fire: the plateau counter restarts with every stage and the "
            f"longest stage has {longest} epoch{'s' if longest > 1 else ''}, so at most {longest - 1} without a "
            f"better valid accuracy", f"plateau:{longest - 1} or less" if longest > 1 else "longer stages")


# Checks added after runs were saved without them, (values) -> (what is wrong, what to do) or None: a new run is
# refused, a config.json (or a cross-validation's saved plan) only warned about, once per process - such a run has
# trained this way already, and its folder must still resume and evaluate as it did. The stage rules apply where the
# stages are known (`values["stages"]`: a TrainConfig's, each with `size` and `epochs`).
RULES_SINCE_SAVED = (_warmup_above_lr, _warmup_longer_than_a_stage, _drop_after_the_run)
# Settings that do nothing here but may be meant (a short trial run keeping a long recipe's --lr-drop plateau:N):
# warned about once, never refused.
WARNINGS = (_plateau_longer_than_every_stage,)
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def check(values: Mapping, *, saved: bool = False) -> None:
    """The one check of a set of training-option values (TrainConfig field names), each error naming its flag:
    every option's own, then how they fit together. ValueError. With `saved` (a config.json, a saved plan) the
    checks of RULES_SINCE_SAVED log a warning instead; WARNINGS always do."""
    for row in OPTIONS:
        row.check(values)
    for broken, message in RULES:
        if broken(values):
            raise ValueError(message.format(**values))
    for rule in RULES_SINCE_SAVED:
        found = rule(values)
        if found is None:
            continue
        what, fix = found
        if not saved:
            raise ValueError(f"{what}; {fix}")
        _warn_once(f"{what}; the run was saved with this setting before new runs were refused it, and keeps it")
    for rule in WARNINGS:
        found = rule(values)
        if found is not None:
            _warn_once(f"{found[0]}: the run trains without it (to use it: {found[1]})")


def resolve(given: Mapping[str, Any], *, saved: bool = False) -> dict:
    """TrainConfig's option values from the flags given ({dest: parsed value}): the recipe's, each replaced by the
    flag given; checked. ValueError naming the flag. `saved`: flags of a saved plan (a cross-validation resumed),
    checked as a config.json is (`check`)."""
    recipe = given.get("recipe", "report")
    opt = given.get("opt", OPTION["opt"].default(recipe))
    values = {}
    for row in OPTIONS:
        value = row.from_given(given[row.name]) if row.name in given else row.default(recipe, opt)
        values.update(row.as_fields(value))
    if "lr_drop" in given and "sched" not in given:  # --lr-drop names its own schedule, over the recipe's
        values["sched"] = sched_for_drops(values["lr_drop_patience"])
    # a recipe's value that the flags given make meaningless goes: Nesterov is SGD's, an EMA's warmup needs an EMA
    if values["opt"] != "sgd" and "nesterov" not in given:
        values["nesterov"] = False
    if values["ema_decay"] is None and "ema_warmup" not in given:
        values["ema_warmup"] = False
    # a flag given that would do nothing
    if "momentum" in given and values["opt"] != "sgd":
        raise ValueError(f"--momentum is SGD's; --opt {values['opt']} uses its default betas (0.9, 0.999)")
    if "min_lr" in given and values["sched"] != "cosine":
        raise ValueError(f"--min-lr is where --sched cosine ends; this run's --sched is {values['sched']}")
    check(values, saved=saved)  # a bad value first, then a good one that would do nothing
    if "warmup_lr" in given and not values["warmup_epochs"] and not saved:
        raise ValueError("--warmup-lr is where a warmup starts; this run has --warmup-epochs 0 (no warmup): give "
                         "--warmup-epochs N too, or drop --warmup-lr")
    return values


def _defaults_text(row: Option) -> str:
    if row.name == "recipe":
        return "default report"
    text = ", ".join(f"{recipe} {row.show(row.default(recipe))}" for recipe in RECIPE_NAMES)
    return text + (f"; modern with --opt adamw {row.show(row.adamw)}" if row.adamw is not _SAME else "")


def add_training_options(p: argparse.ArgumentParser) -> None:
    """The recipe and the options it sets, as flags. Each defaults to None: the recipe decides, and a flag given
    overrides the recipe's value (`resolve`); config.json records the resolved values."""
    g = p.add_argument_group("training options (default: the --recipe's value; given, they override it)")
    for row in OPTIONS:
        kwargs = {"help": f"{row.help} ({_defaults_text(row)})", "default": None}
        if row.boolean:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update({k: v for k, v in (("type", row.parse), ("choices", row.choices), ("metavar", row.metavar),
                                             ("nargs", row.nargs)) if v is not None})
        g.add_argument(row.flag, **kwargs)


def _usage(row: Option) -> str:
    if row.boolean:
        return f"{row.flag}/--no-{row.flag[2:]}"
    if row.choices:
        return f"{row.flag} {'|'.join(row.choices)}"
    return f"{row.flag} {row.metavar}{' ...' if row.nargs else ''}" if row.metavar else row.flag


def markdown_table() -> str:
    """The README's table of training options (every row but --recipe, whose values are the columns)."""
    lines = ["| flag | `--recipe report` (default) | `--recipe modern` | meaning |", "|---|---|---|---|"]
    for row in OPTIONS:
        if row.name == "recipe":
            continue
        modern = row.show(row.modern) + (f" (AdamW: {row.show(row.adamw)})" if row.adamw is not _SAME else "")
        cells = (f"`{_usage(row)}`", row.show(row.report), modern, row.help)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
