"""Build benchmark: what the cache build costs against the bare OpenCV work on the same images, one run.

Prints per-image costs, the HDF5 + joblib overhead over bare OpenCV, and the speedup of 2 jobs over 1 for the
thread and process backends.
"""
from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2

from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.preprocess import preprocess_file
from pipeline.progress import progress_bar

log = logging.getLogger(__name__)

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cnmc-sample"


def bench_source(folder: Path, images: int, cache_root: Path) -> tuple[Path, str]:
    """A class-folder source of `images` BMPs: copies of the real sample when present, else of the demo."""
    if SAMPLE.is_dir():
        originals, origin = sorted(SAMPLE.glob("*/*.bmp")), f"real C-NMC sample ({SAMPLE})"
    else:
        from pipeline.demo import ensure_demo_source
        originals, origin = sorted(ensure_demo_source(cache_root).rglob("*.bmp")), "synthetic demo images"
    # Alternate the classes, so that even a small count has both (the real sample is 2:1 all:hem); each copy keeps
    # its own class.
    by_class = [[p for p in originals if p.name.endswith("_all.bmp")],
                [p for p in originals if not p.name.endswith("_all.bmp")]]
    originals = [p for pair in itertools.zip_longest(*by_class) for p in pair if p is not None]
    for i in range(images):
        src = originals[i % len(originals)]
        cls = "all" if src.name.endswith("_all.bmp") else "hem"
        dst = folder / cls / f"{i:06d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return folder, origin


def bare_opencv_s_per_img(paths: list[Path], config: PreprocessConfig, sizes: tuple[int, ...]) -> float:
    cv2.setNumThreads(1)
    start = time.perf_counter()
    for path in paths:
        preprocess_file(str(path), config, sizes)
    return (time.perf_counter() - start) / len(paths)


def timed_build(source: Path, cache_root: Path, sizes, jobs: int, backend: str) -> float:
    shutil.rmtree(cache_root, ignore_errors=True)
    start = time.perf_counter()
    report = build(PreprocessConfig(), BuildOptions(sizes=sizes, source=source, cache_root=cache_root, jobs=jobs,
                                                    backend=backend, progress=False))
    assert not report.reused and report.images > 0
    return time.perf_counter() - start


def run(images: int = 384, sizes=(128, 224), work_dir: Path | None = None, progress="off") -> dict:
    sizes = tuple(sizes)
    bar = progress_bar(progress, 4, "build benchmark", "part", log)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        tmp = Path(tmp)
        source, origin = bench_source(tmp / "source", images, tmp / "demo")
        paths = sorted(source.rglob("*.bmp"))
        config = PreprocessConfig()
        preprocess_file(str(paths[0]), config, sizes)  # warm-up: imports, OpenCV's first-call setup
        bare = bare_opencv_s_per_img(paths, config, sizes)
        bar.update()
        runs = {}
        for jobs, backend in [(1, "threads"), (2, "threads"), (2, "processes")]:
            runs[(jobs, backend)] = timed_build(source, tmp / "cache", sizes, jobs, backend)
            bar.update()
    bar.close()
    one = runs[(1, "threads")]
    return {
        "images": images, "sizes": list(sizes), "origin": origin, "cpu_count": os.cpu_count(),
        "bare_opencv_ms_per_img": bare * 1e3,
        "build_jobs1_ms_per_img": one / images * 1e3,
        "overhead_vs_opencv": one / images / bare - 1,
        "build_jobs2_threads_s": runs[(2, "threads")], "build_jobs2_processes_s": runs[(2, "processes")],
        "build_jobs1_s": one,
        "speedup_jobs2_threads": one / runs[(2, "threads")],
        "speedup_jobs2_processes": one / runs[(2, "processes")],
    }


def report(r: dict) -> str:
    return "\n".join([
        f"build benchmark: {r['images']} images ({r['origin']}), sizes {r['sizes']}, {r['cpu_count']} cores",
        f"  bare OpenCV (read, CLAHE, unsharp, crop, resize), 1 thread: {r['bare_opencv_ms_per_img']:.2f} ms/img",
        f"  build --jobs 1:                  {r['build_jobs1_ms_per_img']:.2f} ms/img  "
        f"(HDF5 + joblib overhead {r['overhead_vs_opencv'] * 100:+.1f}%)",
        f"  build --jobs 2 --backend threads:   {r['build_jobs2_threads_s']:.2f} s  "
        f"speedup {r['speedup_jobs2_threads']:.2f}x over --jobs 1",
        f"  build --jobs 2 --backend processes: {r['build_jobs2_processes_s']:.2f} s  "
        f"speedup {r['speedup_jobs2_processes']:.2f}x over --jobs 1",
    ])
