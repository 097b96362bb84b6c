"""Benchmark wiring: pipeline.bench keeps `build` only, train.bench runs the rest, the GPU check on a CPU."""
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline import bench as pipeline_bench
from train.bench import __main__ as train_bench
from train.bench import gpu as bench_gpu

ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_never_imports_train_or_torch():
    pattern = re.compile(r"^\s*(from|import)\s+(train|torch)\b", re.MULTILINE)
    offenders = [f"{path.name}: {m.group(0).strip()}" for path in sorted((ROOT / "pipeline").glob("*.py"))
                 for m in pattern.finditer(path.read_text())]
    assert offenders == []


def test_pipeline_bench_build_help_runs_without_torch():
    out = subprocess.run([sys.executable, "-m", "pipeline.bench", "build", "--help"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert "python -m pipeline.bench build" in out and "--images" in out and "--sizes" in out
    code = ("import sys; from pipeline import bench, bench_build; "
            "assert not {'torch', 'train'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.parametrize("argv, points_to", [
    ([], "python -m train.bench loader"),
    (["--device", "cuda", "--size", "128"], "python -m train.bench loader --device cuda --size 128"),
    (["scale", "--counts", "1000"], "python -m train.bench scale --counts 1000"),
])
def test_pipeline_bench_old_forms_point_to_train_bench(argv, points_to, capsys):
    assert pipeline_bench.main(argv) == 2
    assert points_to in capsys.readouterr().err


def test_train_bench_subcommands_parse(capsys):
    for command in ("loader", "scale", "gpu"):
        with pytest.raises(SystemExit) as exit_:
            train_bench.main([command, "--help"])
        assert exit_.value.code == 0
        assert f"python -m train.bench {command}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        train_bench.main(["fast"])
    assert exit_.value.code == 2 and "loader" in capsys.readouterr().err  # the error lists the choices


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_check_without_cuda_says_so(capsys):
    assert train_bench.main(["gpu"]) == 2
    assert "--device cpu" in capsys.readouterr().err


def test_gpu_check_records_each_failure_and_runs_the_rest(tmp_path):
    """Every part of the check on the CPU at tiny sizes; one model name is wrong, so its row alone fails."""
    plan = replace(bench_gpu.QUICK, models=("resnet18", "no-such-model"), aug_compiled=(False,), demo=False)
    result = bench_gpu.run(device="cpu", work_dir=tmp_path, plan=plan)
    json.dumps(result)  # the --json file
    stages = result["stages"]
    assert {k: s["status"] for k, s in stages.items()} == {
        "tests": "skipped", "augmentation": "ok", "cache": "ok", "loader": "ok", "training": "failed",
        "demo": "skipped"}
    assert result["ok"] is False and result["failed"] == ["training"]
    aug = stages["augmentation"]["rows"]
    assert [(r["size"], r["batch_size"], r["compiled"]) for r in aug] == [(64, 8, False)]
    assert aug[0]["imgs_per_s"] > 0 and aug[0]["stored_size"] > 64
    loader = {r["asked"]: r for r in stages["loader"]["rows"]}
    assert "skipped" in loader["resident, device"]  # no device memory on a CPU
    assert loader["resident, host"]["loader"] == "resident/host" and loader["resident, host"]["imgs_per_s"] > 0
    assert loader["streaming"]["loader"] == "streaming/host" and loader["streaming"]["imgs_per_s"] > 0
    assert loader["streaming"]["window_images"] < loader["streaming"]["split_images"]  # several windows
    ok, bad = stages["training"]["rows"]
    assert ok["model"] == "resnet18" and "error" not in ok and ok["images"] == plan.train_steps * plan.batch_size
    assert ok["data_share"] == pytest.approx(1 - ok["fed_imgs_per_s"] / ok["resident_imgs_per_s"])
    assert "no-such-model" in bad["error"] and "imgs_per_s" not in str(bad)
    text = bench_gpu.report(result)
    assert text.startswith("## GPU check on CPU") and "**FAILED**: training" in text
    assert "no-such-model" in text and "| resnet18 |" in text and "| 64 | 8 | eager |" in text


def test_read_run_takes_augment_share_when_present(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,stage,size,epoch_s,imgs_per_s,data_wait\n1,1,64,2.5,80.0,0.1\n")
    (tmp_path / "summary.json").write_text(json.dumps({"best_valid_acc": 0.9, "test_acc": 0.85, "epochs": 1,
                                                       "test_f1_weighted": None, "splits": {}}))
    figures = bench_gpu.read_run(tmp_path)
    assert figures["rows"] == [{"epoch": 1, "stage": 1, "size": 64, "epoch_s": 2.5, "imgs_per_s": 80.0,
                                "data_wait": 0.1}]
    assert figures["summary"]["test_acc"] == 0.85 and figures["summary"]["train_seconds"] is None
    (tmp_path / "metrics.csv").write_text("epoch,size,data_wait,augment_share\n1,64,0.1,0.04\n")
    assert bench_gpu.read_run(tmp_path)["rows"][0]["augment_share"] == 0.04


@pytest.mark.slow
def test_gpu_check_cli_quick_on_cpu_end_to_end(tmp_path, capsys):
    """`python -m train.bench gpu --device cpu --quick`: every part including the demo run in a subprocess."""
    out = tmp_path / "gpu.json"
    code = train_bench.main(["gpu", "--device", "cpu", "--quick", "--json", str(out), "--work-dir", str(tmp_path)])
    result = json.loads(out.read_text())
    assert code == 0 and result["ok"], {k: s.get("error") for k, s in result["stages"].items()}
    demo = result["stages"]["demo"]
    assert demo["run_returncode"] == 0 and [r["epoch"] for r in demo["rows"]] == [1]
    assert demo["summary"]["epochs"] == 1 and demo["summary"]["best_valid_acc"] is not None
    assert [r["compiled"] for r in result["stages"]["augmentation"]["rows"]] == [False, True]
    captured = capsys.readouterr()
    assert "### Demo run" in captured.out and "| 1 | 64 |" in captured.out
    # one line per part as it ends (a check cut off by a time limit still shows how far it came)
    assert [line.split()[2] for line in captured.err.splitlines() if line.startswith("gpu check: ")] == \
        list(result["stages"])
