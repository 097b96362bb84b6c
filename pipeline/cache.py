"""Inspect, check and clear caches.

    python -m pipeline.cache list [--cache-dir cache]
    python -m pipeline.cache verify KEY_OR_PATH [--cache-dir cache]
    python -m pipeline.cache rm KEY_OR_PATH... [--cache-dir cache] [--dry-run]
    python -m pipeline.cache prune [--keep-newest N] [--older-than DAYS] [--incomplete] [--dry-run] [--cache-dir cache]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from pipeline import housekeeping, store
from pipeline.manifest import CacheAccessError


def list_caches(cache_root: Path) -> list[dict]:
    """One row per complete cache under `cache_root`, newest first; a manifest that cannot be used gives a row with
    `damaged` (the reason), a folder this user may not read one with `unreadable`, instead of hiding every other
    cache; a key-named link or file gives a row with `left` (it is not a cache here). Keys are the folders' names.
    CacheError when the cache root is not a folder or cannot be listed."""
    folders, left = housekeeping.scan(Path(cache_root), any_name=True)
    rows = []
    for folder in folders:
        row = {"key": folder.name, "path": str(folder), "bytes": housekeeping.path_bytes(folder), "created": ""}
        try:
            m = store.read_manifest(folder)
        except CacheAccessError as err:
            rows.append({**row, "unreadable": str(err)})
            continue
        except store.ManifestError as err:
            rows.append({**row, "damaged": f"{err.path}: {err.problem}"})
            continue
        except store.CacheError:
            continue  # no manifest: an interrupted or running build (prune --incomplete removes the first kind)
        rows.append({**row, "source": m["source"]["root"], "layout": m["source"]["layout"],
                     "sizes": [int(s) for s in m["sizes"]],
                     "counts": {split: info["count"] for split, info in m["splits"].items()},
                     "created": m["created"], "manifest_key": m["key"]})
    rows.sort(key=lambda r: r["created"], reverse=True)
    return rows + [{"key": e.path.name, "path": str(e.path), "left": e.why, "bytes": 0, "created": ""} for e in left]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_removals(out: housekeeping.Outcome, dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for r in out.removed:
        print(f"{verb} {r.what} {r.path} ({_mib(r.bytes)})")
    for r in out.gone:
        print(f"{r.what} {r.path}: already gone (removed by another rm or prune while this one ran)",
              file=sys.stderr)
    for r in out.left:
        print(f"left {r.path}: {r.why}", file=sys.stderr)
    freed = sum(r.bytes for r in out.removed)
    print(f"{'would free' if dry_run else 'freed'} {_mib(freed)} ({freed} bytes) in {len(out.removed)} item(s)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.cache", description="inspect, check and clear caches",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="show every complete cache and the total size")
    ls.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ver = sub.add_parser("verify", help="re-check every shard's checksum and shape")
    ver.add_argument("path", type=Path, metavar="KEY_OR_PATH",
                     help="a cache folder (cache/<key>), or a key of a cache in --cache-dir, as rm takes it")
    ver.add_argument("--cache-dir", type=Path, default=Path("cache"))
    rm = sub.add_parser("rm", help="remove caches by key or path (only inside --cache-dir)")
    rm.add_argument("targets", nargs="+", metavar="KEY_OR_PATH")
    prune = sub.add_parser("prune", help="remove old caches and leftovers of interrupted builds")
    prune.add_argument("--keep-newest", type=int, metavar="N", help="keep the N newest complete caches")
    prune.add_argument("--older-than", type=float, metavar="DAYS",
                       help="remove complete caches older than this many days (a finite number >= 0, fractions "
                            "allowed; inf and nan are refused, and a number larger than any cache's age removes none)")
    prune.add_argument("--incomplete", action="store_true",
                       help="remove cache folders without a manifest, *.tmp shards and lock files of no running build")
    for sp in (rm, prune):
        sp.add_argument("--cache-dir", type=Path, default=Path("cache"))
        sp.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    return p


def _list(cache_dir: Path) -> int:
    if not os.path.lexists(cache_dir):
        print(f"no cache folder {cache_dir} yet; build a cache with python -m pipeline.build --demo (or pass the "
              f"--cache-dir your builds used)")
        return 0
    rows = list_caches(cache_dir)
    caches = [r for r in rows if "left" not in r]
    for r in rows:
        if "left" in r:
            print(f"{r['key']}  not listed: {r['left']}")
        elif "damaged" in r:
            print(f"{r['key']}  DAMAGED ({r['damaged']}); rebuild it, or remove it with python -m pipeline.cache rm "
                  f"{r['key']}  {_mib(r['bytes'])}")
        elif "unreadable" in r:
            print(f"{r['key']}  UNREADABLE ({r['unreadable']})")
        else:
            counts = " ".join(f"{k}={v}" for k, v in r["counts"].items())
            renamed = "" if r["manifest_key"] == r["key"] else \
                f"  (its manifest names key {r['manifest_key']!r}: a renamed or copied folder; builds do not find it)"
            print(f"{r['key']}  {r['layout']:<13} sizes={r['sizes']}  {counts}  {_mib(r['bytes'])}  "
                  f"{r['created']}  {r['source']}{renamed}")
    if not caches:
        print(f"no complete cache under {cache_dir}; build one with python -m pipeline.build --demo")
        return 0
    print(f"{len(caches)} cache(s); {_mib(housekeeping.path_bytes(cache_dir))} in all under {cache_dir} (demo source "
          f"and leftovers included)")
    return 0


def _remove(args) -> int:
    if args.command == "rm":
        housekeeping.scan(args.cache_dir)  # a cache root that is missing, a file or unreadable is named first
        folders = [housekeeping.cache_folder(args.cache_dir, t) for t in args.targets]  # all checked first
        plan = [housekeeping.Removal(f, "cache", housekeeping.path_bytes(f), f.name) for f in dict.fromkeys(folders)]
        left = []
    else:
        if args.keep_newest is not None and args.keep_newest < 0:
            raise store.CacheError(f"--keep-newest must be >= 0, got {args.keep_newest}")
        if args.older_than is not None and not (math.isfinite(args.older_than) and args.older_than >= 0):
            raise store.CacheError(f"--older-than must be a finite number of days >= 0, got {args.older_than}")
        if args.keep_newest is None and args.older_than is None and not args.incomplete:
            raise store.CacheError("nothing to prune: pass --keep-newest N, --older-than DAYS and/or --incomplete")
        plan, left = housekeeping.plan_prune(args.cache_dir, args.keep_newest, args.older_than, args.incomplete)
    for item in left:  # named before anything is removed
        print(f"left {item.path}: {item.why}", file=sys.stderr)
    out = housekeeping.execute(args.cache_dir, plan, args.dry_run)
    _print_removals(out, args.dry_run)
    return 1 if any(item.problem for item in left + out.left) else 0


def _verify(path: Path) -> int:
    try:
        problems = store.verify(path)
    except store.CacheError as err:
        inside = [p.name for p in path.glob("*") if housekeeping.KEY.match(p.name)] if path.is_dir() else []
        hint = f"\nverify takes one cache folder, such as {path / inside[0]}" if inside else ""
        print(f"error: {err}{hint}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        manifest = store.read_manifest(path)
        print(f"rebuild the bad shards (the rest is kept) with:\n  "
              f"{store.rebuild_command(path, manifest, manifest['sizes'])}", file=sys.stderr)
        return 1
    print(f"ok: every shard of {path} matches its checksum and shape")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "verify":
        # a key, as `list` shows it and `rm` takes it, where no folder of that name is here
        keyed = not os.path.lexists(args.path) and housekeeping.KEY.fullmatch(str(args.path))
        return _verify(args.cache_dir / args.path if keyed else args.path)
    try:
        return _list(args.cache_dir) if args.command == "list" else _remove(args)
    except store.CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
