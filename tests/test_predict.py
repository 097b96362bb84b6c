"""train.predict: raw images through the run's own preprocessing, matching train.evaluate, with the CSVs it writes."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline import parallel
from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.store import CacheReader
from train.evaluation import predictor as predict_mod
from train.predict import main
from train.run import main as run_main
from tests.helpers import REAL_SAMPLE, patient_folders, synthetic_cell


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """One tiny run (ResNet18, 16 px, 1 epoch on the CPU) on a cache of a class-folders source with C-NMC names."""
    root = tmp_path_factory.mktemp("predict")
    src = patient_folders(root / "src", all_images=4, hem_images=4)
    cache = build(PreprocessConfig(), BuildOptions(sizes=(16,), source=src, cache_root=root / "cache", jobs=1,
                                                   progress=False)).cache_dir
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_main(["resnet18", "--stages", "16:1", "--batch-size", "4", "--device", "cpu", "--no-progress",
                         "--cache", str(cache), "--out", str(root / "runs")]) == 0
    run_dir = Path(out.getvalue().strip().splitlines()[-1])
    reader = CacheReader(cache)
    test_paths = [str(p) for p in reader.read_meta(16, "test")["paths"]]
    return {"src": src, "cache": cache, "run": run_dir, "root": Path(reader.manifest["source"]["root"]),
            "test_paths": test_paths}


def predict(args, capsys, code=0) -> tuple[str, str]:
    assert main(args + ["--device", "cpu", "--progress", "off"]) == code
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_test_split_from_raw_files_matches_train_evaluate(trained, tmp_path, capsys):
    files = [str(trained["root"] / p) for p in trained["test_paths"]]
    assert len(files) >= 3
    out, _ = predict([str(trained["run"]), *files, "--out", str(tmp_path / "p.csv")], capsys)
    assert out.strip().splitlines()[-1] == str(tmp_path / "p.csv")  # the last line is the output
    mine = pd.read_csv(tmp_path / "p.csv")
    assert list(mine.columns) == ["path", "patient", "prob_all", "predicted_label"]  # loose files: no label
    assert mine["path"].tolist() == files  # in the order given
    theirs = pd.read_csv(trained["run"] / "predictions_test.csv").set_index("path").loc[trained["test_paths"]]
    diff = np.abs(mine["prob_all"].to_numpy() - theirs["prob_all"].to_numpy())
    print(f"max abs difference vs train.evaluate: {diff.max():.3g}")
    assert diff.max() <= 1e-4
    assert (mine["predicted_label"].to_numpy() == theirs["predicted_label"].to_numpy()).all()
    assert mine["patient"].tolist() == [Path(p).name.split("_")[1] for p in files]
    # the patients CSV beside it: every patient of the split once
    patients = pd.read_csv(tmp_path / "p_patients.csv", dtype={"patient": str})
    assert sorted(patients["patient"]) == sorted(set(mine["patient"])) and patients["cells"].sum() == len(mine)


def _check_patients(predictions: pd.DataFrame, patients: pd.DataFrame) -> None:
    known = predictions[predictions["patient"] != "unknown"]
    assert list(patients.columns) == ["patient", "cells", "predicted_all_share", "mean_prob_all"]
    assert "unknown" not in set(patients["patient"])
    groups = known.groupby("patient")
    assert dict(zip(patients["patient"], patients["cells"])) == groups.size().to_dict()
    for row in patients.itertuples():
        g = groups.get_group(row.patient)
        assert row.predicted_all_share == pytest.approx(g["predicted_label"].mean(), abs=1e-6)
        assert row.mean_prob_all == pytest.approx(g["prob_all"].mean(), abs=1e-6)


def test_loose_files_in_nested_folders_with_mixed_extensions(trained, tmp_path, capsys):
    loose = tmp_path / "loose"
    rng = np.random.default_rng(5)
    names = {"a/UID_7_1_1_all.bmp": 1, "a/b/UID_7_2_1_all.png": 1, "a/b/UID_H9_1_1_hem.PNG": 0,
             "c/cell.jpg": 0, "top.tif": 1}
    for name, label in names.items():
        (loose / name).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(loose / name), synthetic_cell(rng, 64, label))
    (loose / "a" / "notes.txt").write_text("not an image")
    out, _ = predict([str(trained["run"]), str(loose), "--out", str(tmp_path / "p.csv")], capsys)
    table = pd.read_csv(tmp_path / "p.csv", dtype={"patient": str})
    assert table["path"].tolist() == [str(loose / n) for n in sorted(names, key=lambda n: Path(n).parts)]
    assert dict(zip(table["path"].map(lambda p: Path(p).name), table["patient"])) == {
        "UID_7_1_1_all.bmp": "7", "UID_7_2_1_all.png": "7", "UID_H9_1_1_hem.PNG": "H9", "cell.jpg": "unknown",
        "top.tif": "unknown"}
    assert table["prob_all"].between(0, 1).all() and "label" not in table
    assert (table["predicted_label"] == (table["prob_all"] >= 0.5)).all()
    patients = pd.read_csv(tmp_path / "p_patients.csv", dtype={"patient": str})
    assert patients["patient"].tolist() == ["7", "H9"]
    _check_patients(table, patients)
    assert "2 images without a patient id" in out and "H9" in out


def test_a_source_layout_gives_labels_patients_and_accuracy(trained, tmp_path, capsys):
    out, _ = predict([str(trained["run"]), str(trained["src"]), "--out", str(tmp_path / "p.csv")], capsys)
    table = pd.read_csv(tmp_path / "p.csv", dtype={"patient": str})
    assert list(table.columns) == ["path", "patient", "prob_all", "predicted_label", "label"]
    assert len(table) == 4 * 4 + 3 * 4
    assert (table["label"] == table["path"].str.endswith("_all.bmp").astype(int)).all()
    accuracy = (table["label"] == table["predicted_label"]).mean()
    assert f"accuracy {accuracy:.4f} on 28 labelled images" in out
    patients = pd.read_csv(tmp_path / "p_patients.csv", dtype={"patient": str})
    assert patients["patient"].tolist() == ["1", "2", "3", "4", "H1", "H2", "H3"]
    assert (patients["cells"] == 4).all()
    _check_patients(table, patients)


def test_a_bad_image_fails_naming_it_or_is_skipped_and_listed(trained, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for p in trained["test_paths"][:2]:
        shutil.copy(trained["root"] / p, folder)
    (folder / "UID_5_1_1_all.bmp").write_bytes(b"BM" + bytes(range(256)) * 4)  # garbage behind a BMP magic
    out_csv = tmp_path / "p.csv"
    _, err = predict([str(trained["run"]), str(folder), "--out", str(out_csv)], capsys, code=2)
    assert "UID_5_1_1_all.bmp" in err and "not a readable image" in err and "--on-error skip" in err
    assert not list(tmp_path.glob("p*.csv*"))  # nothing written, not even a temporary file
    out, err = predict([str(trained["run"]), str(folder), "--out", str(out_csv), "--on-error", "skip"], capsys)
    assert out.strip().splitlines()[-1] == str(out_csv)
    assert len(pd.read_csv(out_csv)) == 2
    skipped = pd.read_csv(tmp_path / "p_skipped.csv")
    assert skipped["path"].tolist() == [str(folder / "UID_5_1_1_all.bmp")]
    assert "not a readable image" in skipped["reason"][0]
    assert "skipped 1 unusable images" in err and "UID_5_1_1_all.bmp" in err


def _probs(path: Path) -> pd.Series:
    table = pd.read_csv(path)
    return table.set_index("path")["prob_all"]


def test_predicting_needs_no_cache(trained, tmp_path, capsys):
    args = [str(trained["run"]), str(trained["src"])]
    predict(args + ["--out", str(tmp_path / "with.csv")], capsys)
    moved = tmp_path / "cache-away"
    shutil.move(trained["cache"], moved)  # the cache folder is gone (and put back for the other tests)
    try:
        predict(args + ["--out", str(tmp_path / "without.csv")], capsys)
        # a run made before config.json held the preprocessing: refused with the reason, since its cache is gone
        old = tmp_path / "old-run"
        shutil.copytree(trained["run"], old)
        config = json.loads((old / "config.json").read_text())
        del config["preprocess"]
        (old / "config.json").write_text(json.dumps(config))
        _, err = predict([str(old), str(trained["src"]), "--out", str(tmp_path / "old.csv")], capsys, code=2)
        assert "has no preprocessing record" in err and str(trained["cache"]) in err and "no manifest.json" in err
    finally:
        shutil.move(moved, trained["cache"])
    pd.testing.assert_series_equal(_probs(tmp_path / "with.csv"), _probs(tmp_path / "without.csv"))
    # ... and with its cache back, the old run falls back to the cache's manifest
    predict([str(old), str(trained["src"]), "--out", str(tmp_path / "old.csv")], capsys)
    pd.testing.assert_series_equal(_probs(tmp_path / "with.csv"), _probs(tmp_path / "old.csv"))


def test_tta_gives_other_probabilities_in_range(trained, tmp_path, capsys):
    args = [str(trained["run"]), str(trained["src"])]
    predict(args + ["--out", str(tmp_path / "plain.csv")], capsys)
    out, _ = predict(args + ["--out", str(tmp_path / "tta.csv"), "--tta"], capsys)
    assert "8-view TTA" in out
    plain, tta = _probs(tmp_path / "plain.csv"), _probs(tmp_path / "tta.csv")
    assert tta.between(0, 1).all() and list(tta.index) == list(plain.index)
    assert (tta - plain).abs().max() > 1e-4


def test_an_existing_output_is_refused_and_left_unchanged(trained, tmp_path, capsys):
    for name in ("p.csv", "p_patients.csv"):
        target = tmp_path / name
        target.write_text("earlier results\n")
        _, err = predict([str(trained["run"]), str(trained["src"]), "--out", str(tmp_path / "p.csv")], capsys,
                         code=2)
        assert f"{target} already exists" in err and "another --out" in err
        assert target.read_text() == "earlier results\n"
        target.unlink()


def test_a_folder_as_out_is_refused(trained, tmp_path, capsys):
    from train.predict import main as predict_main
    for out in (str(tmp_path) + "/", str(tmp_path)):  # would become a file named like the folder
        with pytest.raises(SystemExit) as stop:
            predict_main([str(trained["run"]), str(trained["src"]), "--out", out])
        assert stop.value.code == 2 and "is a folder; --out takes a CSV file name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_errors_name_the_thing_and_what_to_do(trained, tmp_path, capsys):
    run, src, out = str(trained["run"]), str(trained["src"]), ["--out", str(tmp_path / "p.csv")]
    cases = [
        ([str(tmp_path / "nope"), src], "run folder"),
        ([str(tmp_path), src], "no config.json"),
        ([run, src, "--checkpoint", "missing.pt"],
         "missing.pt: no such checkpoint (the run folder has: best.pt, last.pt)"),
        ([run, str(tmp_path / "ghost.bmp")], "ghost.bmp does not exist"),
        ([run, str(tmp_path)], "no images found"),
        ([run, src, "--out", str(tmp_path / "no" / "p.csv")], "does not exist; create it or pass another --out"),
        ([run, src, "--batch-size", "0"], "--batch-size must be >= 1"),
    ]
    for args, message in cases:
        _, err = predict(args + (out if "--out" not in args else []), capsys, code=2)
        assert message in err, (args, err)
    assert not (tmp_path / "p.csv").exists()


def test_memory_is_bounded_by_the_window_and_the_batch(trained, tmp_path, capsys, monkeypatch):
    """With a window of 3 images and batches of 2: at every forward pass at most window + batch images have been
    preprocessed and not yet predicted; and the probabilities are those of the default window."""
    read, pending_at_forward = [], []
    original_process, original_probs = parallel.process, predict_mod.Predictor.probs_all
    predicted = [0]

    def counting_process(*args):
        read.append(1)
        return original_process(*args)

    def counting_probs(self, stored, tta=False):
        pending_at_forward.append(len(read) - predicted[0])
        predicted[0] += len(stored)
        return original_probs(self, stored, tta)

    run = trained["run"]
    predict([str(run), str(trained["src"]), "--out", str(tmp_path / "default.csv"), "--batch-size", "2"], capsys)
    monkeypatch.setattr(parallel, "process", counting_process)
    monkeypatch.setattr(predict_mod.Predictor, "probs_all", counting_probs)
    predictor = predict_mod.load_predictor(run, device="cpu")
    entries, _ = predict_mod.gather([trained["src"]])
    kept, probs, _ = predict_mod.predict_images(predictor, entries, 2, jobs=2, window=3)
    assert len(read) == len(entries) == len(kept) == 28 and len(pending_at_forward) == 14
    assert max(pending_at_forward) <= 3 + 2
    default = pd.read_csv(tmp_path / "default.csv")
    assert np.abs(np.round(probs, 6) - default["prob_all"].to_numpy()).max() <= 1e-6


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="../shared/data/cnmc-sample not present")
def test_the_real_sample(trained, tmp_path, capsys):
    out, _ = predict([str(trained["run"]), str(REAL_SAMPLE), "--out", str(tmp_path / "p.csv")], capsys)
    table = pd.read_csv(tmp_path / "p.csv", dtype={"patient": str})
    assert len(table) == 96 and (table["patient"] != "unknown").all() and set(table["label"]) == {0, 1}
    assert table["prob_all"].between(0, 1).all()
    _check_patients(table, pd.read_csv(tmp_path / "p_patients.csv", dtype={"patient": str}))
    assert "accuracy" in out
