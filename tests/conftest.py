"""Fixtures shared by several test modules: tiny synthetic sources in each layout, and the tiny caches built from them.

The caches are module-scoped on purpose: each module that asks for one builds it once (a few seconds each) and its
tests share it; the helpers that write the images live in `tests.helpers`, which test modules import directly.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from tests.helpers import SIZE, cnmc_names, patient_folders, write_images


@pytest.fixture
def kaggle_source(tmp_path) -> Path:
    """Kaggle layout: 4 `all` patients x 4 images, 3 `hem` patients x 4 images, across 2 folds."""
    root = tmp_path / "kaggle"
    train = root / "C-NMC_Leukemia" / "training_data"
    for i, p in enumerate(["1", "2", "3", "4"]):
        write_images(train / f"fold_{i % 2}" / "all", cnmc_names([p], 4, "all"), 1, seed=i)
    for i, p in enumerate(["H1", "H2", "H3"]):
        write_images(train / f"fold_{i % 2}" / "hem", cnmc_names([p], 4, "hem"), 0, seed=10 + i)
    return root


@pytest.fixture
def folder_source(tmp_path) -> Path:
    """all/ + hem/ folders, names without patient ids (so the split falls back to images)."""
    root = tmp_path / "folders"
    write_images(root / "all", [f"a{i}.bmp" for i in range(8)], 1, seed=1)
    write_images(root / "hem", [f"h{i}.bmp" for i in range(6)], 0, seed=2)
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """A cache of 60 train-ish images in shards of 7 (uneven, so blocks and shards do not line up), at `SIZE` px."""
    root = tmp_path_factory.mktemp("loader")
    patient_folders(root / "src", all_images=12, hem_images=10)
    report = build(PreprocessConfig(shard_size=7), BuildOptions(sizes=(SIZE,), source=root / "src",
                                                                cache_root=root / "cache", jobs=1, progress=False))
    return report.cache_dir


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A cache for tiny training runs: 4 `all` and 3 `hem` patients x 8 images, at 16 and 24 px.

    Its name hides pytest's own `cache` fixture (which no test here uses); test_robust_build defines a
    function-scoped `cache` of its own, which wins in that module."""
    root = tmp_path_factory.mktemp("train")
    patient_folders(root / "src", all_images=8, hem_images=8)
    report = build(PreprocessConfig(), BuildOptions(sizes=(16, 24), source=root / "src", cache_root=root / "cache",
                                                    jobs=1, progress=False))
    return report.cache_dir
