"""A deterministic synthetic C-NMC-like source, so the README's first command runs with no download.

450x450 BMPs in the Kaggle layout (`training_data/fold_*/{all,hem}/UID_<patient>_<n>_<k>_<class>.bmp`): one stained
cell on a black background. Leukemic blasts (`all`) are larger, with a large round dark nucleus and fine chromatin
texture; normal cells (`hem`) are smaller, with a smaller, paler, indented nucleus. The class distributions overlap
and each patient has its own stain tint, so the task is learnable in a few epochs but not trivial.
Every file gets a fixed modification time, so the demo's cache key is the same on every machine.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np

DEMO_VERSION = 1
DEMO_FOLDER = "demo-source"
IMAGE_PX = 450
LABEL_FOLDERS = ("all", "hem")
FIXED_MTIME_S = 1546300800  # 2019-01-01T00:00:00Z
# patients per class and images per patient: 8 x 24 `all` and 6 x 16 `hem` = 288 images, about 2:1 like C-NMC
PATIENTS = {"all": [(str(p), 24) for p in range(1, 9)], "hem": [(f"H{p}", 16) for p in range(1, 7)]}


def draw_cell(rng: np.random.Generator, label: str, tint: np.ndarray) -> np.ndarray:
    """One cell, BGR (450, 450, 3) uint8, black background."""
    img = np.zeros((IMAGE_PX, IMAGE_PX, 3), np.float32)
    blast = label == "all"
    radius = rng.normal(112 if blast else 92, 12)
    center = (IMAGE_PX / 2 + rng.normal(0, 10), IMAGE_PX / 2 + rng.normal(0, 10))
    axes = (radius * rng.uniform(0.9, 1.1), radius * rng.uniform(0.9, 1.1))
    angle = rng.uniform(0, 180)
    cytoplasm = np.array([200, 150, 170], np.float32) * tint  # BGR, light purple
    _ellipse(img, center, axes, angle, cytoplasm)
    ratio = rng.uniform(0.72, 0.88) if blast else rng.uniform(0.55, 0.72)
    nucleus = (np.array([120, 40, 80]) if blast else np.array([150, 75, 110])) * tint * rng.uniform(0.9, 1.1)
    n_center = (center[0] + rng.normal(0, 6), center[1] + rng.normal(0, 6))
    n_axes = (axes[0] * ratio, axes[1] * ratio * (1.0 if blast else rng.uniform(0.75, 0.9)))
    _ellipse(img, n_center, n_axes, angle + rng.uniform(-30, 30), nucleus)
    if not blast:  # an indentation: normal lymphocyte nuclei are often kidney-shaped
        notch = (n_center[0] + n_axes[0] * 0.8, n_center[1])
        _ellipse(img, notch, (n_axes[0] * 0.35, n_axes[1] * 0.35), 0, cytoplasm)
    mask = img.sum(2, keepdims=True) > 0
    # Chromatin texture: fine grain in blasts, coarser and weaker in normal cells.
    grain = rng.normal(0, 1, (IMAGE_PX // (2 if blast else 6),) * 2).astype(np.float32)
    grain = cv2.resize(grain, (IMAGE_PX, IMAGE_PX), interpolation=cv2.INTER_LINEAR)[:, :, None]
    img = img + grain * (18 if blast else 10) + rng.normal(0, 4, img.shape).astype(np.float32)
    return np.where(mask, np.clip(img, 0, 255), 0).astype(np.uint8)


def _ellipse(img, center, axes, angle, color) -> None:
    c = tuple(int(round(v)) for v in center)
    a = tuple(max(1, int(round(v))) for v in axes)
    cv2.ellipse(img, c, a, float(angle), 0, 360, tuple(float(v) for v in color), thickness=-1, lineType=cv2.LINE_AA)


def generate(root: Path) -> int:
    """Write the demo source under `root`; returns the number of images."""
    count = 0
    for label, patients in PATIENTS.items():
        for p_index, (patient, n_images) in enumerate(patients):
            rng = np.random.default_rng([DEMO_VERSION, 0 if label == "all" else 1, p_index])
            tint = rng.uniform(0.85, 1.15, 3).astype(np.float32)
            folder = root / "C-NMC_Leukemia" / "training_data" / f"fold_{p_index % 3}" / label
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(n_images):
                path = folder / f"UID_{patient}_{n + 1}_1_{label}.bmp"
                if not cv2.imwrite(str(path), draw_cell(rng, label, tint)):
                    raise OSError(f"could not write {path}")
                os.utime(path, (FIXED_MTIME_S, FIXED_MTIME_S))
                count += 1
    return count


def ensure_demo_source(cache_root: Path) -> Path:
    """The demo source folder inside the cache root, generated once (atomically) and reused after."""
    final = Path(cache_root) / DEMO_FOLDER
    marker = final / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(DEMO_VERSION):
        return final
    tmp = Path(cache_root) / f"{DEMO_FOLDER}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    generate(tmp)
    (tmp / ".complete").write_text(f"{DEMO_VERSION}\n")
    shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:  # another process put it in place first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_synthetic_source(root: Path, count: int, image_px: int = 96, patients_per_class: int = 8,
                           seed: int = 0) -> Path:
    """A quick class-folder source of `count` small images (scaling tests and benchmarks), about 2:1 all:hem,
    named like C-NMC files so the split can group by patient. Files get a fixed modification time."""
    rng = np.random.default_rng(seed)
    for label in LABEL_FOLDERS:
        (root / label).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = "all" if i % 3 else "hem"
        patient = (f"H{i % patients_per_class}" if label == "hem" else f"{i % patients_per_class}")
        img = np.zeros((image_px, image_px, 3), np.uint8)
        radius = int(image_px * (0.3 if label == "all" else 0.22) * rng.uniform(0.85, 1.15))
        colour = (120, 40, 80) if label == "all" else (160, 90, 120)
        cv2.circle(img, (image_px // 2, image_px // 2), radius, colour, -1)
        img = cv2.add(img, rng.integers(0, 40, img.shape, dtype=np.uint8), mask=(img[:, :, 0] > 0).astype(np.uint8))
        path = root / label / f"UID_{patient}_{i}_1_{label}.bmp"
        if not cv2.imwrite(str(path), img):
            raise OSError(f"could not write {path}")
        os.utime(path, (FIXED_MTIME_S, FIXED_MTIME_S))
    return root
