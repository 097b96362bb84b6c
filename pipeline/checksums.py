"""Whether a shard is still what the manifest recorded: present, of its recorded byte size, of its sha256.

Readers check before they trust (a cache may sit for months on a shared disk); hashing costs ~1 s per GB, so a
process hashes each file version once and remembers it, and a build's quick reuse test is a stat per shard.
"""
from __future__ import annotations

import hashlib
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HASH_THREADS = 4  # shards hashed at once when a reader checks a split (hashlib releases the GIL)


def sha256_file(path: Path, block_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            h.update(block)
    return h.hexdigest()


# Shards whose sha256 this process has checked: (device, inode, bytes, mtime_ns, expected sha256).
_checked: set[tuple] = set()
_checked_lock = threading.Lock()


def shard_problem(cache_dir: Path, entry: dict, full: bool = True, remember: bool = True) -> str | None:
    """Why a manifest's shard cannot be used (missing, wrong size, checksum differs), or None.

    full=False: existence and byte size only (one stat). full=True: also its sha256 (~1 GB/s on the 2-core dev
    machine), once per process and file version when `remember`."""
    path = Path(cache_dir) / entry["file"]
    try:
        st = path.stat()
    except FileNotFoundError:
        return "is missing"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if "bytes" in entry and st.st_size != entry["bytes"]:
        return f"has {st.st_size} bytes where the manifest records {entry['bytes']} (truncated or replaced)"
    if not full:
        return None
    identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, entry["sha256"])
    if remember and identity in _checked:
        return None
    try:
        digest = sha256_file(path)
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if digest != entry["sha256"]:
        return "differs from its sha256 in the manifest (the file was changed or corrupted)"
    with _checked_lock:
        _checked.add(identity)
    return None


def shard_problems(cache_dir: Path, manifest: dict, sizes=None, full: bool = True,
                   remember: bool = True) -> list[tuple[str, str]]:
    """(file, problem) for every bad shard of `sizes` (default: all), in manifest order; hashed in threads."""
    sizes = manifest["sizes"] if sizes is None else [str(s) for s in sizes]
    entries = [e for size in sizes for split in manifest["sizes"][size]["shards"].values() for e in split]
    if full and len(entries) > 1:
        with ThreadPoolExecutor(min(HASH_THREADS, os.cpu_count() or 1, len(entries))) as pool:
            problems = list(pool.map(lambda e: shard_problem(cache_dir, e, True, remember), entries))
    else:
        problems = [shard_problem(cache_dir, e, full, remember) for e in entries]
    return [(e["file"], why) for e, why in zip(entries, problems) if why]
