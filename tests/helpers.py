"""Helpers shared by several test modules: synthetic C-NMC sources, the repository paths, the tiny caches' settings.

Test modules import these from here, never from each other or from conftest (pytest loads conftest itself; a test
module imported by another would have its tests and module-scoped fixtures tangled with the importer's). This module
imports no torch, so the pipeline's tests (and conftest) stay as quick to start as the pipeline itself; the
torch-side helpers live in `tests.train_helpers`.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline import store
from pipeline.config import PreprocessConfig

ROOT = Path(__file__).resolve().parents[1]  # the repository: the working folder of `python -m ...` subprocesses

REAL_SAMPLE = ROOT.parent / "shared" / "data" / "cnmc-sample"
# CI lays shared/ beside the clone; a developer's checkout has it at ../shared as well.
if not REAL_SAMPLE.is_dir():
    REAL_SAMPLE = Path(os.environ.get("CNMC_SAMPLE", "/nonexistent"))

SIZE = 16  # the image size of the loader tests' cache (the `cache_dir` fixture)
# the loader's two ways of reading, the streaming one in windows small enough that a split spans several
MODES = [dict(mode="resident"), dict(mode="streaming", block_images=3, memory_budget_bytes=3 * 10 * 26 * 26 * 3)]


def synthetic_cell(rng: np.random.Generator, side: int, label: int) -> np.ndarray:
    """A BGR uint8 blob on black: brighter and larger for label 1 (enough texture for CLAHE to matter)."""
    img = np.zeros((side, side, 3), np.uint8)
    radius = int(side * (0.3 if label else 0.2))
    cv2.circle(img, (side // 2, side // 2), radius, (180, 120, 160) if label else (120, 90, 140), -1)
    noise = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
    return np.where(img > 0, cv2.add(img, noise), 0).astype(np.uint8)


def write_images(folder: Path, names: list[str], label: int, side: int = 96, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in names:
        path = folder / name
        assert cv2.imwrite(str(path), synthetic_cell(rng, side, label))
        paths.append(path)
    return paths


def cnmc_names(patients: list[str], per_patient: int, cls: str) -> list[str]:
    return [f"UID_{p}_{i}_1_{cls}.bmp" for p in patients for i in range(1, per_patient + 1)]


def patient_folders(root: Path, all_images: int, hem_images: int, side: int = 64) -> Path:
    """all/ + hem/ folders with C-NMC names: 4 `all` patients x `all_images`, 3 `hem` patients x `hem_images`."""
    for i, p in enumerate(["1", "2", "3", "4"]):
        write_images(root / "all", [f"UID_{p}_{k}_1_all.bmp" for k in range(all_images)], 1, side=side, seed=i)
    for i, p in enumerate(["H1", "H2", "H3"]):
        write_images(root / "hem", [f"UID_{p}_{k}_1_hem.bmp" for k in range(hem_images)], 0, side=side, seed=9 + i)
    return root


def common(cache: Path, out: Path) -> list[str]:
    """The train.run flags every tiny run shares: this cache, this output folder, batches of 4."""
    return ["--cache", str(cache), "--out", str(out), "--batch-size", "4"]


def open_h5_files() -> list[str]:
    """The .h5 files this process holds open now (skips where /proc is missing)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("needs /proc")
    names = []
    for fd in fds.iterdir():
        try:
            names.append(os.readlink(fd))
        except OSError:
            pass
    return [n for n in names if n.endswith(".h5")]


# the loader tests' cache (`cache_dir` fixture), read back directly from its shards
def all_images(cache_dir, split="train") -> np.ndarray:
    reader = store.CacheReader(cache_dir)
    g = PreprocessConfig().geometry(SIZE).stored_size
    out = np.empty((reader.count(SIZE, split), g, g, 3), np.uint8)
    reader.read_images_into(SIZE, split, out)
    return out


SPLITS = ("train", "valid")


def source(cache_dir, splits=SPLITS) -> tuple[np.ndarray, dict]:
    """Images and metadata of `splits` concatenated (global source order), read directly from the shards."""
    reader = store.CacheReader(cache_dir)
    metas = [reader.read_meta(SIZE, s) for s in splits]
    meta = {k: np.concatenate([m[k] for m in metas]) for k in ("labels", "paths", "patients")}
    return np.concatenate([all_images(cache_dir, s) for s in splits]), meta


def subset(cache_dir) -> np.ndarray:
    """30 of the 56 train + valid rows, in shuffled order: every row of train shard 1, none of train shard 3, the
    last valid row (a one-row shard), rows 0 and 2 but not 1 and 34 and 36 but not 35 (holes inside 3-row blocks:
    read, then dropped) and 18 scattered others, so blocks are whole, trimmed, holed, and left out."""
    total = sum(store.CacheReader(cache_dir).count(SIZE, s) for s in SPLITS)
    rng = np.random.default_rng(7)
    fixed = np.r_[0, 2, 7:14, 34, 36, total - 1]
    others = np.setdiff1d(np.arange(3, total - 1), np.r_[7:14, 21:28, 33:38])
    return rng.permutation(np.r_[fixed, rng.choice(others, 30 - len(fixed), replace=False)])


def row_of(images: np.ndarray, source_images: np.ndarray) -> np.ndarray:
    """The global source row of each image, by content (the fixture's images are all different)."""
    where = {im.tobytes(): i for i, im in enumerate(source_images)}
    assert len(where) == len(source_images)
    return np.array([where[im.tobytes()] for im in images])
