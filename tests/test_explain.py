"""train.explain (class activation maps over chosen cells) and the evaluation's mistakes_<split>.png."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import pytorch_grad_cam
from models import build_model
from pipeline.store import CacheReader
from train.evaluate import main as evaluate_main
from train.evaluation import explain as ex
from train.evaluation import picks
from train.evaluation.metrics import predicted_labels
from train.evaluation.mistakes import read_rows
from train.evaluation.predictor import load_predictor
from train.explain import main
from train.run import main as run_main

SIZE = 24  # with the seed stem: a 2x2 feature map at layer4 (torchvision's stem would give 1x1, a flat map)


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory) -> Path:
    """A tiny run (ResNet18, seed stem, 24 px, 1 epoch on the CPU) on the shared tiny cache; its evaluation wrote
    predictions_<split>.csv and mistakes_<split>.png. Barely trained (lr 1e-5), so that its calls are near chance and
    its splits hold mistakes: trained as usual, it gets the synthetic cells all right."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_main(["resnet18", "--stem", "seed", "--stages", f"{SIZE}:1", "--lr", "1e-5", "--batch-size", "4",
                         "--device", "cpu",
                         "--no-progress", "--cache", str(cache), "--out", str(tmp_path_factory.mktemp("runs"))]) == 0
    return Path(out.getvalue().strip().splitlines()[-1])


def expected(run: Path, cache: Path, split: str) -> pd.DataFrame:
    """The run's predictions_<split>.csv with each image's label (from the cache) and the confidence of its call."""
    table = pd.read_csv(run / f"predictions_{split}.csv", dtype={"patient": str})
    meta = CacheReader(cache).read_meta(SIZE, split)
    labels = dict(zip(map(str, meta["paths"]), meta["labels"].astype(int)))
    table["label"] = table["path"].map(labels)
    table["confidence"] = np.where(table["predicted_label"] == 1, table["prob_all"], 1 - table["prob_all"])
    return table


def explain_main(args, capsys, code=0) -> tuple[str, str]:
    assert main(args + ["--device", "cpu"]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


# ----------------------------------------------------------------------------- the choice of cells


def test_the_split_grid_shows_the_most_confident_mistakes_then_sure_then_doubtful_calls(run, cache):
    table = expected(run, cache, "test")
    mistakes = table[table["predicted_label"] != table["label"]]
    assert len(mistakes) >= 2, "the tiny run must make mistakes for this test to mean anything"
    n = 6
    explanation = ex.explain_split(load_predictor(run, device="cpu"), run, "test", n, "gradcam")
    cells = explanation.cells
    assert len(cells) == min(n, len(table))
    kinds = [c.kind for c in cells]
    shown_mistakes = kinds.count(picks.MISTAKE)
    assert shown_mistakes == min(len(mistakes), n // 2) and kinds[:shown_mistakes] == [picks.MISTAKE] * shown_mistakes
    by_path = table.set_index("path")
    for cell in cells:  # each cell's figures are the evaluation's, read back from predictions_test.csv
        row = by_path.loc[cell.path]
        assert cell.prob_all == pytest.approx(row["prob_all"], abs=1e-4)
        assert cell.label == row["label"] and cell.patient == row["patient"]
    # the mistakes shown are, within each true class, the most confident ones the CSV has
    for label in (0, 1):
        shown = [c.path for c in cells if c.kind == picks.MISTAKE and c.label == label]
        ranked = mistakes[mistakes["label"] == label].sort_values("confidence", ascending=False)["path"].tolist()
        assert shown == ranked[:len(shown)]
    # then the surest correct calls of each class, then the least certain of the rest
    correct = table[table["predicted_label"] == table["label"]]
    assert picks.CORRECT in kinds
    for label in (0, 1):
        shown = [c.path for c in cells if c.kind == picks.CORRECT and c.label == label]
        ranked = correct[correct["label"] == label].sort_values("confidence", ascending=False)["path"].tolist()
        assert shown == ranked[:len(shown)]
    rest = table[~table["path"].isin([c.path for c in cells if c.kind != picks.UNCERTAIN])]
    doubtful = [c.path for c in cells if c.kind == picks.UNCERTAIN]
    nearest = (rest["prob_all"] - 0.5).abs().sort_values(kind="stable").index[:len(doubtful)]
    assert sorted(doubtful) == sorted(rest.loc[nearest, "path"])
    assert "most confident mistakes" in explanation.title and "least certain" in explanation.title


def test_each_cell_is_its_evaluation_view_with_a_map_of_that_size(run, cache):
    explanation = ex.explain_split(load_predictor(run, device="cpu"), run, "test", 4, "gradcam")
    reader = CacheReader(cache)
    meta = reader.read_meta(SIZE, "test")
    stored = []
    for i in range(len(reader.shards(SIZE, "test"))):
        with reader.open_shard(SIZE, "test", i) as f:
            stored.append(f["images"][()])
    stored = np.concatenate(stored)
    margin = (stored.shape[1] - SIZE) // 2
    assert explanation.feature_hw == (2, 2) and "layer4[1] (BasicBlock)" in explanation.title
    for cell in explanation.cells:
        row = list(map(str, meta["paths"])).index(cell.path)
        assert cell.view.dtype == np.uint8 and cell.view.shape == (SIZE, SIZE, 3)
        assert np.array_equal(cell.view, stored[row, margin:margin + SIZE, margin:margin + SIZE])
        assert cell.heat.dtype == np.float32 and cell.heat.shape == (SIZE, SIZE)
        assert 0 <= cell.heat.min() and cell.heat.max() <= 1
    # scaled per cell: a map that is not flat spans [0, 1] (a 2x2 feature map where every value is <= 0 is flat)
    assert any(cell.heat.min() < 0.01 and cell.heat.max() > 0.99 for cell in explanation.cells)


def test_useful_cells_fill_each_group_in_order():
    probs = np.array([0.9, 0.2, 0.45, 0.99, 0.05, 0.6, 0.7, 0.52])
    labels = np.array([0, 1, 1, 1, 0, 0, -1, -1])
    # mistakes: 0 (hem called all, conf 0.9), 1 (all called hem, 0.8), 2 (all called hem, 0.55), 5 (hem, 0.6)
    assert picks.confident_mistakes(probs, labels, 10) == [1, 0, 2, 5]  # all-called-hem first, classes alternating
    chosen = picks.useful_cells(probs, labels, 5)
    assert [(p.index, p.kind) for p in chosen] == [(1, picks.MISTAKE), (0, picks.MISTAKE), (2, picks.MISTAKE),
                                                  (3, picks.CORRECT), (7, picks.UNCERTAIN)]
    # unlabelled cells: the surest calls fill the correct calls' places
    chosen = picks.useful_cells(probs, np.full(8, -1), 4)
    assert [(p.index, p.kind) for p in chosen] == [(3, picks.CONFIDENT), (4, picks.CONFIDENT),
                                                  (7, picks.UNCERTAIN), (2, picks.UNCERTAIN)]
    assert len(picks.useful_cells(probs, labels, 50)) == 8  # never more than there are
    assert picks.describe(picks.useful_cells(probs, labels, 5), labels).startswith(
        "3 most confident mistakes (2 all called hem, 1 hem called all), 1 most confident correct call, 1 least "
        "certain call")


@pytest.mark.parametrize("split, rows", [("train", None), (("train", "valid"), [30, 2, 7, 33, 12, 39])],
                         ids=["a split", "a fold's rows of train + valid"])
def test_read_rows_gives_the_rows_asked_in_the_order_asked(cache, split, rows):
    from train.data.loader import CacheLoader
    loader = CacheLoader(cache, SIZE, split, 4, rows=rows)
    everything = torch.cat([x for x, _ in loader])
    order = [len(everything) - 1, 1, 3, 0]
    assert torch.equal(read_rows(loader, order), everything[order])


# ----------------------------------------------------------------------------- the maps


@pytest.mark.parametrize("stem, feature", [("standard", (2, 2)), ("seed", (4, 4))])
def test_maps_come_from_the_last_block_at_its_resolution_and_leave_no_hooks(stem, feature):
    torch.manual_seed(0)
    model = build_model("resnet18", stem=stem).eval()
    layer, name = ex.target_layer(model)
    assert layer is model.layer4[-1] and name == "layer4[1] (BasicBlock)"
    maps, hw = ex.class_maps(model, torch.randn(3, 3, 64, 64), [0, 1, 1], "gradcam")
    assert hw == feature and maps.shape == (3, 64, 64) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1
    assert not any(m._forward_hooks for m in model.modules())  # the library's hooks are removed
    assert all(p.grad is None for p in model.parameters())


def test_the_methods_are_the_librarys():
    library = {c for c in vars(pytorch_grad_cam).values()
               if isinstance(c, type) and issubclass(c, pytorch_grad_cam.base_cam.BaseCAM)}
    assert set(ex.METHODS.values()) == library - {pytorch_grad_cam.base_cam.BaseCAM}
    assert {"gradcam", "gradcam++", "eigencam", "scorecam"} <= set(ex.METHODS)
    with pytest.raises(ex.ExplainError, match="is not one of grad-cam's"):
        ex.class_maps(build_model("resnet18"), torch.zeros(1, 3, 32, 32), [0], "gradcam3")


# ----------------------------------------------------------------------------- the command


def test_the_command_writes_one_png_and_never_over_a_file(run, tmp_path, capsys):
    out = tmp_path / "maps.png"
    printed, _ = explain_main([str(run), "--split", "test", "--n", "5", "--method", "gradcam++", "--out", str(out)],
                              capsys)
    assert printed.strip().splitlines()[-1] == str(out)
    assert "gradcam++ on layer4[1] (BasicBlock), a 2x2 feature map" in printed
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 500
    before = out.read_bytes()
    _, err = explain_main([str(run), "--split", "valid", "--out", str(out)], capsys, code=2)
    assert "already exists; explain never replaces an earlier figure" in err
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["maps.png"]


def test_image_files_are_shown_in_order_or_chosen(run, cache, tmp_path, capsys):
    root = Path(CacheReader(cache).manifest["source"]["root"])
    files = sorted(root.rglob("*.bmp"))[:3]
    predictor = load_predictor(run, device="cpu")
    given = ex.explain_images(predictor, [str(f) for f in reversed(files)], 4, "eigencam")
    assert [c.path for c in given.cells] == [str(f) for f in reversed(files)]
    assert {c.kind for c in given.cells} == {picks.GIVEN} and all(c.label == -1 for c in given.cells)
    chosen = ex.explain_images(predictor, [str(root)], 4, "gradcam")  # a source layout: labels and patients
    assert len(chosen.cells) == 4 and all(c.label in (0, 1) for c in chosen.cells)
    calls = predicted_labels([c.prob_all for c in chosen.cells])
    kinds = [c.kind for c in chosen.cells]
    assert all((call != c.label) == (kind == picks.MISTAKE) for call, c, kind in zip(calls, chosen.cells, kinds)
               if kind != picks.UNCERTAIN)
    out = tmp_path / "files.png"
    printed, _ = explain_main([str(run), str(files[0]), "--out", str(out)], capsys)
    assert printed.strip().splitlines()[-1] == str(out) and out.is_file()


def test_bad_runs_images_and_arguments_are_named_errors(run, cache, tmp_path, capsys):
    image = next(Path(CacheReader(cache).manifest["source"]["root"]).rglob("*.bmp"))
    garbage = tmp_path / "UID_5_1_1_all.bmp"
    garbage.write_bytes(b"BM" + bytes(range(256)) * 4)
    r, out = str(run), ["--out", str(tmp_path / "e.png")]
    cases = [
        ([str(tmp_path / "nope"), "--split", "test"], "run folder"),
        ([str(tmp_path), "--split", "test"], "no config.json"),
        ([r, "--split", "test", "--checkpoint", "missing.pt"], "missing.pt: no such checkpoint"),
        ([r], "or --split NAME"),
        ([r, str(image), "--split", "test"], "(one of the two)"),
        ([r, "--split", "tset"], "has no split 'tset' (it has: test, train, valid)"),
        ([r, "--split", "test", "--n", "0"], "--n must be 1 to 64, got 0"),
        ([r, "--split", "test", "--n", "65"], "--n must be 1 to 64, got 65"),
        ([r, "--split", "test", "--batch-size", "0"], "--batch-size must be >= 1"),
        ([r, str(tmp_path / "ghost.bmp")], "ghost.bmp does not exist"),
        ([r, str(garbage)], "UID_5_1_1_all.bmp: not a readable image"),
        ([r, "--split", "test", "--out", str(tmp_path / "e.jpg")], "the figure is a PNG"),
        ([r, "--split", "test", "--out", str(tmp_path / "no" / "e.png")], "does not exist; create it"),
    ]
    for args, message in cases:
        _, err = explain_main(args + (out if "--out" not in args else []), capsys, code=2)
        assert message in err, (args, err)
    with pytest.raises(SystemExit) as stop:
        main([r, "--split", "test", "--out", str(tmp_path)])  # a folder would become a file named like it
    assert stop.value.code == 2 and "is a folder; --out takes a PNG file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([r, "--split", "test", "--method", "gradcam3"])
    assert "invalid choice: 'gradcam3'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UID_5_1_1_all.bmp"]  # nothing written


# ----------------------------------------------------------------------------- mistakes_<split>.png


def test_evaluate_writes_the_most_confident_mistakes_beside_the_confusion_matrix(run, cache, capsys, monkeypatch):
    from train.evaluation import evaluator
    assert (run / "mistakes_test.png").is_file() and (run / "mistakes_valid.png").is_file()  # by train.run's end
    shown = []
    original = evaluator.write_mistakes

    def recording(loader, probs_all, labels, path, heading, **kwargs):
        rows = original(loader, probs_all, labels, path, heading, **kwargs)
        shown.append((path, [str(loader.paths[i]) for i in rows], heading))
        return rows

    monkeypatch.setattr(evaluator, "write_mistakes", recording)
    (run / "mistakes_test.png").unlink()
    assert evaluate_main([str(run), "--split", "test", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert (run / "mistakes_test.png").is_file()
    [(path, paths, heading)] = shown
    # drawn to a temporary file beside it, renamed into place with the other reports
    assert path.parent == run and path.name in ("mistakes_test.png", "mistakes_test.tmp.png")
    assert heading.startswith("resnet18 best.pt (epoch 1, 24 px), test")
    table = expected(run, cache, "test")
    mistakes = table[table["predicted_label"] != table["label"]]
    assert sorted(paths) == sorted(mistakes["path"]) if len(mistakes) <= 16 else len(paths) == 16
    for label in (0, 1):  # each class's mistakes, most confident first
        ranked = mistakes[mistakes["label"] == label].sort_values("confidence", ascending=False)["path"].tolist()
        assert [p for p in paths if p in set(ranked)] == ranked[:len([p for p in paths if p in set(ranked)])]
    with Image.open(run / "mistakes_test.png") as image:
        assert image.format == "PNG"


def test_a_split_without_mistakes_still_gets_a_figure(cache, tmp_path):
    from train.data.loader import CacheLoader
    from train.evaluation.mistakes import write_mistakes
    loader = CacheLoader(cache, SIZE, "test", 4)
    labels = loader.labels
    assert write_mistakes(loader, labels.astype(float), labels, tmp_path / "m.png", "perfect") == []
    assert (tmp_path / "m.png").is_file()
    (tmp_path / "m.png").write_bytes(b"old")  # a report of the run: rewritten, not refused
    rows = write_mistakes(loader, 1.0 - labels, labels, tmp_path / "m.png", "all wrong")
    assert len(rows) == min(16, len(labels)) and (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
