"""Scale benchmark (`python -m train.bench scale`): build seconds, cache bytes, loader images/s and peak RSS
on generated data of growing size, each loader measurement in a fresh process so its peak RSS is its own.

`python -m train.bench.scale --measure CACHE ...` is that child process (internal; run by `measure_loader`).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.build import BuildOptions, build
from pipeline.config import PreprocessConfig
from pipeline.demo import write_synthetic_source
from pipeline.progress import progress_bar

# the child runs here, so that it imports this checkout's train package (the file is train/bench/scale.py)
REPO_ROOT = Path(__file__).resolve().parents[2]

log = logging.getLogger(__name__)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak_rss() -> int:
    """Set the peak-RSS mark to the current RSS (Linux: clear_refs 5) and return the current RSS.

    Without the reset, a transient peak during imports would hide whatever the data adds afterwards."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _rss_peak_bytes() -> int:
    try:
        return _status_bytes("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def measure_loader(cache_dir: Path, size: int, mode: str, budget_bytes: int | None, batch_size: int = 64,
                   epochs: int = 1) -> dict:
    """In a child process: images/s over `epochs` training epochs, and peak RSS above the set-up baseline."""
    cmd = [sys.executable, "-m", "train.bench.scale", "--measure", str(cache_dir), "--size", str(size),
           "--mode", mode, "--batch-size", str(batch_size), "--epochs", str(epochs)]
    if budget_bytes is not None:
        cmd += ["--budget", str(budget_bytes)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_main(args) -> None:
    import torch

    from train.data.loader import CacheLoader
    torch.set_num_threads(1)
    loader = CacheLoader(args.measure, args.size, "train", args.batch_size, train=True, mode=args.mode,
                         memory_budget_bytes=args.budget)
    # The baseline: interpreter, torch, h5py and the loader's metadata; everything after is the data's footprint.
    baseline = _reset_peak_rss()
    count, start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        for images, _ in loader:
            count += images.shape[0]
    seconds = time.perf_counter() - start
    print(json.dumps({"mode": loader.mode, "images": count, "imgs_per_s": count / seconds,
                      "peak_rss_above_baseline": _rss_peak_bytes() - baseline, "baseline_rss": baseline,
                      "window_images": loader.window_images, "image_bytes": loader.image_bytes}))


def run(counts=(1000, 4000, 16000), size: int = 64, image_px: int = 96, budget_bytes: int = 32 * 2**20,
        work_dir: Path | None = None, plot: Path | None = None, progress="off") -> list[dict]:
    rows = []
    bar = progress_bar(progress, len(counts), "scale benchmark", "source", log)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        for count in counts:
            source = write_synthetic_source(Path(tmp) / f"src-{count}", count, image_px)
            start = time.perf_counter()
            report = build(PreprocessConfig(), BuildOptions(sizes=(size,), source=source,
                                                            cache_root=Path(tmp) / "cache", progress=False))
            build_s = time.perf_counter() - start
            cache_bytes = sum(p.stat().st_size for p in report.cache_dir.rglob("*.h5"))
            # Two epochs: the resident mode's first includes reading the whole split.
            streaming = measure_loader(report.cache_dir, size, "streaming", budget_bytes, epochs=2)
            resident = measure_loader(report.cache_dir, size, "resident", None, epochs=2)
            rows.append({"images": count, "build_s": build_s, "cache_bytes": cache_bytes,
                         "streaming_imgs_per_s": streaming["imgs_per_s"],
                         "streaming_peak_rss_bytes": streaming["peak_rss_above_baseline"],
                         "resident_imgs_per_s": resident["imgs_per_s"],
                         "resident_peak_rss_bytes": resident["peak_rss_above_baseline"],
                         "budget_bytes": budget_bytes})
            import shutil
            shutil.rmtree(source)
            shutil.rmtree(report.cache_dir)
            bar.update()
    bar.close()
    if plot is not None:
        _plot(rows, plot)
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = [r["images"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.loglog(n, [r["build_s"] for r in rows], "o-", label="build seconds")
    ax.loglog(n, [r["cache_bytes"] / 2**20 for r in rows], "s-", label="cache MiB")
    ax.loglog(n, [max(r["streaming_peak_rss_bytes"], 1) / 2**20 for r in rows], "^-",
              label="streaming peak RSS above baseline, MiB")
    ax.loglog(n, [max(r["resident_peak_rss_bytes"], 1) / 2**20 for r in rows], "v--",
              label="resident peak RSS above baseline, MiB")
    ax.axhline(rows[0]["budget_bytes"] / 2**20, color="gray", ls=":", label="streaming memory budget")
    ax.set_xlabel("images in the source")
    ax.set_ylabel("seconds / MiB")
    ax.set_title("cost against data size (log-log)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report(rows: list[dict]) -> str:
    lines = ["| images | build s | build ms/img | cache MiB | streaming img/s | streaming peak RSS MiB | "
             "resident img/s | resident peak RSS MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['images']} | {r['build_s']:.1f} | {r['build_s'] / r['images'] * 1e3:.2f} | "
                     f"{r['cache_bytes'] / 2**20:.1f} | {r['streaming_imgs_per_s']:.0f} | "
                     f"{r['streaming_peak_rss_bytes'] / 2**20:.1f} | {r['resident_imgs_per_s']:.0f} | "
                     f"{r['resident_peak_rss_bytes'] / 2**20:.1f} |")
    lines.append(f"(streaming memory budget {rows[0]['budget_bytes'] / 2**20:.0f} MiB; peak RSS is measured above "
                 f"each child process's baseline after imports and loader set-up)")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m train.bench.scale",
                                description="internal: one loader measurement for `python -m train.bench scale`")
    p.add_argument("--measure", type=Path, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--mode", required=True)
    p.add_argument("--budget", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    _measure_main(p.parse_args())
