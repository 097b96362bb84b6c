"""train.run end to end on a tiny cache (CPU): outputs, stage switch, resume equivalence, DDP, error paths."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from train.engine import checkpoint as ckpt
from train.engine import trainer as trainer_mod
from train.compare import main as compare_main
from train.engine.config import Stage, TrainConfig
from train.evaluation.evaluator import evaluate_run
from train.experiment.session import RunError, check_cpu_recipe
from train.run import main
from tests.helpers import REAL_SAMPLE, ROOT, common


def run(args, capsys=None) -> Path:
    assert main(args + ["--no-progress", "--device", "cpu"]) == 0
    if capsys is not None:
        return Path(capsys.readouterr().out.strip().splitlines()[-1])
    return None


def test_a_run_writes_every_report(cache, tmp_path, capsys):
    run_dir = run(["resnet18", "--stages", "16:2", "24:1"] + common(cache, tmp_path), capsys)
    assert run_dir.parent == tmp_path and run_dir.name.startswith("resnet18-")
    for name in ["config.json", "metrics.csv", "last.pt", "best.pt", "curves.png", "confusion_valid.png",
                 "confusion_test.png", "predictions_test.csv", "summary.json"]:
        assert (run_dir / name).is_file(), name
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert list(metrics.columns[:12]) == ["epoch", "stage", "size", "lr", "train_loss", "train_acc", "valid_loss",
                                         "valid_acc", "epoch_s", "imgs_per_s", "data_wait", "augment_share"]
    assert metrics["epoch"].tolist() == [1, 2, 3] and metrics["size"].tolist() == [16, 16, 24]
    # producing batches includes augmenting them; both are measured, not zero
    assert (metrics["augment_share"] > 0).all() and (metrics["data_wait"] >= metrics["augment_share"]).all()
    assert (metrics["data_wait"] < 1).all()
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("best_valid_acc", "test_acc", "test_f1_weighted", "epochs", "train_seconds"):
        assert key in summary
    assert summary["epochs"] == 3 and 0 <= summary["test_acc"] <= 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["cache_key"] == cache.name and "torch" in config["versions"]
    # predictions: one row per test image, with the image name, predicted label and probability of `all`
    preds = pd.read_csv(run_dir / "predictions_test.csv")
    manifest = json.loads((cache / "manifest.json").read_text())
    assert len(preds) == manifest["splits"]["test"]["count"]
    assert list(preds.columns[:2]) == ["image", "path"] and {"predicted_label", "prob_all"} <= set(preds.columns)
    assert preds["prob_all"].between(0, 1).all()
    assert (preds["predicted_label"] == (preds["prob_all"] >= 0.5)).all()
    assert all(p.endswith(img) for p, img in zip(preds["path"], preds["image"]))
    # test accuracy in the summary is the predictions' accuracy
    truth = preds["image"].str.contains("_all").astype(int)
    assert summary["test_acc"] == pytest.approx((preds["predicted_label"] == truth).mean())
    # compare: one table row per run
    assert compare_main([str(run_dir), str(run_dir), "--out", str(tmp_path / "cmp.png")]) == 0
    out = capsys.readouterr().out
    assert out.count("| resnet18 (report) |") == 2 and (tmp_path / "cmp.png").is_file()


def test_the_next_stage_starts_from_the_best_valid_weights(cache, tmp_path, monkeypatch):
    seen = {}
    original = trainer_mod.Trainer.start_stage

    def spy(self, index):
        original(self, index)
        self.writer.wait()  # best.pt may still be being written in the background
        best = ckpt.load(self.run_dir / "best.pt")
        seen["best_epoch"] = best["epoch"]
        seen["equal"] = all(torch.equal(v, best["model"][k]) for k, v in self.net.state_dict().items())
    monkeypatch.setattr(trainer_mod.Trainer, "start_stage", spy)
    run(["resnet18", "--stages", "16:4", "24:1", "--seed", "3"] + common(cache, tmp_path))
    (run_dir,) = tmp_path.iterdir()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    stage1 = metrics[metrics["stage"] == 1]
    assert seen["equal"]
    assert seen["best_epoch"] + 1 == int(stage1.loc[stage1["valid_acc"].idxmax(), "epoch"])


@pytest.mark.slow
@pytest.mark.parametrize("stop_after", [1, 2])  # mid-stage, and exactly at the 16 -> 24 switch
def test_a_stopped_and_resumed_run_ends_with_the_same_weights(cache, tmp_path, capsys, stop_after):
    args = ["resnet18", "--stages", "16:2", "24:2", "--lr-drop", "plateau:1"]
    whole = run(args + common(cache, tmp_path / "a"), capsys)
    part = run(args + common(cache, tmp_path / "b") + ["--stop-after", str(stop_after)], capsys)
    assert not (part / "summary.json").exists()
    assert len(pd.read_csv(part / "metrics.csv")) == stop_after
    assert main(["resnet18", "--resume", str(part), "--no-progress"]) == 0
    a, b = ckpt.load(whole / "last.pt"), ckpt.load(part / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    cols = ["epoch", "lr", "train_loss", "train_acc", "valid_loss", "valid_acc"]
    pd.testing.assert_frame_equal(pd.read_csv(whole / "metrics.csv")[cols], pd.read_csv(part / "metrics.csv")[cols])


@pytest.mark.slow
def test_ddp_with_two_gloo_processes_matches_one_process(cache, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "train.run", "resnet18",
           "--stages", "16:1", "--device", "cpu", "--no-progress"] + common(cache, tmp_path / "ddp")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert result.stdout.count(str(run_dir)) == 1  # only rank 0 prints and writes
    ddp_summary = json.loads((run_dir / "summary.json").read_text())
    ddp_preds = pd.read_csv(run_dir / "predictions_test.csv")
    single = evaluate_run(run_dir, device="cpu")
    assert single["splits"] == ddp_summary["splits"]
    pd.testing.assert_frame_equal(pd.read_csv(run_dir / "predictions_test.csv"), ddp_preds)
    # and a 2-process evaluation of the same checkpoint agrees too
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "train.evaluate", str(run_dir), "--device", "cpu"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["splits"] == single["splits"]


def test_error_paths_name_the_fix(cache, tmp_path, capsys):
    def err(args):
        assert main(args + ["--no-progress", "--device", "cpu"]) == 2
        return capsys.readouterr().err
    assert "resnet18, resnet50, resnet152" in err(["resnet34", "--cache", str(cache)])
    assert "python -m pipeline.build --sizes 64 96" in err(["resnet18", "--stages", "64:1", "96:1", "--cache-root",
                                                           str(tmp_path / "empty")])
    assert "--sizes 32" in err(["resnet18", "--stages", "32:1", "--cache", str(cache)])
    assert "SIZE:EPOCHS" in err(["resnet18", "--stages", "16", "--cache", str(cache)])
    assert "no config.json" in err(["resnet18", "--resume", str(tmp_path)])


def test_resume_refuses_another_cache_and_checkpoints_of_another_model(cache, tmp_path, capsys):
    run_dir = run(["resnet18", "--stages", "16:1"] + common(cache, tmp_path), capsys)
    config = json.loads((run_dir / "config.json").read_text())
    config["config"]["cache_key"] = "0000000000000000"
    (run_dir / "config.json").write_text(json.dumps(config))
    assert main(["resnet18", "--resume", str(run_dir)]) == 2
    assert "rebuild that cache" in capsys.readouterr().err
    state = ckpt.load(run_dir / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="holds a 'resnet18' model, not 'resnet50'"):
        ckpt.check_compatible(state, "resnet50", cache.name, run_dir / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="trained on cache"):
        ckpt.check_compatible(state, "resnet18", "ffff", run_dir / "last.pt")


def test_checkpoints_load_without_arbitrary_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt.CheckpointError, match="cannot be loaded safely"):
        ckpt.load(tmp_path / "evil.pt")


def test_runs_never_overwrite_each_other(cache, tmp_path, capsys):
    a = run(["resnet18", "--stages", "16:1"] + common(cache, tmp_path), capsys)
    b = run(["resnet18", "--stages", "16:1"] + common(cache, tmp_path), capsys)
    assert a != b and a.is_dir() and b.is_dir()


def test_a_full_recipe_on_cpu_estimates_and_suggests(cache):
    config = TrainConfig(model="resnet18", cache_dir=str(cache), cache_key=cache.name,
                         stages=(Stage(16, 10**6, 4),), device="cpu")
    with pytest.raises(RunError, match=r"(?s)would take about .* h on this CPU.*--stages 64:2 96:1"):
        check_cpu_recipe(config)


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="../shared/data/cnmc-sample not present")
def test_real_cells_go_through_build_train_and_evaluate(tmp_path, capsys):
    """The 96 real C-NMC BMPs through the whole pipeline: build, one short run, reports."""
    report = build(PreprocessConfig(), BuildOptions(sizes=(32,), source=REAL_SAMPLE, cache_root=tmp_path / "cache",
                                                    progress=False))
    run_dir = run(["resnet18", "--stages", "32:1"] + common(report.cache_dir, tmp_path / "runs"), capsys)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["splits"]["test"]["per_class"]["hem"]["support"] + \
        summary["splits"]["test"]["per_class"]["all"]["support"] == len(pd.read_csv(run_dir / "predictions_test.csv"))
    assert (run_dir / "confusion_test.png").stat().st_size > 10_000


def test_evaluating_one_split_keeps_the_others(cache, tmp_path, capsys):
    from train.evaluate import main as evaluate_main
    run_dir = run(["resnet18", "--stages", "16:1"] + common(cache, tmp_path), capsys)
    before = json.loads((run_dir / "summary.json").read_text())
    assert evaluate_main([str(run_dir), "--split", "test", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(run_dir)
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["best_valid_acc"] == before["best_valid_acc"] is not None
    assert after["splits"] == before["splits"]
    assert evaluate_main([str(run_dir), "--split", "valid", "--checkpoint", "last.pt", "--device", "cpu"]) == 0
    last = json.loads((run_dir / "eval-last" / "summary.json").read_text())  # beside the run's, not over it
    assert last["checkpoint"] == "last.pt" and set(last["splits"]) == {"valid"}  # no mixing of checkpoints
    assert json.loads((run_dir / "summary.json").read_text())["splits"] == before["splits"]


def test_compiled_progressive_resizing_traces_one_static_graph_per_stage(cache, tmp_path, monkeypatch):
    """--compile with stages 16 -> 24 px: the second size gets static graphs of its own (train and eval), not the
    symbolic-shape recompile that torch.compile's default makes on a size change (2.6x slower on an H200)."""
    graphs = []

    def recording_backend(gm, example_inputs):
        # the traced shapes (torch.SymInt where dynamic), not the example inputs' concrete ones
        values = [node.meta.get("example_value") for node in gm.graph.nodes if node.op == "placeholder"]
        graphs.append([tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in values])
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": recording_backend}))
    torch._dynamo.reset()
    run(["resnet18", "--stages", "16:1", "24:1", "--compile"] + common(cache, tmp_path))
    torch._dynamo.reset()
    shapes = [shape for graph in graphs for shape in graph]
    assert shapes and all(isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) for shape in shapes)
    # the image batch: (4, 3, S, S) at --batch-size 4 (the stem's weight is (64, 3, 7, 7))
    image_sizes = sorted({shape[-1] for graph in graphs for shape in graph if len(shape) == 4 and shape[:2] == (4, 3)})
    assert image_sizes == [16, 24] and len(graphs) == 4, [len(g) for g in graphs]  # train + eval per stage


def test_evaluation_reports_patients_and_keeps_tta_beside_plain(cache, tmp_path, capsys):
    from train.evaluate import main as evaluate_main
    from train.evaluation.metrics import patient_table
    run_dir = run(["resnet18", "--stages", "16:1"] + common(cache, tmp_path), capsys)
    plain = json.loads((run_dir / "summary.json").read_text())
    assert plain["tta"] is None
    for split in ("valid", "test"):
        predictions = pd.read_csv(run_dir / f"predictions_{split}.csv")
        patients = pd.read_csv(run_dir / f"patients_{split}.csv", dtype={"patient": str})
        assert list(patients.columns) == ["patient", "label", "cells", "accuracy", "predicted_all_share",
                                          "mean_prob_all", "predicted_label"]
        assert patients["cells"].sum() == len(predictions) and set(patients["patient"]) == \
            set(predictions["patient"].astype(str))
        # the table is the per-image predictions grouped by patient
        labels = [1 if "_all" in p else 0 for p in predictions["path"]]
        expected = patient_table(predictions["patient"].astype(str), predictions["prob_all"], labels)
        assert np.allclose(patients["accuracy"], expected["accuracy"], atol=1e-6)
        summary = plain["patients"][split]
        assert summary["patients"] == len(patients)
        assert summary["mean_patient_accuracy"] == pytest.approx(patients["accuracy"].mean(), abs=1e-6)
    # best.pt replaced by fresh weights: a model this short-trained can be saturated (every prob_all 0.000000),
    # where TTA and plain could not be told apart
    from models import build_model
    state = ckpt.load(run_dir / "best.pt")
    torch.manual_seed(3)
    state["model"] = build_model("resnet18").state_dict()
    ckpt.save(state, run_dir / "best.pt")
    assert evaluate_main([str(run_dir), "--device", "cpu"]) == 0
    plain = json.loads((run_dir / "summary.json").read_text())
    assert evaluate_main([str(run_dir), "--tta", "--device", "cpu"]) == 0
    assert "with TTA (8 views), test acc" in capsys.readouterr().out
    tta = json.loads((run_dir / "summary.json").read_text())
    assert tta["splits"] == plain["splits"]  # the plain figures stay, TTA beside them
    assert set(tta["tta"]["splits"]) == {"valid", "test"} and 0 <= tta["tta"]["test_acc"] <= 1
    predictions = pd.read_csv(run_dir / "predictions_test.csv")
    # the TTA column is the mean over the 8 views of best.pt's softmax, computed here independently
    from pipeline import store
    from train.augment import GpuAugment
    from train.data.loader import CacheLoader
    from train.engine.loop import Precision
    from train.evaluation.tta import tta_probs
    model = build_model("resnet18")
    model.load_state_dict(ckpt.load(run_dir / "best.pt")["model"])
    model.eval()
    augment = GpuAugment.from_manifest(store.read_manifest(cache), 16).eval()
    expected = torch.cat([tta_probs(model, augment(x), Precision(channels_last=True), torch.device("cpu"))[:, 1]
                          for x, _ in CacheLoader(cache, 16, "test", 4)])
    assert np.allclose(predictions["prob_all_tta"], expected.numpy(), atol=2e-6)
    assert not np.allclose(predictions["prob_all_tta"], predictions["prob_all"], atol=1e-4)
    hits = ((predictions["prob_all_tta"] >= 0.5).astype(int) == [1 if "_all" in p else 0 for p in predictions["path"]])
    assert tta["tta"]["test_acc"] == pytest.approx(hits.mean())


def test_a_split_the_cache_lacks_is_refused_and_nothing_changes(cache, tmp_path, capsys):
    from train.evaluate import main as evaluate_main
    run_dir = run(["resnet18", "--stages", "16:1"] + common(cache, tmp_path), capsys)
    before = (run_dir / "summary.json").read_bytes()
    assert evaluate_main([str(run_dir), "--split", "tset", "--checkpoint", "last.pt", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "no split 'tset'" in err and "test, train, valid" in err
    assert (run_dir / "summary.json").read_bytes() == before


def test_a_stopped_run_is_not_compared_as_a_result_and_ctrl_c_says_how_to_go_on(cache, tmp_path, capsys,
                                                                                 monkeypatch):
    from train.evaluate import main as evaluate_main
    run_dir = run(["resnet18", "--stages", "16:3", "--stop-after", "1"] + common(cache, tmp_path), capsys)
    assert evaluate_main([str(run_dir), "--device", "cpu"]) == 0  # best.pt so far: allowed, but marked
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "unfinished"
    capsys.readouterr()
    assert compare_main([str(run_dir), "--out", str(tmp_path / "c.png")]) == 2  # nothing finished to compare
    assert f"--resume {run_dir}" in capsys.readouterr().err

    def interrupted(self, stop_after_epoch=None):
        raise KeyboardInterrupt
    monkeypatch.setattr(trainer_mod.Trainer, "fit", interrupted)
    assert main(["resnet18", "--resume", str(run_dir), "--no-progress"]) == 130
    assert f"continue with python -m train.run resnet18 --resume {run_dir}" in capsys.readouterr().err
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.undo()
    # going on (and stopping again) leaves no stale "interrupted" record behind
    assert main(["resnet18", "--resume", str(run_dir), "--stop-after", "2", "--no-progress"]) == 0
    assert not (run_dir / "summary.json").exists() and len(pd.read_csv(run_dir / "metrics.csv")) == 2
