"""Files that appear whole under their final name or not at all.

A reader trusts a file by its name (a manifest's presence means a complete cache, a shard's final name means a whole
shard), so every writer writes a temporary sibling, flushes it to disk and renames it into place: a crash, a full
disk or Ctrl-C at any point leaves either the old file or the new one, never a prefix of it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"  # a leftover with this suffix is an interrupted write: safe to delete


def fsync_rename(tmp: Path, final: Path) -> None:
    """Make `tmp` durable, then give it its final name (os.replace is atomic on one filesystem)."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: Path, data: dict) -> None:
    """`data` as indented JSON at `path`, atomically; on any failure the temporary file is removed."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
        fsync_rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
