"""Planning a build's shards and writing them: the images of each split cut into chunks of `shard_size`, and every
chunk written as one shard per size while worker processes preprocess the images.

Only the parent writes shards, in plan order, so a shard's bytes depend on its images alone (the same checksum on
every rebuild) and an interrupted build leaves whole shards under their final names and nothing else. Every size is
planned over the same chunks, so shard i of every size holds the same images.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline import parallel, store
from pipeline.build_checks import BuildError, StorageError
from pipeline.config import PreprocessConfig
from pipeline.dask_backend import DaskUnavailable
from pipeline.progress import progress_bar
from pipeline.sources import Item, Source
from pipeline.split import split_rank

# The build's messages keep the logger name they have always had (what a user filters the command's output on).
log = logging.getLogger("pipeline.build")
# Free space asked for beyond the pixels: HDF5 metadata, labels, paths (measured: under 2 KiB per shard plus 0.1 KiB
# per image), the manifest and split table, with room to spare.
SPACE_HEADROOM = 0.02
SPACE_PER_SHARD_BYTES = 64 * 2**10
SPACE_PER_IMAGE_BYTES = 1024


@dataclass
class Chunk:
    """Shard `index` of `split`: its images, and the sizes this build still has to write for it."""
    split: str
    index: int
    items: list[Item]
    todo_sizes: tuple[int, ...] = ()


def plan(items: list[Item], shard_size: int) -> list[Chunk]:
    """Each split's items in chunks of `shard_size`, splits in SPLIT_ORDER; chunk i of a split is shard i."""
    by_split: dict[str, list[Item]] = {}
    for item in items:
        by_split.setdefault(item.split, []).append(item)
    order = sorted(by_split, key=lambda s: (split_rank(s), s))
    return [Chunk(split, i // shard_size, by_split[split][i:i + shard_size])
            for split in order for i in range(0, len(by_split[split]), shard_size)]


def shard_file(size: int, chunk: Chunk) -> str:
    """The shard's file relative to the cache folder, as the manifest names it."""
    return f"{size}/{store.shard_name(chunk.split, chunk.index)}"


def check_free_space(config: PreprocessConfig, cache_root: Path, key: str, chunks: list[Chunk],
                     known_skipped: dict) -> None:
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


def write_chunks(config: PreprocessConfig, options, source: Source, cache_dir: Path, chunks: list[Chunk],
                 known_skipped: dict, done: dict) -> tuple[int, int]:
    """Preprocess every image of `chunks` in parallel; the parent alone writes shards, in order, into `done`.

    options: the build's BuildOptions (jobs, backend, scheduler, on_error, progress).

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
