"""Finding the images of a source folder, their labels, patients and (where the source gives one) their split.

Layouts, tried in this order:
- `kaggle`: the Kaggle C-NMC 2019 layout, `training_data/fold_*/{all,hem}/*.bmp` (optionally under
  `C-NMC_Leukemia/`), plus `validation_data/C-NMC_test_prelim_phase_data/*.bmp` with its labels CSV (split
  `prelim`) and `testing_data/C-NMC_test_final_phase_data/*.bmp` without labels (split `final`) when present;
- `csv-lists`: the report's `train.csv`, `valid.csv` and a `*test*.csv`, columns `Path,label`; their split is kept;
- `labels-csv`: a folder with a `labels.csv` (`Path,label`);
- `class-folders`: a folder with `all/` and `hem/` subfolders.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

CLASS_NAMES = ("hem", "all")  # label 0 = normal (hem), label 1 = leukemic blast (all)
LABEL_OF_FOLDER = {"hem": 0, "all": 1}
UNKNOWN_LABEL = -1
UNKNOWN_PATIENT = "unknown"
IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
EXPECTED_LAYOUTS = (
    "  - kaggle: training_data/fold_*/{all,hem}/*.bmp (the Kaggle C-NMC 2019 download, optionally under "
    "C-NMC_Leukemia/)\n"
    "  - csv-lists: train.csv, valid.csv and a *test*.csv with columns Path,label\n"
    "  - labels-csv: labels.csv with columns Path,label\n"
    "  - class-folders: all/ and hem/ subfolders of images"
)
_PATIENT_RE = re.compile(r"UID_([A-Za-z]*\d+)_")


class SourceError(ValueError):
    """The source folder or one of its lists is unusable; the message names it and says what to do."""


@dataclass(frozen=True)
class Item:
    path: str  # relative to the source root (may start with '..' for absolute paths in a CSV list)
    label: int  # 0 hem, 1 all, -1 unknown
    patient: str
    split: str | None  # given by the source, or None where the build assigns one


@dataclass(frozen=True)
class Source:
    root: Path
    layout: str
    items: tuple[Item, ...]
    label_files: tuple[str, ...]  # lists read for labels/splits; part of the fingerprint

    @property
    def has_split(self) -> bool:
        return all(item.split is not None for item in self.items)

    def fingerprint(self) -> str:
        """Hash of every file's relative path, byte size and modification time (stat only, no image read)."""
        h = hashlib.sha256()
        for rel in sorted({item.path for item in self.items} | set(self.label_files)):
            try:
                st = os.stat(self.root / rel)
                h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            except FileNotFoundError:
                h.update(f"{rel}\tmissing\n".encode())
        return h.hexdigest()


def patient_of(filename: str) -> str:
    """`UID_11_10_1_all.bmp` -> `11`, `UID_H10_43_1_hem.bmp` -> `H10`, anything else -> `unknown`."""
    match = _PATIENT_RE.search(os.path.basename(filename))
    return match.group(1) if match else UNKNOWN_PATIENT


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _class_folder_items(root: Path, folder: Path, split: str | None) -> list[Item]:
    items = []
    for name, label in LABEL_OF_FOLDER.items():
        if (folder / name).is_dir():
            items += [Item(p.relative_to(root).as_posix(), label, patient_of(p.name), split)
                      for p in _images_in(folder / name)]
    return items


def _parse_label(value, csv_path: Path, row: int) -> int:
    if pd.isna(value) or str(value).strip() == "":
        return UNKNOWN_LABEL
    text = str(value).strip().lower()
    if text in LABEL_OF_FOLDER:
        return LABEL_OF_FOLDER[text]
    try:
        label = int(float(text))
    except ValueError:
        label = None
    if label not in (0, 1):
        raise SourceError(f"{csv_path}: row {row + 2} has label {value!r}; expected 0 (hem), 1 (all) or empty")
    return label


def _rel(root: Path, path: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def read_list(csv_path: Path, root: Path, split: str | None, labelled: bool = True) -> list[Item]:
    """Items of a `Path,label` CSV; paths absolute or relative to the CSV's folder."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SourceError(f"{csv_path}: cannot be read as CSV ({err}); expected columns Path,label") from err
    if "Path" not in table.columns:
        raise SourceError(f"{csv_path}: no 'Path' column (columns: {list(table.columns)}); expected Path,label")
    if labelled and "label" not in table.columns:
        raise SourceError(f"{csv_path}: no 'label' column (columns: {list(table.columns)}); expected Path,label")
    items = []
    for row, record in enumerate(table.to_dict("records")):
        path = Path(record["Path"])
        path = path if path.is_absolute() else csv_path.parent / path
        label = _parse_label(record.get("label", ""), csv_path, row)
        items.append(Item(_rel(root, path), label, patient_of(path.name), split))
    return items


def _kaggle_root(root: Path) -> Path | None:
    for base in (root, root / "C-NMC_Leukemia"):
        if any((base / "training_data").glob("fold_*")):
            return base
    return None


def _kaggle(root: Path, base: Path) -> Source:
    items = []
    for fold in sorted((base / "training_data").glob("fold_*")):
        items += _class_folder_items(root, fold, None)
    label_files = []
    prelim = base / "validation_data" / "C-NMC_test_prelim_phase_data"
    if prelim.is_dir():
        # The prelim labels CSV maps the served names (`1.bmp`) to the original names (which carry the patient).
        labels_csv = next(iter(sorted(prelim.parent.glob("*labels*.csv"))), None)
        labels = {}
        if labels_csv is not None:
            label_files.append(_rel(root, labels_csv))
            table = pd.read_csv(labels_csv, dtype=str)
            if not {"new_names", "labels"} <= set(table.columns):
                raise SourceError(f"{labels_csv}: expected columns Patient_ID,new_names,labels, "
                                  f"got {list(table.columns)}")
            for row, rec in enumerate(table.to_dict("records")):
                labels[rec["new_names"]] = (_parse_label(rec["labels"], labels_csv, row),
                                            patient_of(rec.get("Patient_ID", "")))
        for p in _images_in(prelim):
            label, patient = labels.get(p.name, (UNKNOWN_LABEL, UNKNOWN_PATIENT))
            items.append(Item(_rel(root, p), label, patient, "prelim"))
    final = base / "testing_data" / "C-NMC_test_final_phase_data"
    if final.is_dir():
        items += [Item(_rel(root, p), UNKNOWN_LABEL, UNKNOWN_PATIENT, "final") for p in _images_in(final)]
    return Source(root, "kaggle", tuple(items), tuple(label_files))


def _csv_lists(root: Path) -> Source | None:
    train, valid = root / "train.csv", root / "valid.csv"
    tests = sorted(p for p in root.glob("*test*.csv"))
    if not (train.is_file() and valid.is_file()):
        return None
    if len(tests) > 1:
        raise SourceError(f"{root}: several test lists {[p.name for p in tests]}; keep one *test*.csv")
    items = read_list(train, root, "train") + read_list(valid, root, "valid")
    if tests:
        items += read_list(tests[0], root, "test", labelled=False)
    return Source(root, "csv-lists", tuple(items), tuple(p.name for p in [train, valid, *tests]))


def discover(root: str | os.PathLike) -> Source:
    """Detect the layout of `root` and list its images (no image is opened)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise SourceError(f"source folder {root} does not exist; pass --source PATH or --demo")
    base = _kaggle_root(root)
    if base is not None:
        source = _kaggle(root, base)
    elif (source := _csv_lists(root)) is not None:
        pass
    elif (root / "labels.csv").is_file():
        source = Source(root, "labels-csv", tuple(read_list(root / "labels.csv", root, None)), ("labels.csv",))
    elif (root / "all").is_dir() and (root / "hem").is_dir():
        source = Source(root, "class-folders", tuple(_class_folder_items(root, root, None)), ())
    else:
        raise SourceError(f"{root}: no known source layout found. Expected one of:\n{EXPECTED_LAYOUTS}")
    if not source.items:
        raise SourceError(f"{root}: layout {source.layout} found but it lists no images")
    paths = [item.path for item in source.items]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise SourceError(f"{root}: image {dup} is listed more than once; each image may appear once")
    return source
