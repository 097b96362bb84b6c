"""train.preview: the grid PNG, its cells, the cache variant, errors."""
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from tests.helpers import REAL_SAMPLE, patient_folders
from train.augment.preview import CELL_IN, COLUMNS, DPI, preview
from train.preview import main


def _check_png(path: Path, rows: int) -> np.ndarray:
    png = cv2.imread(str(path))
    assert png is not None
    assert png.shape[1] == round(len(COLUMNS) * CELL_IN * DPI)
    assert png.shape[0] == round((rows * (CELL_IN + 0.45) + 0.3) * DPI)
    return png


def _check_rows(rows, n: int, size: int) -> None:
    assert len(rows) == n
    labels = [r["label"].split("\n")[0] for r in rows]
    assert labels[:2] == ["all (leukemic)", "hem (normal)"]  # both classes, alternating
    for row in rows:
        assert len(row["panels"]) == len(COLUMNS) and len(row["captions"]) == 4
        for panel in row["panels"]:
            assert np.asarray(panel, np.float64).std() > 0  # not blank
        assert row["panels"][4].shape[:2] == (size, size) and row["panels"][5].shape[:2] == (size, size)
        assert "rot" in row["captions"][0] and "order" in row["captions"][0]


def test_preview_of_a_source(tmp_path):
    patient_folders(tmp_path / "src", all_images=3, hem_images=3, side=64)
    rows = preview(tmp_path / "src", None, 4, 16, 0, tmp_path / "p.png")
    _check_rows(rows, 4, 16)
    png = _check_png(tmp_path / "p.png", 4)
    assert png.std() > 10
    again = preview(tmp_path / "src", None, 4, 16, 0, tmp_path / "q.png")  # fixed seed: the same views
    for a, b in zip(rows, again):
        assert a["captions"] == b["captions"] and np.array_equal(a["panels"][5], b["panels"][5])


def test_preview_of_a_cache_shows_the_cached_images(tmp_path, capsys):
    patient_folders(tmp_path / "src", all_images=3, hem_images=3, side=64)
    report = build(PreprocessConfig(), BuildOptions(sizes=(16,), source=tmp_path / "src", cache_root=tmp_path / "c",
                                                    jobs=1, progress="off"))
    from_cache = preview(None, report.cache_dir, 2, 16, 3, tmp_path / "c.png")
    from_source = preview(tmp_path / "src", None, 2, 16, 3, tmp_path / "s.png")
    _check_rows(from_cache, 2, 16)
    for a, b in zip(from_cache, from_source):  # the build's functions and the cache agree
        assert a["label"] == b["label"] and np.array_equal(a["panels"][3], b["panels"][3])
    assert main(["--cache", str(report.cache_dir), "--size", "24", "--out", str(tmp_path / "x.png")]) == 2
    assert "size 24 is not in" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x.png")]) == 2
    assert "pass --source PATH" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="real C-NMC sample not present")
def test_preview_of_the_real_sample(tmp_path, capsys):
    assert main(["--source", str(REAL_SAMPLE), "--n", "2", "--size", "64", "--out", str(tmp_path / "r.png")]) == 0
    assert capsys.readouterr().out.strip().endswith("r.png")
    _check_png(tmp_path / "r.png", 2)
