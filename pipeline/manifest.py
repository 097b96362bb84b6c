"""The cache manifest: what a build writes and what a reader accepts, side by side so the two cannot drift.

The manifest is the last file a build writes, atomically (`write_manifest`): its presence under its final name is
what makes a cache folder complete, and it records every shard's sha256 and byte size, the preprocessing config the
cache key was derived from, the source it came from and the images left out. `make_manifest` is the one place that
lays the record out; `read_manifest` checks the fields readers index and refuses anything else with a
`ManifestError` naming the file and the problem, so that no reader meets a KeyError deep inside training. The
writer runs the same check before writing, so a build cannot leave a manifest its own readers would refuse.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.atomic import write_json_atomic
from pipeline.config import FORMAT_VERSION, Geometry, PreprocessConfig

if TYPE_CHECKING:  # only for annotations: the cache readers need not import the source scanner (and pandas)
    from pipeline.sources import Source

MANIFEST = "manifest.json"
# The fields every reader may index; a manifest without one of them is refused, whatever else it holds.
REQUIRED_FIELDS = ("format_version", "key", "created", "config", "source", "splits", "sizes", "skipped")
# Training normalises in float32: a mean or std beyond its range, or a std whose inverse is, would give inf or NaN.
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_SMALLEST_NORMAL = 1.1754943508222875e-38


class CacheError(ValueError):
    """A cache folder is missing, incomplete or corrupt; the message names the file."""


class CacheAccessError(CacheError):
    """A cache folder or manifest this user may not read: neither damaged nor incomplete, so it is not rebuilt or
    pruned as such; the message names it and what to do."""

    def __init__(self, path: Path, err: OSError):
        self.path = Path(path)
        super().__init__(f"{path}: cannot be read ({err.strerror}); the cache may be whole: make it readable by this "
                         f"user (check its owner and permissions), or use another cache folder")


class ManifestError(CacheError):
    """A manifest.json that cannot be used; `path` and `problem` say which and why."""

    def __init__(self, path: Path, problem: str):
        self.path, self.problem = Path(path), problem
        key = self.path.parent.name
        super().__init__(f"{path}: {problem}. This cache cannot be used: build it again with python -m pipeline.build "
                         f"(the same --source and options; the damaged folder is replaced), or remove it with "
                         f"python -m pipeline.cache rm {key}")


# ----------------------------------------------------------------------------- writing


def size_entry(*, geometry: Geometry, mean: list[float], std: list[float], shards: dict[str, list[dict]]) -> dict:
    """The record of one cached size: its stored geometry, the train split's channel statistics in [0, 1] units
    (what the loader normalizes with) and each split's shard entries ({file, count, sha256, bytes}) in order."""
    return {"stored_size": geometry.stored_size, "crop": geometry.crop, "context_crop": geometry.context_crop,
            "mean": mean, "std": std, "shards": shards}


def make_manifest(*, key: str, config: PreprocessConfig, classes, source: Source, split: dict, splits: dict,
                  sizes: dict[str, dict], skipped: list[dict], created: str | None = None) -> dict:
    """The manifest of cache `key`, laid out in the order it is written (sizes in increasing order).

    split: how the images were assigned to splits (pipeline.split's record); splits: {name: {count, classes}} of
    the images kept; sizes: {"<size>": size_entry(...)}; skipped: [{path, reason}] of the images left out;
    created: the first build's time (kept when a build adds sizes), now when None."""
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.as_dict(),
        "classes": list(classes),
        "source": {"root": str(source.root), "fingerprint": source.fingerprint(), "layout": source.layout,
                   "count": len(source.items)},
        "split": split,
        "splits": splits,
        "sizes": {k: sizes[k] for k in sorted(sizes, key=int)},
        "skipped": skipped,
    }


def write_manifest(cache_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write the manifest last and atomically: a failure at any point leaves the previous manifest (or none), never
    a partial one. Refuses (ValueError) a manifest that `read_manifest` would refuse."""
    problem = manifest_problem(manifest)
    if problem:
        raise ValueError(f"refusing to write a cache manifest that {problem}")
    path = Path(cache_dir) / MANIFEST
    write_json_atomic(path, manifest)
    return path


# ----------------------------------------------------------------------------- reading


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def normalisation_problem(mean, std) -> str | None:
    """Why per-channel `mean` and `std` (RGB, [0, 1] units) cannot normalise an image, or None. Each must be three
    numbers, finite in float32 (what training computes in), and each std > 0 (it is divided by)."""
    for name, values, positive in (("mean", mean, False), ("std", std, True)):
        ok = isinstance(values, (list, tuple)) and len(values) == 3 and all(
            _number(v) and math.isfinite(v) and abs(v) <= _FLOAT32_MAX
            and (v >= _FLOAT32_SMALLEST_NORMAL if positive else True) for v in values)
        if not ok:
            want = "three finite numbers > 0" if positive else "three finite numbers"
            return f"{name} is {values!r}, not {want} (one per RGB channel)"
    return None


def check_normalisation(mean, std, where: str, fix: str | None = None) -> None:
    """Raise ValueError naming `where` (the file and entry they come from), the bad field and its value, and `fix`
    (what to do), unless `mean` and `std` can normalise an image (`normalisation_problem`). For every copy of the
    numbers: a cache's manifest checks its own through `read_manifest`; a run's saved config through this."""
    problem = normalisation_problem(mean, std)
    if problem:
        raise ValueError(f"{where}: {problem}" + (f"; {fix}" if fix else ""))


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _created_problem(created) -> str | None:
    try:
        datetime.fromisoformat(created)
        return None
    except (TypeError, ValueError):
        return f"has no usable creation time (created: {created!r}; an ISO date such as 2026-01-31T12:00:00+00:00)"


def _size_problem(size: str, info) -> str | None:
    shards = info.get("shards") if isinstance(info, dict) else None
    if not (str(size).isdigit() and isinstance(shards, dict) and _count(info.get("stored_size"))
            and info["stored_size"] >= int(size)
            and all(isinstance(entries, list) and all(
                isinstance(e, dict) and isinstance(e.get("file"), str) and _count(e.get("count"))
                and isinstance(e.get("sha256"), str) and _count(e.get("bytes", 0)) for e in entries)
                for entries in shards.values())):
        return f"has a malformed entry for size {size!r}"
    problem = normalisation_problem(info.get("mean"), info.get("std"))
    if problem:
        return f"has a bad normalisation for size {size}: {problem}"
    return None


def manifest_problem(m) -> str | None:
    """What makes a parsed manifest unusable, or None. Checks every field a reader indexes: its presence, type and
    range (counts >= 0, stored sizes >= the size, usable normalisation numbers), not the shards' contents."""
    if not isinstance(m, dict):
        return f"holds a JSON {type(m).__name__}, not a cache manifest (an object with format_version, sizes, ...)"
    missing = [k for k in REQUIRED_FIELDS if k not in m]
    if missing:
        return f"is not a cache manifest: it lacks {', '.join(missing)}"
    if m["format_version"] != FORMAT_VERSION:
        return f"is cache format {m['format_version']!r}; this version reads format {FORMAT_VERSION}"
    if not (isinstance(m["source"], dict) and isinstance(m["source"].get("root"), str)):
        return "has no source root"
    if not isinstance(m["source"].get("layout"), str):
        return "has no source layout"
    if not (isinstance(m["config"], dict) and isinstance(m["splits"], dict) and isinstance(m["skipped"], list)
            and isinstance(m["sizes"], dict)):
        return "has a config, splits, sizes or skipped entry of the wrong type"
    if "classes" in m and not (isinstance(m["classes"], list) and all(isinstance(c, str) for c in m["classes"])):
        return f"has classes {m['classes']!r}, not a list of class names"
    problem = _created_problem(m["created"])
    if problem:
        return problem
    for split, info in m["splits"].items():
        classes = info.get("classes", {}) if isinstance(info, dict) else None
        if not (isinstance(info, dict) and _count(info.get("count")) and isinstance(classes, dict)
                and all(_count(n) for n in classes.values())):
            return f"has a malformed entry for split {split!r}"
    for size, info in m["sizes"].items():
        problem = _size_problem(size, info)
        if problem:
            return problem
    return None


def read_manifest(cache_dir: str | os.PathLike) -> dict:
    """The manifest of a complete cache; CacheError when there is none, ManifestError when it cannot be used,
    CacheAccessError when this user may not read it."""
    path = Path(cache_dir) / MANIFEST
    try:
        os.lstat(path)
    except PermissionError as err:
        raise CacheAccessError(cache_dir, err) from None
    except OSError:  # no such file, or cache_dir is no folder
        if not os.path.isdir(cache_dir):
            what = "is not a folder" if os.path.lexists(cache_dir) else "no such folder"
            raise CacheError(f"{cache_dir}: {what}, hence no {MANIFEST}; a cache is a folder <cache root>/<key> "
                             f"holding one (python -m pipeline.cache list shows them)") from None
        raise CacheError(f"{cache_dir}: no {MANIFEST}; it is not a complete cache (build it with python -m "
                         f"pipeline.build)") from None
    if not path.is_file():
        raise ManifestError(path, "is not a regular file (a folder or a broken link?)")
    try:
        m = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(path, f"is not valid JSON ({err})") from None
    except PermissionError as err:
        raise CacheAccessError(path, err) from None
    except OSError as err:
        raise ManifestError(path, f"cannot be read ({err.strerror})") from None
    problem = manifest_problem(m)
    if problem:
        raise ManifestError(path, problem)
    return m


def rebuild_command(cache_dir: str | os.PathLike, manifest: dict, sizes) -> str:
    """The build command that rebuilds `sizes` of this cache in place: same source, cache root and parameters (those
    that differ from the defaults), --verify so that every shard's checksum is checked and the bad ones rebuilt."""
    cache_dir = Path(cache_dir).resolve()
    args = ["python", "-m", "pipeline.build", "--source", manifest["source"]["root"], "--cache-dir",
            str(cache_dir.parent), "--sizes", *(str(s) for s in sorted(sizes))]
    defaults = PreprocessConfig().as_dict()
    for name, value in manifest["config"].items():
        if name in defaults and value != defaults[name]:
            args += ["--" + name.replace("_", "-"), *(str(v) for v in (value if isinstance(value, list) else [value]))]
    if manifest["skipped"]:
        args += ["--on-error", "skip"]
    return shlex.join(args + ["--verify"])
