"""`python -m train.bench recipe`: the preset recipe timed on a C-NMC-shaped source; every part recorded, the
projection's arithmetic, a failing part keeping its error while the others run. No wall-clock thresholds."""
import json
from collections import Counter

import pytest

from pipeline.sources import discover
from train.bench import __main__ as train_bench
from train.bench import recipe
from train.bench import recipe_source

PARTS = ["source", "build", "training", "evaluation", "report_loader"]


def projected(result: dict) -> float:
    """The whole recipe's seconds from the parts' figures, as the module documents it."""
    parts, up = result["parts"], 1 / result["scale"]
    stages = sum(s["s_per_epoch"] * up * s["recipe_epochs"] + s["first_epoch_extra_s"]
                 for s in parts["training"]["stages"])
    return parts["build"]["build_s"] * up + stages + parts["evaluation"]["evaluation_s"] * up


def test_source_has_the_kaggle_downloads_counts_and_layout(tmp_path):
    info = recipe_source.ensure_source(tmp_path, recipe_source.CNMC)
    source = discover(info["root"])
    counts = Counter((item.split, item.label) for item in source.items)
    assert source.layout == "kaggle"
    assert counts == {(None, 1): 7272, (None, 0): 3389, ("prelim", 1): 1219, ("prelim", 0): 648, ("final", -1): 2586}
    patients = Counter(label for label, patient in {(i.label, i.patient) for i in source.items if i.split is None})
    assert patients == {1: 47, 0: 26}
    assert info["distinct_images"] == 24 and info["files"] == 15114 and not info["reused"]
    assert recipe_source.ensure_source(tmp_path, recipe_source.CNMC)["reused"]  # written once per work folder


def test_a_scaled_source_keeps_the_ratio():
    shape = recipe_source.CNMC.scaled(0.1)
    assert shape.counts["training_folds"] == 1067 and shape.counts["training_all"] == 728  # 7,272 : 3,389 of 10,661
    assert shape.counts["prelim"] == 187 and shape.counts["final"] == 259


def test_stage_figures_take_the_steady_epochs_and_the_first_ones_extra():
    stage = {"size": 224, "recipe_epochs": 100, "epochs_measured": 3}
    rows = [{"epoch_s": e, "imgs_per_s": 100.0, "data_wait": 0.1, "augment_share": 0.05, "valid_acc": 0.5}
            for e in (9.0, 4.0, 5.0)]
    figures = recipe.stage_figures(stage, [12.0, 6.0, 8.0], rows, compiled=True)
    assert figures["s_per_epoch"] == 7.0 and figures["first_epoch_extra_s"] == 5.0 and figures["compile_s"] == 5.0
    assert figures["train_pass_s_per_epoch"] == 4.5 and figures["steady"]
    one = recipe.stage_figures({**stage, "epochs_measured": 1}, [12.0], rows[:1], compiled=True)
    assert one["s_per_epoch"] == 12.0 and one["first_epoch_extra_s"] == 0.0 and one["compile_s"] is None


def test_totals_project_per_stage_seconds_times_epochs_plus_build_and_evaluation():
    stages = [{"s_per_epoch": 2.0, "recipe_epochs": 550, "epochs_measured": 2, "first_epoch_extra_s": 3.0},
              {"s_per_epoch": 5.0, "recipe_epochs": 100, "epochs_measured": 2, "first_epoch_extra_s": 1.0}]
    parts = {"build": {"build_s": 10.0}, "training": {"training_s": 20.0, "stages": stages},
             "evaluation": {"evaluation_s": 4.0}}
    t = recipe.totals(parts, scale=0.5)
    assert t["measured_s"] == 34.0
    assert [s["projected_s"] for s in stages] == [2 * 2 * 550 + 3, 5 * 2 * 100 + 1]
    assert t["projected_s"] == pytest.approx(20 + 2203 + 1001 + 8)
    whole = {"s_per_epoch": 2.0, "recipe_epochs": 2, "epochs_measured": 2, "first_epoch_extra_s": 3.0,
             "epoch_wall_s": [5.0, 2.5]}  # every epoch measured at full scale: its own seconds, not a projection
    recipe.totals({"training": {"stages": [whole]}}, scale=1)
    assert whole["measured_all_epochs"] and whole["projected_s"] == 7.5
    parts["evaluation"] = {"error": "RuntimeError: boom"}
    incomplete = recipe.totals(parts, scale=1)
    assert (incomplete["measured_s"], incomplete["projected_s"], incomplete["missing"]) == (None, None, ["evaluation"])


@pytest.mark.parametrize("argv, message", [
    (["--model", "resnet19"], "--model 'resnet19' is not a model"),
    (["--scale", "0"], "--scale must be a fraction"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_bad_arguments_exit_2_naming_the_flag(argv, message, capsys, tmp_path):
    assert train_bench.main(["recipe", "--device", "cpu", "--work-dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_recipe_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_bench.main(["recipe", "--help"])
    assert exit_.value.code == 0 and "python -m train.bench recipe" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_cli_writes_every_part_with_figures(tmp_path, capsys):
    out = tmp_path / "recipe.json"
    code = train_bench.main(["recipe", "--device", "cpu", "--quick", "--json", str(out), "--work-dir",
                             str(tmp_path / "work"), "--progress", "off"])
    result = json.loads(out.read_text())
    parts = result["parts"]
    assert code == 0 and result["ok"], {k: p.get("error") for k, p in parts.items()}
    assert list(parts) == PARTS and all(p["status"] == "ok" for p in parts.values())
    assert parts["source"]["counts"]["training_folds"] == 36 and "synthetic" in result["synthetic"]
    assert parts["build"]["sizes"] == [32, 48] and parts["build"]["build_s"] > 0
    assert set(parts["build"]["splits"]) == {"train", "valid", "test", "prelim", "final"}
    (stage,) = parts["training"]["stages"]  # resnet18's preset: one stage, 224 px (48 px here) x 100 epochs
    assert (stage["size"], stage["recipe_epochs"], stage["epochs_measured"]) == (48, 100, 1)
    assert len(stage["epoch_wall_s"]) == 1 and stage["s_per_epoch"] > 0 and 0 <= stage["data_wait"] <= 1
    assert 0 <= stage["augment_share"] <= stage["data_wait"] and not stage["measured_all_epochs"]
    assert parts["evaluation"]["evaluation_s"] > 0
    (row,) = parts["report_loader"]["rows"]
    assert row["size"] == 48 and row["s_per_epoch"] > 0 and row["ratio"] == pytest.approx(
        row["s_per_epoch"] / stage["train_pass_s_per_epoch"])
    totals = result["totals"]
    assert totals["projected_s"] == pytest.approx(projected(result))
    assert totals["measured_s"] == pytest.approx(parts["build"]["build_s"] + parts["training"]["training_s"]
                                                 + parts["evaluation"]["evaluation_s"])
    captured = capsys.readouterr()
    assert "| total |" in captured.out and "projected" in captured.out and "synthetic" in captured.out
    assert [line.split()[1] for line in captured.err.splitlines() if line.startswith("recipe: ")] == PARTS
    assert (tmp_path / "work").is_dir() and len(list((tmp_path / "work").iterdir())) == 1  # the source, kept


@pytest.mark.slow
def test_a_failing_part_keeps_its_error_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("evaluation broke on purpose")

    monkeypatch.setattr(recipe, "evaluate_run", broken)
    result = recipe.run(device="cpu", quick=True, work_dir=tmp_path)
    json.dumps(result)  # the --json file
    parts = result["parts"]
    assert {k: p["status"] for k, p in parts.items()} == {
        "source": "ok", "build": "ok", "training": "ok", "evaluation": "failed", "report_loader": "ok"}
    assert "evaluation broke on purpose" in parts["evaluation"]["error"]
    assert parts["training"]["stages"][0]["s_per_epoch"] > 0 and parts["report_loader"]["rows"][0]["s_per_epoch"] > 0
    assert result["failed"] == ["evaluation"] and not result["ok"]
    assert result["totals"]["missing"] == ["evaluation"] and result["totals"]["projected_s"] is None
    text = recipe.report(result)
    assert "**failed**: RuntimeError: evaluation broke on purpose" in text and "missing evaluation" in text


def test_the_preset_stages_and_a_compiled_run_measures_two_epochs_per_stage():
    stages = recipe.stages_of("resnet50", recipe.Plan(), epochs=1)
    assert [(s["size"], s["recipe_epochs"], s["batch_size"], s["epochs_measured"]) for s in stages] == [
        (128, 550, 64, 1), (224, 100, 64, 1)]  # train.run's preset for resnet50
    assert [s["epochs_measured"] for s in recipe.stages_of("resnet50", recipe.Plan(), 1, compiled=True)] == [2, 2]
    assert [s["size"] for s in recipe.stages_of("resnet152", recipe.QUICK, None)] == [32, 48]
