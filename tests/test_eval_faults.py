"""train.evaluate and train.predict against faults a user meets: every one ends in a clear answer (exit 2, the file or
flag named, what to do) or a right result, and no evaluation replaces or drops figures it did not compute."""
import codecs
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from models import build_model
from pipeline import parallel
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from tests.helpers import ROOT, common, synthetic_cell
from train.engine import checkpoint as ckpt
from train.engine import run_folder as rf
from train.evaluate import main as evaluate_main
from train.evaluation import predictor as predictor_mod
from train.predict import main as predict_main
from train.run import main as run_main

# how far another --batch-size may move an image's probability of `all` on the CPU (the README says so)
BATCH_EFFECT_BOUND = 1e-3


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory) -> Path:
    """One tiny finished run (ResNet18, 16 px then 24 px, one epoch each, CPU) with best.pt, last.pt and reports."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_main(["resnet18", "--stages", "16:1", "24:1", "--device", "cpu", "--no-progress"]
                        + common(cache, tmp_path_factory.mktemp("runs"))) == 0
    return Path(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def source(cache) -> Path:
    """The raw images the cache was built from."""
    return Path(json.loads((cache / "manifest.json").read_text())["source"]["root"])


def copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    return Path(shutil.copytree(run, tmp_path / name))


def evaluate(args, capsys, code=0) -> tuple[str, str]:
    assert evaluate_main([str(a) for a in args] + ["--device", "cpu"]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def predict(args, capsys, code=0) -> tuple[str, str]:
    assert predict_main([str(a) for a in args] + ["--device", "cpu", "--progress", "off"]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def reports(run_dir: Path) -> dict:
    """The bytes of every file directly in the run folder."""
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def summary(folder: Path) -> dict:
    return json.loads((folder / rf.SUMMARY).read_text())


def fresh_weights(path: Path, seed: int) -> None:
    """Replace a checkpoint's model by freshly initialised ResNet18 weights: another model of the same run shape."""
    state = ckpt.load(path)
    torch.manual_seed(seed)
    state["model"] = build_model("resnet18").state_dict()
    ckpt.save(state, path)


# ---------------------------------------------------------------- 1: a run's reports are of its own checkpoints


def test_a_checkpoint_from_outside_the_run_is_refused_and_nothing_changes(run, tmp_path, capsys):
    mine, other = copy(run, tmp_path, "mine"), copy(run, tmp_path, "other")
    fresh_weights(other / rf.BEST, seed=3)  # another run: same model and cache, other weights
    before = reports(mine)
    _, err = evaluate([mine, "--checkpoint", other / rf.BEST, "--split", "test"], capsys, code=2)
    assert f"{other / rf.BEST} is not in the run folder {mine}" in err
    assert f"it belongs to the run folder {other}" in err and "nothing was evaluated or changed" in err
    assert reports(mine) == before and not [p for p in mine.iterdir() if p.is_dir()]
    _, err = predict([mine, tmp_path, "--checkpoint", other / rf.BEST, "--out", tmp_path / "p.csv"], capsys,
                     code=2)
    assert f"{other / rf.BEST} is not in the run folder {mine}" in err and not (tmp_path / "p.csv").exists()


def test_another_checkpoint_of_the_run_reports_beside_the_runs_own(run, tmp_path, capsys):
    mine = copy(run, tmp_path)
    fresh_weights(mine / rf.LAST, seed=4)  # so that last.pt's figures differ from best.pt's
    before = reports(mine)
    out, _ = evaluate([mine, "--checkpoint", "last.pt", "--split", "test"], capsys)
    elsewhere = mine / "eval-last"
    assert out.strip().splitlines()[-1] == str(elsewhere)  # the last line: where the reports are
    assert reports(mine) == before  # the run's summary, predictions, patients, confusion matrices: untouched
    last = summary(elsewhere)
    assert last["checkpoint"] == "last.pt" and set(last["splits"]) == {"test"} and last["best_valid_acc"] is None
    assert {"predictions_test.csv", "patients_test.csv", "summary.json"} <= {p.name for p in elsewhere.iterdir()}
    assert not list(elsewhere.glob("*.tmp*"))
    # the same checkpoint named by its path inside the run folder; the other split joins the first
    evaluate([mine, "--checkpoint", mine / rf.LAST, "--split", "valid"], capsys)
    assert set(summary(elsewhere)["splits"]) == {"valid", "test"}
    assert summary(elsewhere)["splits"]["test"] == last["splits"]["test"]
    # best.pt's evaluation of one split keeps its other split, whatever was evaluated in between
    evaluate([mine, "--split", "test"], capsys)
    assert summary(mine)["best_valid_acc"] == json.loads(before["summary.json"])["best_valid_acc"] is not None
    assert summary(mine)["splits"] == json.loads(before["summary.json"])["splits"]


def test_figures_of_another_checkpoint_or_an_unreadable_summary_are_recomputed_not_dropped(run, tmp_path, capsys):
    mine = copy(run, tmp_path)
    complete = summary(mine)
    # summary.json as an earlier `--checkpoint last.pt --split valid` left it: last.pt's valid figures only
    stale = {**complete, "checkpoint": "last.pt", "best_valid_acc": 0.123,
             "splits": {"valid": complete["splits"]["valid"]}, "patients": {"valid": complete["patients"]["valid"]}}
    (mine / rf.SUMMARY).write_text(json.dumps(stale))
    evaluate([mine, "--split", "test"], capsys)
    now = summary(mine)
    assert now["checkpoint"] == "best.pt" and set(now["splits"]) == {"valid", "test"}
    assert now["best_valid_acc"] == complete["best_valid_acc"] and now["splits"] == complete["splits"]
    # a damaged summary.json: the message said "evaluate the run again to rewrite it"; so it does, every split
    (mine / rf.SUMMARY).write_text("{half a file")
    evaluate([mine, "--split", "test"], capsys)
    assert summary(mine)["splits"] == complete["splits"]


def test_the_runs_own_final_evaluation_still_writes_the_run_folder(run):
    assert summary(run)["checkpoint"] == "best.pt" and set(summary(run)["splits"]) == {"valid", "test"}
    assert not [p for p in run.iterdir() if p.is_dir()]


# ---------------------------------------------------------------- 4: names that differ only in undecodable bytes


def test_names_that_differ_only_in_undecodable_bytes_stay_different(run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(7)
    raw = os.fsencode(folder) + b"/bad\xff\xfe.bmp"  # bytes that are no UTF-8
    literal = folder / "bad\\xff\\xfe.bmp"  # the same name written with backslashes
    plain = folder / "UID_3_1_1_all.bmp"
    for path, label in ((raw, 1), (literal, 0), (plain, 1)):
        ok, data = cv2.imencode(".bmp", synthetic_cell(rng, 64, label))
        with open(path, "wb") as f:
            f.write(data.tobytes())
    predict([run, folder, "--out", tmp_path / "p.csv"], capsys)
    table = pd.read_csv(tmp_path / "p.csv")
    assert len(table) == 3 and table["path"].is_unique
    # the escaping (backslash doubled, a byte that is no UTF-8 as \xNN) reads back to each file's own name
    files = {codecs.escape_decode(p.encode())[0] for p in table["path"]}
    assert files == {raw, os.fsencode(literal), os.fsencode(plain)}
    assert str(plain) in set(table["path"])  # a name with neither is written as it is


# ---------------------------------------------------------------- 5: batch composition


def spread_predictor(run: Path) -> predictor_mod.Predictor:
    """The run's predictor with fresh weights and a sharpened head: probabilities spread over (0, 1), where
    rounding differences show most (a model trained this little can be saturated, every probability 0 or 1)."""
    predictor = predictor_mod.load_predictor(run, device="cpu")
    torch.manual_seed(0)
    model = build_model("resnet18")
    with torch.no_grad():
        model.fc.weight.mul_(30)
    layout = torch.channels_last if predictor.precision.channels_last else torch.contiguous_format
    predictor.model = model.to(memory_format=layout).eval()
    return predictor


def test_an_image_gets_the_same_probability_alone_or_among_others(run, source, tmp_path, capsys):
    predictor = spread_predictor(run)
    entries, _ = predictor_mod.gather([source])
    _, probs, _ = predictor_mod.predict_images(predictor, entries, 16, jobs=1)
    target = entries[int(np.abs(probs - 0.5).argmin())]  # the least saturated: where rounding shows most
    others = [e for e in entries if e != target]
    _, alone, _ = predictor_mod.predict_images(predictor, [target], 16, jobs=1)
    assert 0.01 < alone[0] < 0.99
    for given in ([*others[:3], target], [*others[7:], target], [target, *others[::-1]]):
        kept, probs, _ = predictor_mod.predict_images(predictor, given, 16, jobs=1)  # 4 images; 16 + 6; 16 + 12
        assert probs[kept.index(target)] == alone[0]  # the same bits


def test_another_batch_size_moves_a_probability_by_at_most_the_documented_bound(run, source):
    bound = f"{BATCH_EFFECT_BOUND:.0e}".replace("e-0", "e-")
    assert f"another `--batch-size` moves a probability by at most {bound}" in (ROOT / "README.md").read_text()
    predictor = spread_predictor(run)
    files = sorted(str(p) for p in source.rglob("*.bmp"))
    stored = [parallel.process(f, predictor.preprocess, (predictor.size,))[1][predictor.size] for f in files]
    stored += [np.ascontiguousarray(np.rot90(s)) for s in stored]  # 112 distinct images
    alone = torch.cat([predictor.probs_all([s]) for s in stored]).numpy()
    assert alone.min() < 0.2 and alone.max() > 0.8  # spread: not a saturated model that hides differences
    rng = np.random.default_rng(0)
    worst = 0.0
    for size in (2, 3, 7, 16, 33, 64):
        for _ in range(2):
            pick = rng.permutation(len(stored))[:size]
            batch = predictor.probs_all([stored[i] for i in pick]).numpy()
            worst = max(worst, float(np.abs(batch - alone[pick]).max()))
    print(f"largest difference, batch of 1 vs batches of 2..64: {worst:.3g}")
    assert 0 < worst <= BATCH_EFFECT_BOUND  # 0 would mean the measurement measures nothing


# ---------------------------------------------------------------- 12: weights of another architecture


def test_weights_of_another_architecture_are_named(run, tmp_path, capsys):
    mine = copy(run, tmp_path)
    state = ckpt.load(mine / rf.BEST)
    state["model"] = build_model("resnet50").state_dict()  # labelled resnet18, holding resnet50 weights
    ckpt.save(state, mine / rf.BEST)
    before = reports(mine)
    message = (f"{mine / rf.BEST} holds weights of another architecture than the run's resnet18 (first mismatch: "
               f"layer1.0.conv1.weight 64x64x1x1 vs 64x64x3x3)")
    _, err = evaluate([mine], capsys, code=2)
    assert message in err and "Traceback" not in err
    assert reports(mine) == before
    _, err = predict([mine, tmp_path, "--out", tmp_path / "p.csv"], capsys, code=2)
    assert message in err


def test_a_bare_state_dict_is_not_taken_for_a_run_checkpoint(run, tmp_path, capsys):
    mine = copy(run, tmp_path)
    torch.save(build_model("resnet18").state_dict(), mine / "weights.pt")  # e.g. torchvision weights
    _, err = evaluate([mine, "--checkpoint", "weights.pt"], capsys, code=2)
    assert f"{mine / 'weights.pt'}: not a checkpoint of python -m train.run" in err
    assert not (mine / "eval-weights").exists()


# ---------------------------------------------------------------- 13, 18: config.json's preprocessing record


def edit_config(run_dir: Path, change) -> None:
    data = json.loads((run_dir / rf.CONFIG).read_text())
    change(data)
    (run_dir / rf.CONFIG).write_text(json.dumps(data))


def best_size(run_dir: Path) -> str:
    return str(summary(run_dir)["checkpoint_size"])


@pytest.mark.parametrize("field, value, phrase", [
    ("mean", "abc", "mean is 'abc', not three finite numbers (one per RGB channel)"),
    ("mean", [0.1, float("nan"), 0.2], "mean is [0.1, nan, 0.2], not three finite numbers"),
    ("std", [0, 0, 0], "std is [0, 0, 0], not three finite numbers > 0 (one per RGB channel)"),
    ("std", [0.2, 0.2], "std is [0.2, 0.2], not three finite numbers > 0"),
    ("std", [0.2, True, 0.2], "std is [0.2, True, 0.2], not three finite numbers > 0"),
])
def test_bad_normalisation_in_config_json_is_refused_by_name(run, source, tmp_path, capsys, field, value, phrase):
    mine = copy(run, tmp_path)
    size = best_size(mine)
    edit_config(mine, lambda d: d["preprocess"]["sizes"][size].__setitem__(field, value))
    _, err = predict([mine, source, "--out", tmp_path / "p.csv"], capsys, code=2)
    assert f"{mine / rf.CONFIG}: preprocess.sizes.{size}: " in err and phrase in err, err
    assert "restore config.json from a copy of the run folder" in err
    assert not (tmp_path / "p.csv").exists()


def test_a_record_without_the_checkpoints_size_names_config_json(run, source, tmp_path, capsys):
    mine = copy(run, tmp_path)
    size = best_size(mine)
    edit_config(mine, lambda d: d["preprocess"]["sizes"].pop(size))
    _, err = predict([mine, source, "--out", tmp_path / "p.csv"], capsys, code=2)
    assert f"{mine / rf.CONFIG}: its preprocessing record has no entry for {size} px" in err
    assert "best.pt was trained at" in err and "restore config.json from a copy" in err
    # the run's cache still holds that size: removing the record makes predict use the cache's manifest
    assert "delete its `preprocess` entry" in err


def test_a_record_without_the_class_all_names_config_json(run, source, tmp_path, capsys):
    mine = copy(run, tmp_path)
    edit_config(mine, lambda d: d["preprocess"].__setitem__("classes", ["hem", "ALL"]))
    _, err = predict([mine, source, "--out", tmp_path / "p.csv"], capsys, code=2)
    assert f"{mine / rf.CONFIG}: preprocess.classes" in err and "no class `all`" in err


# ---------------------------------------------------------------- 17: a cross-validation folder


def test_predict_on_a_cross_validation_folder_points_to_its_folds(run, source, tmp_path, capsys):
    cv = tmp_path / "cv"
    cv.mkdir()
    (cv / rf.CV_PLAN).write_text("{}")
    copy(run, cv, "fold-0")
    _, err = predict([cv, source, "--out", tmp_path / "p.csv"], capsys, code=2)
    assert "is a cross-validation folder (train.cv); pass one of its runs" in err and str(cv / "fold-0") in err


# ---------------------------------------------------------------- 20 and others: which checkpoint to use instead


def test_a_damaged_best_pt_points_to_last_pt_when_that_loads(run, source, tmp_path, capsys):
    mine = copy(run, tmp_path)
    (mine / rf.BEST).write_bytes((mine / rf.BEST).read_bytes()[:1000])  # truncated
    for args in ([mine], [mine, "--split", "test"]):
        _, err = evaluate(args, capsys, code=2)
        assert "best.pt: cannot be loaded safely" in err and "last.pt loads: pass --checkpoint last.pt" in err
    _, err = predict([mine, source, "--out", tmp_path / "p.csv"], capsys, code=2)
    assert "last.pt loads: pass --checkpoint last.pt" in err
    (mine / rf.LAST).write_bytes(b"")  # both damaged: nothing to point to
    _, err = evaluate([mine], capsys, code=2)
    assert "best.pt: cannot be loaded safely" in err and "--checkpoint" not in err


def test_a_run_with_only_last_pt_says_to_pass_it(run, source, tmp_path, capsys):
    mine = copy(run, tmp_path)
    (mine / rf.BEST).unlink()
    _, err = evaluate([mine], capsys, code=2)
    assert f"{mine / rf.BEST}: no such checkpoint (the run folder has: last.pt); pass --checkpoint last.pt" in err
    _, err = predict([mine, source, "--out", tmp_path / "p.csv"], capsys, code=2)
    assert "(the run folder has: last.pt); pass --checkpoint last.pt" in err


# ---------------------------------------------------------------- evaluate: flags, cache, files


def test_split_given_twice_evaluates_both(run, tmp_path, capsys):
    mine = copy(run, tmp_path)
    (mine / rf.SUMMARY).unlink()
    out, _ = evaluate([mine, "--split", "valid", "--split", "test", "test"], capsys)
    assert set(summary(mine)["splits"]) == {"valid", "test"}
    assert out.count("valid acc") == 1 and out.count("test acc") == 1  # each split once


def test_a_cache_rebuilt_without_the_checkpoints_size_names_it_and_the_command(run, source, tmp_path, capsys):
    mine = copy(run, tmp_path)
    config, _ = rf.read_config(mine)
    smaller = build(PreprocessConfig(), BuildOptions(sizes=(16,), source=source, cache_root=tmp_path / "cache",
                                                     jobs=1, progress=False)).cache_dir
    assert smaller.name == config.cache_key  # the same cache, rebuilt with fewer sizes
    edit_config(mine, lambda d: d["config"].__setitem__("cache_dir", str(smaller)))
    before = reports(mine)
    _, err = evaluate([mine], capsys, code=2)
    assert f"the run's cache {smaller} holds 16 px, not {best_size(mine)} px" in err
    assert f"python -m pipeline.build --source {source} --cache-dir {smaller.parent} --sizes 16 24" in err
    assert reports(mine) == before


def test_reports_that_cannot_be_written_are_an_error_and_the_summary_stays(run, tmp_path, capsys):
    mine = copy(run, tmp_path)
    before = (mine / rf.SUMMARY).read_bytes()
    (mine / "patients_test.csv").unlink()
    (mine / "patients_test.csv").mkdir()  # in the way, as a read-only or full disk would be
    _, err = evaluate([mine], capsys, code=2)
    assert f"cannot write {mine / 'patients_test.csv'}" in err and "Traceback" not in err
    assert (mine / rf.SUMMARY).read_bytes() == before
    assert not [p for p in mine.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------- predict: batch size


def test_a_huge_batch_size_keeps_memory_bounded(run, source, tmp_path, capsys, monkeypatch):
    batches = []
    original = predictor_mod.Predictor.probs_all

    def counting(self, stored, tta=False):
        batches.append(len(stored))
        return original(self, stored, tta)

    predictor = predictor_mod.load_predictor(run, device="cpu")
    entries, _ = predictor_mod.gather([source])
    monkeypatch.setattr(predictor_mod.Predictor, "probs_all", counting)
    kept, probs, _ = predictor_mod.predict_images(predictor, entries, 10**12, jobs=1, window=5)
    assert len(kept) == len(entries) == len(probs) and batches == [5] * -(-len(entries) // 5)  # the last one padded


def test_running_out_of_memory_says_to_pass_a_smaller_batch_size(run, source, tmp_path, capsys, monkeypatch):
    def out_of_memory(self, stored, tta=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(predictor_mod.Predictor, "probs_all", out_of_memory)
    _, err = predict([run, source, "--out", tmp_path / "p.csv", "--batch-size", "8"], capsys, code=2)
    assert "out of memory on cpu predicting a batch of 8 images" in err
    assert "pass a smaller --batch-size (e.g. 2)" in err
    assert not list(tmp_path.glob("p*.csv*"))


def test_an_out_below_a_file_and_a_run_without_checkpoints_are_named(run, source, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    _, err = predict([run, source, "--out", tmp_path / "notes.txt" / "p.csv"], capsys, code=2)
    assert f"{tmp_path / 'notes.txt'} is a file, not a folder" in err
    fresh = copy(run, tmp_path, "fresh")
    for name in (rf.BEST, rf.LAST):
        (fresh / name).unlink()  # a run still in its first epoch
    _, err = evaluate([fresh], capsys, code=2)
    assert "best.pt: no such checkpoint (the run folder has: none); the run is still in its first epoch" in err
