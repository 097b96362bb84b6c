"""Assigning images to train/valid/test where the source gives no split.

Grouped by patient (no patient's cells in two splits: the report's split leaked patients between train and test)
and stratified by class. With fewer than three patients in some class a grouped split cannot give every split both
classes, so we fall back to a stratified split of images and record that in the manifest.

The assignment is stored beside the shards as a table (SPLIT_TABLE): a build that adds a size later follows the
stored one, so shard i of every size holds the same images even if the assignment code has changed since.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from pipeline.atomic import TMP_SUFFIX, fsync_rename
from pipeline.config import PreprocessConfig
from pipeline.sources import UNKNOWN_PATIENT, Item, Source

SPLITS = ("train", "valid", "test")
SPLIT_ORDER = (*SPLITS, "prelim", "final")  # the order splits are planned, counted and reported in
SPLIT_TABLE = "split.csv"  # path,label,patient,split of every source image
log = logging.getLogger(__name__)


def _largest_deficit(counts: np.ndarray, targets: np.ndarray) -> int:
    return int(np.argmax(targets - counts))


def _grouped(items: list[Item], fractions, rng: np.random.Generator) -> list[str]:
    """Patients of each class, largest first (ties in random order), each to the split furthest below target."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_patient[item.patient].append(i)
    # A patient's class is its majority label (C-NMC patients are single-class).
    patient_class = {p: Counter(items[i].label for i in idx).most_common(1)[0][0] for p, idx in by_patient.items()}
    assignment = [""] * len(items)
    for label in sorted(set(patient_class.values())):
        patients = [p for p in sorted(by_patient) if patient_class[p] == label]
        order = rng.permutation(len(patients))
        patients = sorted((patients[j] for j in order), key=lambda p: -len(by_patient[p]))
        total = sum(len(by_patient[p]) for p in patients)
        targets = np.asarray(fractions) * total
        counts = np.zeros(len(SPLITS))
        # The first patients seed each split, so every split gets at least one patient of each class.
        for rank, patient in enumerate(patients):
            s = rank if rank < len(SPLITS) else _largest_deficit(counts, targets)
            counts[s] += len(by_patient[patient])
            for i in by_patient[patient]:
                assignment[i] = SPLITS[s]
    return assignment


def _stratified_images(items: list[Item], fractions, rng: np.random.Generator) -> list[str]:
    assignment = [""] * len(items)
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        by_label[item.label].append(i)
    for label in sorted(by_label):
        idx = np.asarray(by_label[label])[rng.permutation(len(by_label[label]))]
        bounds = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for s, part in enumerate(np.split(idx, bounds)):
            for i in part:
                assignment[i] = SPLITS[s]
    return assignment


def assign_splits(items: list[Item], fractions, seed: int) -> tuple[list[str], dict]:
    """Split names for `items` (in order) and a record of how they were made, for the manifest."""
    unlabelled = [item.path for item in items if item.label not in (0, 1)]
    if unlabelled:
        # An unlabelled image in train or valid would stop training much later (target -1 is out of bounds).
        raise ValueError(f"{len(unlabelled)} images without a label (label -1), e.g. {unlabelled[0]}, cannot be "
                         f"assigned to train/valid/test; give them a label or list them in a test split")
    rng = np.random.default_rng(seed)
    patients_per_class = defaultdict(set)
    for item in items:
        patients_per_class[item.label].add(item.patient)
    too_few = {label: len(p) for label, p in patients_per_class.items()
               if len(p - {UNKNOWN_PATIENT}) < len(SPLITS) or UNKNOWN_PATIENT in p}
    record = {"method": "patient-grouped", "seed": seed, "fractions": list(fractions)}
    if too_few:
        reason = (f"too few known patients per class for a patient-grouped split (need {len(SPLITS)} per class, "
                  f"patients per label: {dict(sorted(too_few.items()))}); fell back to a stratified image split, "
                  f"so a patient's cells may sit in more than one split")
        log.warning(reason)
        record.update(method="stratified-images", note=reason)
        return _stratified_images(items, fractions, rng), record
    return _grouped(items, fractions, rng), record


def split_rank(split: str) -> int:
    """Sort key of a split name: SPLIT_ORDER first, any other name after them."""
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def split_items(source: Source, config: PreprocessConfig) -> tuple[list[Item], dict]:
    """Every item with its split: the source's own where given, else a patient-grouped assignment."""
    given = [it for it in source.items if it.split is not None]
    free = [it for it in source.items if it.split is None]
    record = {"method": "given"}
    if free:
        names, record = assign_splits(free, config.split_fractions, config.split_seed)
        free = [Item(it.path, it.label, it.patient, s) for it, s in zip(free, names)]
    if given:
        record["given"] = sorted({it.split for it in given})
    return free + given, record


def write_split_table(cache_dir: Path, items: list[Item]) -> None:
    import pandas as pd
    table = pd.DataFrame([(it.path, it.label, it.patient, it.split) for it in items],
                         columns=["path", "label", "patient", "split"])
    tmp = cache_dir / (SPLIT_TABLE + TMP_SUFFIX)
    try:
        table.to_csv(tmp, index=False)
        fsync_rename(tmp, cache_dir / SPLIT_TABLE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_split_table(cache_dir: Path) -> list[Item] | None:
    """The stored assignment, or None (with a warning) when the table is missing or damaged."""
    import pandas as pd
    path = cache_dir / SPLIT_TABLE
    try:
        table = pd.read_csv(path, dtype={"path": str, "patient": str, "split": str}, keep_default_na=False)
        return [Item(r.path, int(r.label), r.patient, r.split) for r in table.itertuples()]
    except (OSError, ValueError, AttributeError) as err:  # pandas' parser errors are ValueErrors
        log.warning("%s cannot be read (%s); making the assignment again from the source and the config", path, err)
        return None
