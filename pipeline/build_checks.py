"""How a build stops: its two errors, and the checks that raise them.

A bad input (BuildError) removes what the build wrote; a cache folder that cannot take the output (StorageError:
disk full, read-only) keeps what is finished, and the same command resumes. Both name the file or value and what to
do; the command prints them as `error: ...` and exits 2. A cache left without an image, a class or a split by images
that had to be left out is such a bad input: an error, not a result.
"""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from pipeline.manifest import normalisation_problem
from pipeline.sources import CLASS_NAMES, Item, Source
from pipeline.split import split_rank

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
# The build's messages keep the logger name they have always had (what a user filters the command's output on).
log = logging.getLogger("pipeline.build")


class BuildError(RuntimeError):
    """The build stopped; the message names the file or value and what to do. Unless `resumable`, what this build
    wrote is removed (a bad input must not leave a half-made cache)."""
    resumable = False


class StorageError(BuildError):
    """The cache folder cannot take the output (disk full, read-only, no permission). Finished shards are kept, the
    temporary one is removed, and the same command resumes once the cause is fixed."""
    resumable = True


def storage_error(err: OSError, cache_root: Path, key: str | None) -> StorageError | None:
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


def refuse_empty_source(source: Source) -> None:
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


def refuse_empty(items: list[Item], skipped: list[dict]) -> None:
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
               for split in sorted({it.split for it in items}, key=split_rank)]
    for what, group in groups:
        if group and all(it.path in reasons for it in group):
            raise BuildError(f"{what} would be empty: all its {len(group)} images were left out "
                             f"({examples(group)}); {fix}")
    for split in sorted({it.split for it in items}, key=split_rank):
        for label, name in enumerate(CLASS_NAMES):
            group = [it for it in items if it.split == split and it.label == label]
            if group and all(it.path in reasons for it in group):
                log.warning("split %s keeps no image of class %s: all its %d were left out", split, name, len(group))


def refuse_unusable_folders(cache_root: Path, key: str | None = None) -> None:
    """Before anything is read or written: the cache root (and, given a key, that cache's folder) must be a folder
    or not exist yet; a file or a broken link there would end the build with a bare 'Not a directory'."""
    if os.path.lexists(cache_root) and not os.path.isdir(cache_root):
        raise BuildError(f"--cache-dir {cache_root} is a file (or a broken link), not a folder; nothing was built. "
                         f"Pass a folder (it is made when missing)")
    if key and os.path.lexists(cache_root / key) and not os.path.isdir(cache_root / key):
        raise BuildError(f"{cache_root / key}: a file (or a broken link) where the folder of cache {key} belongs; "
                         f"nothing was built. Move or remove it (it is not a cache) and run the same command again")


def refuse_flat(size: int, mean: list[float], std: list[float]) -> None:
    """Channel statistics the cache's readers would refuse (`normalisation_problem`): a channel with std 0 means every
    train pixel has the same value there (blank or single-colour images), and training divides by the std."""
    problem = normalisation_problem(mean, std)
    if problem:
        raise BuildError(f"size {size}: the train split's channel statistics cannot normalise images ({problem}): "
                         f"its images are blank or of a single colour; nothing was cached. Check --source "
                         f"(python -m train.preview shows what the build makes of an image)")
