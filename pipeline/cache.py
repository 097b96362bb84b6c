"""Inspect, check and clear caches.

    python -m pipeline.cache list [--cache-dir cache]
    python -m pipeline.cache verify cache/<key>
    python -m pipeline.cache rm KEY_OR_PATH... [--cache-dir cache] [--dry-run]
    python -m pipeline.cache prune [--keep-newest N] [--older-than DAYS] [--incomplete] [--dry-run] [--cache-dir cache]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import housekeeping, store


def list_caches(cache_root: Path) -> list[dict]:
    """One row per complete cache under `cache_root`, newest first; a manifest that cannot be read gives a row
    with `damaged` (the reason) instead of hiding every other cache."""
    rows = []
    for manifest_path in sorted(Path(cache_root).glob(f"*/{store.MANIFEST}")):
        try:
            m = store.read_manifest(manifest_path.parent)
            rows.append({
                "key": m["key"],
                "path": str(manifest_path.parent),
                "source": m["source"]["root"],
                "layout": m["source"]["layout"],
                "sizes": [int(s) for s in m["sizes"]],
                "counts": {split: info["count"] for split, info in m["splits"].items()},
                "bytes": housekeeping.path_bytes(manifest_path.parent),
                "created": m["created"],
            })
        except (ValueError, KeyError, TypeError, AttributeError, OSError) as err:
            reason = (f"{err.path}: {err.problem}" if isinstance(err, store.ManifestError)
                      else f"{manifest_path}: {type(err).__name__}: {err}")
            rows.append({"key": manifest_path.parent.name, "path": str(manifest_path.parent), "damaged": reason,
                         "bytes": housekeeping.path_bytes(manifest_path.parent), "created": ""})
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _print_removals(removed, skipped, dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        print(f"{verb} {r.what} {r.path} ({_mib(r.bytes)})")
    for r in skipped:
        print(f"left {r.what} {r.path}: a running build holds its lock", file=sys.stderr)
    freed = sum(r.bytes for r in removed)
    print(f"{'would free' if dry_run else 'freed'} {_mib(freed)} ({freed} bytes) in {len(removed)} item(s)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.cache", description="inspect, check and clear caches",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="show every complete cache and the total size")
    ls.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ver = sub.add_parser("verify", help="re-check every shard's checksum and shape")
    ver.add_argument("path", type=Path, help="a cache folder, cache/<key>")
    rm = sub.add_parser("rm", help="remove caches by key or path (only inside --cache-dir)")
    rm.add_argument("targets", nargs="+", metavar="KEY_OR_PATH")
    prune = sub.add_parser("prune", help="remove old caches and leftovers of interrupted builds")
    prune.add_argument("--keep-newest", type=int, metavar="N", help="keep the N newest complete caches")
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="remove complete caches older than this")
    prune.add_argument("--incomplete", action="store_true",
                       help="remove cache folders without a manifest, *.tmp shards and lock files of no running build")
    for sp in (rm, prune):
        sp.add_argument("--cache-dir", type=Path, default=Path("cache"))
        sp.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    return p


def _list(cache_dir: Path) -> int:
    rows = list_caches(cache_dir)
    if not rows:
        print(f"no complete cache under {cache_dir}; build one with python -m pipeline.build --demo")
        return 0
    for r in rows:
        if "damaged" in r:
            print(f"{r['key']}  DAMAGED ({r['damaged']}); rebuild it, or remove it with python -m pipeline.cache rm "
                  f"{r['key']}  {_mib(r['bytes'])}")
            continue
        counts = " ".join(f"{k}={v}" for k, v in r["counts"].items())
        print(f"{r['key']}  {r['layout']:<13} sizes={r['sizes']}  {counts}  {_mib(r['bytes'])}  "
              f"{r['created']}  {r['source']}")
    total = housekeeping.path_bytes(cache_dir) if cache_dir.is_dir() else 0
    print(f"{len(rows)} cache(s); {_mib(total)} in all under {cache_dir} (demo source and leftovers included)")
    return 0


def _remove(args) -> int:
    if args.command == "rm":
        folders = [housekeeping.cache_folder(args.cache_dir, t) for t in args.targets]  # all checked first
        plan = [housekeeping.Removal(f, "cache", housekeeping.path_bytes(f), f.name) for f in dict.fromkeys(folders)]
    else:
        if args.keep_newest is not None and args.keep_newest < 0:
            raise store.CacheError(f"--keep-newest must be >= 0, got {args.keep_newest}")
        if args.older_than is not None and not args.older_than >= 0:
            raise store.CacheError(f"--older-than must be a number of days >= 0, got {args.older_than}")
        if args.keep_newest is None and args.older_than is None and not args.incomplete:
            raise store.CacheError("nothing to prune: pass --keep-newest N, --older-than DAYS and/or --incomplete")
        plan = housekeeping.plan_prune(args.cache_dir, args.keep_newest, args.older_than, args.incomplete)
    removed, skipped = housekeeping.execute(args.cache_dir, plan, args.dry_run)
    _print_removals(removed, skipped, args.dry_run)
    return 1 if skipped else 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "list":
        return _list(args.cache_dir)
    try:
        if args.command in ("rm", "prune"):
            return _remove(args)
        problems = store.verify(args.path)
    except store.CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        manifest = store.read_manifest(args.path)
        print(f"rebuild the bad shards (the rest is kept) with:\n  "
              f"{store.rebuild_command(args.path, manifest, manifest['sizes'])}", file=sys.stderr)
        return 1
    print(f"ok: every shard of {args.path} matches its checksum and shape")
    return 0


if __name__ == "__main__":
    sys.exit(main())
