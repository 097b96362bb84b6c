"""Every fault a clear answer, on the training/resume and compare/preview side: a run folder whose config.json was
edited, deleted or whose last.pt is cut short; options that cannot do what they say (a warmup longer than a stage, a
drop after the last epoch, a warmup starting above the lr); a finished run resumed; figures that would replace a
file, land in a missing folder or take a name matplotlib changes; a preview asked for more cells than there are."""
import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.helpers import common, patient_folders
from train.augment import preview as preview_module
from train.compare import main as compare_main
from train.cv import main as cv_main
from train.engine import checkpoint as ckpt
from train.engine import options
from train.engine import run_folder as rf
from train.engine.config import Stage, TrainConfig
from train.experiment.session import parse_args, resolve_config
from train.preview import main as preview_main
from train.run import main

RUN = ["resnet18", "--device", "cpu", "--no-progress"]


def _only_run(out: Path) -> Path:
    (run_dir,) = out.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def stopped(cache, tmp_path_factory) -> Path:
    """A run of 16:2 stopped after epoch 1: config.json, last.pt, best.pt (epoch 1), one metrics row."""
    out = tmp_path_factory.mktemp("stopped")
    assert main([*RUN, "--stages", "16:2", "--stop-after", "1", *common(cache, out)]) == 0
    return _only_run(out)


@pytest.fixture(scope="module")
def finished(cache, tmp_path_factory) -> Path:
    """A run of 16:1, trained and evaluated (summary.json: complete)."""
    out = tmp_path_factory.mktemp("finished")
    assert main([*RUN, "--stages", "16:1", *common(cache, out)]) == 0
    return _only_run(out)


@pytest.fixture
def stopped_copy(stopped, tmp_path) -> Path:
    return Path(shutil.copytree(stopped, tmp_path / stopped.name))


def _resume(run_dir: Path, *flags) -> int:
    return main(["resnet18", "--resume", str(run_dir), "--no-progress", *flags])


# ---------------------------------------------------------------- resume: what the run folder holds

def test_a_config_json_edited_after_training_is_refused_by_field(stopped_copy, capsys):
    path = stopped_copy / rf.CONFIG
    data = json.loads(path.read_text())
    data["config"]["lr"] = 0.5
    data["config"]["stages"][0]["epochs"] = 3
    path.write_text(json.dumps(data))
    last, metrics = (stopped_copy / rf.LAST).read_bytes(), (stopped_copy / rf.METRICS).read_text()
    assert _resume(stopped_copy) == 2  # it used to train the edited epochs at the saved lr, exit 0
    err = capsys.readouterr().err
    assert "config.json does not say what last.pt was trained with" in err
    assert "lr 0.5 (last.pt: 0.005)" in err and "stages 16:3:4 (last.pt: 16:2:4)" in err
    assert "restore config.json" in err and "start a new run" in err
    assert (stopped_copy / rf.LAST).read_bytes() == last and (stopped_copy / rf.METRICS).read_text() == metrics


def test_only_where_the_cache_lies_may_differ_from_last_pt():
    from train.experiment import resume
    trained = TrainConfig(model="resnet18", cache_dir="/old/cache", cache_key="k", stages=(Stage(16, 2, 4),))
    moved = TrainConfig(model="resnet18", cache_dir="/new/cache", cache_key="k", stages=(Stage(16, 2, 4),))
    assert resume.differences(moved, trained) == []  # a moved cache is followed by editing cache_dir
    other = TrainConfig(model="resnet18", cache_dir="/old/cache", cache_key="k2", stages=(Stage(16, 2, 4),), seed=3)
    assert resume.differences(other, trained) == ['cache_key "k2" (last.pt: "k")', "seed 3 (last.pt: 0)"]


def test_a_deleted_config_json_is_restored_from_last_pt_and_the_run_goes_on(stopped_copy, caplog, capsys):
    (stopped_copy / rf.CONFIG).unlink()
    with caplog.at_level(logging.WARNING):
        assert _resume(stopped_copy) == 0  # it used to say "is it a run folder?" or "restore it from a copy"
    assert "had no config.json: restored it from last.pt (epoch 1)" in caplog.text
    data = json.loads((stopped_copy / rf.CONFIG).read_text())
    assert data["config"] == ckpt.load(stopped_copy / rf.LAST)["config"]
    assert data["restored"]["from"] == rf.LAST and data["preprocess"]["cache_key"] == data["config"]["cache_key"]
    assert len(pd.read_csv(stopped_copy / rf.METRICS)) == 2
    assert rf.read_summary(stopped_copy)["status"] == rf.COMPLETE


def test_a_damaged_config_json_beside_a_good_last_pt_says_how_to_restore_it(stopped_copy, capsys):
    (stopped_copy / rf.CONFIG).write_text("{half a file")
    assert _resume(stopped_copy) == 2
    err = capsys.readouterr().err
    assert "config.json: cannot be read" in err
    assert "last.pt carries the settings it was trained with: delete config.json and --resume writes it again" in err


def test_a_cut_last_pt_says_that_best_pt_holds_and_how_to_go_on_from_it(stopped_copy, capsys):
    last = stopped_copy / rf.LAST
    last.write_bytes(last.read_bytes()[:100_000])
    assert _resume(stopped_copy) == 2
    err = capsys.readouterr().err
    assert "last.pt cannot be loaded (" in err and "best.pt is intact: epoch 1 of 2 (16 px" in err
    command = f"mv {last} {last}.damaged && cp {stopped_copy / rf.BEST} {last}"
    assert command in err
    # the command given works: the run goes on from best.pt's epoch
    last.rename(f"{last}.damaged")
    shutil.copy(stopped_copy / rf.BEST, last)
    assert _resume(stopped_copy) == 0
    assert list(pd.read_csv(stopped_copy / rf.METRICS)["epoch"]) == [1, 2]


def test_a_cut_last_pt_without_a_usable_best_pt_says_start_a_new_run(stopped_copy, capsys):
    (stopped_copy / rf.LAST).write_bytes(b"PK\x03\x04 cut")
    (stopped_copy / rf.BEST).write_bytes(b"")
    assert _resume(stopped_copy) == 2
    err = capsys.readouterr().err
    assert "best.pt cannot be loaded either" in err and "nothing in" in err and "start a new run" in err


def test_a_finished_run_is_not_resumed_and_a_past_stop_after_is_refused(finished, stopped_copy, tmp_path, capsys):
    done = Path(shutil.copytree(finished, tmp_path / "done"))
    summary = (done / rf.SUMMARY).read_text()
    assert _resume(done) == 2  # it used to evaluate the run again and exit 0
    err = capsys.readouterr().err
    assert "has finished: its 1 epoch trained and evaluated" in err and f"python -m train.evaluate {done}" in err
    assert (done / rf.SUMMARY).read_text() == summary
    last = (stopped_copy / rf.LAST).read_bytes()
    assert _resume(stopped_copy, "--stop-after", "1") == 2  # it used to train epoch 2 without a word
    err = capsys.readouterr().err
    assert "--stop-after 1: " in err and "has already finished epoch 1 (last.pt)" in err and "up to 2" in err
    assert (stopped_copy / rf.LAST).read_bytes() == last and len(pd.read_csv(stopped_copy / rf.METRICS)) == 1


def test_resume_of_a_file_or_a_missing_folder_names_it(tmp_path, capsys):
    (tmp_path / "a-file").write_text("not a run")
    assert _resume(tmp_path / "a-file") == 2
    assert "is not a folder" in capsys.readouterr().err
    assert _resume(tmp_path / "nothing") == 2
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- options that cannot do what they say

@pytest.mark.parametrize("flags, message", [
    (["--stages", "16:2", "--warmup-epochs", "5"],
     "--warmup-epochs 5 is longer than stage 1 (16 px, 2 epochs): every stage restarts the warmup"),
    (["--stages", "16:3", "24:1", "--recipe", "modern", "--warmup-epochs", "2"],
     "--warmup-epochs 2 is longer than stage 2 (24 px, 1 epoch): every stage restarts the warmup, so that stage would "
     "end before its lr reached --lr 0.005; give --warmup-epochs 1 or less, or longer stages"),
    (["--stages", "16:2", "--lr-drop", "5"], "--lr-drop 5 is after the run's last epoch (2): the drop would never"),
    (["--stages", "16:2", "--warmup-epochs", "1", "--warmup-lr", "1.0"],
     "--warmup-lr 1 is above --lr 0.005: a warmup rises from --warmup-lr to the lr"),
    (["--stages", "16:2", "--warmup-lr", "0.001"], "--warmup-lr is where a warmup starts; this run has --warmup-ep"),
])
def test_options_that_would_do_nothing_or_the_opposite_are_refused_by_flag(cache, tmp_path, capsys, flags, message):
    assert main([*RUN, *common(cache, tmp_path), *flags]) == 2  # each used to be accepted without a word
    assert message in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_plateau_no_stage_is_long_enough_for_is_warned_about_once(cache, caplog):
    args = parse_args(["resnet18", "--stages", "16:2", "--lr-drop", "plateau:2", "--cache", str(cache), "--device",
                       "cpu"])
    options._warned.clear()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert resolve_config(args)[0].lr_drop_patience == 2  # kept: a trial may keep a longer recipe's flags
    assert [r.getMessage() for r in caplog.records] == [  # it used to say nothing
        "--lr-drop plateau:2 can never fire: the plateau counter restarts with every stage and the longest stage has "
        "2 epochs, so at most 1 without a better valid accuracy: the run trains without it (to use it: plateau:1 or "
        "less)"]


def test_the_modern_recipe_still_fits_one_epoch_stages(cache):
    config, _ = resolve_config(parse_args(["resnet18", "--stages", "16:1", "24:1", "--recipe", "modern",
                                           "--cache", str(cache), "--device", "cpu"]))
    assert config.warmup_epochs == 1  # a warmup as long as the stage is allowed


def test_a_run_saved_before_these_checks_still_resumes_with_one_warning(stopped_copy, caplog):
    """A run trained with a drop after its last epoch (accepted then): config.json and last.pt both say so."""
    path = stopped_copy / rf.CONFIG
    data = json.loads(path.read_text())
    data["config"]["lr_drop_epochs"] = [9]
    path.write_text(json.dumps(data))
    last = ckpt.load(stopped_copy / rf.LAST)
    last["config"]["lr_drop_epochs"] = [9]
    torch.save(last, stopped_copy / rf.LAST)
    options._warned.clear()
    with caplog.at_level(logging.WARNING):
        assert _resume(stopped_copy) == 0
    warnings = [r.getMessage() for r in caplog.records if "--lr-drop 9 is after the run's last epoch" in r.getMessage()]
    assert len(warnings) == 1 and "keeps it" in warnings[0]  # once, however often config.json is read


def test_a_saved_cross_validation_plan_is_checked_as_a_config_json(cache):
    args = parse_args(["resnet18", "--stages", "16:2", "--warmup-epochs", "5", "--cache", str(cache), "--device",
                       "cpu"])
    with pytest.raises(ValueError, match="--warmup-epochs 5 is longer"):
        resolve_config(args)
    assert resolve_config(args, saved=True)[0].warmup_epochs == 5


# ---------------------------------------------------------------- train.cv --resume

def test_cv_resume_of_what_is_no_cv_folder_or_a_finished_one(stopped, tmp_path, capsys):
    assert cv_main(["resnet18", "--resume", str(stopped)]) == 2
    assert f"is a run folder (train.run), not a cross-validation folder; continue it with python -m train.run " \
           f"MODEL --resume {stopped}" in capsys.readouterr().err
    damaged = tmp_path / "cv-damaged"
    damaged.mkdir()
    (damaged / rf.CV_PLAN).write_text("[]")
    assert cv_main(["resnet18", "--resume", str(damaged)]) == 2  # it used to stop on a TypeError traceback
    assert "cv.json: not a plan of python -m train.cv (model, argv missing" in capsys.readouterr().err
    done = tmp_path / "cv-done"
    done.mkdir()
    (done / rf.CV_PLAN).write_text(json.dumps({"model": "resnet18", "argv": ["resnet18", "--folds", "2"]}))
    (done / rf.CV_SUMMARY).write_text("{}")
    assert cv_main(["resnet18", "--resume", str(done)]) == 2
    assert "has finished: every fold trained and evaluated" in capsys.readouterr().err


def test_a_cv_fold_with_an_edited_config_json_is_refused_as_a_run_is(stopped, tmp_path):
    from train.engine.distributed import Dist
    from train.experiment.crossval import run_fold
    fold = Path(shutil.copytree(stopped, rf.fold_dir(tmp_path / "cv", 0)))
    data = json.loads((fold / rf.CONFIG).read_text())
    data["config"]["seed"] = 7
    (fold / rf.CONFIG).write_text(json.dumps(data))
    with pytest.raises(rf.RunFolderError, match=r"seed 7 \(last.pt: 0\)"):  # it used to resume with seed 7
        run_fold({"folds": [{}]}, None, 0, tmp_path / "cv", Dist())


# ---------------------------------------------------------------- train.compare

def test_compare_never_replaces_a_figure_unless_told(finished, tmp_path, capsys):
    out = tmp_path / "c.png"
    out.write_bytes(b"an earlier figure")
    assert compare_main([str(finished), "--out", str(out)]) == 2  # it used to replace it silently
    err = capsys.readouterr().err
    assert f"--out {out} already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"an earlier figure"
    assert compare_main([str(finished), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert not list(tmp_path.glob(".*tmp*"))


def test_compare_out_in_a_missing_folder_a_folder_or_without_a_figure_type(finished, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "c.png"
    assert compare_main([str(finished), "--out", str(missing)]) == 2  # it used to say [Errno 2] only
    assert f"folder {missing.parent} does not exist; create it (mkdir -p {missing.parent})" in \
        capsys.readouterr().err
    assert compare_main([str(finished), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    bare = tmp_path / "figure"
    assert compare_main([str(finished), "--out", str(bare)]) == 2  # it used to write figure.png and print figure
    assert "no file type" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_compare_says_when_a_run_is_given_twice_or_has_no_curve(finished, tmp_path, capsys):
    assert compare_main([str(finished), str(finished), "--out", str(tmp_path / "twice.png")]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("| resnet18 (report) |") == 2  # a row per argument, as before
    assert f"{finished.resolve()} is given 2 times" in captured.err
    emptied = Path(shutil.copytree(finished, tmp_path / "emptied", ignore=shutil.ignore_patterns("*.pt")))
    (emptied / rf.METRICS).write_text("")
    assert compare_main([str(emptied), "--out", str(tmp_path / "empty.png")]) == 0
    assert "metrics.csv holds no epochs" in capsys.readouterr().err  # it used to draw no curve without a word


def test_compare_names_a_damaged_cv_summary(tmp_path, capsys):
    cv_dir = tmp_path / "cv"
    cv_dir.mkdir()
    (cv_dir / rf.CV_PLAN).write_text("{}")
    (cv_dir / rf.CV_SUMMARY).write_text('{"model": "resnet18"}')
    assert compare_main([str(cv_dir), "--out", str(tmp_path / "c.png")]) == 2  # it used to stop on a KeyError
    assert f"{cv_dir / rf.CV_SUMMARY}: not a cross-validation summary" in capsys.readouterr().err


# ---------------------------------------------------------------- train.preview

@pytest.fixture
def source(tmp_path) -> Path:
    return patient_folders(tmp_path / "src", all_images=3, hem_images=3, side=64)


def test_preview_caps_n_to_the_cells_there_are_in_one_line_with_progress(source, tmp_path, caplog, capsys):
    with caplog.at_level(logging.INFO):
        assert preview_main(["--source", str(source), "--n", "10000", "--size", "16", "--out",
                             str(tmp_path / "p.png"), "--progress", "on"]) == 0  # --progress used to be unknown
    caps = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    cells = len(list(source.rglob("*.bmp")))
    assert caps == [f"--n 10000: there are {cells} labelled cells; showing {cells}"]
    err = capsys.readouterr().err
    assert "cells: 100%" in err and f"{cells}/{cells}" in err and "drawing" in err


def test_preview_caps_rows_to_what_one_png_holds(caplog):
    cells = pd.DataFrame({"label": [0, 1] * 400})
    MAX_ROWS = preview_module.MAX_ROWS
    with caplog.at_level(logging.WARNING):
        assert preview_module.rows_shown(500, cells) == MAX_ROWS
    assert f"one PNG holds at most {MAX_ROWS} rows" in caplog.text
    assert MAX_ROWS * 2.2 + 0.3 < 2**16 / 100 < (MAX_ROWS + 1) * 2.2 + 0.3  # the rows that fit under 2**16 px


def test_preview_never_replaces_its_out_unless_told(source, tmp_path, capsys):
    out = tmp_path / "p.png"
    out.write_bytes(b"an earlier preview")
    args = ["--source", str(source), "--n", "2", "--size", "16", "--out", str(out)]
    assert preview_main(args) == 2  # it used to replace it
    assert "already exists" in capsys.readouterr().err and out.read_bytes() == b"an earlier preview"
    assert preview_main([*args, "--overwrite"]) == 0 and out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n must be >= 1 (the cells shown, one row each), got 0"),
    (["--seed", "-1"], "--seed must be an integer in [0, 2**32), got -1"),  # it used to say "Seed must be ..."
    (["--size", "100000"], "--size must be a size in px from 1 to 4096, got 100000"),  # it used to name --sizes
])
def test_preview_names_the_flag_of_a_bad_number(source, tmp_path, capsys, flags, message):
    assert preview_main(["--source", str(source), "--out", str(tmp_path / "p.png"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "p.png").exists()
