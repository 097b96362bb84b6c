"""`python -m pipeline.build --sizes 128 224 [--source PATH | --demo]`: preprocess once into a reusable cache.

The build is resumable and safe to interrupt: shards appear under their final names only when whole, the manifest
is written last, and a second build of the same key waits on a file lock and then reuses the first one's work.
A complete cache is reused after a stat of each shard (present, recorded byte size); `--verify` also re-hashes every
shard, and any shard found missing, resized or changed is rebuilt (the rest is kept).

This module runs the build from top to bottom; its parts have modules of their own: the flags (`build_args`), the
errors and the checks that raise them (`build_checks`), the split assignment and its table (`split`), the shard plan
and the parallel writing (`writing`), and the manifest (`manifest`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import locks, store
from pipeline.build_args import config_from_args, parse_args
from pipeline.build_checks import (BuildError, StorageError, refuse_empty, refuse_empty_source, refuse_flat,
                                   refuse_unusable_folders, storage_error)
from pipeline.config import PreprocessConfig
from pipeline.manifest import (MANIFEST, CacheAccessError, CacheError, ManifestError, make_manifest, read_manifest,
                               size_entry, write_manifest)
from pipeline.parallel import BACKENDS, DEFAULT_BACKEND
from pipeline.sources import CLASS_NAMES, Item, Source, SourceError, discover
from pipeline.split import SPLIT_TABLE, read_split_table, split_items, split_rank, write_split_table
from pipeline.writing import Chunk, check_free_space, plan, shard_file, write_chunks

# BuildError and StorageError are raised from here too: callers catch them as pipeline.build names.
__all__ = ["BuildError", "BuildOptions", "BuildReport", "StorageError", "build", "cache_key", "key_lock", "main"]
log = logging.getLogger(__name__)


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
    """Exclusive lock per key (pipeline.locks), kept beside the caches so removing a failed cache never removes a held
    lock; waits for another build of the same key."""
    with locks.hold(cache_root, key, on_wait=lambda: log.warning(
            "another build of cache %s is running; waiting for it to finish", key)):
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
        manifest = read_manifest(cache_dir)
    except CacheError:
        return False
    if not all(str(s) in manifest["sizes"] for s in sizes):
        return False
    _refuse_skipped(manifest, cache_dir, on_error)
    return not store.shard_problems(cache_dir, manifest, sizes, full=verify)


def _usable_manifest(cache_dir: Path) -> dict | None:
    """The manifest, or None when there is none; a damaged one is reported and its folder removed (nothing in it can
    be trusted: its shards have no checksums to be checked against)."""
    try:
        return read_manifest(cache_dir)
    except ManifestError as err:
        log.warning("%s: %s; removing %s and building it again", err.path, err.problem, cache_dir)
        shutil.rmtree(cache_dir)
        return None
    except CacheAccessError:  # not ours to judge, nor to replace
        raise
    except CacheError:  # no manifest: a new build, or one resumed after an interruption
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


def _stored_assignment(cache_dir: Path) -> list[Item] | None:
    """The split table the existing shards follow, or None (with a warning) when it is missing or damaged."""
    try:
        return read_split_table(cache_dir)
    except (OSError, ValueError, AttributeError) as err:  # pandas' parser errors are ValueErrors
        log.warning("%s cannot be read (%s); making the assignment again from the source and the config",
                    cache_dir / SPLIT_TABLE, err)
        return None


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
    refuse_empty_source(source)
    key = cache_key(config, source)
    cache_dir = options.cache_root / key
    refuse_unusable_folders(options.cache_root, key)
    if _reusable(cache_dir, sizes, options.on_error, options.verify):
        return BuildReport(cache_dir, key, reused=True)
    try:
        with key_lock(options.cache_root, key):
            fresh = not os.path.lexists(cache_dir / MANIFEST)
            try:
                return _build_locked(config, options, source, key, cache_dir, sizes)
            except BuildError as err:  # a bad input; an interrupted build (signal, crash) keeps its shards to resume
                if not err.resumable:
                    _discard(cache_dir, fresh, sizes)
                raise
    except OSError as err:
        raise storage_error(err, options.cache_root, key) or err


def _discard(cache_dir: Path, fresh: bool, sizes) -> None:
    """After a bad-input error, remove what this build wrote, so nothing half-made stays behind."""
    if fresh or not (cache_dir / MANIFEST).is_file():
        shutil.rmtree(cache_dir, ignore_errors=True)
        return
    manifest = read_manifest(cache_dir)
    for size in sizes:
        if str(size) not in manifest["sizes"]:
            shutil.rmtree(cache_dir / str(size), ignore_errors=True)


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
    items = _stored_assignment(cache_dir) if manifest else None
    write_table = items is None
    if write_table:
        items, split_record = split_items(source, config)
    if manifest:
        split_record = manifest["split"]
    # Images left out before stay out in every size, without being read again. Every size is planned over all
    # images, so shard i of every size holds the same images.
    known_skipped = {s["path"]: s["reason"] for s in manifest["skipped"]} if manifest else {}
    new_sizes = tuple(s for s in sizes if not manifest or str(s) not in manifest["sizes"])
    chunks = plan(items, config.shard_size)
    done: dict[str, store.ShardResult] = {}  # shard file -> result, finished in an earlier run or in this one
    for chunk in chunks:
        todo = []
        for size in new_sizes:
            file = shard_file(size, chunk)
            finished = store.read_finished_shard(cache_dir, file, [it.path for it in chunk.items],
                                                 config.geometry(size).stored_size)
            if finished is None:
                todo.append(size)
            else:
                done[file] = finished
        todo += [s for s in sizes if s not in new_sizes and shard_file(s, chunk) in rebuild]
        chunk.todo_sizes = tuple(sorted(todo))
    resumed = len(done)
    if resumed:
        log.info("resuming: %d finished shards kept", resumed)
    todo_chunks = [c for c in chunks if c.todo_sizes]
    check_free_space(config, options.cache_root, key, todo_chunks, known_skipped)

    cache_dir.mkdir(parents=True, exist_ok=True)
    for leftover in cache_dir.rglob("*" + store.TMP_SUFFIX):  # from a build killed mid-write
        leftover.unlink()
    if write_table:
        write_split_table(cache_dir, items)
    n_images, bytes_written = write_chunks(config, options, source, cache_dir, todo_chunks, known_skipped, done)
    if rebuild:
        _check_rebuilt(cache_dir, manifest, rebuild, done)
    skipped = _all_skipped(manifest, source, chunks, new_sizes, done)
    refuse_empty(items, skipped)
    manifest = make_manifest(key=key, config=config, classes=CLASS_NAMES, source=source, split=split_record,
                             splits=_split_counts(items, skipped),
                             sizes=_sizes(config, manifest, chunks, new_sizes, done), skipped=skipped,
                             created=manifest.get("created") if manifest else None)
    write_manifest(cache_dir, manifest)
    return BuildReport(cache_dir, key, reused=False, sizes_built=new_sizes, images=n_images,
                       seconds=time.perf_counter() - started, bytes_written=bytes_written,
                       skipped=manifest["skipped"], repaired=tuple(sorted(rebuild)))


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
            for s in done[shard_file(size, chunk)].skipped:
                if s["path"] not in seen:
                    seen.add(s["path"])
                    skipped.append(s)
    return skipped


def _class_counts(labels) -> dict[str, int]:
    counts = Counter(labels)
    out = {name: counts.get(i, 0) for i, name in enumerate(CLASS_NAMES)}
    if counts.get(-1):
        out["unknown"] = counts[-1]
    return out


def _split_counts(items: list[Item], skipped: list[dict]) -> dict[str, dict]:
    """{split: {count, classes}} of the images kept, in SPLIT_ORDER."""
    left_out = {s["path"] for s in skipped}
    kept = [it for it in items if it.path not in left_out]
    splits = {}
    for split in sorted({it.split for it in kept}, key=split_rank):
        labels = [it.label for it in kept if it.split == split]
        splits[split] = {"count": len(labels), "classes": _class_counts(labels)}
    return splits


def _sizes(config: PreprocessConfig, old: dict | None, chunks: list[Chunk], new_sizes,
           done: dict[str, store.ShardResult]) -> dict[str, dict]:
    """The manifest's `sizes`: those cached before (with the new checksum and byte size of any shard rebuilt), and
    each new size with its shards and the train split's channel statistics."""
    sizes = copy.deepcopy(old["sizes"]) if old else {}
    for info in sizes.values():
        for entries in info["shards"].values():
            entries[:] = [done[e["file"]].entry() if e["file"] in done else e for e in entries]
    for size in new_sizes:
        shards: dict[str, list[store.ShardResult]] = {}
        for chunk in chunks:
            shards.setdefault(chunk.split, []).append(done[shard_file(size, chunk)])
        mean, std = store.channel_stats(shards.get("train", []))
        refuse_flat(size, mean, std)
        sizes[str(size)] = size_entry(geometry=config.geometry(size), mean=mean, std=std,
                                      shards={split: [r.entry() for r in rs] for split, rs in shards.items()})
    return sizes


# ----------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv, __doc__.splitlines()[0])
    try:
        config = config_from_args(args)
        refuse_unusable_folders(args.cache_dir)
        if args.demo:
            from pipeline.demo import ensure_demo_source
            try:
                source = ensure_demo_source(args.cache_dir)
            except OSError as err:
                raise storage_error(err, args.cache_dir, None) or err
        elif args.source is None:
            raise BuildError("no source given: pass --source PATH (a C-NMC folder) or --demo")
        else:
            source = args.source
        options = BuildOptions(sizes=tuple(args.sizes), source=source, cache_root=args.cache_dir, jobs=args.jobs,
                               backend=args.backend, on_error=args.on_error, scheduler=args.scheduler,
                               progress=args.progress, verify=args.verify, allow_upscale=args.allow_upscale)
        report = build(config, options)
    except (BuildError, ValueError, CacheError) as err:
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
