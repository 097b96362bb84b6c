"""Nothing lost, nothing silently wrong, on the training side: kills at any moment, numbers that are not numbers,
a diverging loss, resume flags, failed runs, unusable caches, an unwritable --out."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from train.engine import checkpoint as ckpt
from train.compare import main as compare_main
from train.experiment.session import find_cache
from train.run import main
from tests.helpers import ROOT, common

STAGES = ["--stages", "16:3", "24:2", "--seed", "1"]
RESULT_KEYS = ("best_valid_acc", "test_acc", "test_f1_weighted", "checkpoint_epoch", "checkpoint_size", "epochs")
TRAINING_COLUMNS = ["epoch", "stage", "size", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc"]


def _train(cache, out: Path, extra=(), env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.run", "resnet18", *STAGES, "--device", "cpu", "--no-progress",
           *common(cache, out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _resume(run_dir: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.run", "resnet18", "--resume", str(run_dir), "--no-progress"]
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)


def _result(run_dir: Path):
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = pd.read_csv(run_dir / "metrics.csv")[TRAINING_COLUMNS]
    best = ckpt.load(run_dir / "best.pt")
    return {k: summary[k] for k in RESULT_KEYS}, metrics, best


@pytest.fixture(scope="module")
def reference(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = _train(cache, out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return _result(Path(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [
    "best.pt@1",  # best.pt written, last.pt not yet: best.pt one epoch ahead
    "last.pt.tmp@2",  # mid-write: a leftover last.pt.tmp
    "best.pt@4",  # the first epoch of the 24 px stage: best.pt of the new stage, last.pt of the old
    "last.pt@3",  # the end of the first stage, both written
    "last.pt@4",  # both written for the stage's first epoch (the old order wrote last.pt, then best.pt)
])
def test_a_run_killed_at_any_moment_resumes_to_the_same_result(cache, tmp_path, reference, kill_at):
    proc = _train(cache, tmp_path, env_extra={ckpt.KILL_AT_ENV: kill_at})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    assert not (run_dir / "summary.json").exists()  # a killed run leaves no result
    if kill_at == "best.pt@1":  # nothing to resume from: the first last.pt was never written
        assert not (run_dir / "last.pt").exists()
        return
    resumed = _resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(run_dir.glob("*.tmp"))
    summary, metrics, best = _result(run_dir)
    ref_summary, ref_metrics, ref_best = reference
    assert summary == ref_summary
    pd.testing.assert_frame_equal(metrics, ref_metrics)
    assert best["epoch"] == ref_best["epoch"]
    for k, v in ref_best["model"].items():
        assert torch.equal(v, best["model"][k]), k


@pytest.mark.slow
def test_a_kill_right_after_an_epoch_log_line_resumes_to_the_same_result(cache, tmp_path, reference):
    cmd = [sys.executable, "-m", "train.run", "resnet18", *STAGES, "--device", "cpu", "--no-progress",
           *common(cache, tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the trainer logs one line per epoch, right after submitting its checkpoints
        if "epoch 2/5" in line:
            proc.kill()
            break
    proc.wait(timeout=60)
    (run_dir,) = tmp_path.iterdir()
    resumed = _resume(run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary, metrics, _ = _result(run_dir)
    assert summary == reference[0]
    pd.testing.assert_frame_equal(metrics, reference[1])


def test_a_missing_best_pt_is_rewritten_from_last_pt(cache, tmp_path, capsys):
    assert main(["resnet18", *STAGES, "--device", "cpu", "--no-progress", "--stop-after", "2",
                 *common(cache, tmp_path)]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    best_epoch = ckpt.load(run_dir / "last.pt")["progress"]["best_epoch"]
    (run_dir / "best.pt").unlink()
    (run_dir / "last.pt.tmp").write_bytes(b"half a checkpoint")
    # one more epoch: resuming a run that has already finished its --stop-after epoch is refused
    assert main(["resnet18", "--resume", str(run_dir), "--no-progress", "--stop-after", "3"]) == 0
    # best.pt was rewritten from last.pt on resume; epoch 3 (index 2) replaces it only if it improved
    assert ckpt.load(run_dir / "best.pt")["epoch"] in (best_epoch, 2)
    assert not (run_dir / "last.pt.tmp").exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--momentum", "nan"], "--momentum must be a finite number in [0, 1), got nan"),
    (["--momentum", "1.5"], "--momentum must be"),
    (["--seed", "-5"], "--seed must be an integer in [0, 2**32), got -5"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "-2"], "--epochs must be >= 1, got -2"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lr-drop", "0"], "--lr-drop"),
])
def test_numbers_that_are_not_numbers_are_refused_by_name(cache, tmp_path, capsys, flags, message):
    assert main(["resnet18", "--device", "cpu", "--no-progress", *common(cache, tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run folder for a refused command


def test_stop_after_must_be_an_epoch(cache, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["resnet18", "--stages", "16:1", "--stop-after", "0", *common(cache, tmp_path)])
    assert stop.value.code == 2 and "--stop-after must be an epoch >= 1, got 0" in capsys.readouterr().err


def test_a_diverging_loss_stops_the_run_and_is_never_a_result(cache, tmp_path, capsys):
    assert main(["resnet18", "--stages", "16:3", "--lr", "1e30", "--device", "cpu", "--no-progress",
                 *common(cache, tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "at lr 1e+30" in err and "nothing of this epoch was saved" in err
    (run_dir,) = tmp_path.iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "TrainingDiverged" in summary["error"] and summary["test_acc"] is None
    assert not (run_dir / "best.pt").exists()  # the diverged epoch saved nothing
    assert compare_main([str(run_dir), "--out", str(tmp_path / "c.png")]) == 2  # nothing to compare
    assert "skipped" in capsys.readouterr().err


def test_resume_refuses_flags_that_would_change_the_run(cache, tmp_path, capsys):
    assert main(["resnet18", "--stages", "16:2", "--device", "cpu", "--no-progress", "--stop-after", "1",
                 *common(cache, tmp_path)]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    before = (run_dir / "last.pt").read_bytes()
    for flags, named in [(["resnet50"], "model resnet50 (the run trains resnet18)"),
                         (["resnet18", "--stages", "64:5", "--lr", "0.1"], "--stages 64:5"),
                         (["resnet18", "--lr", "0.1"], "--lr 0.1 (the run keeps 0.005)"),
                         (["resnet18", "--out", str(tmp_path / "elsewhere")], "--out")]:
        assert main([*flags, "--resume", str(run_dir), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert named in err and "start a new run" in err, err
    assert (run_dir / "last.pt").read_bytes() == before  # refused before touching anything
    # the same values as saved, --stop-after and --progress are fine
    assert main(["resnet18", "--stages", "16:2:4", "--lr", "0.005", "--resume", str(run_dir), "--progress", "off",
                 "--stop-after", "2"]) == 0


def test_the_automatic_cache_choice_skips_unusable_caches(cache, tmp_path):
    root = tmp_path / "caches"
    good = root / cache.name
    shutil.copytree(cache, good)
    newer = json.loads((good / "manifest.json").read_text())
    newer["created"] = "2099-01-01T00:00:00+00:00"
    for name, edit in [("0000000000000001", lambda m: m["splits"]["valid"].update(count=0)),
                       ("0000000000000002", lambda m: m["splits"]["train"]["classes"].update(hem=0))]:
        (root / name).mkdir()
        m = json.loads(json.dumps(newer))
        edit(m)
        (root / name / "manifest.json").write_text(json.dumps(m))
    (root / "0000000000000003").mkdir()
    (root / "0000000000000003" / "manifest.json").write_text("{not json")
    assert find_cache(root, [16]) == good


def test_an_unwritable_out_is_a_clear_error(cache, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("a file where the runs folder should be")
    assert main(["resnet18", "--stages", "16:1", "--device", "cpu", "--no-progress", "--cache", str(cache),
                 "--out", str(blocker), "--batch-size", "4"]) == 2
    assert f"cannot make a run folder under {blocker}" in capsys.readouterr().err
