"""`python -m pipeline.build --sizes 128 224 [--source PATH | --demo]`: preprocess once into a reusable cache.

The build is resumable and safe to interrupt: shards appear under their final names only when whole, the manifest
is written last, and a second build of the same key waits on a file lock and then reuses the first one's work.
A complete cache is reused after a stat of each shard (present, recorded byte size); `--verify` also re-hashes every
shard, and any shard found missing, resized or changed is rebuilt (the rest is kept).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import FORMAT_VERSION, PreprocessConfig
from pipeline.sources import CLASS_NAMES, Item, Source, SourceError, discover
from pipeline.progress import add_progress_flags, progress_bar
from pipeline import parallel
from pipeline.dask_backend import DaskUnavailable
from pipeline.parallel import BACKENDS, DEFAULT_BACKEND
from pipeline.split import assign_splits
from pipeline import store

log = logging.getLogger(__name__)
SPLIT_ORDER = ("train", "valid", "test", "prelim", "final")
# Free space asked for beyond the pixels: HDF5 metadata, labels, paths (measured: under 2 KiB per shard plus 0.1 KiB
# per image), the manifest and split table, with room to spare.
SPACE_HEADROOM = 0.02
SPACE_PER_SHARD_BYTES = 64 * 2**10
SPACE_PER_IMAGE_BYTES = 1024
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class BuildError(RuntimeError):
    """The build stopped; the message names the file or value and what to do. Unless `resumable`, what this build
    wrote is removed (a bad input must not leave a half-made cache)."""
    resumable = False


class StorageError(BuildError):
    """The cache folder cannot take the output (disk full, read-only, no permission). Finished shards are kept, the
    temporary one is removed, and the same command resumes once the cause is fixed."""
    resumable = True


@dataclass(frozen=True)
class BuildOptions:
    sizes: tuple[int, ...]
    source: Path
    cache_root: Path
    jobs: int = -1
    backend: str = DEFAULT_BACKEND
    on_error: str = "fail"  # or "skip"
    scheduler: str | None = None  # dask scheduler address for backend "dask"; None starts a local cluster
    progress: bool | str = "auto"  # pipeline.progress: auto, on, off (True/False: auto/off)
    verify: bool = False  # re-hash every shard of a complete cache before reusing it (rebuild the bad ones)
    allow_upscale: bool = False  # sizes above the crop's source pixels (up to config.MAX_SIZE_PX)


@dataclass
class BuildReport:
    cache_dir: Path
    key: str
    reused: bool
    sizes_built: tuple[int, ...] = ()
    images: int = 0  # images preprocessed in this run
    seconds: float = 0.0
    bytes_written: int = 0
    skipped: list = field(default_factory=list)
    repaired: tuple[str, ...] = ()  # shards rebuilt because they were missing or damaged

    def summary(self) -> str:
        if self.reused:
            return f"cache {self.key} is complete for the requested sizes; nothing to do"
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        what = f"built sizes {list(self.sizes_built)}" if self.sizes_built else "rebuilt damaged shards"
        lines = [f"{what} of cache {self.key}: {self.images} images in "
                 f"{self.seconds:.1f} s ({rate:.1f} images/s), {self.bytes_written / 2**20:.1f} MiB written"]
        if self.repaired:
            lines.append(f"rebuilt {len(self.repaired)} missing or damaged shard(s): {', '.join(self.repaired)}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} unusable images:")
            lines += [f"  {s['path']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def cache_key(config: PreprocessConfig, source: Source) -> str:
    return hashlib.sha256((config.digest() + source.fingerprint()).encode()).hexdigest()[:16]


@contextlib.contextmanager
def key_lock(cache_root: Path, key: str):
    """Exclusive lock per key, kept beside the caches so removing a failed cache never removes a held lock."""
    lock_dir = cache_root / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another build of cache %s is running; waiting for it to finish", key)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _refuse_skipped(manifest: dict, cache_dir: Path, on_error: str) -> None:
    if manifest["skipped"] and on_error == "fail":
        names = ", ".join(s["path"] for s in manifest["skipped"][:5])
        raise BuildError(f"cache {cache_dir} was built with --on-error skip and leaves out {len(manifest['skipped'])}"
                         f" images ({names}); pass --on-error skip to use it, or fix or remove those files")


def _reusable(cache_dir: Path, sizes, on_error: str, verify: bool) -> bool:
    """The fast path, without the lock and without writing: the cache holds every requested size and each of their
    shards is present at its recorded byte size (one stat each; with `verify` also its sha256). Anything else goes to
    the locked build, which looks closer (a damaged manifest, a full checksum pass) and says what it finds."""
    try:
        manifest = store.read_manifest(cache_dir)
    except store.CacheError:
        return False
    if not all(str(s) in manifest["sizes"] for s in sizes):
        return False
    _refuse_skipped(manifest, cache_dir, on_error)
    return not store.shard_problems(cache_dir, manifest, sizes, full=verify)


def _usable_manifest(cache_dir: Path) -> dict | None:
    """The manifest, or None when there is none; a damaged one is reported and its folder removed (nothing in it can
    be trusted: its shards have no checksums to be checked against)."""
    try:
        return store.read_manifest(cache_dir)
    except store.ManifestError as err:
        log.warning("%s: %s; removing %s and building it again", err.path, err.problem, cache_dir)
        shutil.rmtree(cache_dir)
        return None
    except store.CacheError:  # no manifest: a new build, or one resumed after an interruption
        return None


def _shards_to_rebuild(cache_dir: Path, manifest: dict, sizes, verify: bool) -> set[str]:
    """Shard files of `sizes` that are missing, resized or (checked with sha256 when `verify` or when a stat found
    something wrong) changed."""
    problems = store.shard_problems(cache_dir, manifest, sizes, full=False)
    if problems or verify:
        problems = store.shard_problems(cache_dir, manifest, sizes, full=True)
    for file, why in problems:
        log.warning("%s: shard %s; rebuilding it", cache_dir / file, why)
    return {file for file, _ in problems}


# ----------------------------------------------------------------------------- split table


def _split_items(source: Source, config: PreprocessConfig) -> tuple[list[Item], dict]:
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


def _write_split_table(cache_dir: Path, items: list[Item]) -> None:
    import pandas as pd
    table = pd.DataFrame([(it.path, it.label, it.patient, it.split) for it in items],
                         columns=["path", "label", "patient", "split"])
    tmp = cache_dir / (store.SPLIT_TABLE + store.TMP_SUFFIX)
    try:
        table.to_csv(tmp, index=False)
        store.fsync_rename(tmp, cache_dir / store.SPLIT_TABLE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_split_table(cache_dir: Path) -> list[Item] | None:
    """The stored assignment, or None (with a warning) when the table is missing or damaged."""
    import pandas as pd
    path = cache_dir / store.SPLIT_TABLE
    try:
        table = pd.read_csv(path, dtype={"path": str, "patient": str, "split": str}, keep_default_na=False)
        return [Item(r.path, int(r.label), r.patient, r.split) for r in table.itertuples()]
    except (OSError, ValueError, AttributeError) as err:  # pandas' parser errors are ValueErrors
        log.warning("%s cannot be read (%s); making the assignment again from the source and the config", path, err)
        return None


# ----------------------------------------------------------------------------- shard planning


@dataclass
class Chunk:
    split: str
    index: int
    items: list[Item]
    todo_sizes: tuple[int, ...] = ()


def _plan(items: list[Item], shard_size: int) -> list[Chunk]:
    by_split: dict[str, list[Item]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    order = sorted(by_split, key=lambda s: (_split_rank(s), s))
    return [Chunk(split, i // shard_size, by_split[split][i:i + shard_size])
            for split in order for i in range(0, len(by_split[split]), shard_size)]


# ----------------------------------------------------------------------------- the build


def build(config: PreprocessConfig, options: BuildOptions) -> BuildReport:
    if options.jobs == 0 or options.jobs < -(os.cpu_count() or 1):
        raise BuildError(f"--jobs must be a number of workers >= 1, or -1 for all cores (-2: all but one, ...), got "
                         f"{options.jobs}")
    if options.on_error not in ("fail", "skip"):
        raise BuildError(f"--on-error must be fail or skip, got {options.on_error!r}")
    if options.backend not in BACKENDS:
        raise BuildError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}")
    try:
        sizes = config.check_sizes(options.sizes, options.allow_upscale)  # bounds, and a possible geometry
    except ValueError as err:
        raise BuildError(str(err)) from err
    try:
        source = discover(options.source, on_error=options.on_error)
    except SourceError as err:
        raise BuildError(str(err)) from err
    _refuse_empty_source(source)
    key = cache_key(config, source)
    cache_dir = options.cache_root / key
    if _reusable(cache_dir, sizes, options.on_error, options.verify):
        return BuildReport(cache_dir, key, reused=True)
    try:
        with key_lock(options.cache_root, key):
            fresh = not os.path.lexists(cache_dir / store.MANIFEST)
            try:
                return _build_locked(config, options, source, key, cache_dir, sizes)
            except BuildError as err:  # a bad input; an interrupted build (signal, crash) keeps its shards to resume
                if not err.resumable:
                    _discard(cache_dir, fresh, sizes)
                raise
    except OSError as err:
        raise _storage_error(err, options.cache_root, key) or err


def _storage_error(err: OSError, cache_root: Path, key: str | None) -> StorageError | None:
    """A clear error for a cache folder that is full or cannot be written (building cache `key`, or the demo source
    when None); None for any other OSError."""
    names = [n for n in (err.filename, err.filename2) if n]
    root = Path(cache_root).resolve()
    if names and not any(Path(n).resolve().is_relative_to(root) for n in names):
        return None  # not ours (a source file, say)
    where = f" ({names[0]})" if names else ""
    doing = f"building cache {key}" if key else "writing the demo source"
    if err.errno in _DISK_FULL:
        kept = " The temporary shard was removed and finished shards are kept:" if key else ""
        return StorageError(
            f"{cache_root}: {err.strerror}{where} while {doing}.{kept} free some space there (or pass --cache-dir on "
            f"a disk with more room) and run the same command again{' to resume' if key else ''}")
    if err.errno in _NOT_WRITABLE:
        return StorageError(
            f"cannot write in the cache folder {cache_root}: {err.strerror}{where}. "
            f"{f'Building cache {key} (a new key or a new size)' if key else 'Making the demo source'} writes there: "
            f"make it writable, or pass --cache-dir PATH on a writable disk (a complete cache is reused without "
            f"writing)")
    return None


def _discard(cache_dir: Path, fresh: bool, sizes) -> None:
    """After a bad-input error, remove what this build wrote, so nothing half-made stays behind."""
    if fresh or not (cache_dir / store.MANIFEST).is_file():
        shutil.rmtree(cache_dir, ignore_errors=True)
        return
    manifest = store.read_manifest(cache_dir)
    for size in sizes:
        if str(size) not in manifest["sizes"]:
            shutil.rmtree(cache_dir / str(size), ignore_errors=True)


def _shard_file(size: int, chunk: "Chunk") -> str:
    return f"{size}/{store.shard_name(chunk.split, chunk.index)}"


def _build_locked(config, options, source, key, cache_dir: Path, sizes) -> BuildReport:
    started = time.perf_counter()
    manifest = _usable_manifest(cache_dir)
    rebuild: set[str] = set()  # shard files of cached sizes to build again
    if manifest:
        cached = [s for s in sizes if str(s) in manifest["sizes"]]
        if len(cached) == len(sizes):
            _refuse_skipped(manifest, cache_dir, options.on_error)
        rebuild = _shards_to_rebuild(cache_dir, manifest, cached, options.verify)
        if len(cached) == len(sizes) and not rebuild:  # another build finished it while we waited, or --verify: ok
            return BuildReport(cache_dir, key, reused=True)
    # Adding sizes: the stored assignment is the one the existing shards follow. New or resumed: the assignment is a
    # function of config and source, so recomputing it is safe.
    items = _read_split_table(cache_dir) if manifest else None
    write_table = items is None
    if write_table:
        items, split_record = _split_items(source, config)
    if manifest:
        split_record = manifest["split"]
    # Images left out before stay out in every size, without being read again. Every size is planned over all
    # images, so shard i of every size holds the same images.
    known_skipped = {s["path"]: s["reason"] for s in manifest["skipped"]} if manifest else {}
    new_sizes = tuple(s for s in sizes if not manifest or str(s) not in manifest["sizes"])
    chunks = _plan(items, config.shard_size)
    done: dict[str, store.ShardResult] = {}  # shard file -> result, finished in an earlier run or in this one
    for chunk in chunks:
        todo = []
        for size in new_sizes:
            file = _shard_file(size, chunk)
            finished = store.read_finished_shard(cache_dir, file, [it.path for it in chunk.items],
                                                 config.geometry(size).stored_size)
            if finished is None:
                todo.append(size)
            else:
                done[file] = finished
        todo += [s for s in sizes if s not in new_sizes and _shard_file(s, chunk) in rebuild]
        chunk.todo_sizes = tuple(sorted(todo))
    resumed = len(done)
    if resumed:
        log.info("resuming: %d finished shards kept", resumed)
    todo_chunks = [c for c in chunks if c.todo_sizes]
    _check_free_space(config, options.cache_root, key, todo_chunks, known_skipped)

    cache_dir.mkdir(parents=True, exist_ok=True)
    for leftover in cache_dir.rglob("*" + store.TMP_SUFFIX):  # from a build killed mid-write
        leftover.unlink()
    if write_table:
        _write_split_table(cache_dir, items)
    n_images, bytes_written = _write_chunks(config, options, source, cache_dir, todo_chunks, known_skipped, done)
    if rebuild:
        _check_rebuilt(cache_dir, manifest, rebuild, done)
    skipped = _all_skipped(manifest, source, chunks, new_sizes, done)
    _refuse_empty(items, skipped)
    manifest = _manifest(config, source, key, manifest, split_record, items, chunks, new_sizes, done, skipped)
    store.write_json_atomic(cache_dir / store.MANIFEST, manifest)
    return BuildReport(cache_dir, key, reused=False, sizes_built=new_sizes, images=n_images,
                       seconds=time.perf_counter() - started, bytes_written=bytes_written,
                       skipped=manifest["skipped"], repaired=tuple(sorted(rebuild)))


def _check_free_space(config, cache_root: Path, key: str, chunks: list[Chunk], known_skipped: dict) -> None:
    """StorageError before any image is read when the cache root's disk cannot hold what this build writes."""
    pixels, images, shards = 0, 0, 0
    for chunk in chunks:
        count = sum(it.path not in known_skipped for it in chunk.items)
        for size in chunk.todo_sizes:
            pixels += count * config.geometry(size).stored_size ** 2 * 3
            images += count
            shards += 1
    need = int(pixels * (1 + SPACE_HEADROOM)) + shards * SPACE_PER_SHARD_BYTES + images * SPACE_PER_IMAGE_BYTES
    free = shutil.disk_usage(cache_root).free
    if need > free:
        mib = 2**20
        raise StorageError(
            f"not enough free space for cache {key}: this build writes about {need / mib:,.0f} MiB ({images} stored "
            f"images in {shards} shards: {pixels / mib:,.0f} MiB of pixels plus {SPACE_HEADROOM:.0%} and metadata) "
            f"and {cache_root} has {free / mib:,.0f} MiB free. Free at least {(need - free) / mib:,.0f} MiB there, "
            f"or pass --cache-dir on a disk with more room")


def _results(*args):
    """parallel.results, with a missing Dask installation said as a build error."""
    try:
        yield from parallel.results(*args)
    except DaskUnavailable as err:
        raise BuildError(str(err)) from err


def _write_chunks(config, options, source, cache_dir, chunks: list[Chunk], known_skipped: dict,
                  done: dict) -> tuple[int, int]:
    """Preprocess every image of `chunks` in parallel; the parent alone writes shards, in order, into `done`.

    Returns (images processed, bytes written)."""
    tasks = [(str(source.root / it.path), c.todo_sizes) for c in chunks for it in c.items
             if it.path not in known_skipped]
    if not chunks:
        return 0, 0
    bytes_written = 0
    task_bytes = max(sum(config.geometry(s).stored_size ** 2 * 3 for s in c.todo_sizes) for c in chunks)
    window, workers = parallel.window_for(task_bytes, parallel.workers(options.jobs))
    jobs = options.jobs
    if workers < parallel.workers(options.jobs) and options.backend != "dask":  # a Dask cluster's size is its own
        log.info("%.0f MiB of stored pixels per image: %d workers, at most %d images in memory", task_bytes / 2**20,
                 workers, window)
        jobs = workers
    # (a chunk of images left out earlier still gets its shard, empty like the first build's, and starts no pool)
    outputs = _results(tasks, config, options.backend, jobs, options.scheduler, window) if tasks else iter(())
    bar = progress_bar(options.progress, len(tasks), "preprocess", "img", log)
    writers: list[store.ShardWriter] = []
    try:
        for chunk in chunks:
            writers = [store.ShardWriter(cache_dir, size, chunk.split, chunk.index, config.geometry(size).stored_size,
                                         len(chunk.items)) for size in chunk.todo_sizes]
            for item in chunk.items:
                if item.path in known_skipped:
                    for w in writers:
                        w.skip(item.path, known_skipped[item.path])
                    continue
                ok, value = next(outputs)
                bar.update()
                if not ok:
                    if options.on_error == "fail":
                        raise BuildError(f"{source.root / item.path}: {value}. Fix or remove the file, or pass "
                                         f"--on-error skip to leave it out")
                    log.warning("skipping %s: %s", item.path, value)
                    for w in writers:
                        w.skip(item.path, value)
                    continue
                for w in writers:
                    w.add(value[w.size], item.label, item.path, item.patient)
            for w in writers:
                shard = w.close()
                bytes_written += shard.nbytes
                done[shard.file] = shard
            writers = []
    finally:
        for w in writers:
            w.abort()
        bar.close()
        outputs.close()
    return len(tasks), bytes_written


def _check_rebuilt(cache_dir: Path, manifest: dict, rebuilt: set[str], done: dict) -> None:
    """A rebuilt shard must hold what the manifest says; the bytes should match too (the build is deterministic)."""
    recorded = {e["file"]: e for info in manifest["sizes"].values() for split in info["shards"].values()
                for e in split}
    for file in sorted(rebuilt):
        old, new = recorded[file], done[file]
        if new.count != old["count"]:
            (cache_dir / file).unlink(missing_ok=True)
            raise BuildError(
                f"{cache_dir / file}: rebuilt with {new.count} images, but the manifest counts {old['count']} (the "
                f"source changed, or an older version laid this cache out differently); it cannot be repaired in "
                f"place: remove it with python -m pipeline.cache rm {cache_dir.name} and build it again")
        if new.sha256 != old["sha256"]:
            log.warning("%s: the rebuilt shard's bytes differ from the recorded ones (written by an older version?); "
                        "the manifest now records its new checksum", cache_dir / file)


def _all_skipped(manifest: dict | None, source: Source, chunks: list[Chunk], new_sizes, done: dict) -> list[dict]:
    """The manifest's `skipped`: what earlier builds (or, for a new cache, the source listing: bad label rows,
    unusable names) left out, then what the new shards left out, in plan order."""
    skipped = list(manifest["skipped"]) if manifest else [s.as_dict() for s in source.skipped]
    seen = {s["path"] for s in skipped}
    for chunk in chunks:
        for size in new_sizes:
            for s in done[_shard_file(size, chunk)].skipped:
                if s["path"] not in seen:
                    seen.add(s["path"])
                    skipped.append(s)
    return skipped


def _refuse_empty_source(source: Source) -> None:
    """With --on-error skip the listing itself may leave out rows (bad labels, unusable names): refuse a source
    left with no image, or with no image of a class, before anything is read."""
    if not source.skipped:
        return
    shown = "; ".join(f"{s.path}: {s.reason}" for s in source.skipped[:3]) + ("; ..." if len(source.skipped) > 3
                                                                              else "")
    if not source.items:
        raise BuildError(f"no usable image: all {len(source.skipped)} listed images were left out ({shown}); nothing "
                         f"was cached. Fix those rows or files (or check --source)")
    labels = {it.label for it in source.items}
    for label, name in enumerate(CLASS_NAMES):
        if label not in labels:
            raise BuildError(f"class {name} would be empty after leaving out {len(source.skipped)} listed images "
                             f"({shown}); nothing was cached. Fix those rows or files")


def _refuse_empty(items: list[Item], skipped: list[dict]) -> None:
    """A cache with no image, or with a class or a split emptied by skipped images, is an error, not a result."""
    reasons = {s["path"]: s["reason"] for s in skipped}
    if not reasons:
        return

    def examples(group: list[Item]) -> str:
        shown = "; ".join(f"{it.path}: {reasons[it.path]}" for it in group[:3])
        return shown + ("; ..." if len(group) > 3 else "")

    fix = "nothing was cached. Fix or replace those files (or check --source)"
    if all(it.path in reasons for it in items):
        raise BuildError(f"no usable image: all {len(items)} source images were left out ({examples(items)}); {fix}")
    groups = [(f"class {name}", [it for it in items if it.label == label]) for label, name in enumerate(CLASS_NAMES)]
    groups += [(f"split {split}", [it for it in items if it.split == split])
               for split in sorted({it.split for it in items}, key=_split_rank)]
    for what, group in groups:
        if group and all(it.path in reasons for it in group):
            raise BuildError(f"{what} would be empty: all its {len(group)} images were left out "
                             f"({examples(group)}); {fix}")
    for split in sorted({it.split for it in items}, key=_split_rank):
        for label, name in enumerate(CLASS_NAMES):
            group = [it for it in items if it.split == split and it.label == label]
            if group and all(it.path in reasons for it in group):
                log.warning("split %s keeps no image of class %s: all its %d were left out", split, name, len(group))


def _split_rank(split: str) -> int:
    return SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER)


def _class_counts(labels) -> dict[str, int]:
    counts = Counter(labels)
    out = {name: counts.get(i, 0) for i, name in enumerate(CLASS_NAMES)}
    if counts.get(-1):
        out["unknown"] = counts[-1]
    return out


def _manifest(config, source, key, old, split_record, items, chunks, new_sizes, done, skipped) -> dict:
    left_out = {s["path"] for s in skipped}
    kept = [it for it in items if it.path not in left_out]
    splits = {}
    for split in sorted({it.split for it in kept}, key=_split_rank):
        labels = [it.label for it in kept if it.split == split]
        splits[split] = {"count": len(labels), "classes": _class_counts(labels)}
    sizes = copy.deepcopy(old["sizes"]) if old else {}
    for info in sizes.values():  # rebuilt shards of cached sizes: their new checksum and byte size
        for entries in info["shards"].values():
            entries[:] = [done[e["file"]].entry() if e["file"] in done else e for e in entries]
    for size in new_sizes:
        g = config.geometry(size)
        shards: dict[str, list] = {}
        for chunk in chunks:
            shards.setdefault(chunk.split, []).append(done[_shard_file(size, chunk)])
        mean, std = store.channel_stats(shards.get("train", []))
        sizes[str(size)] = {"stored_size": g.stored_size, "crop": g.crop, "context_crop": g.context_crop,
                            "mean": mean, "std": std,
                            "shards": {split: [r.entry() for r in rs] for split, rs in shards.items()}}
    sizes = {k: sizes[k] for k in sorted(sizes, key=int)}
    return {
        "format_version": FORMAT_VERSION,
        "key": key,
        "created": old["created"] if old else datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": config.as_dict(),
        "classes": list(CLASS_NAMES),
        "source": {"root": str(source.root), "fingerprint": source.fingerprint(), "layout": source.layout,
                   "count": len(source.items)},
        "split": split_record,
        "splits": splits,
        "sizes": sizes,
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    d = PreprocessConfig()
    p = argparse.ArgumentParser(prog="python -m pipeline.build", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="output sizes in px")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", type=Path, help="source folder (Kaggle C-NMC layout, CSV lists, labels.csv or "
                                                 "all/ + hem/)")
    src.add_argument("--demo", action="store_true", help="generate and use the synthetic demo source")
    p.add_argument("--cache-dir", type=Path, default=Path("cache"), help="root folder of all caches")
    p.add_argument("--jobs", type=int, default=-1, help="parallel workers (-1: all cores)")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help="joblib backend")
    p.add_argument("--scheduler", help="dask scheduler address for --backend dask (default: a local cluster of "
                                       "--jobs workers)")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="images per HDF5 shard")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/valid/test assignment")
    p.add_argument("--split-fractions", type=float, nargs=3, default=list(d.split_fractions),
                   metavar=("TRAIN", "VALID", "TEST"), help="split fractions where the source gives no split")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="an unusable source image stops the build (fail) or is left out and listed (skip)")
    p.add_argument("--clahe-clip", type=float, default=d.clahe_clip, help="CLAHE clip limit")
    p.add_argument("--clahe-tiles", type=int, default=d.clahe_tiles, help="CLAHE tile grid (N x N)")
    p.add_argument("--unsharp-sigma", type=float, default=d.unsharp_sigma, help="unsharp mask Gaussian sigma (px)")
    p.add_argument("--unsharp-strength", type=float, default=d.unsharp_strength, help="unsharp mask strength")
    p.add_argument("--crop-px", type=int, default=d.crop_px, help="centre crop side at the reference size (px)")
    p.add_argument("--reference-px", type=int, default=d.reference_px, help="image side the crop refers to (px)")
    p.add_argument("--max-rotation-deg", type=float, default=d.max_rotation_deg,
                   help="largest training rotation the stored context must allow")
    p.add_argument("--allow-upscale", action="store_true",
                   help="allow --sizes above the crop's source pixels (--crop-px), up to 4096; they only enlarge")
    p.add_argument("--verify", action="store_true",
                   help="re-check the sha256 of every shard of a complete cache and rebuild any that differ (default: "
                        "a shard's presence and byte size are checked; a mismatch triggers the full check)")
    add_progress_flags(p)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(clahe_clip=args.clahe_clip, clahe_tiles=args.clahe_tiles,
                            unsharp_sigma=args.unsharp_sigma, unsharp_strength=args.unsharp_strength,
                            crop_px=args.crop_px, reference_px=args.reference_px,
                            max_rotation_deg=args.max_rotation_deg, split_fractions=tuple(args.split_fractions),
                            split_seed=args.split_seed, shard_size=args.shard_size)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        config = config_from_args(args)
        if args.demo:
            from pipeline.demo import ensure_demo_source
            try:
                source = ensure_demo_source(args.cache_dir)
            except OSError as err:
                raise _storage_error(err, args.cache_dir, None) or err
        elif args.source is None:
            raise BuildError("no source given: pass --source PATH (a C-NMC folder) or --demo")
        else:
            source = args.source
        options = BuildOptions(sizes=tuple(args.sizes), source=source, cache_root=args.cache_dir, jobs=args.jobs,
                               backend=args.backend, on_error=args.on_error, scheduler=args.scheduler,
                               progress=args.progress, verify=args.verify, allow_upscale=args.allow_upscale)
        report = build(config, options)
    except (BuildError, ValueError, store.CacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # any other I/O failure: named, without a traceback
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    print(report.cache_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
