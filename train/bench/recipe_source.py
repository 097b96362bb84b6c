"""A synthetic source shaped like the Kaggle C-NMC download, for timing the report's recipe at the dataset's scale.

The counts are the download's: 10,661 training-fold images (7,272 `all` : 3,389 `hem`) in `training_data/fold_0..2`
from 47 `all` and 26 `hem` patients, 1,867 labelled preliminary-test images (1,219 : 648) with their labels CSV, and
2,586 unlabelled final-test images, all 450 x 450 BMPs in the Kaggle layout that `pipeline.sources` reads. The build
then assigns the training folds to train/valid/test by patient, as it does for the real download.

Only a few distinct cells are drawn (`pipeline.demo.draw_cell`, a second each at most); every other file is a hard
link to one of them, so 15k files cost a few MB and seconds. The build and the loaders pay per file and per pixel,
not per distinct image, so their timings are those of the real data, except that every read after the first of a
distinct image comes from the page cache (a cold first read of the real ~9 GB adds the disk's time). The pictures
are synthetic: the accuracy a run reaches on them says nothing about C-NMC.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.demo import IMAGE_PX, draw_cell

LAYOUT_ROOT = "C-NMC_Leukemia"
PRELIM = Path("validation_data") / "C-NMC_test_prelim_phase_data"
FINAL = Path("testing_data") / "C-NMC_test_final_phase_data"
PRELIM_LABELS = Path("validation_data") / "C-NMC_test_prelim_phase_data_labels.csv"
COMPLETE = ".complete"  # holds the shape it was written for: a work folder's source is reused only when equal


@dataclass(frozen=True)
class SourceShape:
    """Image counts and patients of a C-NMC-like source; `CNMC` is the download's, `QUICK` a wiring check's."""
    folds: tuple[tuple[int, int], ...] = ((2397, 1130), (2418, 1163), (2457, 1096))  # (all, hem) per fold
    fold_patients: tuple[int, int] = (47, 26)  # (all, hem) over the folds: the build's grouped split needs them
    prelim: tuple[int, int] = (1219, 648)  # (all, hem), labelled through the labels CSV
    prelim_patients: tuple[int, int] = (13, 15)
    final: int = 2586  # unlabelled
    image_px: int = IMAGE_PX
    distinct_per_class: int = 12  # drawn cells per class; the other files link to them

    def scaled(self, fraction: float) -> "SourceShape":
        """Every count times `fraction` (at least one image per fold and class, patients capped by images)."""
        if fraction == 1:
            return self
        n = lambda count: max(1, round(count * fraction))  # noqa: E731
        folds = tuple((n(a), n(h)) for a, h in self.folds)
        return SourceShape(folds=folds, fold_patients=self.fold_patients, prelim=(n(self.prelim[0]), n(self.prelim[1])),
                           prelim_patients=self.prelim_patients, final=n(self.final), image_px=self.image_px,
                           distinct_per_class=self.distinct_per_class)

    @property
    def counts(self) -> dict:
        return {"training_folds": sum(a + h for a, h in self.folds), "training_all": sum(a for a, _ in self.folds),
                "training_hem": sum(h for _, h in self.folds), "prelim": sum(self.prelim), "final": self.final}


CNMC = SourceShape()
QUICK = SourceShape(folds=((8, 4), (8, 4), (8, 4)), fold_patients=(6, 3), prelim=(4, 2), prelim_patients=(2, 2),
                    final=6, image_px=64, distinct_per_class=2)


def _cells(shape: SourceShape, label: str, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng([seed, label == "all"])
    cells = []
    for _ in range(shape.distinct_per_class):
        cell = draw_cell(rng, label, rng.uniform(0.85, 1.15, 3).astype(np.float32))  # (450, 450, 3) uint8 BGR
        if shape.image_px != IMAGE_PX:
            cell = cv2.resize(cell, (shape.image_px, shape.image_px), interpolation=cv2.INTER_AREA)
        cells.append(cell)
    return cells


class _Writer:
    """Writes each distinct cell once and links every other file to it (a copy where links are refused)."""

    def __init__(self, root: Path, shape: SourceShape):
        self.root, self.originals, self.linked, self.files = root, {}, True, 0
        self.cells = {label: _cells(shape, label, seed=0) for label in ("all", "hem")}

    def put(self, rel: Path, label: str, index: int) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        key = (label, index % len(self.cells[label]))
        original = self.originals.get(key)
        if original is None:
            if not cv2.imwrite(str(path), self.cells[label][key[1]]):
                raise OSError(f"could not write {path}")
            self.originals[key] = path
        else:
            try:
                os.link(original, path)
            except OSError:  # a file system without hard links: the same bytes, at the cost of the space
                shutil.copyfile(original, path)
                self.linked = False
        self.files += 1


def _spread(count: int, patients: int) -> list[int]:
    """The patient (0-based) of each of `count` images, in runs: patient 0's images first."""
    patients = max(1, min(patients, count))
    return [i * patients // count for i in range(count)]


def write_source(root: Path, shape: SourceShape) -> dict:
    """Write the Kaggle-layout source under `root` (replacing what is there); its counts and how it was made."""
    shutil.rmtree(root, ignore_errors=True)
    base = root / LAYOUT_ROOT
    writer = _Writer(base, shape)
    first_patient = {"all": 0, "hem": 0}
    for fold, counts in enumerate(shape.folds):
        for label, count, patients in zip(("all", "hem"), counts, shape.fold_patients):
            share = patients // len(shape.folds) + (fold < patients % len(shape.folds))  # this fold's patients
            for i, p in enumerate(_spread(count, share)):
                patient = first_patient[label] + p
                name = f"UID_{'' if label == 'all' else 'H'}{patient + 1}_{i + 1}_1_{label}.bmp"
                writer.put(Path("training_data") / f"fold_{fold}" / label / name, label, i)
            first_patient[label] += share
    rows = []
    for label, count, patients in zip(("all", "hem"), shape.prelim, shape.prelim_patients):
        for i, p in enumerate(_spread(count, patients)):
            name = f"{len(rows) + 1}.bmp"  # the served name; the CSV maps it to the patient's file name
            writer.put(PRELIM / name, label, i)
            rows.append(f"UID_P{'' if label == 'all' else 'H'}{p + 1}_{i + 1}_1_{label}.bmp,{name},"
                        f"{1 if label == 'all' else 0}")
    (base / PRELIM_LABELS).write_text("Patient_ID,new_names,labels\n" + "\n".join(rows) + "\n")
    for i in range(shape.final):
        writer.put(FINAL / f"{i + 1}.bmp", "all" if i % 3 else "hem", i)
    return {"root": str(base), "files": writer.files, "distinct_images": len(writer.originals),
            "hard_linked": writer.linked, "counts": shape.counts, "image_px": shape.image_px}


def ensure_source(folder: Path, shape: SourceShape) -> dict:
    """The source for `shape` in `folder`, written once: a later run with the same shape reuses it (`reused`)."""
    digest = hashlib.sha256(json.dumps(asdict(shape), sort_keys=True).encode()).hexdigest()[:12]
    root = folder / f"cnmc-like-{digest}"
    marker = root / COMPLETE
    start = time.perf_counter()
    if marker.is_file():
        info = json.loads(marker.read_text())
        return {**info, "reused": True, "seconds": round(time.perf_counter() - start, 2)}
    info = write_source(root, shape)
    marker.write_text(json.dumps(info))  # last: a half-written source is written again next time
    return {**info, "reused": False, "seconds": round(time.perf_counter() - start, 2)}
