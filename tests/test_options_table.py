"""The table of training options and what comes from it: the flags, the one check (flags and config.json alike),
the recipe's resolution, the README's table; and --resume, which goes by the flags typed, not by their defaults.
No training: configs are built by hand and compared with what the parser gives."""
import json
from pathlib import Path

import pytest

from train.engine import options
from train.engine.config import Stage, TrainConfig
from train.engine.options import OPTION, OPTIONS, RECIPES
from train.experiment import crossval, session
from train.experiment.session import parse_args, resume_conflicts

README = Path(__file__).resolve().parents[1] / "README.md"


def saved_run(**fields) -> TrainConfig:
    """A run's saved config, as check_resume reads it: batch 16, one stage, the report's recipe unless told."""
    return TrainConfig(model="resnet18", cache_dir="unused", cache_key="unused", stages=(Stage(16, 2, 16),),
                       saved=True, **fields)


def conflicts(*flags, config=None) -> list[str]:
    return resume_conflicts(parse_args(["resnet18", *flags, "--resume", "RUN"]), config or saved_run())


# ---------------------------------------------------------------- the table and what it makes

def test_the_readme_holds_exactly_the_tables_rendering():
    table = "\n".join("  " + line for line in options.markdown_table().splitlines())  # inside a list item
    assert table in README.read_text(), "regenerate the README's table from train.engine.options.markdown_table()"
    rows = options.markdown_table().splitlines()[2:]
    assert len(rows) == len(OPTIONS) - 1  # every option but --recipe, whose values are the columns
    assert "| `--weight-decay` | 0 | 5e-4 (AdamW: 0.05) |" in options.markdown_table()
    assert "| `--ema-decay DECAY\\|off` | off | 0.998 |" in options.markdown_table()  # a pipe escaped in a cell


def test_every_training_flag_comes_from_a_row():
    parser = session.build_parser()
    group = next(g for g in parser._action_groups if g.title.startswith("training options"))
    assert [a.option_strings[0] for a in group._group_actions] == [row.flag for row in OPTIONS]
    for action, row in zip(group._group_actions, OPTIONS):
        assert action.default is None and row.help in action.help  # the recipe decides what is not given
        for recipe in options.RECIPE_NAMES if row.name != "recipe" else ():
            assert f"{recipe} {row.show(row.default(recipe))}" in action.help, row.flag


def test_the_recipes_come_from_the_rows_and_the_report_recipe_is_trainconfigs_defaults():
    assert RECIPES["modern"]["weight_decay"] == 5e-4 and RECIPES["report"]["ema_decay"] is None
    assert options.MODERN_ADAMW == {"lr": 0.001, "weight_decay": 0.05}
    assert set(RECIPES["report"]) == {row.name for row in OPTIONS} - {"recipe", "lr_drop"}
    fields = TrainConfig.__dataclass_fields__
    for name, value in RECIPES["report"].items():
        assert fields[name].default == (None if name == "sched" else value), name  # sched None: from the drops


@pytest.mark.parametrize("name, bad", [("lr", -1.0), ("lr", float("nan")), ("momentum", 1.0), ("weight_decay", -1.0),
                                       ("label_smoothing", 1.0), ("warmup_epochs", -1), ("warmup_lr", float("inf")),
                                       ("ema_decay", 1.0), ("min_lr", -1.0), ("opt", "lamb"), ("sched", "linear")])
def test_flags_and_a_config_json_meet_the_same_check(name, bad):
    cosine = {"sched": "cosine"} if name == "min_lr" else {}  # --min-lr is cosine's
    with pytest.raises(ValueError) as from_flags:
        options.resolve({name: bad, **cosine})
    with pytest.raises(ValueError) as from_config:
        saved_run(**{name: bad, **cosine})
    assert str(from_flags.value) == str(from_config.value)
    assert str(from_flags.value).startswith(OPTION[name].flag)


def test_a_config_json_with_impossible_lr_drops_or_text_for_a_number_names_the_flag():
    with pytest.raises(ValueError, match=r"--lr-drop must be epochs >= 1 .*got 0 plateau:0"):
        saved_run(lr_drop_epochs=(0,), lr_drop_patience=0)
    with pytest.raises(ValueError, match="--weight-decay must be a finite number >= 0, got high"):
        saved_run(weight_decay="high")


def test_resolution_the_recipe_then_the_flags_given_then_what_they_make_meaningless():
    assert options.resolve({}) == {**RECIPES["report"], "recipe": "report", "lr_drop_epochs": (),
                                   "lr_drop_patience": None}
    modern = options.resolve({"recipe": "modern", "weight_decay": 0.0, "ema_decay": None})
    assert (modern["weight_decay"], modern["ema_decay"], modern["ema_warmup"]) == (0.0, None, False)
    adamw = options.resolve({"recipe": "modern", "opt": "adamw"})
    assert (adamw["lr"], adamw["weight_decay"], adamw["nesterov"]) == (0.001, 0.05, False)
    assert options.resolve({"recipe": "modern", "lr_drop": ["3"]})["sched"] == "step"  # the drops name it
    with pytest.raises(ValueError, match="--ema-warmup needs an EMA"):  # given, not the recipe's: refused
        options.resolve({"recipe": "modern", "ema_decay": None, "ema_warmup": True})


# ---------------------------------------------------------------- given, not default

def test_the_parser_records_the_flags_typed_whatever_their_value():
    given = parse_args(["resnet18", "--batch-size", "64", "--lr=0.005", "--no-progress", "--ema-decay", "off"]).given
    assert given == {"model": "resnet18", "batch_size": 64, "lr": 0.005, "progress": "off", "ema_decay": None}
    assert parse_args(["resnet18", "--batch", "64"]).given["batch_size"] == 64  # argparse's abbreviation too
    assert parse_args(["resnet18"]).given == {"model": "resnet18"}


def test_every_train_run_flag_has_a_resume_rule():
    dests = set(vars(parse_args(["resnet18"]))) - {"given"}
    ruled = {"model", "resume", *session.RESUME_MAY_CHANGE, *session.COMPARED_ON_RESUME, *session.NOT_ON_RESUME}
    assert dests <= ruled, f"say what --resume does with {sorted(dests - ruled)}"


def test_resume_refuses_a_flag_given_with_its_default_when_the_run_saved_another_value():
    assert conflicts("--batch-size", "64") == ["--batch-size 64 (the run keeps 16)"]  # 64 is the default
    assert conflicts("--seed", "0", config=saved_run(seed=3)) == ["--seed 0 (the run keeps 3)"]
    assert conflicts("--recipe", "report", config=saved_run(recipe="modern", nesterov=True)) == \
        ["--recipe report (the run keeps modern)"]
    assert conflicts("--sched", "step", config=saved_run(sched="cosine")) == ["--sched step (the run keeps cosine)"]
    assert conflicts("--device", "auto", config=saved_run(device="cuda:3")) == \
        ["--device auto (the run keeps cuda:3)"]
    assert conflicts("--lr-drop", "4", config=saved_run(lr_drop_epochs=(2,), lr_drop_patience=5)) == \
        ["--lr-drop 4 (the run keeps 2 plateau:5)"]
    assert conflicts("--no-amp", config=saved_run(amp=True)) == ["--no-amp (the run keeps on)"]
    assert conflicts("--epochs", "2", "--batch-size", "8") == ["--epochs 2 (the run keeps 16:2:16)"]


def test_resume_accepts_the_saved_values_and_what_changes_nothing_trained():
    assert conflicts("--batch-size", "16", "--seed", "0", "--lr", "0.005", "--recipe", "report", "--sched", "step",
                     "--ema-decay", "off", "--no-nesterov", "--device", "cpu", "--stem", "standard", "--no-amp",
                     "--stages", "16:2", "--batch-size", "16", "--stop-after", "1", "--no-progress") == []
    assert conflicts("--epochs", "2", "--batch-size", "16") == []
    assert conflicts("--stages", "16:2:16") == []


def test_resume_refuses_flags_that_cannot_apply_to_a_resumed_run():
    found = conflicts("--out", "runs", "--cache-root", "cache", "--force", "--cache", "x")
    assert [c.split(" (")[0] for c in found] == ["--cache", "--cache-root", "--out", "--force"]


def test_train_cv_resume_refuses_every_flag_but_the_progress(tmp_path):
    argv = ["resnet18", "--folds", "3", "--stages", "16:2", "--batch-size", "16"]
    (tmp_path / crossval.PLAN).write_text(json.dumps({"model": "resnet18", "argv": argv}))

    def resume(*flags):
        flags = ["resnet18", "--resume", str(tmp_path), *flags]
        return crossval.resume_plan(crossval.build_parser().parse_args(flags), flags)
    plan, saved = resume("--no-progress")
    assert saved.progress == "off" and saved.batch_size == 16 and saved.given["folds"] == "3"
    for flags, named in [(["--batch-size", "16"], "drop --batch-size"), (["--lr=0.005"], "drop --lr"),
                         (["--folds", "3"], "drop --folds"), (["--stop-after", "1"], "--stop-after stops one run")]:
        with pytest.raises(session.RunError, match=named):
            resume(*flags)
