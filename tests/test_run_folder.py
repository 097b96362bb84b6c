"""The run folder's one owner (train.engine.run_folder): every reader fails the same named way, every replacing
write is atomic, metrics.csv survives a resume and a crash, one summary layout, checkpoint versions read by name."""
import argparse
import json
import os
import pathlib
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.engine.config import Stage, TrainConfig
from train.engine.distributed import Dist
from train.engine.trainer import SCHEDULE_KEY as SCHEDULE, Trainer
from train.evaluation.compare import compare
from train.evaluation.evaluator import _summary, evaluate_run
from train.evaluation.predictor import load_predictor
from train.experiment.crossval import run_fold
from train.experiment.session import check_resume, mark_unfinished
from train.run import main
from tests.helpers import common

CONFIG = TrainConfig(model="resnet18", cache_dir="/nowhere", cache_key="0123456789abcdef", stages=(Stage(16, 2, 4),))


def _write_config(run_dir: Path, data) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / rf.CONFIG
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---------------------------------------------------------------- reading config.json


@pytest.mark.parametrize("make, phrases", [
    (lambda d: d / "nope", ["run folder", "does not exist", "printed last"]),
    (lambda d: (d / "a-file").write_text("x") and d / "a-file", ["run folder", "is not a folder"]),
    (lambda d: (d / rf.CV_PLAN).write_text("{}") and d,
     ["is a cross-validation folder (train.cv); pass one of its runs, e.g.", "fold-0"]),
    (lambda d: d, ["no config.json; is it a run folder made by python -m train.run?"]),
    (lambda d: (d / rf.LAST).write_bytes(b"x") and d, ["no config.json, though it holds last.pt", "start a new run"]),
    (lambda d: _write_config(d, "{half a file") and d, ["config.json: cannot be read", "damaged"]),
    (lambda d: _write_config(d, "[1, 2]") and d, ["config.json: not a run's config", "no `config` object"]),
    (lambda d: _write_config(d, {"config": {"model": "resnet18"}}) and d, ["config.json: not a run's config",
                                                                          "KeyError"]),
])
def test_every_way_config_json_cannot_be_read_is_one_named_error(tmp_path, make, phrases):
    run_dir = make(tmp_path)
    with pytest.raises(rf.RunFolderError) as err:
        rf.read_config(run_dir)
    assert isinstance(err.value, ValueError)
    for phrase in phrases:
        assert phrase in str(err.value), str(err.value)


def test_every_reader_of_config_json_raises_the_same_error(tmp_path):
    """evaluator, predictor, compare, crossval and session's resume used to fail three different ways."""
    run_dir = tmp_path / "run"
    _write_config(run_dir, "{half a file")
    (run_dir / rf.LAST).write_bytes(b"")
    rf.write_summary(run_dir, rf.summary_record(rf.COMPLETE, "resnet18", 1))
    rf.append_metrics(run_dir, {"epoch": 1})
    readers = {
        "evaluator": lambda: evaluate_run(run_dir),
        "predictor": lambda: load_predictor(run_dir),
        "compare": lambda: compare([run_dir], tmp_path / "c.png"),
        "session": lambda: check_resume(argparse.Namespace(resume=run_dir)),
    }
    for name, read in readers.items():
        with pytest.raises(rf.RunFolderError, match="config.json: cannot be read"):
            read()
    # crossval: a fold with last.pt (not finished) is continued from its config.json
    cv_dir = tmp_path / "cv"
    shutil.copytree(run_dir, rf.fold_dir(cv_dir, 0))
    rf.remove_summary(rf.fold_dir(cv_dir, 0))
    with pytest.raises(rf.RunFolderError, match="config.json: cannot be read"):
        run_fold({"folds": [{}]}, CONFIG, 0, cv_dir, Dist())


def test_a_config_written_and_read_back_is_the_run_s_config(tmp_path):
    rf.write_config(tmp_path, {"config": CONFIG.as_dict(), "preprocess": None})
    config, data = rf.read_config(tmp_path)
    assert config == CONFIG and "preprocess" in data


# ---------------------------------------------------------------- atomic writes


def _half_write_then_fail(monkeypatch):
    """Path.write_text writes half its text, then the disk is full."""
    original = pathlib.Path.write_text

    def half(self, text, *args, **kwargs):
        original(self, text[:len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_text", half)


def _killed(*args):
    raise KeyboardInterrupt  # stands for a kill: the write's own cleanup runs, nothing after it


@pytest.mark.parametrize("fail", ["mid-write", "before-rename"])
@pytest.mark.parametrize("write, path_of", [
    (lambda d: rf.write_config(d, {"config": {"model": "new"}}), lambda d: d / rf.CONFIG),
    (lambda d: rf.write_summary(d, rf.summary_record(rf.COMPLETE, "new", 3)), lambda d: d / rf.SUMMARY),
])
def test_a_write_that_fails_half_way_leaves_the_old_file_intact(tmp_path, monkeypatch, write, path_of, fail):
    path = path_of(tmp_path)
    path.write_text('{"old": true}\n')
    if fail == "mid-write":
        _half_write_then_fail(monkeypatch)
    else:  # killed after the temporary file was written, before it replaced the old one
        monkeypatch.setattr(os, "replace", _killed)
    with pytest.raises((OSError, KeyboardInterrupt)):
        write(tmp_path)
    monkeypatch.undo()
    assert path.read_text() == '{"old": true}\n'
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


# ---------------------------------------------------------------- summary.json


def test_a_failed_run_s_summary_has_the_complete_layout_s_keys(tmp_path):
    metrics = pd.DataFrame({"epoch": [1, 2], "epoch_s": [1.0, 2.0], "valid_acc": [0.5, 0.6]})
    state = {"epoch": 1, "stage": 0}
    report = {"accuracy": 0.6, "f1_weighted": 0.55}
    complete = _summary(metrics, CONFIG, state, {"valid": report, "test": report}, "best.pt", {}, {})
    mark_unfinished(tmp_path, "resnet18", RuntimeError("boom"), 1)
    failed = rf.read_summary(tmp_path)
    assert list(failed) == list(complete) == list(rf.SUMMARY_KEYS)
    assert failed["status"] == rf.FAILED and failed["error"] == "RuntimeError: boom" and failed["epochs_done"] == 1
    assert all(failed[k] is None for k in rf.SUMMARY_FIGURES)  # no figure a reader could take for a result
    assert complete["status"] == rf.COMPLETE and complete["error"] is None and complete["epochs_done"] == 2
    mark_unfinished(tmp_path, "resnet18", KeyboardInterrupt(), 1)
    assert rf.read_summary(tmp_path)["status"] == rf.INTERRUPTED


def test_reading_summary_json(tmp_path):
    assert rf.read_summary(tmp_path) is None  # not finished
    (tmp_path / rf.SUMMARY).write_text('{"model": "resnet18", "test_acc": 0.9}')
    assert rf.read_summary(tmp_path)["status"] == rf.COMPLETE  # written before `status` existed
    (tmp_path / rf.SUMMARY).write_text('{"status": "compl')
    with pytest.raises(rf.RunFolderError, match="summary.json: cannot be read .*python -m train.evaluate"):
        rf.read_summary(tmp_path)


# ---------------------------------------------------------------- metrics.csv


def _row(epoch: int) -> dict:
    return {name: epoch if name == "epoch" else 0.125 * epoch for name in rf.METRIC_COLUMNS}


def test_metrics_rows_are_appended_as_whole_lines_and_truncated_to_the_epochs_kept(tmp_path):
    for epoch in (1, 2, 3):
        rf.append_metrics(tmp_path, _row(epoch))
    path = tmp_path / rf.METRICS
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0] == ",".join(rf.METRIC_COLUMNS) + "\n" and len(lines) == 4  # one header
    rf.truncate_metrics(tmp_path, 2)
    assert path.read_text() == "".join(lines[:3])  # the rows kept, byte for byte
    assert rf.read_metrics(tmp_path)["epoch"].tolist() == [1, 2]
    # a row cut by a crash (no newline) is dropped, never read as an epoch with empty figures
    with open(path, "a") as f:
        f.write("3,1,16,0.0")
    rf.truncate_metrics(tmp_path, 3)
    assert rf.read_metrics(tmp_path)["epoch"].tolist() == [1, 2]
    rf.append_metrics(tmp_path, _row(3))
    assert rf.read_metrics(tmp_path)["epoch"].tolist() == [1, 2, 3]


def test_a_truncation_killed_before_its_rename_leaves_the_old_metrics(tmp_path, monkeypatch):
    for epoch in (1, 2, 3):
        rf.append_metrics(tmp_path, _row(epoch))
    before = (tmp_path / rf.METRICS).read_text()
    monkeypatch.setattr(os, "replace", _killed)
    with pytest.raises(KeyboardInterrupt):
        rf.truncate_metrics(tmp_path, 1)
    assert (tmp_path / rf.METRICS).read_text() == before and [p.name for p in tmp_path.iterdir()] == [rf.METRICS]


def test_a_cut_header_leaves_no_file_and_the_next_append_writes_a_new_one(tmp_path):
    (tmp_path / rf.METRICS).write_text("epoch,sta")
    rf.truncate_metrics(tmp_path, 5)
    assert not (tmp_path / rf.METRICS).exists()
    rf.append_metrics(tmp_path, _row(1))
    assert rf.read_metrics(tmp_path)["epoch"].tolist() == [1]


# ---------------------------------------------------------------- checkpoint versions


@pytest.mark.parametrize("version", [3, 99, "2", None, True])
def test_a_checkpoint_of_an_unknown_version_is_refused_by_name(tmp_path, version):
    path = tmp_path / "last.pt"
    torch.save({"version": version, "model": {}}, path)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(path)
    assert str(path) in str(err.value) and f"version {version!r}" in str(err.value)
    assert "start a new run" in str(err.value)


def test_a_checkpoint_without_a_version_is_version_1(tmp_path):
    torch.save({"model": {}}, tmp_path / "old.pt")
    assert ckpt.version_of(ckpt.load(tmp_path / "old.pt")) == 1


@pytest.fixture
def stopped_run(cache, tmp_path, capsys):  # noqa: F811 (fixture)
    """A run of 16:3 stopped after epoch 2 (last.pt at epoch 2)."""
    assert main(["resnet18", "--stages", "16:3", "--stop-after", "2", "--device", "cpu", "--no-progress",
                 *common(cache, tmp_path)]) == 0
    return Path(capsys.readouterr().out.strip().splitlines()[-1])


def test_resume_refuses_a_last_pt_of_an_unknown_version_by_name(stopped_run, capsys):
    last = ckpt.load(stopped_run / rf.LAST)
    torch.save({**last, "version": ckpt.CHECKPOINT_VERSION + 1}, stopped_run / rf.LAST)
    before = (stopped_run / rf.METRICS).read_bytes()
    assert main(["resnet18", "--resume", str(stopped_run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"last.pt: checkpoint format version {ckpt.CHECKPOINT_VERSION + 1}" in err
    assert (stopped_run / rf.METRICS).read_bytes() == before


def test_resume_takes_the_stage_s_best_weights_where_the_version_says(stopped_run):
    """Version 1: from best.pt, whatever last.pt holds; version 2: from last.pt's `best_model`, which it must hold."""
    folder = rf.RunFolder(stopped_run)
    config = rf.read_run_config(stopped_run)
    last = ckpt.load(folder.last)
    best = {**last, "epoch": 0, SCHEDULE: {**last[SCHEDULE], "epoch": 0, "best_epoch": 0},
            "model": {k: torch.zeros_like(v) for k, v in last["model"].items()}}
    torch.save(best, folder.best)  # best.pt: epoch 1 of the stage
    decoy = {k: torch.ones_like(v) for k, v in last["model"].items()}
    last = {**last, SCHEDULE: {**last[SCHEDULE], "best_epoch": 0}}
    torch.save({**last, "version": 1, "best_model": decoy}, folder.last)
    trainer = Trainer(config, stopped_run, progress=False)
    trainer.resume()
    assert all(torch.equal(v, best["model"][k]) for k, v in trainer.best_weights.items())
    torch.save({**last, "version": 2, "best_model": None}, folder.last)
    with pytest.raises(ckpt.CheckpointError, match="last.pt: a version 2 checkpoint without the stage's best "
                                                   "weights"):
        Trainer(config, stopped_run, progress=False).resume()


# ---------------------------------------------------------------- the evaluator's `all` column


def test_the_evaluator_finds_the_all_column_by_class_name(stopped_run, tmp_path):
    folder = rf.RunFolder(stopped_run)
    evaluate_run(stopped_run, ("test",), "cpu")
    plain = pd.read_csv(folder.predictions("test"))
    config, data = rf.read_config(stopped_run)
    swapped = tmp_path / "swapped-cache"
    shutil.copytree(config.cache_dir, swapped)
    manifest = json.loads((swapped / "manifest.json").read_text())
    manifest["classes"] = ["all", "hem"]  # the model's column 0 is `all` for this cache
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    data["config"]["cache_dir"] = str(swapped)
    rf.write_config(stopped_run, data)
    evaluate_run(stopped_run, ("test",), "cpu")
    flipped = pd.read_csv(folder.predictions("test"))
    assert flipped["prob_all"].to_numpy() == pytest.approx(1 - plain["prob_all"].to_numpy(), abs=2e-6)
