"""`python -m train.preview`: what the preprocessing and the augmentation do to a few cells, as one PNG grid.

    python -m train.preview --source ../shared/data/cnmc-sample --n 6 --size 224 --out docs/preview.png --overwrite
    python -m train.preview --cache cache/<key> --size 128

One row per cell (both classes, labelled with class and patient): the original image, after CLAHE, after unsharp
masking, the stored (cached) image with the centre training window outlined, the eval view, and four training views
from GpuAugment with a fixed seed, each with its parameters. With --cache the stored image is read from the cache and
the preprocessing parameters are the cache's; otherwise both come from the same functions and defaults the build
uses. It lives in train/ because it draws GpuAugment's views, and pipeline/ never imports train/ or torch.
An existing --out is never replaced unless --overwrite is given; the last line printed is the PNG's path.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.progress import add_progress_flags
from train.augment.preview import MAX_ROWS, PreviewError, preview


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="python -m train.preview", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--source", type=Path, help="a source folder in any layout the build understands")
    src.add_argument("--cache", type=Path, help="a cache folder, cache/<key>: its parameters and stored images")
    p.add_argument("--n", type=int, default=6,
                   help=f"cells (rows), both classes; capped to the labelled cells there are and to {MAX_ROWS} rows "
                        f"(the most one PNG holds), saying so")
    p.add_argument("--size", type=int, default=224, help="training size (px)")
    p.add_argument("--seed", type=int, default=0, help="which cells, and the training views' parameters")
    p.add_argument("--out", type=Path, default=Path("preview.png"),
                   help="the PNG (or .pdf, .svg ...), in an existing folder; an existing file is refused unless "
                        "--overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_progress_flags(p)
    args = p.parse_args(argv)
    try:
        preview(args.source, args.cache, args.n, args.size, args.seed, args.out, overwrite=args.overwrite,
                progress=args.progress)
    except (PreviewError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.out.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
