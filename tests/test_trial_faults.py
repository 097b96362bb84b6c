"""Faults a new user met in the second trial of the commands (issue 17's "try the commands again"), each with the
answer it now gets: a checkpoint that is not the run's own (typed as `./best.pt` in another run's folder, or linked
in from another run) is refused; a folder named like a checkpoint, a file torch will not load, a reports folder
passed as a run and a missing --pretrained are named; Ctrl-C ends evaluate, predict and explain with exit 130 and no
half-written file; the build command printed for a missing size builds into the run's own cache folder."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from models import ModelError, build_model
from pipeline.cache import main as cache_main
from tests.helpers import common
from train import evaluate as evaluate_cmd
from train import explain as explain_cmd
from train.compare import main as compare_main
from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.evaluation import evaluator
from train.evaluation.predictor import Predictor
from train.evaluation.run_checkpoint import checkpoint_name
from train.predict import main as predict_main
from train.run import main as run_main


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory) -> Path:
    """One tiny finished run (ResNet18, one epoch at 16 px, CPU) with best.pt, last.pt and its reports."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_main(["resnet18", "--stages", "16:1", "--device", "cpu", "--no-progress"]
                        + common(cache, tmp_path_factory.mktemp("runs"))) == 0
    return Path(out.getvalue().strip().splitlines()[-1])


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "cell.png"
    cv2.imwrite(str(path), np.full((64, 64, 3), 90, np.uint8))
    return path


def copy(run: Path, tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main_of(main, args, capsys, code) -> str:
    try:
        assert main([str(a) for a in args]) == code
    except KeyboardInterrupt:  # would end pytest's session rather than fail the test
        pytest.fail("Ctrl-C escaped the command as a traceback")
    return capsys.readouterr().err


# ----------------------------------------------------------------- the checkpoint named is the run's own, or refused


def test_dot_slash_checkpoint_typed_in_another_runs_folder_is_that_file_and_refused(tmp_path, monkeypatch):
    mine, other, elsewhere = (tmp_path / n for n in ("mine", "other", "elsewhere"))
    for folder in (mine, other):
        folder.mkdir()
        (folder / rf.CONFIG).write_text("{}")
        (folder / rf.BEST).write_bytes(b"weights")
    elsewhere.mkdir()
    monkeypatch.chdir(other)  # ./best.pt is other's best.pt: it used to be taken silently as mine's
    with pytest.raises(ckpt.CheckpointError, match=f"it belongs to the run folder {other}: pass that folder"):
        checkpoint_name(mine, "./best.pt")
    monkeypatch.chdir(mine)
    assert checkpoint_name(mine, "./best.pt") == rf.BEST
    monkeypatch.chdir(elsewhere)  # names nothing here: read relative to the run folder, as a plain name is
    assert checkpoint_name(mine, "./best.pt") == rf.BEST


def test_a_link_to_another_runs_checkpoint_is_refused_and_nothing_changes(run, image, tmp_path, capsys):
    mine, other = copy(run, tmp_path, "mine"), copy(run, tmp_path, "other")
    (mine / rf.BEST).unlink()
    (mine / rf.BEST).symlink_to(other / rf.BEST)
    (mine / "shared.pt").symlink_to(other / rf.LAST)
    before = files(mine)
    err = main_of(evaluate_cmd.main, [mine, "--split", "test", "--device", "cpu"], capsys, 2)
    assert f"{mine / rf.BEST} is a link to {other / rf.BEST}, outside the run folder" in err
    assert f"it belongs to the run folder {other}" in err
    err = main_of(predict_main, [mine, image, "--checkpoint", "shared.pt", "--out", tmp_path / "p.csv",
                                 "--device", "cpu"], capsys, 2)
    assert f"{mine / 'shared.pt'} is a link to {other / rf.LAST}, outside the run folder" in err
    assert files(mine) == before and not (tmp_path / "p.csv").exists()


def test_a_folder_named_like_a_checkpoint_and_an_empty_checkpoint_are_named(run, tmp_path, capsys):
    mine = copy(run, tmp_path, "mine")
    (mine / "old.pt").mkdir()
    err = main_of(evaluate_cmd.main, [mine, "--checkpoint", "old.pt", "--device", "cpu"], capsys, 2)
    assert f"{mine / 'old.pt'}: a folder, not a checkpoint file (the run folder has: best.pt, last.pt)" in err
    err = main_of(evaluate_cmd.main, [mine, "--checkpoint", "", "--device", "cpu"], capsys, 2)
    assert "--checkpoint is empty" in err


def test_a_file_torch_will_not_load_is_named_without_torchs_unsafe_advice(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"config": {}}))
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.load(path)
    with pytest.raises(ModelError) as caught_pretrained:
        build_model("resnet18", pretrained=path)
    for message in (str(caught.value), str(caught_pretrained.value)):
        assert "weights_only=True: Unsupported operand" in message
        assert "set to `False`" not in message and "file an issue" not in message and "https://" not in message


# ----------------------------------------------------------------- Ctrl-C: exit 130, no traceback, nothing half-written


def test_ctrl_c_during_evaluate_leaves_every_report_as_it_was(run, tmp_path, capsys, monkeypatch):
    mine = copy(run, tmp_path, "mine")
    before = files(mine)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluator, "plot_confusion", interrupted)  # Ctrl-C while the reports are being written
    err = main_of(evaluate_cmd.main, [mine, "--device", "cpu"], capsys, 130)
    assert "interrupted; no report was half-written" in err
    assert files(mine) == before


def test_ctrl_c_during_predict_and_explain_exits_130_and_writes_nothing(run, image, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Predictor, "probs_all", interrupted)
    err = main_of(predict_main, [run, image, "--out", tmp_path / "p.csv", "--device", "cpu"], capsys, 130)
    assert "interrupted; nothing was written" in err and list(tmp_path.glob("p*")) == []
    monkeypatch.setattr(explain_cmd, "draw_explanation", interrupted)
    err = main_of(explain_cmd.main, [run, "--split", "test", "--n", "1", "--out", tmp_path / "x.png",
                                     "--device", "cpu"], capsys, 130)
    assert "interrupted; nothing was written" in err and list(tmp_path.glob("x*")) == []


# ----------------------------------------------------------------- clearer answers


def test_explain_does_not_suggest_a_flag_it_lacks(run, tmp_path, capsys):
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.full((1, 1, 3), 90, np.uint8))
    err = main_of(explain_cmd.main, [run, tiny, "--out", tmp_path / "x.png", "--device", "cpu"], capsys, 2)
    assert "tiny.png: image of 1x1 px is too small" in err and "leave it out of the INPUTs" in err
    assert "--on-error" not in err


def test_a_reports_folder_passed_as_a_run_names_its_run(run, image, tmp_path, capsys):
    mine = copy(run, tmp_path, "mine")
    reports = mine / "eval-last"  # what train.evaluate --checkpoint last.pt makes, and prints last
    reports.mkdir()
    shutil.copy(mine / rf.SUMMARY, reports / rf.SUMMARY)
    hint = f"{reports} holds the reports of last.pt of the run folder {mine}"
    err = main_of(evaluate_cmd.main, [reports, "--device", "cpu"], capsys, 2)
    assert hint in err and f"pass {mine} with --checkpoint last.pt" in err
    err = main_of(predict_main, [reports, image, "--out", tmp_path / "p.csv", "--device", "cpu"], capsys, 2)
    assert hint in err
    err = main_of(compare_main, [reports, "--out", tmp_path / "c.png"], capsys, 2)
    assert hint in err and "--checkpoint" not in err.split("not a run folder")[1]
    err = main_of(compare_main, [tmp_path / "gone", "--out", tmp_path / "c.png"], capsys, 2)
    assert f"{tmp_path / 'gone'}: no such folder" in err


def test_a_missing_size_names_the_build_command_of_that_very_cache(cache, tmp_path, capsys):
    err = main_of(run_main, ["resnet18", "--stages", "20:1", "--device", "cpu"] + common(cache, tmp_path / "runs"),
                  capsys, 2)
    # without --cache-dir the printed command built a second cache under ./cache, and the run still lacked the size
    assert f"--cache-dir {cache.parent} --sizes 20" in err
    assert not (tmp_path / "runs").exists()


def test_a_bad_pretrained_file_is_named_before_a_run_folder_is_made(cache, tmp_path, capsys):
    not_weights = tmp_path / "weights.json"
    not_weights.write_text("{}")
    for given, phrase in ((tmp_path / "none.pt", "no such file"), (not_weights, "not a loadable weights file")):
        err = main_of(run_main, ["resnet18", "--stages", "16:1", "--device", "cpu", "--pretrained", given]
                      + common(cache, tmp_path / "runs"), capsys, 2)
        assert f"--pretrained {given}: {phrase}" in err
        assert not list((tmp_path / "runs").glob("*")), "a run folder with a failed summary was left behind"


def test_cache_verify_takes_a_key_as_rm_does(cache, capsys):
    assert cache_main(["verify", cache.name, "--cache-dir", str(cache.parent)]) == 0
    assert f"ok: every shard of {cache}" in capsys.readouterr().out


def test_a_predictions_file_that_cannot_be_put_in_place_takes_its_companions_back(tmp_path):
    import pandas as pd
    from train.evaluation.predictor import PredictError, write_outputs
    table = pd.DataFrame({"patient": ["H1"], "cells": [1]})
    (tmp_path / "p.csv").mkdir()  # appeared while predicting: the predictions CSV cannot go there
    with pytest.raises(PredictError, match="appeared while predicting"):
        write_outputs([(tmp_path / "p_patients.csv", table), (tmp_path / "p.csv", table)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv"]  # no companion left, no temporary file
