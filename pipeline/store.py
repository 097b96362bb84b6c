"""The cache's on-disk format: writer and reader side by side, so they cannot drift.

    cache/<key>/manifest.json             written last; its presence means "complete"
    cache/<key>/split.csv                 path,label,patient,split of every source image
    cache/<key>/<size>/<split>-00000.h5   images (N, S, S, 3) uint8 RGB, labels (N,) int64, paths (N,), patients (N,)

Shards are written as `*.h5.tmp` and renamed when complete, so a shard with its final name is always whole. The
manifest records each shard's sha256 and byte size: a reader hashes a shard the first time a process opens it
(`CacheReader`), and a build that finds a shard missing, resized or (with --verify) changed rebuilds it.
The manifest's layout and checks are `pipeline.manifest`'s, the shard checksums `pipeline.checksums`', the split
table `pipeline.split`'s.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import h5py
import numpy as np

# The manifest, the shard checksums and the atomic writes have modules of their own; their names stay importable
# from here, where readers of the cache have always found them.
from pipeline.atomic import TMP_SUFFIX, fsync_rename, write_json_atomic  # noqa: F401
from pipeline.checksums import sha256_file, shard_problem, shard_problems  # noqa: F401
from pipeline.manifest import (MANIFEST, CacheError, ManifestError, read_manifest,  # noqa: F401
                               rebuild_command)

STRING = h5py.string_dtype("utf-8")
_LEVELS = np.arange(256, dtype=np.int64)
# Images per h5py write call: one call per image cost ~0.3 ms of h5py overhead (7% of a build on 2 cores) ...
WRITE_BATCH = 16
# ... but never more than this many bytes buffered per shard, so memory stays bounded at any image size.
WRITE_BUFFER_BYTES = 64 * 2**20
# cv2.calcHist counts in float32, exact up to 2**24; larger windows are counted with np.bincount (int64).
_CALCHIST_EXACT_PIXELS = 2**24


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.h5"


@dataclass
class ShardResult:
    file: str  # relative to the cache folder
    count: int
    sha256: str
    pixel_sum: np.ndarray  # (3,) int64, over the centre size x size window
    pixel_sumsq: np.ndarray  # (3,) int64
    pixel_count: int  # pixels per channel summed
    skipped: list  # [{path, reason}]
    nbytes: int = 0  # file size

    def entry(self) -> dict:
        return {"file": self.file, "count": self.count, "sha256": self.sha256, "bytes": self.nbytes}


class _WriteGuard(io.FileIO):
    """The shard file under HDF5 (h5py's file-object driver). A failed write (disk full, quota, I/O error) is kept in
    `error` for ShardWriter to raise, and HDF5 is told it succeeded: after a failed write HDF5 can no longer close the
    file and the process dies at exit with SIGSEGV (h5py 3.16 / HDF5 2.0 on a full tmpfs). The file is discarded."""
    error: OSError | None = None

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while self.error is None and done < len(view):  # h5py ignores short writes: finish them here
            try:
                done += super().write(view[done:])
            except OSError as err:
                self.error = err
        return len(view)


def channel_histograms(center: np.ndarray) -> np.ndarray:
    """(3, 256) int64 pixel counts per channel of an (H, W, 3) uint8 window, exact at any size."""
    if center.shape[0] * center.shape[1] <= _CALCHIST_EXACT_PIXELS:
        # 0.07 ms against 2.7 ms for an int64 sum of squares and 0.26 ms for np.bincount over a 224 px window
        # (measured on the 2-core dev machine)
        hist = np.stack([cv2.calcHist([center], [c], None, [256], [0, 256]).ravel() for c in range(3)])
        return hist.astype(np.int64)
    return np.stack([np.bincount(center[:, :, c].ravel(), minlength=256) for c in range(3)]).astype(np.int64)


class ShardWriter:
    """Writes one shard under a temporary name; `close()` renames it into place and returns its ShardResult.

    Pixel sums over the centre `size` window are kept in int64 (exact for uint8) and stored in the shard's
    attributes, so a resumed build gets exact statistics without re-reading finished shards. At most `batch` images
    (WRITE_BATCH, fewer for large images) wait in memory for the next write. A failed write raises OSError (errno
    as the system gave it, the temporary file as filename); `abort()` then removes the temporary file.
    """

    def __init__(self, cache_dir: Path, size: int, split: str, index: int, stored_size: int, capacity: int):
        self.cache_dir = cache_dir
        self.rel = f"{size}/{shard_name(split, index)}"
        self.final = cache_dir / self.rel
        self.tmp = self.final.with_name(self.final.name + TMP_SUFFIX)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.margin = (stored_size - size) // 2
        self.size = size
        s = stored_size
        self.raw = _WriteGuard(self.tmp, "w+")
        try:
            # track_times=False keeps the file's bytes a function of its contents (same checksum on every rebuild).
            self.file = h5py.File(self.raw, "w", libver="v108", track_order=False)
            self.images = self.file.create_dataset("images", (capacity, s, s, 3), np.uint8,
                                                   maxshape=(None, s, s, 3), chunks=(1, s, s, 3), track_times=False)
        except BaseException:
            self.raw.close()
            self.tmp.unlink(missing_ok=True)
            raise
        self._check()
        self.batch = max(1, min(WRITE_BATCH, WRITE_BUFFER_BYTES // (s * s * 3)))
        self.buffer = np.empty((self.batch, s, s, 3), np.uint8)
        self.labels: list[int] = []
        self.paths: list[str] = []
        self.patients: list[str] = []
        self.skipped: list[dict] = []
        self.sum = np.zeros(3, np.int64)
        self.sumsq = np.zeros(3, np.int64)

    def add(self, image: np.ndarray, label: int, path: str, patient: str) -> None:
        i = len(self.labels)
        self.buffer[i % self.batch] = image
        if i % self.batch == self.batch - 1:
            self._flush(i + 1)
        m, n = self.margin, self.size
        hist = channel_histograms(image[m:m + n, m:m + n])  # per-channel counts, then exact integer sums
        self.sum += hist @ _LEVELS
        self.sumsq += hist @ (_LEVELS * _LEVELS)
        self.labels.append(label)
        self.paths.append(path)
        self.patients.append(patient)

    def _flush(self, end: int) -> None:
        start = (end - 1) // self.batch * self.batch
        self.images[start:end] = self.buffer[:end - start]
        self._check()

    def _check(self) -> None:
        if self.raw.error is not None:
            err = self.raw.error
            raise OSError(err.errno, err.strerror, str(self.tmp)) from err

    def skip(self, path: str, reason: str) -> None:
        self.skipped.append({"path": path, "reason": reason})

    def close(self) -> ShardResult:
        n = len(self.labels)
        if n % self.batch:
            self._flush(n)
        self.images.resize(n, axis=0)
        f = self.file
        f.create_dataset("labels", data=np.asarray(self.labels, np.int64), track_times=False)
        f.create_dataset("paths", data=np.asarray(self.paths, dtype=object), dtype=STRING, track_times=False)
        f.create_dataset("patients", data=np.asarray(self.patients, dtype=object), dtype=STRING,
                         track_times=False)
        f.attrs["pixel_sum"] = self.sum
        f.attrs["pixel_sumsq"] = self.sumsq
        f.attrs["pixel_count"] = n * self.size * self.size
        f.attrs["skipped"] = json.dumps(self.skipped)
        f.close()
        self._check()
        os.fsync(self.raw.fileno())
        self.raw.close()
        os.replace(self.tmp, self.final)
        return ShardResult(self.rel, n, sha256_file(self.final), self.sum, self.sumsq, n * self.size ** 2,
                           self.skipped, self.final.stat().st_size)

    def abort(self) -> None:
        """Close and remove the temporary file (after an error: a close error is of no interest then)."""
        try:
            with contextlib.suppress(OSError, RuntimeError, ValueError):
                self.file.close()
        finally:
            self.raw.close()
            self.tmp.unlink(missing_ok=True)


def read_finished_shard(cache_dir: Path, rel: str, expected_paths: list[str], stored_size: int) -> ShardResult | None:
    """A shard left by an earlier, interrupted build, if it is whole and holds exactly the expected images."""
    path = cache_dir / rel
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][()]]
            skipped = json.loads(f.attrs["skipped"])
            if f["images"].shape[1:] != (stored_size, stored_size, 3) or f["images"].shape[0] != len(paths):
                return None
            if sorted(paths + [s["path"] for s in skipped]) != sorted(expected_paths):
                return None
            result = ShardResult(rel, len(paths), "", np.asarray(f.attrs["pixel_sum"], np.int64),
                                 np.asarray(f.attrs["pixel_sumsq"], np.int64), int(f.attrs["pixel_count"]), skipped)
    except (OSError, KeyError, ValueError):
        return None
    result.sha256, result.nbytes = sha256_file(path), path.stat().st_size
    return result


def channel_stats(results: list[ShardResult]) -> tuple[list[float], list[float]]:
    """Exact per-channel mean and std in [0, 1] units from the shards' integer sums (float64)."""
    total = sum(r.pixel_count for r in results)
    if total == 0:
        return [0.0] * 3, [0.0] * 3
    s = sum(r.pixel_sum for r in results).astype(np.float64)
    ss = sum(r.pixel_sumsq for r in results).astype(np.float64)
    mean = s / total
    var = np.maximum(ss / total - mean * mean, 0.0)
    return [float(v) for v in mean / 255], [float(v) for v in np.sqrt(var) / 255]


# ----------------------------------------------------------------------------- reading


class CacheReader:
    """Read access to one complete cache folder (no file is held open between calls).

    Every shard is checked against the manifest's sha256 before its first read in this process, and a bad one stops
    the reading with a CacheError that names it and gives the command that rebuilds it."""

    def __init__(self, cache_dir: str | os.PathLike):
        self.dir = Path(cache_dir)
        self.manifest = read_manifest(self.dir)

    @property
    def sizes(self) -> list[int]:
        return sorted(int(s) for s in self.manifest["sizes"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def size_info(self, size: int) -> dict:
        try:
            return self.manifest["sizes"][str(size)]
        except KeyError:
            raise CacheError(f"{self.dir}: size {size} is not cached (cached: {self.sizes}); add it with "
                             f"python -m pipeline.build --sizes {size} ...") from None

    def shards(self, size: int, split: str) -> list[dict]:
        shards = self.size_info(size)["shards"]
        if split not in shards:
            raise CacheError(f"{self.dir}: no split {split!r} (splits: {sorted(shards)})")
        return shards[split]

    def shard_paths(self, size: int, split: str) -> list[Path]:
        return [self.dir / s["file"] for s in self.shards(size, split)]

    def count(self, size: int, split: str) -> int:
        return sum(s["count"] for s in self.shards(size, split))

    def damaged(self, problems: list[tuple[str, str]]) -> CacheError:
        """The error for bad shards: each named, then the command that rebuilds them (the rest is kept)."""
        lines = [f"{self.dir / file}: shard {why}" for file, why in problems]
        sizes = sorted({int(file.split("/")[0]) for file, _ in problems})
        return CacheError("\n".join(lines) + "\nRebuild the damaged shards (the rest of the cache is kept) with:\n  "
                          + rebuild_command(self.dir, self.manifest, sizes))

    def check_shards(self, size: int, split: str) -> None:
        """Raise CacheError unless every shard of the split matches its sha256 (hashed once per process)."""
        problems = shard_problems(self.dir, {"sizes": {str(size): {"shards": {split: self.shards(size, split)}}}})
        if problems:
            raise self.damaged(problems)

    def check_shard(self, size: int, split: str, index: int) -> None:
        """Raise CacheError unless shard `index` of the split matches its sha256 (a stat once it has been hashed)."""
        entry = self.shards(size, split)[index]
        why = shard_problem(self.dir, entry)
        if why:
            raise self.damaged([(entry["file"], why)])

    def open_shard(self, size: int, split: str, index: int, **h5py_kwargs) -> h5py.File:
        """Shard `index` of a split, checked, open for reading (the caller closes it)."""
        self.check_shard(size, split, index)
        file = self.shards(size, split)[index]["file"]
        try:
            return h5py.File(self.dir / file, "r", **h5py_kwargs)
        except OSError as err:
            raise self.damaged([(file, f"cannot be opened by HDF5 ({err})")]) from None

    def read_meta(self, size: int, split: str) -> dict[str, np.ndarray]:
        """labels (N,) int64, paths (N,) str and patients (N,) str of a split, in shard order."""
        self.check_shards(size, split)
        parts = []
        for i in range(len(self.shards(size, split))):
            with self.open_shard(size, split, i) as f:
                parts.append(_read_open_shard(f, images=False))
        return {k: np.concatenate([p[k] for p in parts]) if parts else np.empty(0) for k in
                ("labels", "paths", "patients")}

    def read_images_into(self, size: int, split: str, out: np.ndarray) -> None:
        """Fill `out` (N, S, S, 3) uint8 with the split's images, one contiguous read per shard."""
        self.check_shards(size, split)
        offset = 0
        for i in range(len(self.shards(size, split))):
            with self.open_shard(size, split, i) as f:
                n = f["images"].shape[0]
                f["images"].read_direct(out, dest_sel=np.s_[offset:offset + n])
            offset += n


def _read_open_shard(f: h5py.File, images: bool) -> dict[str, np.ndarray]:
    out = {
        "labels": f["labels"][()],
        "paths": f["paths"].asstr()[()],
        "patients": f["patients"].asstr()[()],
    }
    if images:
        out["images"] = f["images"][()]
    return out


def read_shard(path: Path, images: bool = True) -> dict[str, np.ndarray]:
    """One shard file's datasets, unchecked (CacheReader checks against the manifest)."""
    with h5py.File(path, "r") as f:
        return _read_open_shard(f, images)


def verify(cache_dir: str | os.PathLike) -> list[str]:
    """Every problem found in a cache: checksum, shape, dtype or count mismatches, missing shards (always re-hashed)."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    bad = dict(shard_problems(cache_dir, manifest, remember=False))
    problems = []
    for info in manifest["sizes"].values():
        s = info["stored_size"]
        for shards in info["shards"].values():
            for shard in shards:
                path = cache_dir / shard["file"]
                if shard["file"] in bad:
                    problems.append(f"{path}: {bad[shard['file']]}")
                    continue
                try:
                    with h5py.File(path, "r") as f:
                        shape, dtype = f["images"].shape, f["images"].dtype
                        n_labels = f["labels"].shape[0]
                except (OSError, KeyError) as err:
                    problems.append(f"{path}: unreadable ({err})")
                    continue
                if shape != (shard["count"], s, s, 3) or dtype != np.uint8 or n_labels != shard["count"]:
                    problems.append(f"{path}: images {shape} {dtype}, labels {n_labels}; expected "
                                    f"({shard['count']}, {s}, {s}, 3) uint8")
    return problems
