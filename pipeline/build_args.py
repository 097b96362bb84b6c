"""The flags of `python -m pipeline.build`, and the preprocessing config they describe.

Every preprocessing parameter has a flag whose default is PreprocessConfig's, so the cache key of a plain command
is the key of the default config; `pipeline.manifest.rebuild_command` writes these flags back from a manifest.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import PreprocessConfig
from pipeline.parallel import BACKENDS, DEFAULT_BACKEND
from pipeline.progress import add_progress_flags


def parse_args(argv=None, description: str | None = None) -> argparse.Namespace:
    """The command's arguments; `description` is the help's first line (the command module's docstring line)."""
    d = PreprocessConfig()
    p = argparse.ArgumentParser(prog="python -m pipeline.build", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224], help="output sizes in px")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", type=Path, help="source folder (Kaggle C-NMC layout, CSV lists, labels.csv or "
                                                 "all/ + hem/)")
    src.add_argument("--demo", action="store_true", help="generate and use the synthetic demo source")
    p.add_argument("--cache-dir", type=Path, default=Path("cache"), help="root folder of all caches")
    p.add_argument("--jobs", type=int, default=-1, help="parallel workers (-1: all cores)")
    p.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND, help="joblib backend")
    p.add_argument("--scheduler", help="dask scheduler address for --backend dask (default: a local cluster of "
                                       "--jobs workers)")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="images per HDF5 shard")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/valid/test assignment")
    p.add_argument("--split-fractions", type=float, nargs=3, default=list(d.split_fractions),
                   metavar=("TRAIN", "VALID", "TEST"), help="split fractions where the source gives no split")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="an unusable source image stops the build (fail) or is left out and listed (skip)")
    p.add_argument("--clahe-clip", type=float, default=d.clahe_clip, help="CLAHE clip limit")
    p.add_argument("--clahe-tiles", type=int, default=d.clahe_tiles, help="CLAHE tile grid (N x N)")
    p.add_argument("--unsharp-sigma", type=float, default=d.unsharp_sigma, help="unsharp mask Gaussian sigma (px)")
    p.add_argument("--unsharp-strength", type=float, default=d.unsharp_strength, help="unsharp mask strength")
    p.add_argument("--crop-px", type=int, default=d.crop_px, help="centre crop side at the reference size (px)")
    p.add_argument("--reference-px", type=int, default=d.reference_px, help="image side the crop refers to (px)")
    p.add_argument("--max-rotation-deg", type=float, default=d.max_rotation_deg,
                   help="largest training rotation the stored context must allow")
    p.add_argument("--allow-upscale", action="store_true",
                   help="allow --sizes above the crop's source pixels (--crop-px), up to 4096; they only enlarge")
    p.add_argument("--verify", action="store_true",
                   help="re-check the sha256 of every shard of a complete cache and rebuild any that differ (default: "
                        "a shard's presence and byte size are checked; a mismatch triggers the full check)")
    add_progress_flags(p)
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    """The preprocessing config the flags describe (ValueError, naming the field, for a value out of bounds)."""
    return PreprocessConfig(clahe_clip=args.clahe_clip, clahe_tiles=args.clahe_tiles,
                            unsharp_sigma=args.unsharp_sigma, unsharp_strength=args.unsharp_strength,
                            crop_px=args.crop_px, reference_px=args.reference_px,
                            max_rotation_deg=args.max_rotation_deg, split_fractions=tuple(args.split_fractions),
                            split_seed=args.split_seed, shard_size=args.shard_size)

