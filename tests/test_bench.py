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
from train.bench import consistency as bench_consistency
from train.bench import gpu as bench_gpu
from train.bench import gpu_report as bench_gpu_report
from train.bench import record as bench_record

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
    """Every default part of the check on the CPU at tiny sizes; one model name is wrong, so its row alone fails.
    The augmentation also writes bf16 (as train.run's AMP step asks), the training steps are also fed ahead."""
    plan = replace(bench_gpu.QUICK, models=("resnet18", "no-such-model"), aug_compiled=(False,),
                   aug_bf16_compiled=(False,), demo=False)
    result = bench_gpu.run(device="cpu", work_dir=tmp_path, plan=plan)
    json.dumps(result)  # the --json file
    stages = result["stages"]
    assert {k: s["status"] for k, s in stages.items()} == {
        "tests": "skipped", "augmentation": "ok", "cache": "ok", "loader": "ok", "training": "failed",
        "demo": "skipped"}
    assert result["ok"] is False and result["failed"] == ["training"]
    aug = stages["augmentation"]["rows"]
    assert [(r["size"], r["batch_size"], r["backend"], r["compiled"], r["out_dtype"]) for r in aug] == [
        (64, 8, "torch", False, "float32"), (64, 8, "torch", False, "bfloat16"), (64, 8, "triton", False, "bfloat16")]
    assert all(r["imgs_per_s"] > 0 and r["stored_size"] > 64 for r in aug[:2])
    assert aug[2]["skipped"] == "the Triton backend runs on CUDA"  # recorded, with the reason, not measured
    loader = {r["asked"]: r for r in stages["loader"]["rows"]}
    assert "skipped" in loader["resident, device"]  # no device memory on a CPU
    assert loader["resident, host"]["loader"] == "resident/host" and loader["resident, host"]["imgs_per_s"] > 0
    assert loader["streaming"]["loader"] == "streaming/host" and loader["streaming"]["imgs_per_s"] > 0
    assert loader["streaming"]["window_images"] < loader["streaming"]["split_images"]  # several windows
    ok, bad = stages["training"]["rows"]
    assert ok["model"] == "resnet18" and "error" not in ok and ok["images"] == plan.train_steps * plan.batch_size
    assert ok["data_share"] == pytest.approx(1 - ok["fed_imgs_per_s"] / ok["resident_imgs_per_s"])
    assert ok["ahead_data_share"] == pytest.approx(1 - ok["ahead_imgs_per_s"] / ok["resident_imgs_per_s"])
    assert len(ok["fed_rounds"]) == len(ok["ahead_rounds"]) == len(ok["resident_rounds"]) == ok["rounds"]
    assert set(stages["training"]["feeds"]) == {"fed", "ahead"}
    assert "no-such-model" in bad["error"] and "imgs_per_s" not in str(bad)
    text = bench_gpu.report(result)
    assert text.startswith("## GPU check on CPU") and "**FAILED**: training" in text
    assert "no-such-model" in text and "| resnet18 |" in text and "| 64 | 8 | torch | eager |" in text
    assert "| 64 | 8 | torch | eager | bfloat16 |" in text and "ahead data share" in text


def test_gpu_check_subprocesses_start_in_the_repository():
    """`python -m train.run` and `pytest tests` run from the checkout itself (the bench package is two levels below
    it): from the train package's folder they would import an installed copy of the project, or none."""
    assert (bench_record.ROOT / "train" / "run.py").is_file() and (bench_record.ROOT / "tests").is_dir()
    assert bench_gpu.ROOT == bench_record.ROOT == ROOT


def test_gpu_parts_are_the_same_in_the_cli():
    """The CLI keeps the part names without importing torch; they are the check's."""
    assert train_bench.GPU_PARTS == bench_gpu.PARTS
    assert train_bench.GPU_DEFAULT_PARTS == bench_gpu.DEFAULT_PARTS
    assert bench_gpu.parts_asked(None) == bench_gpu.DEFAULT_PARTS
    assert bench_gpu.parts_asked(["consistency", "tests"]) == ("tests", "consistency")  # the check's order
    assert bench_gpu.parts_asked(["all"]) == bench_gpu.PARTS
    with pytest.raises(ValueError, match="unknown part nope; the parts are tests, .*consistency"):
        bench_gpu.parts_asked(["nope"])


def test_gpu_check_refuses_an_unknown_part(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_bench.main(["gpu", "--device", "cpu", "--quick", "--part", "training", "nope"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "nope" in err
    assert all(name in err for name in (*bench_gpu.PARTS, "all"))  # the choices are named
    with pytest.raises(SystemExit):
        train_bench.main(["gpu", "--help"])
    assert "compile-modes" in capsys.readouterr().out


def test_gpu_check_runs_only_the_parts_asked_and_keeps_row_errors(tmp_path):
    """--part compile-modes alone: no other part, no benchmark cache; eager steps measured, CUDA graphs skipped on a
    CPU with the reason, and a wrong model's rows keep their error while the others are measured."""
    plan = replace(bench_gpu.QUICK, cm_models=("no-such-model", "resnet18"), cm_modes=("eager", "reduce-overhead"))
    result = bench_gpu.run(device="cpu", work_dir=tmp_path, plan=plan, parts=["compile-modes"])
    json.dumps(result)
    assert list(result["stages"]) == ["compile-modes"] and result["parts"] == ["compile-modes"]
    assert result["failed"] == ["compile-modes"]
    rows = {(r["model"], r["mode"]): r for r in result["stages"]["compile-modes"]["rows"]}
    assert "no-such-model" in rows["no-such-model", "eager"]["error"]
    eager = rows["resnet18", "eager"]
    assert "error" not in eager and eager["imgs_per_s"] > 0 and eager["compile_s"] > 0
    assert eager["ratio_to_eager"] == 1 and len(eager["rounds"]) == plan.cm_rounds
    assert "CUDA graphs need a CUDA device" in rows["resnet18", "reduce-overhead"]["skipped"]
    text = bench_gpu.report(result)
    assert "### Compile modes" in text and "### Augmentation" not in text and "### Benchmark cache" not in text
    assert "| resnet18 | 4 | eager |" in text and "no-such-model" in text


def test_consistency_compare_states_difference_tolerance_and_result():
    ok = bench_consistency.compare(0.63, 0.62, 0.05, relative=True)
    assert ok["passed"] and "error" not in ok and ok["difference"] == pytest.approx(0.01 / 0.62)
    bad = bench_consistency.compare([0.5, 0.9], [0.5, 0.7], 2e-2, relative=False)
    assert not bad["passed"] and bad["difference"] == pytest.approx(0.2) and bad["values"] == 2
    assert "exceeds the tolerance 0.02" in bad["error"]
    assert not bench_consistency.compare(float("nan"), 0.6, 0.05, relative=True)["passed"]
    with pytest.raises(ValueError, match="2 figures on the device against 3"):
        bench_consistency.compare([1, 2], [1, 2, 3], 0.1, relative=False)


def test_consistency_failing_command_keeps_its_error_and_the_rest_run(tmp_path, monkeypatch):
    """The device's train.run fails: its row keeps the command's own error line, and every later row still runs
    and says what it lacks; the part is failed, the report shows each error."""
    calls = []

    def fake_run(cmd, timeout_s):
        calls.append(cmd[2])
        failed = cmd[2] in ("train.run", "train.cv")
        return subprocess.CompletedProcess(cmd, 2 if failed else 0, stdout=str(tmp_path) + "\n",
                                           stderr=f"error: {cmd[2]} refused the flags\n" if failed else ""), 0.1

    monkeypatch.setattr(bench_consistency, "run_command", fake_run)
    plan = replace(bench_gpu.QUICK, consistency_opts=("sgd", "adamw"))
    stage = bench_record.stage(bench_consistency.check_consistency, plan, torch.device("cpu"), tmp_path)
    assert stage["status"] == "failed" and calls == ["pipeline.build", "train.run", "train.run", "train.cv"]
    rows = stage["rows"]
    assert [r["check"] for r in rows] == [
        "train.run --recipe modern --opt sgd", "train.run --recipe modern --opt adamw",
        "train.cv --folds 2 --recipe modern", "train.evaluate --tta", "train.evaluate --tta", "train.predict --tta"]
    assert all("error" in r for r in rows)
    assert "train.run on cpu exited 2: error: train.run refused the flags" in rows[0]["error"]
    assert "refused the flags" in rows[0]["output_tail"]
    assert "the train.run --opt sgd row failed" in rows[3]["error"] and "train.evaluate row failed" in rows[4]["error"]
    text = bench_gpu.report({"device_name": "CPU", "torch": torch.__version__, "quick": True, "ok": False,
                             "failed": ["consistency"], "seconds": 1.0, "stages": {"consistency": stage}})
    assert "### Consistency" in text and text.count("**error**") == 6


def test_consistency_report_keeps_the_figures_of_a_missed_tolerance():
    row = {"check": "train.run --recipe modern --opt sgd", "figure": "epoch-1 train loss", "device_value": 0.7,
           "cpu_value": 0.6, "device_s": 20.0, "cpu_s": 30.0, **bench_consistency.compare(0.7, 0.6, 0.05, True)}
    stage = {"status": "failed", "seconds": 50.0, "stage": "64:2", "batch_size": 32, "seed": 0, "counterpart": "cpu",
             "rows": [row]}
    lines = bench_gpu_report._consistency(stage)
    assert ("| train.run --recipe modern --opt sgd | epoch-1 train loss | 0.7000 | 0.6000 | 16.67% | 5% relative | "
            "**FAIL** | 20 / 30 |") in lines


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
    """`python -m train.bench gpu --device cpu --quick --part all`: every part, the demo run and the consistency
    part's commands in subprocesses (on a CPU each compared with itself)."""
    out = tmp_path / "gpu.json"
    code = train_bench.main(["gpu", "--device", "cpu", "--quick", "--json", str(out), "--work-dir", str(tmp_path),
                             "--part", "all"])
    result = json.loads(out.read_text())
    assert code == 0 and result["ok"], {k: s.get("error") or [r.get("error") for r in s.get("rows", [])]
                                        for k, s in result["stages"].items()}
    assert list(result["stages"]) == ["tests", "augmentation", "cache", "loader", "training", "demo",
                                      "compile-modes", "consistency", "kernels"]
    kernels = {r["form"]: r for r in result["stages"]["kernels"]["rows"]}
    assert kernels["planes"]["inductor_kernels"] < kernels["stacked"]["inductor_kernels"], kernels
    assert "skipped" in kernels["triton"] and len(result["stages"]["kernels"]["triton_compiled"]) == 4
    demo = result["stages"]["demo"]
    assert demo["run_returncode"] == 0 and [r["epoch"] for r in demo["rows"]] == [1]
    assert demo["summary"]["epochs"] == 1 and demo["summary"]["best_valid_acc"] is not None
    assert demo["augment_ahead"] is False  # the default off CUDA
    assert [(r["backend"], r["compiled"], r["out_dtype"]) for r in result["stages"]["augmentation"]["rows"]] == [
        ("torch", False, "float32"), ("torch", True, "float32"), ("torch", True, "bfloat16"),
        ("triton", False, "bfloat16")]
    modes = {r["mode"]: r for r in result["stages"]["compile-modes"]["rows"]}
    assert modes["eager"]["imgs_per_s"] > 0 and modes["default"]["imgs_per_s"] > 0 and "skipped" in modes[
        "reduce-overhead"]
    consistency = result["stages"]["consistency"]["rows"]
    assert len(consistency) == 5 and all(r["passed"] and r["difference"] == 0 for r in consistency)
    assert consistency[0]["augment_ahead"] is False and len(consistency[1]["device_value"]) == 2  # 2 folds
    captured = capsys.readouterr()
    assert "### Demo run" in captured.out and "| 1 | 64 |" in captured.out
    assert "augment_ahead false" in captured.out and "### Consistency" in captured.out
    assert "### Augmentation passes" in captured.out and "| chain_kernel | sm_90 |" in captured.out
    # one line per part as it ends (a check cut off by a time limit still shows how far it came)
    assert [line.split()[2] for line in captured.err.splitlines() if line.startswith("gpu check: ")] == \
        list(result["stages"])
