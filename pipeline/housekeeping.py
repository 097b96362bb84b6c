"""Removing caches safely: `remove` (named caches) and `prune` (old caches and leftovers), for `pipeline.cache`.

Both act only on cache folders directly inside the cache root: real folders with a 16-hex-digit key as the name. A
key-named symbolic link or file is named and left alone: never followed, locked, removed or counted as a cache (a
link may lead to another cache root, whose caches are not ours to judge). Both take the key's build lock before they
touch a folder, without waiting for a build: a folder whose lock stays held for a few seconds is left alone, named.
They look again under the lock (a second prune may have removed it, a build may have finished it), and delete the
key's lock file with the folder while still holding it (pipeline.locks says why that is safe). What would be removed is planned first (`Removal`
rows), printed, and only then removed, so `--dry-run` shows exactly what a real run removes. A folder is removed
manifest first: a removal stopped halfway (no permission, say) leaves an incomplete cache, never one that looks
complete with shards missing.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pipeline import locks
from pipeline.atomic import TMP_SUFFIX
from pipeline.manifest import MANIFEST, CacheAccessError, CacheError, ManifestError, read_manifest

KEY = re.compile(r"^[0-9a-f]{16}$")
LOCKS = locks.LOCKS
FOLDER_KINDS = ("cache", "incomplete cache", "damaged cache")
_SECONDS_PER_DAY = 86400.0
BUSY_WAIT_S = 3.0  # how long a held lock is tried again before its folder is left as a running build's


@dataclass(frozen=True)
class Removal:
    path: Path
    what: str  # one of FOLDER_KINDS, "temporary shard" or "stale lock"
    bytes: int
    key: str


@dataclass(frozen=True)
class Left:
    """Something named and left alone; `problem` where the command should exit 1 (it could not do all it was
    asked), not where leaving it is the rule (a link)."""
    path: Path
    why: str
    problem: bool = True


@dataclass
class Outcome:
    removed: list[Removal] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    gone: list[Removal] = field(default_factory=list)  # removed by someone else since it was planned


def path_bytes(path: Path) -> int:
    """Bytes of the regular files at or under `path`; links are not followed, and a file that vanishes or cannot be
    looked at while counting counts 0 (another prune may be removing it)."""
    try:
        if not path.is_dir() or path.is_symlink():
            return path.lstat().st_size if path.is_file() and not path.is_symlink() else 0
    except OSError:
        return 0
    total = 0
    for folder, _, files in os.walk(path):  # does not follow links, skips folders it cannot list
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            total += st.st_size if not os.path.islink(os.path.join(folder, name)) else 0
    return total


def scan(cache_root: Path, any_name: bool = False) -> tuple[list[Path], list[Left]]:
    """(the key-named real folders, the key-named entries that are not: links and files, named and left alone).
    `any_name` (for `list`) adds folders of other names that hold a manifest (a cache renamed by hand) and names links
    of other names that lead to one. CacheError when the cache root is missing, not a folder or cannot be listed."""
    try:
        entries = sorted(os.scandir(cache_root), key=lambda e: e.name)
    except FileNotFoundError:
        raise CacheError(f"{cache_root}: no such cache folder (--cache-dir; by default ./cache)") from None
    except NotADirectoryError:
        raise CacheError(f"{cache_root}: not a folder; --cache-dir names the folder that holds the caches "
                         f"(by default ./cache)") from None
    except PermissionError as err:
        raise CacheError(f"{cache_root}: cannot be listed ({err.strerror}); make it readable by this user, or pass "
                         f"another --cache-dir") from None
    folders, left = [], []
    for entry in entries:
        path = Path(cache_root) / entry.name
        keyed = bool(KEY.match(entry.name))
        if not keyed and not (any_name and os.path.isfile(path / MANIFEST)):  # a stat (through a link): nothing read
            continue
        if entry.is_symlink():
            left.append(Left(path, f"a symbolic link (to {os.readlink(path)}), not a cache folder: left alone (never "
                                   f"followed, listed or removed; remove the link itself if it is not wanted)",
                             problem=False))
        elif entry.is_dir(follow_symlinks=False):
            folders.append(path)
        elif keyed:
            left.append(Left(path, "a file, not a cache folder: left alone (remove it yourself if it is not yours)",
                             problem=False))
    return folders, left


def cache_folder(cache_root: Path, key_or_path: str) -> Path:
    """The cache folder named by a key or a path, which must be a key-named folder directly inside `cache_root` (a
    real one: not a link, not a file)."""
    root = cache_root.resolve()
    candidate = cache_root / key_or_path if KEY.match(key_or_path) else Path(key_or_path)
    if candidate.is_symlink():
        raise CacheError(f"{key_or_path}: a symbolic link (to {os.readlink(candidate)}), not a cache folder; rm never "
                         f"follows or removes links (remove the link itself if it is not wanted); nothing was removed")
    path = candidate.resolve()
    if path.parent != root or not KEY.match(path.name):
        raise CacheError(f"{key_or_path}: not a cache folder inside {cache_root} (a key such as "
                         f"0123456789abcdef, or {cache_root}/<key>); nothing was removed")
    if not os.path.lexists(path):
        raise CacheError(f"{key_or_path}: no such cache under {cache_root}; nothing was removed")
    if not path.is_dir():
        raise CacheError(f"{key_or_path}: a file, not a cache folder; nothing was removed (remove it yourself if it "
                         f"is not yours)")
    return path


def created(cache_dir: Path) -> datetime | None:
    """When a complete cache was made (its manifest's `created`), or None for one without a readable manifest."""
    try:
        when = datetime.fromisoformat(read_manifest(cache_dir)["created"])
    except (CacheError, ValueError, TypeError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def state(folder: Path) -> str:
    """One of FOLDER_KINDS ("cache": a usable manifest, "damaged cache": one that cannot be used, "incomplete
    cache": none), or "unreadable" where this user may not look (neither removed as damaged nor as incomplete)."""
    try:
        read_manifest(folder)
        return "cache"
    except CacheAccessError:
        return "unreadable"
    except ManifestError:
        return "damaged cache"
    except CacheError:
        return "incomplete cache"


def plan_prune(cache_root: Path, keep_newest: int | None = None, older_than_days: float | None = None,
               incomplete: bool = False, now: datetime | None = None) -> tuple[list[Removal], list[Left]]:
    """What `prune` removes, and what it names and leaves alone (links, files, unreadable folders).

    A complete cache goes when it is past the newest `keep_newest` and older than `older_than_days` (each only when
    given; a number of days larger than any cache's age selects none); `incomplete` adds key folders without a
    manifest or with one that cannot be used (ManifestError), `*.tmp` shards left in complete caches, and lock
    files that no build holds (but for those of folders removed here: they go with their folder). Folders without a
    readable date are left alone. CacheError when the cache root cannot be listed."""
    now = now or datetime.now(timezone.utc)
    folders, left = scan(cache_root)
    states = {p: state(p) for p in folders}
    left += [Left(p, "cannot be read by this user: left alone (make it readable to have it judged)")
             for p in folders if states[p] == "unreadable"]
    complete = [(created(p), p) for p in folders if states[p] == "cache"]
    dated = sorted(((when, p) for when, p in complete if when is not None), reverse=True)
    plan = []
    if keep_newest is not None or older_than_days is not None:
        for rank, (when, path) in enumerate(dated):
            if keep_newest is not None and rank < keep_newest:
                continue
            # in seconds, as a float: a timedelta of a huge number of days would overflow
            if older_than_days is not None and (now - when).total_seconds() < older_than_days * _SECONDS_PER_DAY:
                continue
            plan.append(Removal(path, "cache", path_bytes(path), path.name))
    if incomplete:
        for path in folders:
            if states[path] in ("incomplete cache", "damaged cache"):
                plan.append(Removal(path, states[path], path_bytes(path), path.name))
        removing = {r.path for r in plan}
        for _, path in complete:
            if path not in removing:
                plan += [Removal(t, "temporary shard", path_bytes(t), path.name)
                         for t in sorted(path.rglob("*" + TMP_SUFFIX))]
        lock_dir = Path(cache_root) / LOCKS
        if lock_dir.is_dir():
            keys = {r.key for r in plan if r.what in FOLDER_KINDS}
            plan += [Removal(lock, "stale lock", path_bytes(lock), lock.stem)
                     for lock in sorted(lock_dir.glob("*.lock")) if lock.stem not in keys and not lock.is_dir()]
    return plan, left


def _look_again(item: Removal) -> str | None:
    """Under the key's lock, before removing: "gone" where it was removed since it was planned, the reason to leave
    it where it changed, None where it is still what was planned."""
    if not os.path.lexists(item.path):
        return "gone"
    if item.what not in FOLDER_KINDS:
        return None
    if item.path.is_symlink() or not item.path.is_dir():
        return "it is no longer a cache folder (replaced since it was planned): left alone"
    if item.what == "cache":
        return None  # chosen by name (rm) or by age (prune): what its manifest says now does not matter
    now = state(item.path)
    if now != item.what:
        return {"cache": "a build finished it since it was planned: left alone",
                "unreadable": "it cannot be read by this user now: left alone"}.get(now, f"it is a {now} now: left "
                                                                                       f"alone")
    return None


def _unwritable(item: Removal) -> str | None:
    """The first folder that removing `item` must change and this user may not, or None."""
    folders = [item.path.parent]
    if item.what in FOLDER_KINDS:  # the folder itself first: os.walk skips one it cannot list
        folders += [item.path] + [Path(d) for d, _, _ in os.walk(item.path)]
    for folder in folders:
        if not os.access(folder, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            return str(folder)
    return None


def _remove(item: Removal) -> None:
    if item.what not in FOLDER_KINDS:
        item.path.unlink(missing_ok=True)
        return
    (item.path / MANIFEST).unlink(missing_ok=True)  # first: a removal stopped halfway leaves an incomplete cache
    shutil.rmtree(item.path)


def _what_is_left(item: Removal) -> str:
    try:
        os.lstat(item.path / MANIFEST if item.what in FOLDER_KINDS else item.path)
    except FileNotFoundError:
        if item.what in FOLDER_KINDS and os.path.lexists(item.path):
            return "what is left has no manifest (an incomplete cache): fix the cause and run prune --incomplete"
        return "it is gone"
    except OSError:
        pass  # cannot even be looked at: then nothing in it could be removed either
    return "nothing of it was removed"


def _attempt(cache_root: Path, item: Removal, dry_run: bool, out: Outcome) -> bool:
    """Remove `item` (or, in a dry run, count it) under its key's lock, recording the outcome in `out`; False, with
    nothing recorded, where another process holds the lock."""
    if not os.path.lexists(item.path):  # before locking: no lock file is made for it
        out.gone.append(item)
        return True
    with locks.hold(cache_root, item.key, wait=False, create=not dry_run) as lock:
        if lock is None:
            return False
        why = _look_again(item)
        if why == "gone":
            out.gone.append(item)
        elif why:
            out.left.append(Left(item.path, f"{item.what}: {why}"))
        elif not dry_run and (folder := _unwritable(item)):
            out.left.append(Left(item.path, f"{item.what}: cannot be removed: {folder} is not writable by this user "
                                            f"(check its owner and permissions); nothing of it was removed"))
        else:
            try:
                if not dry_run:
                    _remove(item)
                out.removed.append(item)
            except OSError as err:
                out.left.append(Left(item.path, f"{item.what}: removing it failed ({err.strerror}: {err.filename}); "
                                                f"{_what_is_left(item)}"))
        if not dry_run and item.what in FOLDER_KINDS and not os.path.lexists(item.path):
            locks.remove_held(lock)  # no lock file outlives its cache
    return True


def execute(cache_root: Path, plan: list[Removal], dry_run: bool = False) -> Outcome:
    """Each removal done while holding its key's lock, after looking at it again under the lock; left (named, with
    the reason) where a build holds the lock, it changed since it was planned, this user may not remove it, or its
    removal failed. A removed folder's lock file is deleted too, while held.

    A lock found held is tried again for up to BUSY_WAIT_S: another rm or prune holds one only while it removes that
    folder (it is then found gone), a build for as long as it builds (it is then left, named)."""
    out = Outcome()
    busy = [item for item in plan if not _attempt(cache_root, item, dry_run, out)]
    deadline = time.monotonic() + BUSY_WAIT_S
    while busy and time.monotonic() < deadline:
        time.sleep(0.1)
        busy = [item for item in busy if not _attempt(cache_root, item, dry_run, out)]
    out.left += [Left(item.path, f"{item.what}: a running build holds its lock (or another rm or prune does)")
                 for item in busy]
    return out
