"""train.cv: patient-grouped K-fold cross-validation on one cache (the demo's), its summary, resume and compare."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.demo import ensure_demo_source
from pipeline.store import CacheReader
from train.engine import checkpoint as ckpt
from train.compare import main as compare_main
from train.cv import main as cv_main
from train.data.folds import CV_SPLITS, make_folds

ROOT = Path(__file__).resolve().parents[1]
CV_ARGS = ["--folds", "3", "--stages", "16:2", "--batch-size", "16", "--device", "cpu", "--no-progress"]
FOLD_KEYS = ("run_dir", "train_patients", "valid_patients", "best_valid_acc", "valid_f1_weighted", "test_acc",
             "test_f1_weighted")


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cv")
    source = ensure_demo_source(root / "cache")
    report = build(PreprocessConfig(), BuildOptions(sizes=(16,), source=source, cache_root=root / "cache",
                                                    progress=False))
    return report.cache_dir


@pytest.fixture(scope="module")
def cv_run(demo_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv-runs")
    caches_before = sorted(p.name for p in demo_cache.parent.iterdir())
    # a subprocess with one thread, as the interrupted CV below: CPU results depend on the thread count
    proc = _cv(["--cache", str(demo_cache), "--out", str(out)] + CV_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cv_dirs = list(out.glob("cv-resnet18-*"))
    assert len(cv_dirs) == 1 and proc.stdout.strip().splitlines()[-1] == str(cv_dirs[0].resolve())
    assert "| mean +- std |" in proc.stdout
    return cv_dirs[0], caches_before


def _cv(args, env_extra=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cv", "resnet18", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})})


def _paths(reader, splits):
    return {p for split in splits for p in reader.read_meta(16, split)["paths"]}


def test_a_three_fold_cv_on_the_demo_cache(demo_cache, cv_run):
    cv_dir, caches_before = cv_run
    reader = CacheReader(demo_cache)
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert summary["k"] == 3 and summary["scheme"] == "patients" and len(summary["folds"]) == 3
    valid_paths = []
    for fold in summary["folds"]:
        assert all(key in fold for key in FOLD_KEYS)
        # no patient on both sides of a fold
        assert fold["valid_patients"] and not set(fold["valid_patients"]) & set(fold["train_patients"])
        run_dir = cv_dir / fold["run_dir"]
        config = json.loads((run_dir / "config.json").read_text())["config"]
        assert config["fold"]["index"] == fold["fold"] and config["cache_dir"] == str(demo_cache.resolve())
        predictions = pd.read_csv(run_dir / "predictions_valid.csv")
        assert set(predictions["patient"]) == set(fold["valid_patients"])
        valid_paths += predictions["path"].tolist()
        assert (run_dir / "patients_valid.csv").is_file() and (run_dir / "patients_test.csv").is_file()
    # the folds' valid parts, together, are the cache's train + valid images, each once; test is untouched
    assert sorted(valid_paths) == sorted(_paths(reader, CV_SPLITS)) and len(valid_paths) == len(set(valid_paths))
    assert not set(valid_paths) & _paths(reader, ["test"])
    # mean and sample standard deviation over the folds
    for key in ("best_valid_acc", "test_acc", "test_f1_weighted"):
        values = [f[key] for f in summary["folds"]]
        assert summary[key]["mean"] == pytest.approx(np.mean(values))
        assert summary[key]["std"] == pytest.approx(np.std(values, ddof=1))
    # the ensemble: the folds' test probabilities averaged
    tests = [pd.read_csv(cv_dir / f["run_dir"] / "predictions_test.csv").set_index("path") for f in summary["folds"]]
    mean_prob = sum(t["prob_all"] for t in tests) / 3
    labels = pd.Series(reader.read_meta(16, "test")["labels"], index=reader.read_meta(16, "test")["paths"])
    expected = float(((mean_prob.reindex(labels.index) >= 0.5).astype(int) == labels).mean())
    assert summary["ensemble"]["test_acc"] == pytest.approx(expected) and summary["ensemble"]["models"] == 3
    # one cache, no rebuild
    assert sorted(p.name for p in demo_cache.parent.iterdir()) == caches_before


def test_an_interrupted_cv_resumes_where_it_stopped(demo_cache, cv_run, tmp_path):
    cv_dir, _ = cv_run
    killed = _cv(["--cache", str(demo_cache), "--out", str(tmp_path)] + CV_ARGS, {ckpt.KILL_AT_ENV: "last.pt@1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    (stopped,) = tmp_path.glob("cv-resnet18-*")
    assert (stopped / "fold-0" / "last.pt").is_file() and not (stopped / "cv_summary.json").exists()
    # another flag with --resume is refused, and nothing is touched
    assert cv_main(["resnet18", "--resume", str(stopped), "--lr", "0.1"]) == 2
    resumed = _cv(["--resume", str(stopped), "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "fold 1 of 3: continuing" in resumed.stderr  # from last.pt, not started again
    assert resumed.stdout.strip().splitlines()[-1] == str(stopped.resolve())
    again, first = (json.loads((d / "cv_summary.json").read_text()) for d in (stopped, cv_dir))
    # the same folds and the same figures as the uninterrupted CV (same seed, same cache)
    for a, b in zip(again["folds"], first["folds"]):
        assert a["valid_patients"] == b["valid_patients"]
        for key in ("best_valid_acc", "test_acc", "test_f1_weighted"):
            assert a[key] == pytest.approx(b[key]), (a["fold"], key)
    assert len(pd.read_csv(stopped / "fold-0" / "metrics.csv")) == 2  # no epoch logged twice


def test_too_many_folds_say_how_many_patients_there_are(demo_cache, tmp_path, capsys):
    assert cv_main(["resnet18", "--cache", str(demo_cache), "--out", str(tmp_path), "--folds", "9", "--stages",
                    "16:1", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--folds 9" in err and "hem" in err and "patient" in err
    assert not list(tmp_path.glob("cv-*"))  # nothing made


def test_kaggle_folds_of_the_demo_cache_are_its_fold_folders(demo_cache):
    reader = CacheReader(demo_cache)
    folds = make_folds(reader, 16, "kaggle", seed=0)
    assert [f["valid_groups"] for f in folds] == [["fold_0"], ["fold_1"], ["fold_2"]]


def test_a_cv_folder_where_a_run_is_expected_points_to_its_folds(cv_run, capsys):
    from train.evaluate import main as evaluate_main
    cv_dir, _ = cv_run
    assert evaluate_main([str(cv_dir), "--device", "cpu"]) == 2
    assert f"is a cross-validation folder (train.cv); pass one of its runs, e.g. {cv_dir / 'fold-0'}" in \
        capsys.readouterr().err


def test_compare_takes_a_cv_folder_as_mean_and_std(cv_run, tmp_path, capsys):
    cv_dir, _ = cv_run
    assert compare_main([str(cv_dir), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "resnet18 (report) 3-fold CV" in out and "+-" in out and (tmp_path / "c.png").is_file()
