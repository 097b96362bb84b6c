"""The per-key build lock: one file per cache key in the cache root's `.locks` folder, held with flock.

A build holds its key's lock while it writes; `pipeline.cache rm` and `prune` take it without waiting before they
touch that key, and delete the lock file of a cache they removed while they still hold it, so that no lock file
outlives its cache. Deleting a held lock file is safe only because every locker checks, once it holds the lock, that
the path still names the file it locked: a process that opened the file before it was deleted would otherwise hold a
lock on a file no one else can find, and a second build of the same key could start beside it. On a mismatch the
locker opens the path again (making a new file) and locks that.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Callable, Iterator

from pipeline.manifest import CacheError

LOCKS = ".locks"  # the folder, directly inside the cache root
_ABSENT = object()  # no lock file, and none to be made: no one holds the lock


def lock_path(cache_root: Path, key: str) -> Path:
    return Path(cache_root) / LOCKS / f"{key}.lock"


def _names_locked_file(f, path: Path) -> bool:
    """Whether `path` still names the file open as `f` (it was not deleted, nor replaced, since it was opened)."""
    held = os.fstat(f.fileno())
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def _acquire(path: Path, wait: bool, on_wait, create: bool):
    """The open lock file, locked; None where another process holds it (and not `wait`); _ABSENT where there is no
    lock file and not `create`."""
    waited = False
    while True:
        try:
            f = open(path, "a" if create else "r")  # "a": never truncates, and makes the file when it is missing
        except FileNotFoundError:
            if create:
                raise
            return _ABSENT
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    f.close()
                    return None
                if on_wait and not waited:
                    on_wait()
                waited = True
                fcntl.flock(f, fcntl.LOCK_EX)
            if _names_locked_file(f, path):
                return f
        except BaseException:
            f.close()
            raise
        f.close()  # the file was deleted by the remover that held it: lock the one the path names now


@contextlib.contextmanager
def hold(cache_root: Path, key: str, wait: bool = True, on_wait: Callable[[], None] | None = None,
         create: bool = True) -> Iterator[Path | None]:
    """Hold `key`'s lock for the body; yields the lock file's path, or None where another process holds it and
    `wait` is False. `on_wait` is called once before waiting. `create=False` only looks (a dry run): where there is
    no lock file no one holds the lock, and the body runs, yielding the path, without one being made."""
    path = lock_path(cache_root, key)
    if os.path.lexists(path.parent) and not path.parent.is_dir():
        raise CacheError(f"{path.parent}: a file (or a broken link) where the folder of the caches' build locks "
                         f"belongs; nothing was done. Move or remove it: it is made again when needed")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    f = _acquire(path, wait, on_wait, create)
    if f is None or f is _ABSENT:
        yield None if f is None else path
        return
    try:
        yield path
    finally:
        f.close()  # releases the lock


def remove_held(path: Path) -> None:
    """Delete a lock file that this process holds (inside `hold`); others waiting on it then lock a new file."""
    path.unlink(missing_ok=True)
