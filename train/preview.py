"""`python -m train.preview`: what the preprocessing and the augmentation do to a few cells, as one PNG grid.

    python -m train.preview --source ../shared/data/cnmc-sample --n 6 --size 224 --out docs/preview.png
    python -m train.preview --cache cache/<key> --size 128

One row per cell (both classes, labelled with class and patient): the original image, after CLAHE, after unsharp
masking, the stored (cached) image with the centre training window outlined, the eval view, and four training views
from GpuAugment with a fixed seed, each with its parameters. With --cache the stored image is read from the cache and
the preprocessing parameters are the cache's; otherwise both come from the same functions and defaults the build
uses. It lives in train/ because it draws GpuAugment's views, and pipeline/ never imports train/ or torch.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from train.augment.preview import PreviewError, preview


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m train.preview", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", type=Path, help="a source folder in any layout the build understands")
    src.add_argument("--cache", type=Path, help="a cache folder, cache/<key>: its parameters and stored images")
    p.add_argument("--n", type=int, default=6, help="cells (rows), both classes")
    p.add_argument("--size", type=int, default=224, help="training size (px)")
    p.add_argument("--seed", type=int, default=0, help="which cells, and the training views' parameters")
    p.add_argument("--out", type=Path, default=Path("preview.png"))
    args = p.parse_args(argv)
    try:
        preview(args.source, args.cache, args.n, args.size, args.seed, args.out)
    except (PreviewError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
