"""Benchmarks that need torch, each printing figures measured in one run (speed targets live here, never in tests).

    python -m train.bench loader [--device cpu|cuda] [--size 224] [--batch-size 64] [--images 512] [--workers 2]
        the report's per-image loader against the cached loader, alone and with augmentation (and, on CUDA,
        ResNet training steps on a resident batch and fed by it: the data share)
    python -m train.bench scale [--counts 1000 4000 16000] [--plot scale.png]
        build seconds, cache bytes, streaming/resident images/s and peak RSS as the data grows
    python -m train.bench gpu [--device cuda] [--json gpu.json] [--quick] [--part NAME [NAME ...]]
        the one-command GPU check: CUDA tests, augmentation, loader placements, training steps fed inline and one
        batch ahead, a compiled demo run (the default parts); --part compile-modes consistency kernels (or all) adds
        eager against compiled and CUDA-graph steps, the training/evaluation commands on the device against the CPU,
        and the augmentation's kernels per batch;
        markdown tables for the README; exit code 1 if anything failed
    python -m train.bench recipe [--model resnet18] [--epochs N] [--device cpu|cuda] [--quick] [--scale F] [--json PATH]
        the preset recipe at the dataset's scale on a synthetic C-NMC-sized source: build s, s per epoch per stage,
        evaluation s, total (measured, and projected to the whole recipe), data share, the report's loader for the
        ratio; exit code 1 if anything failed
    python -m train.bench peers [--device cpu|cuda] [--size 224] [--batch-size 256] [--quick] [--json PATH]
        GpuAugment beside Kornia, torchvision v2 and the report's DataLoader on the same batch, alone and feeding
        ResNet18 training steps: img/s, ratio to GpuAugment, data share, and how each one's semantics differ
    python -m train.bench kernels [--device cpu|cuda] [--size 224] [--batch-size 16] [--bf16] [--json PATH]
        the passes over the batch of each form of the augmentation (eager formulation compiled, planes compiled,
        Triton): Inductor's kernels, intermediate and moved MB per image, CUDA kernels per batch, ms per image

The build benchmark (no torch) is `python -m pipeline.bench build`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.progress import add_progress_flags

# train.bench.gpu's PARTS and DEFAULT_PARTS, here too so that --help does not import torch (a test keeps them equal)
GPU_PARTS = ("tests", "augmentation", "loader", "training", "demo", "compile-modes", "consistency", "kernels")
GPU_DEFAULT_PARTS = ("tests", "augmentation", "loader", "training", "demo")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True, metavar="{loader,scale,gpu,recipe,peers,kernels}")

    loader = sub.add_parser("loader", prog="python -m train.bench loader",
                            help="the report's per-image loader against the cached loader + augmentation",
                            description="the report's per-image loader against the cached loader + augmentation")
    loader.add_argument("--device", default="cpu", help="cpu or cuda")
    loader.add_argument("--size", type=int, default=224)
    loader.add_argument("--batch-size", type=int, default=64)
    loader.add_argument("--images", type=int, default=512, help="images per measurement")
    loader.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the report's loader")
    loader.add_argument("--no-training", action="store_true", help="on CUDA, skip the ResNet training steps")
    loader.add_argument("--json", type=Path, help="also write the figures here")
    add_progress_flags(loader)

    scale = sub.add_parser("scale", prog="python -m train.bench scale", help="costs against data size",
                           description="costs against data size on generated images")
    scale.add_argument("--counts", type=int, nargs="+", default=[1000, 4000, 16000], help="images per source")
    scale.add_argument("--size", type=int, default=64, help="cached size (px)")
    scale.add_argument("--image-px", type=int, default=96, help="side of the generated source images")
    scale.add_argument("--budget-mib", type=int, default=32, help="streaming memory budget")
    scale.add_argument("--plot", type=Path, default=Path("scale.png"), help="log-log figure")
    scale.add_argument("--work-dir", type=Path, help="where the generated data goes (default: the temp folder)")
    scale.add_argument("--json", type=Path, help="also write the figures here")
    add_progress_flags(scale)

    gpu = sub.add_parser("gpu", prog="python -m train.bench gpu", help="the one-command GPU check",
                         description="CUDA tests, augmentation, loader placements, training steps and a compiled "
                                     "demo run, each recorded even when another fails")
    gpu.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --quick: checks the wiring)")
    gpu.add_argument("--quick", action="store_true",
                     help="tiny sizes and counts, no pytest, a one-epoch demo without --compile")
    gpu.add_argument("--part", nargs="+", metavar="NAME", choices=(*GPU_PARTS, "all"), default=None,
                     help=f"the parts to run, in the check's order: {', '.join(GPU_PARTS)}; or all (default: "
                          f"{' '.join(GPU_DEFAULT_PARTS)}, one call of under 8 minutes on an H200)")
    gpu.add_argument("--work-dir", type=Path, help="where the caches and the demo run go (default: the temp folder)")
    gpu.add_argument("--json", type=Path, help="also write the figures here")
    add_progress_flags(gpu)

    recipe = sub.add_parser("recipe", prog="python -m train.bench recipe",
                            help="the preset recipe timed at the dataset's scale",
                            description="the model's preset recipe (train.run without --stages) on a synthetic "
                                        "source of the Kaggle C-NMC download's shape: build, epochs per stage, "
                                        "evaluation, totals measured and projected, and the report's per-image "
                                        "loader for the ratio; every part recorded even when another fails")
    recipe.add_argument("--model", default="resnet18", help="resnet18 (default), resnet50 or resnet152")
    recipe.add_argument("--epochs", type=int, help="train only the first N epochs of each stage (compiled: at least "
                                                    "2) and project the rest (default: the whole recipe)")
    recipe.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    recipe.add_argument("--quick", action="store_true",
                        help="tiny images and sizes (32/48 px), 1 epoch per stage: checks the wiring")
    recipe.add_argument("--scale", type=float, default=1.0,
                        help="build and train on this fraction of the dataset's images and project per-image costs "
                             "to the whole (default 1)")
    recipe.add_argument("--recipe", default="report", help="the training options' recipe: report (default) or modern")
    recipe.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile as train.run --compile (default: on CUDA only)")
    recipe.add_argument("--report-images", type=int,
                        help="time the report's loader on this many images per stage and project the pass "
                             "(default: the whole training split)")
    recipe.add_argument("--work-dir", type=Path,
                        help="where the source is kept (reused by the next run) and the cache and run go while "
                             "it runs (default: the temp folder)")
    recipe.add_argument("--json", type=Path, help="also write the figures here")
    add_progress_flags(recipe)

    peers = sub.add_parser("peers", prog="python -m train.bench peers",
                           help="GpuAugment against Kornia, torchvision v2 and the report's DataLoader",
                           description="the same uint8 batch through GpuAugment and its peers, alone and feeding "
                                       "ResNet18 training steps; every row recorded even when another fails")
    peers.add_argument("--device", default="cpu", help="cpu or cuda")
    peers.add_argument("--size", type=int, help="output px (default 224; 64 with --quick)")
    peers.add_argument("--batch-size", type=int,
                       help="images per batch (default 256 on CUDA, 64 on the CPU, 8 with --quick)")
    peers.add_argument("--quick", action="store_true", help="tiny size, batch and counts: checks the wiring")
    peers.add_argument("--json", type=Path, help="also write the figures here")
    add_progress_flags(peers)

    kernels = sub.add_parser("kernels", prog="python -m train.bench kernels",
                             help="kernels and bytes per image of each form of the augmentation",
                             description="the passes over the batch of each form of the augmentation, read from the "
                                         "code Inductor generates, and ms per image in the same run")
    kernels.add_argument("--device", default="cpu", help="cpu or cuda")
    kernels.add_argument("--size", type=int, default=224, help="output px")
    kernels.add_argument("--batch-size", type=int, default=16)
    kernels.add_argument("--calls", type=int, default=3, help="timed calls per form")
    kernels.add_argument("--bf16", action="store_true", help="write bf16 (what an AMP step asks for)")
    kernels.add_argument("--json", type=Path, help="also write the figures here")
    return p


def _cuda_missing(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    import torch
    if torch.cuda.is_available():
        return False
    print(f"error: --device {device} asked for, but torch sees no CUDA device; use --device cpu", file=sys.stderr)
    return True


def _part_reporter(label: str, key: str, json_path: Path | None):
    """The callback a benchmark made of parts calls after each: one line on stderr for the part that ended, and
    `json_path` rewritten with what is done, so a run stopped by a time limit keeps the parts it finished."""
    def report(partial: dict) -> None:
        name, part = list(partial[key].items())[-1]
        print(f"{label}: {name} {part['status']} in {part['seconds']} s", file=sys.stderr, flush=True)
        if json_path:
            json_path.write_text(json.dumps(partial, indent=2) + "\n")
    return report


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The copied sample has too few patients for a grouped split; the build's warning would repeat each run.
    logging.getLogger("pipeline.split").setLevel(logging.ERROR)
    code = 0
    if args.command == "loader":
        from train.bench import loader as bench_loader
        if _cuda_missing(args.device):
            return 2
        try:
            result = bench_loader.run(device=args.device, size=args.size, batch_size=args.batch_size,
                                      images=args.images, workers=args.workers, train_models=not args.no_training,
                                      progress=args.progress)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(bench_loader.report(result))
    elif args.command == "scale":
        from train.bench import scale as bench_scale
        result = bench_scale.run(counts=args.counts, size=args.size, image_px=args.image_px,
                                 budget_bytes=args.budget_mib * 2**20, work_dir=args.work_dir, plot=args.plot,
                                 progress=args.progress)
        print(bench_scale.report(result))
        print(args.plot)
    elif args.command == "recipe":
        from train.bench import recipe as bench_recipe
        if _cuda_missing(args.device):
            return 2

        try:
            result = bench_recipe.run(model=args.model, epochs=args.epochs, device=args.device, quick=args.quick,
                                      work_dir=args.work_dir, scale=args.scale, compile_=args.compile,
                                      recipe=args.recipe, report_images=args.report_images,
                                      progress=args.progress,
                                      on_part=_part_reporter("recipe", "parts", args.json))
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(bench_recipe.report(result))
        code = 0 if result["ok"] else 1
    elif args.command == "peers":
        from train.bench import peers as bench_peers
        if _cuda_missing(args.device):
            return 2
        try:
            bench_peers.plan_for(args.device, args.quick, args.size, args.batch_size)  # bad flags: exit 2 at once
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        result = bench_peers.run(device=args.device, size=args.size, batch_size=args.batch_size, quick=args.quick,
                                 progress=args.progress)
        print(bench_peers.report(result))
    elif args.command == "kernels":
        from train.bench import kernels as bench_kernels
        if _cuda_missing(args.device):
            return 2
        if args.size < 2 or args.batch_size < 1 or args.calls < 1:
            print(f"error: --size must be >= 2 and --batch-size, --calls >= 1 (got {args.size}, {args.batch_size}, "
                  f"{args.calls})", file=sys.stderr)
            return 2
        import torch
        result = bench_kernels.run(device=args.device, size=args.size, batch_size=args.batch_size, calls=args.calls,
                                   out_dtype=torch.bfloat16 if args.bf16 else torch.float32)
        print(bench_kernels.report(result))
        code = 1 if any("error" in row for row in result["rows"]) else 0
    else:
        from train.bench import gpu as bench_gpu
        if _cuda_missing(args.device):
            return 2
        result = bench_gpu.run(device=args.device, quick=args.quick, work_dir=args.work_dir,
                               progress=args.progress,
                               on_stage=_part_reporter("gpu check", "stages", args.json), parts=args.part)
        print(bench_gpu.report(result))
        code = 0 if result["ok"] else 1
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
