"""Cross-validation folds over one cache: which of its train + valid images each fold validates on.

A fold is recorded in the run's config (`TrainConfig.fold`, a small JSON-able dict) by the groups it validates on,
not by row numbers, so it means the same at every cached size:

    {"scheme": "patients", "index": 0, "folds": 3, "seed": 0, "valid_groups": ["11", "H3", ...]}
    {"scheme": "kaggle", "index": 0, "folds": 3, "valid_groups": ["fold_0"]}

- "patients": patient-grouped, class-stratified K-fold. Each class's patients, in a seeded random order, go one by
  one to the fold with the fewest cells of that class so far: no patient is in two folds, and the folds' cell counts
  per class differ by at most one patient's cells (greedy assignment in any order guarantees that). Not sorting by
  size first keeps the seed meaningful: another --seed gives other folds, for repeated CV. An image whose patient
  id could not be parsed is a group of its own (it cannot be grouped with anything, and one "unknown" group would
  swallow them all).
- "kaggle": the Kaggle layout's own `fold_0/1/2` folders (read from the cached paths; no rebuild).

The test split is never part of a fold.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict

import numpy as np

from pipeline.sources import UNKNOWN_PATIENT

CV_SPLITS = ("train", "valid")  # what the folds divide; the cache's test split stays untouched
_KAGGLE_FOLD = re.compile(r"(?:^|[/\\])(fold_\d+)(?:[/\\]|$)")


class FoldError(ValueError):
    """Folds that cannot be made from this cache; the message says why and what would work."""


def group_of(patient: str, path: str) -> str:
    return f"image:{path}" if patient == UNKNOWN_PATIENT else str(patient)


def kaggle_fold_of(path: str) -> str | None:
    match = _KAGGLE_FOLD.search(path)
    return match.group(1) if match else None


def _class_of_groups(groups: np.ndarray, labels: np.ndarray) -> dict[str, int]:
    """A group's class is its majority label (C-NMC patients are single-class)."""
    members = defaultdict(list)
    for g, label in zip(groups, labels):
        members[g].append(int(label))
    return {g: Counter(ls).most_common(1)[0][0] for g, ls in members.items()}


def patient_folds(patients, paths, labels, k: int, seed: int) -> list[list[str]]:
    """The valid groups of each of `k` folds (sorted), from the rows' patients, paths and labels."""
    if k < 2:
        raise FoldError(f"--folds must be 2 or more (or kaggle), got {k}")
    groups = np.array([group_of(p, q) for p, q in zip(patients, paths)], dtype=object)
    labels = np.asarray(labels, np.int64)
    group_class = _class_of_groups(groups, labels)
    sizes = Counter(groups.tolist())
    per_class = Counter(group_class.values())
    short = {c: n for c, n in per_class.items() if n < k}
    if short or len(per_class) < 2:
        counts = ", ".join(f"{n} {_class_name(c)}" for c, n in sorted(per_class.items()))
        fewest = min(per_class.values()) if len(per_class) == 2 else 0
        fix = (f"use --folds {fewest} or fewer" if fewest >= 2 else
               "cross-validation needs at least 2 patients of each class, so this cache cannot be cross-validated")
        raise FoldError(f"--folds {k}: every fold's valid part needs patients of both classes, but the cache's train "
                        f"+ valid images come from {counts} patient(s); {fix}, or use a cache with more patients")
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    for label in sorted(per_class):
        members = sorted(g for g, c in group_class.items() if c == label)
        members = [members[i] for i in rng.permutation(len(members))]
        cells = np.zeros(k, np.int64)
        for rank, g in enumerate(members):
            f = rank if rank < k else int(np.argmin(cells))  # the first k seed one fold each
            cells[f] += sizes[g]
            folds[f].append(g)
    return [sorted(f) for f in folds]


def kaggle_folds(paths, layout: str | None) -> list[list[str]]:
    found = [kaggle_fold_of(p) for p in paths]
    missing = [p for p, f in zip(paths, found) if f is None]
    if missing:
        raise FoldError(f"--folds kaggle needs a cache built from the Kaggle layout (training_data/fold_0, fold_1, "
                        f"...); this cache's source layout is {layout or 'unknown'} and {len(missing)} of its train + "
                        f"valid images (e.g. {missing[0]}) are in no fold_N folder. Use --folds K instead")
    names = sorted(set(found), key=lambda f: int(f.split("_")[1]))
    if len(names) < 2:
        raise FoldError(f"--folds kaggle: the cache's train + valid images are all in {names[0]}; use --folds K")
    return [[name] for name in names]


def _class_name(label: int) -> str:
    return {0: "hem", 1: "all"}.get(label, str(label))


def row_groups(meta: dict, scheme: str) -> np.ndarray:
    """The group (patient, or Kaggle fold folder) of every row of `meta` (read_meta of the CV splits, joined)."""
    if scheme == "kaggle":
        return np.array([kaggle_fold_of(p) for p in meta["paths"]], dtype=object)
    return np.array([group_of(p, q) for p, q in zip(meta["patients"], meta["paths"])], dtype=object)


def read_cv_meta(reader, size: int) -> dict:
    """labels, paths and patients of the cache's train + valid rows at `size`, joined in that order: the row
    numbering that `CacheLoader(reader, size, CV_SPLITS, rows=...)` uses."""
    parts = [reader.read_meta(size, split) for split in CV_SPLITS]
    return {key: np.concatenate([p[key] for p in parts]) for key in ("labels", "paths", "patients")}


def fold_rows(reader, size: int, fold: dict, meta: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, valid rows) of a fold at `size`: indices into the joined train + valid rows. `meta`: that
    size's `read_cv_meta`, when the caller has it already (it is read from every shard otherwise)."""
    meta = read_cv_meta(reader, size) if meta is None else meta
    in_valid = np.isin(row_groups(meta, fold["scheme"]), np.array(fold["valid_groups"], dtype=object))
    valid = np.flatnonzero(in_valid)
    train = np.flatnonzero(~in_valid)
    if not len(valid) or not len(train):
        raise FoldError(f"fold {fold['index']} of {fold['folds']} has {len(train)} training and {len(valid)} "
                        f"validation images at {size} px; its groups are not in this cache")
    return train, valid


def make_folds(reader, size: int, folds: str | int, seed: int) -> list[dict]:
    """The fold records for `--folds K|kaggle` over the cache's train + valid images, checked: every fold's valid
    part holds both classes."""
    meta = read_cv_meta(reader, size)
    if str(folds) == "kaggle":
        scheme, groups = "kaggle", kaggle_folds(meta["paths"], reader.manifest.get("source", {}).get("layout"))
    else:
        scheme, groups = "patients", patient_folds(meta["patients"], meta["paths"], meta["labels"], int(folds), seed)
    records = []
    row_group = row_groups(meta, scheme)
    for index, valid_groups in enumerate(groups):
        valid_labels = set(meta["labels"][np.isin(row_group, np.array(valid_groups, dtype=object))].tolist())
        if valid_labels != {0, 1}:
            missing = " and ".join(_class_name(c) for c in (0, 1) if c not in valid_labels)
            per_class = Counter(_class_of_groups(row_groups(meta, "patients"), meta["labels"]).values())
            raise FoldError(f"fold {index} ({', '.join(valid_groups)}) has no {missing} images to validate on; the "
                            f"cache's train + valid images come from {per_class.get(1, 0)} all and "
                            f"{per_class.get(0, 0)} hem patients. Use --folds K with K at most the smaller count")
        record = {"scheme": scheme, "index": index, "folds": len(groups), "valid_groups": valid_groups}
        if scheme == "patients":
            record["seed"] = seed
        records.append(record)
    return records
