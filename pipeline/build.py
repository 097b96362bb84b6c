"""`python -m pipeline.build --sizes 128 224 [--source PATH | --demo]`: preprocess once into a reusable cache.

The build is resumable and safe to interrupt: shards appear under their final names only when whole, the manifest
is written last, and a second build of the same key waits on a file lock and then reuses the first one's work.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
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
from pipeline.split import assign_splits
from pipeline import store

log = logging.getLogger(__name__)
SPLIT_ORDER = ("train", "valid", "test", "prelim", "final")
BACKENDS = ("threads", "processes", "dask")
DEFAULT_BACKEND = "threads"  # see README "Build benchmark": threads beat processes on 2 cores (no array copy-back)
# "dask" runs the image work on a Dask cluster through joblib's Dask backend (pip install -e '.[cluster]')


class BuildError(RuntimeError):
    """The build stopped; the message names the file or value and what to do."""


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

    def summary(self) -> str:
        if self.reused:
            return f"cache {self.key} is complete for the requested sizes; nothing to do"
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        lines = [f"built sizes {list(self.sizes_built)} of cache {self.key}: {self.images} images in "
                 f"{self.seconds:.1f} s ({rate:.1f} images/s), {self.bytes_written / 2**20:.1f} MiB written"]
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


def _complete_for(cache_dir: Path, sizes, on_error: str) -> dict | None:
    """The manifest if the cache already holds every requested size."""
    if not (cache_dir / store.MANIFEST).is_file():
        return None
    manifest = store.read_manifest(cache_dir)
    if not all(str(s) in manifest["sizes"] for s in sizes):
        return None
    if manifest["skipped"] and on_error == "fail":
        names = ", ".join(s["path"] for s in manifest["skipped"][:5])
        raise BuildError(f"cache {cache_dir} was built with --on-error skip and leaves out {len(manifest['skipped'])}"
                         f" images ({names}); pass --on-error skip to use it, or fix or remove those files")
    return manifest


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
    table.to_csv(tmp, index=False)
    store.fsync_rename(tmp, cache_dir / store.SPLIT_TABLE)


def _read_split_table(cache_dir: Path) -> list[Item]:
    import pandas as pd
    table = pd.read_csv(cache_dir / store.SPLIT_TABLE, dtype={"path": str, "patient": str, "split": str},
                        keep_default_na=False)
    return [Item(r.path, int(r.label), r.patient, r.split) for r in table.itertuples()]


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
    order = sorted(by_split, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    return [Chunk(split, i // shard_size, by_split[split][i:i + shard_size])
            for split in order for i in range(0, len(by_split[split]), shard_size)]


def _process(path: str, config: PreprocessConfig, sizes: tuple[int, ...]):
    """Worker: (True, {size: stored image}) or (False, reason). Never raises for a bad image."""
    import cv2
    from pipeline.preprocess import ImageError, preprocess_file
    cv2.setNumThreads(1)  # one image per worker; OpenCV's own threads would oversubscribe the cores
    try:
        return True, preprocess_file(path, config, sizes)
    except ImageError as err:
        return False, str(err)
    except cv2.error as err:
        return False, f"OpenCV could not process it ({str(err).strip().splitlines()[-1]})"


def _parallel_results(tasks, config, backend: str, jobs: int, scheduler: str | None = None):
    """Results of `_process` over `tasks` (path, sizes), in order, through joblib."""
    import joblib
    calls = (joblib.delayed(_process)(path, config, sizes) for path, sizes in tasks)
    if backend == "dask":
        from pipeline.dask_backend import DaskUnavailable, dask_parallel_config
        try:
            with dask_parallel_config(scheduler, jobs):
                yield from joblib.Parallel(n_jobs=-1, return_as="generator")(calls)
        except DaskUnavailable as err:
            raise BuildError(str(err)) from err
        return
    if jobs == 1:
        yield from (_process(path, config, sizes) for path, sizes in tasks)
        return
    joblib_backend = {"threads": "threading", "processes": "loky"}[backend]
    yield from joblib.Parallel(n_jobs=jobs, backend=joblib_backend, return_as="generator")(calls)


# ----------------------------------------------------------------------------- the build


def build(config: PreprocessConfig, options: BuildOptions) -> BuildReport:
    if not options.sizes or any(s < 1 for s in options.sizes):
        raise BuildError(f"--sizes must be positive integers, got {list(options.sizes)}")
    if options.on_error not in ("fail", "skip"):
        raise BuildError(f"--on-error must be fail or skip, got {options.on_error!r}")
    if options.backend not in BACKENDS:
        raise BuildError(f"--backend must be one of {', '.join(BACKENDS)}, got {options.backend!r}")
    sizes = tuple(sorted(set(options.sizes)))
    for s in sizes:
        config.geometry(s)  # raises ValueError for an impossible size/rotation combination
    try:
        source = discover(options.source)
    except SourceError as err:
        raise BuildError(str(err)) from err
    key = cache_key(config, source)
    cache_dir = options.cache_root / key
    if _complete_for(cache_dir, sizes, options.on_error):
        return BuildReport(cache_dir, key, reused=True)
    with key_lock(options.cache_root, key):
        if _complete_for(cache_dir, sizes, options.on_error):  # another build finished it while we waited
            return BuildReport(cache_dir, key, reused=True)
        fresh = not (cache_dir / store.MANIFEST).is_file()
        try:
            return _build_locked(config, options, source, key, cache_dir, sizes)
        except BuildError:  # a bad input; an interrupted build (signal, crash) keeps its shards for resuming
            _discard(cache_dir, fresh, sizes)
            raise


def _discard(cache_dir: Path, fresh: bool, sizes) -> None:
    """After a bad-input error, remove what this build wrote, so nothing half-made stays behind."""
    if fresh:
        shutil.rmtree(cache_dir, ignore_errors=True)
        return
    manifest = store.read_manifest(cache_dir)
    for size in sizes:
        if str(size) not in manifest["sizes"]:
            shutil.rmtree(cache_dir / str(size), ignore_errors=True)


def _build_locked(config, options, source, key, cache_dir: Path, sizes) -> BuildReport:
    started = time.perf_counter()
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = store.read_manifest(cache_dir) if (cache_dir / store.MANIFEST).is_file() else None
    for leftover in cache_dir.rglob("*" + store.TMP_SUFFIX):  # from a build killed mid-write
        leftover.unlink()
    if manifest:  # adding sizes: the stored assignment is the one the existing shards follow
        items, split_record = _read_split_table(cache_dir), manifest["split"]
    else:  # new or resumed: the assignment is a function of config and source, so recomputing it is safe
        items, split_record = _split_items(source, config)
        _write_split_table(cache_dir, items)
    known_skipped = manifest["skipped"] if manifest else []
    skipped_paths = {s["path"] for s in known_skipped}
    items = [it for it in items if it.path not in skipped_paths]  # left out before: stay out in every size
    new_sizes = tuple(s for s in sizes if not manifest or str(s) not in manifest["sizes"])

    chunks = _plan(items, config.shard_size)
    results: dict[tuple[int, str], list] = {}  # (size, split) -> [ShardResult] in shard order
    for chunk in chunks:
        todo = []
        for size in new_sizes:
            rel = f"{size}/{store.shard_name(chunk.split, chunk.index)}"
            done = store.read_finished_shard(cache_dir, rel, [it.path for it in chunk.items],
                                             config.geometry(size).stored_size)
            if done is None:
                todo.append(size)
            results.setdefault((size, chunk.split), []).append(done)
        chunk.todo_sizes = tuple(todo)
    resumed = sum(r is not None for rs in results.values() for r in rs)
    if resumed:
        log.info("resuming: %d finished shards kept", resumed)

    n_images, bytes_written = _write_chunks(config, options, source, cache_dir, [c for c in chunks if c.todo_sizes],
                                            results)
    manifest = _manifest(config, source, key, manifest, split_record, items, new_sizes, results, known_skipped)
    store.write_json_atomic(cache_dir / store.MANIFEST, manifest)
    return BuildReport(cache_dir, key, reused=False, sizes_built=new_sizes, images=n_images,
                       seconds=time.perf_counter() - started, bytes_written=bytes_written,
                       skipped=manifest["skipped"])


def _write_chunks(config, options, source, cache_dir, chunks: list[Chunk], results) -> tuple[int, int]:
    """Preprocess every image of `chunks` in parallel; the parent alone writes shards, in order.

    Returns (images processed, bytes written)."""
    tasks = [(str(source.root / it.path), c.todo_sizes) for c in chunks for it in c.items]
    if not tasks:
        return 0, 0
    bytes_written = 0
    outputs = _parallel_results(tasks, config, options.backend, options.jobs, options.scheduler)
    bar = progress_bar(options.progress, len(tasks), "preprocess", "img", log)
    writers: list[store.ShardWriter] = []
    try:
        for chunk in chunks:
            writers = [store.ShardWriter(cache_dir, size, chunk.split, chunk.index, config.geometry(size).stored_size,
                                         len(chunk.items)) for size in chunk.todo_sizes]
            for item in chunk.items:
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
                bytes_written += w.final.stat().st_size
                results[(w.size, chunk.split)][chunk.index] = shard
            writers = []
    finally:
        for w in writers:
            w.abort()
        bar.close()
        outputs.close()
    return len(tasks), bytes_written


def _class_counts(labels) -> dict[str, int]:
    counts = Counter(labels)
    out = {name: counts.get(i, 0) for i, name in enumerate(CLASS_NAMES)}
    if counts.get(-1):
        out["unknown"] = counts[-1]
    return out


def _manifest(config, source, key, old, split_record, items, new_sizes, results, known_skipped) -> dict:
    skipped = list(known_skipped)
    seen = {s["path"] for s in skipped}
    for rs in results.values():
        for r in rs:
            for s in r.skipped:
                if s["path"] not in seen:
                    seen.add(s["path"])
                    skipped.append(s)
    kept = [it for it in items if it.path not in seen]
    splits = {}
    for split in sorted({it.split for it in kept}, key=lambda s: SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99):
        labels = [it.label for it in kept if it.split == split]
        splits[split] = {"count": len(labels), "classes": _class_counts(labels)}
    sizes = dict(old["sizes"]) if old else {}
    for size in new_sizes:
        g = config.geometry(size)
        shards = {split: [r.entry() for r in results[(size, split)]] for (s, split) in results if s == size}
        mean, std = store.channel_stats(results.get((size, "train"), []))
        sizes[str(size)] = {"stored_size": g.stored_size, "crop": g.crop, "context_crop": g.context_crop,
                            "mean": mean, "std": std, "shards": shards}
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
            source = ensure_demo_source(args.cache_dir)
        elif args.source is None:
            raise BuildError("no source given: pass --source PATH (a C-NMC folder) or --demo")
        else:
            source = args.source
        options = BuildOptions(sizes=tuple(args.sizes), source=source, cache_root=args.cache_dir, jobs=args.jobs,
                               backend=args.backend, on_error=args.on_error, scheduler=args.scheduler,
                               progress=args.progress)
        report = build(config, options)
    except (BuildError, ValueError, store.CacheError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    print(report.cache_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
