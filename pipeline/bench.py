"""Benchmarks, each printing figures and ratios measured in one run (speed targets live here, never in tests).

    python -m pipeline.bench [--device cpu|cuda] [--size 224] [--batch-size 64] [--images 512] [--workers 2]
        the report's per-image loader against the cached loader, alone and with augmentation (and, on CUDA,
        ResNet training steps fed by it)
    python -m pipeline.bench build [--images 1024] [--sizes 128 224]
        the cache build against bare OpenCV; --jobs 2 against --jobs 1
    python -m pipeline.bench scale [--counts 1000 4000 16000] [--plot scale.png]
        build seconds, cache bytes, streaming/resident images/s and peak RSS as the data grows

The loader benchmark needs torch, so it lives in train/ and is imported only when asked for.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _build_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline.bench build",
                                description="build cost against bare OpenCV; --jobs 2 against --jobs 1")
    p.add_argument("--images", type=int, default=1024, help="images in the generated source")
    p.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def _scale_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline.bench scale",
                                description="costs against data size on generated images")
    p.add_argument("--counts", type=int, nargs="+", default=[1000, 4000, 16000], help="images per source")
    p.add_argument("--size", type=int, default=64, help="cached size (px)")
    p.add_argument("--image-px", type=int, default=96, help="side of the generated source images")
    p.add_argument("--budget-mib", type=int, default=32, help="streaming memory budget")
    p.add_argument("--plot", type=Path, default=Path("scale.png"), help="log-log figure")
    p.add_argument("--work-dir", type=Path, help="where the generated data goes (default: the temp folder)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def _loader_args(argv):
    p = argparse.ArgumentParser(prog="python -m pipeline.bench",
                                description="the report's per-image loader against the cached loader + augmentation")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images", type=int, default=512, help="images per measurement")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the report's loader")
    p.add_argument("--no-training", action="store_true", help="on CUDA, skip the ResNet training steps")
    p.add_argument("--json", type=Path, help="also write the figures here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The copied sample has too few patients for a grouped split; the build's warning would repeat each run.
    logging.getLogger("pipeline.split").setLevel(logging.ERROR)
    if argv[:1] == ["build"]:
        from pipeline import bench_build
        args = _build_args(argv[1:])
        result = bench_build.run(images=args.images, sizes=args.sizes)
        print(bench_build.report(result))
    elif argv[:1] == ["scale"]:
        from train import bench_scale
        args = _scale_args(argv[1:])
        result = bench_scale.run(counts=args.counts, size=args.size, image_px=args.image_px,
                                 budget_bytes=args.budget_mib * 2**20, work_dir=args.work_dir, plot=args.plot)
        print(bench_scale.report(result))
        print(args.plot)
    else:
        from train import bench_loader
        args = _loader_args(argv)
        if args.device.startswith("cuda"):
            import torch
            if not torch.cuda.is_available():
                print("error: --device cuda asked for, but torch sees no CUDA device; use --device cpu",
                      file=sys.stderr)
                return 2
        try:
            result = bench_loader.run(device=args.device, size=args.size, batch_size=args.batch_size,
                                      images=args.images, workers=args.workers, train_models=not args.no_training)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(bench_loader.report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
