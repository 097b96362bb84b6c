"""Removing caches safely: `remove` (named caches) and `prune` (old caches and leftovers), for `pipeline.cache`.

Both act only on cache folders directly inside the cache root (a 16-hex-digit key as the name), take the key's build
lock without waiting before they touch a folder, and leave a folder alone while a build holds that lock. What would
be removed is planned first (`Removal` rows), printed, and only then removed, so `--dry-run` shows exactly what a real
run removes.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from pipeline import store

KEY = re.compile(r"^[0-9a-f]{16}$")
LOCKS = ".locks"


@dataclass(frozen=True)
class Removal:
    path: Path
    what: str  # "cache", "incomplete cache", "damaged cache", "temporary shard", "stale lock"
    bytes: int
    key: str


def path_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@contextlib.contextmanager
def unless_building(cache_root: Path, key: str, create: bool = True):
    """Yields True while holding `key`'s build lock (taken without waiting), False if a build holds it.

    `create=False` (a dry run) only looks: no lock file means no build holds one, and none is made."""
    lock_path = cache_root / LOCKS / f"{key}.lock"
    if not lock_path.parent.is_dir() or (not create and not lock_path.exists()):
        yield True
        return
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_folder(cache_root: Path, key_or_path: str) -> Path:
    """The cache folder named by a key or a path, which must be a key-named folder directly inside `cache_root`."""
    root = cache_root.resolve()
    candidate = cache_root / key_or_path if KEY.match(key_or_path) else Path(key_or_path)
    path = candidate.resolve()
    if path.parent != root or not KEY.match(path.name):
        raise store.CacheError(f"{key_or_path}: not a cache folder inside {cache_root} (a key such as "
                               f"0123456789abcdef, or {cache_root}/<key>); nothing was removed")
    if not path.is_dir():
        raise store.CacheError(f"{key_or_path}: no such cache under {cache_root}; nothing was removed")
    return path


def created(cache_dir: Path) -> datetime | None:
    """When a complete cache was made (its manifest's `created`), or None for one without a readable manifest."""
    try:
        stamp = json.loads((cache_dir / store.MANIFEST).read_text())["created"]
        when = datetime.fromisoformat(stamp)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _state(folder: Path) -> str:
    """"cache" (a usable manifest), "damaged cache" (a manifest that cannot be used) or "incomplete cache"."""
    try:
        store.read_manifest(folder)
        return "cache"
    except store.ManifestError:
        return "damaged cache"
    except store.CacheError:
        return "incomplete cache"


def plan_prune(cache_root: Path, keep_newest: int | None = None, older_than_days: float | None = None,
               incomplete: bool = False, now: datetime | None = None) -> list[Removal]:
    """What `prune` removes. A complete cache goes when it is past the newest `keep_newest` and older than
    `older_than_days` (each only when given); `incomplete` adds key folders without a manifest or with one that cannot
    be used (store.ManifestError), `*.tmp` shards left in complete caches, and lock files that no build holds.
    Folders without a readable date are left alone."""
    now = now or datetime.now(timezone.utc)
    folders = sorted(p for p in cache_root.iterdir() if p.is_dir() and KEY.match(p.name)) \
        if cache_root.is_dir() else []
    states = {p: _state(p) for p in folders}
    complete = [(created(p), p) for p in folders if states[p] == "cache"]
    dated = sorted(((when, p) for when, p in complete if when is not None), reverse=True)
    plan = []
    if keep_newest is not None or older_than_days is not None:
        for rank, (when, path) in enumerate(dated):
            if keep_newest is not None and rank < keep_newest:
                continue
            if older_than_days is not None and now - when < timedelta(days=older_than_days):
                continue
            plan.append(Removal(path, "cache", path_bytes(path), path.name))
    if incomplete:
        for path in folders:
            if states[path] != "cache":
                plan.append(Removal(path, states[path], path_bytes(path), path.name))
        removing = {r.path for r in plan}
        for _, path in complete:
            if path not in removing:
                plan += [Removal(t, "temporary shard", t.stat().st_size, path.name)
                         for t in sorted(path.rglob("*" + store.TMP_SUFFIX))]
        locks = cache_root / LOCKS
        if locks.is_dir():
            plan += [Removal(lock, "stale lock", lock.stat().st_size, lock.stem)
                     for lock in sorted(locks.glob("*.lock"))]
    return plan


def execute(cache_root: Path, plan: list[Removal], dry_run: bool = False) -> tuple[list[Removal], list[Removal]]:
    """(removed, skipped): each removal done while holding its key's lock; skipped where a build holds it."""
    removed, skipped = [], []
    for item in plan:
        with unless_building(cache_root, item.key, create=not dry_run) as free:
            if not free:
                skipped.append(item)
                continue
            if not dry_run:
                if item.path.is_dir():
                    shutil.rmtree(item.path)
                else:
                    item.path.unlink(missing_ok=True)
            removed.append(item)
    return removed, skipped
