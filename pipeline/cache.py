"""`python -m pipeline.cache list [--cache-dir cache]` and `python -m pipeline.cache verify PATH`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import store


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def list_caches(cache_root: Path) -> list[dict]:
    """One row per complete cache under `cache_root`, newest first."""
    rows = []
    for manifest_path in sorted(Path(cache_root).glob(f"*/{store.MANIFEST}")):
        m = store.read_manifest(manifest_path.parent)
        rows.append({
            "key": m["key"],
            "path": str(manifest_path.parent),
            "source": m["source"]["root"],
            "layout": m["source"]["layout"],
            "sizes": [int(s) for s in m["sizes"]],
            "counts": {split: info["count"] for split, info in m["splits"].items()},
            "bytes": folder_bytes(manifest_path.parent),
            "created": m["created"],
        })
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.cache", description="inspect and check caches")
    sub = p.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list", help="show every complete cache")
    ls.add_argument("--cache-dir", type=Path, default=Path("cache"))
    ver = sub.add_parser("verify", help="re-check every shard's checksum and shape")
    ver.add_argument("path", type=Path, help="a cache folder, cache/<key>")
    args = p.parse_args(argv)
    if args.command == "list":
        rows = list_caches(args.cache_dir)
        if not rows:
            print(f"no complete cache under {args.cache_dir}; build one with python -m pipeline.build --demo")
            return 0
        for r in rows:
            counts = " ".join(f"{k}={v}" for k, v in r["counts"].items())
            print(f"{r['key']}  {r['layout']:<13} sizes={r['sizes']}  {counts}  {r['bytes'] / 2**20:.1f} MiB  "
                  f"{r['created']}  {r['source']}")
        return 0
    try:
        problems = store.verify(args.path)
    except store.CacheError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"BAD {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"ok: every shard of {args.path} matches its checksum and shape")
    return 0


if __name__ == "__main__":
    sys.exit(main())
