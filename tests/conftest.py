"""Shared fixtures: tiny synthetic sources in each layout, written to tmp folders."""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

REAL_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc-sample"
# CI lays shared/ beside the clone; a developer's checkout has it at ../shared as well.
if not REAL_SAMPLE.is_dir():
    REAL_SAMPLE = Path(os.environ.get("CNMC_SAMPLE", "/nonexistent"))


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
