"""Finding the images of a source folder, their labels, patients and (where the source gives one) their split.

Layouts, tried in this order (`detect_layout`):
- `kaggle`: the Kaggle C-NMC 2019 layout, `training_data/fold_*/{all,hem}/*.bmp` (optionally under
  `C-NMC_Leukemia/`), plus `validation_data/C-NMC_test_prelim_phase_data/*.bmp` with its labels CSV (split
  `prelim`) and `testing_data/C-NMC_test_final_phase_data/*.bmp` without labels (split `final`) when present;
- `csv-lists`: the report's `train.csv`, `valid.csv` and a `*test*.csv`, columns `Path,label`; their split is kept;
- `labels-csv`: a folder with a `labels.csv` (`Path,label`);
- `class-folders`: a folder with `all/` and `hem/` subfolders.

Labels in a list are exactly `0`/`hem` or `1`/`all` (ACCEPTED_LABELS). An unlabelled image never reaches train or
valid: only the csv-lists test list may leave labels empty, and the Kaggle prelim/final images may have none.
A bad row (a label like `1.7`, an empty label in a labelled list, an empty path) and an image whose file name is
not valid UTF-8 stop discovery with an error naming the file, or with `on_error="skip"` are left out and listed in
`Source.skipped`. Folders that are symbolic link loops or broken links are errors; an image file that is one is
listed, and the build reports it when it reads it, like any other unusable image.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

CLASS_NAMES = ("hem", "all")  # label 0 = normal (hem), label 1 = leukemic blast (all)
LABEL_OF_FOLDER = {"hem": 0, "all": 1}
UNKNOWN_LABEL = -1
UNKNOWN_PATIENT = "unknown"
IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
# A label cell, stripped and lower-cased. `0.0`/`1.0` are what pandas writes for a label column with a gap in it.
LABEL_OF_TEXT = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, **LABEL_OF_FOLDER}
ACCEPTED_LABELS = "0 or hem (normal), 1 or all (leukemic blast); case-insensitive, 0.0 and 1.0 count as 0 and 1"
UNLABELLED_SPLITS = ("test", "prelim", "final")  # the only splits an unlabelled image may be in
ON_ERROR = ("fail", "skip")
EXPECTED_LAYOUTS = (
    "  - kaggle: training_data/fold_*/{all,hem}/*.bmp (the Kaggle C-NMC 2019 download, optionally under "
    "C-NMC_Leukemia/)\n"
    "  - csv-lists: train.csv, valid.csv and a *test*.csv with columns Path,label\n"
    "  - labels-csv: labels.csv with columns Path,label\n"
    "  - class-folders: all/ and hem/ subfolders of images"
)
_PATIENT_RE = re.compile(r"UID_([A-Za-z]*\d+)_")
log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The source folder or one of its lists is unusable; the message names it and says what to do."""


@dataclass(frozen=True)
class Item:
    path: str  # relative to the source root (may start with '..' for absolute paths in a CSV list)
    label: int  # 0 hem, 1 all, -1 unknown (only in UNLABELLED_SPLITS)
    patient: str
    split: str | None  # given by the source, or None where the build assigns one


@dataclass(frozen=True)
class Skipped:
    """An image left out by `discover(..., on_error="skip")`; `path` is printable (see `printable`)."""
    path: str
    reason: str

    def as_dict(self) -> dict:
        return {"path": self.path, "reason": self.reason}  # the shape of the manifest's `skipped` entries


@dataclass(frozen=True)
class Source:
    root: Path
    layout: str
    items: tuple[Item, ...]
    label_files: tuple[str, ...]  # lists read for labels/splits; part of the fingerprint
    skipped: tuple[Skipped, ...] = ()  # left out with on_error="skip"; part of the fingerprint

    @property
    def has_split(self) -> bool:
        return all(item.split is not None for item in self.items)

    def fingerprint(self) -> str:
        """Hash of every file's relative path, byte size and modification time (stat only, no image read)."""
        h = hashlib.sha256()
        for rel in sorted({item.path for item in self.items} | set(self.label_files)):
            try:
                st = os.stat(self.root / rel)
                line = f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n"
            except FileNotFoundError:
                line = f"{rel}\tmissing\n"
            except OSError as err:  # a symbolic link loop, say: the build reports the file when it reads it
                line = f"{rel}\tunreadable {err.errno}\n"
            h.update(line.encode("utf-8", "surrogateescape"))
        for s in self.skipped:
            h.update(f"skipped\t{s.path}\t{s.reason}\n".encode())
        return h.hexdigest()


def printable(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text: bytes that are not UTF-8 shown as `\\xff` (`bad\\xff_all.bmp`)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def patient_of(filename: str) -> str:
    """`UID_11_10_1_all.bmp` -> `11`, `UID_H10_43_1_hem.bmp` -> `H10`, anything else -> `unknown`."""
    match = _PATIENT_RE.search(os.path.basename(filename))
    return match.group(1) if match else UNKNOWN_PATIENT


class _Problems:
    """Bad rows and names: a SourceError at the first (on_error fail or None), or collected (skip)."""

    def __init__(self, on_error: str | None):
        if on_error not in (None, *ON_ERROR):
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        self.on_error = on_error
        self.skipped: list[Skipped] = []

    def report(self, path: str, reason: str, message: str) -> None:
        if self.on_error == "skip":
            log.warning("skipping %s: %s", path, reason)
            self.skipped.append(Skipped(path, reason))
            return
        # None: the caller has no --on-error flag, so the message must not suggest one
        hint = "; or pass --on-error skip to leave it out and list it" if self.on_error == "fail" else ""
        raise SourceError(message + hint)


def _stat(path: Path) -> os.stat_result | None:
    """os.stat following links; None where nothing is; SourceError for a link loop or a broken link."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        if os.path.islink(path):
            raise SourceError(f"{printable(path)} is a broken symbolic link (to {printable(os.readlink(path))}); "
                              f"fix or remove the link") from None
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise SourceError(f"{printable(path)} is (or passes through) a symbolic link loop; fix or remove the "
                              f"link") from None
        raise SourceError(f"{printable(path)} cannot be read ({err.strerror})") from None


def _is_dir(path: Path) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _is_file(path: Path) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def _images_in(folder: Path) -> list[Path]:
    """Entries with an image suffix that are not folders. A link leading nowhere stays in: the build reports it."""
    try:
        entries = list(folder.iterdir())
    except OSError as err:
        raise SourceError(f"{printable(folder)} cannot be listed ({err.strerror})") from None
    return sorted(p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())


def _class_folder_items(root: Path, folder: Path, split: str | None) -> list[Item]:
    items = []
    for name, label in LABEL_OF_FOLDER.items():
        if _is_dir(folder / name):
            items += [Item(p.relative_to(root).as_posix(), label, patient_of(p.name), split)
                      for p in _images_in(folder / name)]
    return items


def _cell(value) -> str:
    """A CSV cell as stripped text; '' for an empty or missing one (a short row gives NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def _rel(root: Path, path: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _read_csv(csv_path: Path, columns: tuple[str, ...], expected: str) -> pd.DataFrame:
    """A list as a table of strings (empty cells stay ''), or SourceError naming it and its expected columns."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SourceError(f"{csv_path}: cannot be read as CSV ({err}); expected columns {expected}") from err
    except OSError as err:
        raise SourceError(f"{printable(csv_path)}: cannot be opened ({err.strerror})") from None
    for column in columns:
        if column not in table.columns:
            raise SourceError(f"{csv_path}: no {column!r} column (columns: {list(table.columns)}); "
                              f"expected {expected}")
    return table


def _label(text: str, csv_path: Path, row: int, image: str, labelled: bool, problems: _Problems) -> int | None:
    """The label of one row (UNKNOWN_LABEL for an empty cell of an unlabelled list), or None if reported."""
    if not text:
        if not labelled:
            return UNKNOWN_LABEL
        problems.report(image, f"{csv_path.name} row {row}: no label",
                        f"{csv_path}: row {row} has no label (image {image}); every row of this list needs one: "
                        f"{ACCEPTED_LABELS}. Unlabelled images may not go into train or valid; only the *test*.csv "
                        f"of the csv-lists layout may leave labels empty")
        return None
    label = LABEL_OF_TEXT.get(text.lower())
    if label is None:
        problems.report(image, f"{csv_path.name} row {row}: label {text!r} is not one of 0, 1, hem, all",
                        f"{csv_path}: row {row} has label {text!r} (image {image}); expected {ACCEPTED_LABELS}")
    return label


def read_list(csv_path: Path, root: Path, split: str | None, labelled: bool = True,
              problems: _Problems | None = None) -> list[Item]:
    """Items of a `Path,label` CSV; paths absolute or relative to the CSV's folder.

    Rows are numbered as lines of the file, the header being row 1 (as a spreadsheet shows them). `labelled=False`
    (a test list) lets the label column, or a cell of it, be empty: such an image gets UNKNOWN_LABEL.
    """
    problems = problems or _Problems(None)
    table = _read_csv(csv_path, ("Path", "label") if labelled else ("Path",), "Path,label")
    items = []
    for index, record in enumerate(table.to_dict("records")):
        row, text = index + 2, _cell(record["Path"])
        if not text:
            _report_empty_name(problems, root, csv_path, row, "Path")
            continue
        path = Path(text) if Path(text).is_absolute() else csv_path.parent / text
        rel = _rel(root, path)
        label = _label(_cell(record.get("label")), csv_path, row, rel, labelled, problems)
        if label is not None:
            items.append(Item(rel, label, patient_of(path.name), split))
    return items


def _report_empty_name(problems: "_Problems", root: Path, csv_path: Path, row: int, column: str) -> None:
    problems.report(f"{_rel(root, csv_path)} row {row}", f"{csv_path.name} row {row}: empty {column}",
                    f"{csv_path}: row {row} has an empty {column}; every row must name an image")


def _kaggle_root(root: Path) -> Path | None:
    for base in (root, root / "C-NMC_Leukemia"):
        if _is_dir(base) and _is_dir(base / "training_data") and any((base / "training_data").glob("fold_*")):
            return base
    return None


def _prelim_labels(root: Path, prelim: Path, problems: _Problems) -> tuple[dict, set[str], list[str]]:
    """{served name: (label, patient)} from the prelim labels CSV, the names of bad rows, the CSV read (if any).

    The CSV maps the served names (`1.bmp`) to the original names, which carry the patient."""
    labels_csv = next(iter(sorted(prelim.parent.glob("*labels*.csv"))), None)
    if labels_csv is None:
        return {}, set(), []
    table = _read_csv(labels_csv, ("new_names", "labels"), "Patient_ID,new_names,labels")
    labels, bad = {}, set()
    for index, rec in enumerate(table.to_dict("records")):
        row, name = index + 2, _cell(rec["new_names"])
        if not name:
            _report_empty_name(problems, root, labels_csv, row, "new_names")
            continue
        label = _label(_cell(rec["labels"]), labels_csv, row, _rel(root, prelim / name), True, problems)
        if label is None:
            bad.add(name)
        else:
            labels[name] = (label, patient_of(_cell(rec.get("Patient_ID"))))
    return labels, bad, [_rel(root, labels_csv)]


def _kaggle(root: Path, problems: _Problems) -> Source:
    base = _kaggle_root(root)
    items = []
    for fold in sorted((base / "training_data").glob("fold_*")):
        if _is_dir(fold):
            items += _class_folder_items(root, fold, None)
    label_files = []
    prelim = base / "validation_data" / "C-NMC_test_prelim_phase_data"
    if _is_dir(prelim):
        labels, bad, label_files = _prelim_labels(root, prelim, problems)
        unlabelled = 0
        for p in _images_in(prelim):
            if p.name in bad:
                continue  # reported (and, with on_error skip, listed) by _prelim_labels
            label, patient = labels.get(p.name, (UNKNOWN_LABEL, UNKNOWN_PATIENT))
            unlabelled += label == UNKNOWN_LABEL
            items.append(Item(_rel(root, p), label, patient, "prelim"))
        if unlabelled:
            log.warning("%d prelim images have no row in the prelim labels CSV; they stay unlabelled (-1) in split "
                        "prelim", unlabelled)
    final = base / "testing_data" / "C-NMC_test_final_phase_data"
    if _is_dir(final):
        items += [Item(_rel(root, p), UNKNOWN_LABEL, UNKNOWN_PATIENT, "final") for p in _images_in(final)]
    return Source(root, "kaggle", tuple(items), tuple(label_files))


def _csv_lists(root: Path, problems: _Problems) -> Source:
    train, valid = root / "train.csv", root / "valid.csv"
    tests = sorted(p for p in root.glob("*test*.csv"))
    if len(tests) > 1:
        raise SourceError(f"{root}: several test lists {[p.name for p in tests]}; keep one *test*.csv")
    items = read_list(train, root, "train", problems=problems) + read_list(valid, root, "valid", problems=problems)
    if tests:
        items += read_list(tests[0], root, "test", labelled=False, problems=problems)
    return Source(root, "csv-lists", tuple(items), tuple(p.name for p in [train, valid, *tests]))


def _utf8_items(source: Source, problems: _Problems) -> list[Item]:
    """The items whose relative path is valid UTF-8 (the split table, manifest and HDF5 shards store names so)."""
    items = []
    for item in source.items:
        try:
            item.path.encode("utf-8")
        except UnicodeEncodeError:  # os.listdir gave the undecodable bytes as surrogates
            problems.report(printable(item.path), "file name is not valid UTF-8",
                            f"{printable(source.root / item.path)}: the file name is not valid UTF-8 (shown with "
                            f"\\x escapes); the cache stores names as UTF-8, so rename it (convmv can)")
            continue
        items.append(item)
    return items


def _labels_csv(root: Path, problems: _Problems) -> Source:
    items = read_list(root / "labels.csv", root, None, problems=problems)
    return Source(root, "labels-csv", tuple(items), ("labels.csv",))


def _class_folders(root: Path, problems: _Problems) -> Source:  # (no list: nothing to report)
    return Source(root, "class-folders", tuple(_class_folder_items(root, root, None)), ())


_READERS = {"kaggle": _kaggle, "csv-lists": _csv_lists, "labels-csv": _labels_csv, "class-folders": _class_folders}


def detect_layout(folder: str | os.PathLike) -> str | None:
    """The layout `discover` reads `folder` as (the first match, in this module's order), or None for a folder of
    none; a few stats, no list or image read. Every caller asks this one function, so a folder another command takes
    for a source is one the build reads the same way. SourceError for a link loop or broken link at a marker."""
    root = Path(folder)
    if _kaggle_root(root) is not None:
        return "kaggle"
    if _is_file(root / "train.csv") and _is_file(root / "valid.csv"):
        return "csv-lists"
    if _is_file(root / "labels.csv"):
        return "labels-csv"
    if _is_dir(root / "all") and _is_dir(root / "hem"):
        return "class-folders"
    return None


def _source_root(root: str | os.PathLike) -> Path:
    path = Path(root)
    try:
        st = _stat(path)
    except SourceError as err:
        raise SourceError(f"source folder {err}; pass --source PATH or --demo") from None
    if st is None:
        raise SourceError(f"source folder {printable(path)} does not exist; pass --source PATH or --demo")
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"source {printable(path)} is a file, not a folder; pass the folder that holds the images")
    return path.resolve()


def discover(root: str | os.PathLike, on_error: str | None = None) -> Source:
    """Detect the layout of `root` and list its images (no image is opened).

    on_error: "fail" stops at the first bad list row or file name with a SourceError that names it and suggests
    `--on-error skip`; "skip" leaves such images out and lists them in `Source.skipped` (for the manifest's
    `skipped`); None (the default) fails like "fail" without the suggestion, for callers without that flag.
    """
    problems = _Problems(on_error)
    root = _source_root(root)
    layout = detect_layout(root)
    if layout is None:
        raise SourceError(f"{root}: no known source layout found. Expected one of:\n{EXPECTED_LAYOUTS}")
    source = _READERS[layout](root, problems)
    items = _utf8_items(source, problems)
    source = dataclasses.replace(source, items=tuple(items), skipped=tuple(problems.skipped))
    if not source.items:
        left_out = f" ({len(source.skipped)} left out as unusable)" if source.skipped else ""
        raise SourceError(f"{root}: layout {source.layout} found but it lists no images{left_out}")
    paths = [item.path for item in source.items]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise SourceError(f"{root}: image {dup} is listed more than once; each image may appear once")
    # Every layout above labels what it puts into train/valid or leaves unsplit (the build assigns those).
    assert all(it.label in (0, 1) or it.split in UNLABELLED_SPLITS for it in source.items)
    return source
