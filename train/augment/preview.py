"""What the preprocessing and the augmentation do to a few cells, drawn as one PNG grid (`python -m train.preview`).

One row per cell (both classes, labelled with class and patient): the original image, after CLAHE, after unsharp
masking, the stored (cached) image with the centre training window outlined, the eval view, and four training views
from GpuAugment with a fixed seed, each with its parameters. With a cache the stored image is read from the cache and
the preprocessing parameters are the cache's; otherwise both come from the same functions and defaults the build
uses. It lives in train/ because it draws GpuAugment's views, and pipeline/ never imports train/ or torch.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config import MAX_SIZE_PX, PreprocessConfig
from pipeline.preprocess import ImageError, center_crop, clahe_per_channel, enhance, read_bgr, stored_image
from pipeline.progress import progress_bar
from pipeline.sources import SourceError, discover
from pipeline.store import CacheError, CacheReader
from train.augment import OPS, AugParams, GpuAugment
from train.augment.figure_file import check_out, write_figure

log = logging.getLogger(__name__)
AUG_VIEWS = 4
COLUMNS = ("original", "after CLAHE", "after unsharp mask", "stored (train window)", "eval view") + tuple(
    f"train view {i + 1}" for i in range(AUG_VIEWS))
CELL_IN = 1.75  # inches per grid cell at 100 dpi: 175 px, legible at 100%
DPI = 100
ROW_IN, TITLE_IN = CELL_IN + 0.45, 0.3  # a row with its captions; the column titles (the figure's height, `render`)
# matplotlib's Agg canvas refuses an image of 2**16 px or more in either direction: the most rows one PNG holds
MAX_ROWS = int((2**16 / DPI - TITLE_IN) // ROW_IN)


class PreviewError(ValueError):
    """Bad arguments or inputs; the message says what to pass instead."""


def pick_cells(cells: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """`n` labelled cells, the classes alternating (all, hem, ...) as far as each has cells; chosen by `seed`."""
    labelled = cells[cells["label"] >= 0]
    by_class = [labelled[labelled["label"] == c].sample(frac=1, random_state=seed) for c in (1, 0)]
    if any(len(b) == 0 for b in by_class):
        raise PreviewError("the source needs labelled cells of both classes (all and hem) for a preview")
    order = [b.iloc[i] for i in range(n) for b in by_class if i < len(b)][:n]
    return pd.DataFrame(order).reset_index(drop=True)


def _cells_from_source(source: Path) -> tuple[Path, pd.DataFrame]:
    try:
        src = discover(source)
    except SourceError as err:
        raise PreviewError(str(err)) from err
    return src.root, pd.DataFrame([{"path": it.path, "label": it.label, "patient": it.patient} for it in src.items])


def _cache_index(reader: CacheReader, size: int) -> dict[str, tuple[str, int, int]]:
    """{cached path: (split, shard, row)} at `size`, each shard's paths read once (not once per cell)."""
    index = {}
    for split in reader.splits:
        for shard in range(len(reader.shards(size, split))):
            with reader.open_shard(size, split, shard) as f:
                for row, path in enumerate(f["paths"].asstr()[()]):
                    index.setdefault(path, (split, shard, row))
    return index


def _cached_image(reader: CacheReader, size: int, rel_path: str, index: dict) -> np.ndarray:
    """The stored image of `rel_path` at `size`, read from the cache's (checked) shards."""
    if rel_path not in index:
        raise PreviewError(f"{rel_path} is not in the cache (left out with --on-error skip?)")
    split, shard, row = index[rel_path]
    with reader.open_shard(size, split, shard) as f:
        return f["images"][row]


def _describe(p: AugParams, i: int) -> str:
    flips = "".join(name for name, on in (("H", p.hflip[i]), ("V", p.vflip[i])) if on) or "no"
    order = ">".join(OPS[op][0] for op in p.orders()[i].tolist())
    return (f"flip {flips}, rot {float(p.angle_deg[i]):+.0f}°\n"
            f"b {float(p.brightness[i]):.2f} c {float(p.contrast[i]):.2f} s {float(p.saturation[i]):.2f} "
            f"h {float(p.hue[i]):+.2f}\norder {order}")


def cell_panels(bgr: np.ndarray, stored: np.ndarray, config: PreprocessConfig, size: int,
                generator: torch.Generator) -> tuple[list[np.ndarray], list[str]]:
    """The row's images (RGB uint8 or float in [0, 1]) and the captions of its training views."""
    h, w = bgr.shape[:2]
    if h != w:  # as the build: a non-square image is centre-cropped to a square first
        bgr = center_crop(bgr, min(h, w))
    rgb = bgr[:, :, ::-1]
    clahe = clahe_per_channel(bgr, config.clahe_clip, config.clahe_tiles)[:, :, ::-1]
    enhanced = enhance(bgr, config)
    margin = (stored.shape[0] - size) // 2
    eval_view = stored[margin:margin + size, margin:margin + size]
    # mean 0, std 1: the augmented views come back in [0, 1], ready to show
    augment = GpuAugment(size, stored.shape[0], [0.0] * 3, [1.0] * 3, cpu_threads=1)
    params = augment.sample(AUG_VIEWS, generator)
    batch = torch.from_numpy(np.ascontiguousarray(stored)).permute(2, 0, 1)[None].expand(AUG_VIEWS, -1, -1, -1)
    views = augment.apply(batch.contiguous(memory_format=torch.channels_last), params)
    views = views.permute(0, 2, 3, 1).clamp(0, 1).numpy()
    return ([rgb, clahe, enhanced, stored, eval_view] + list(views),
            [_describe(params, i) for i in range(AUG_VIEWS)])


def render(rows: list[dict], size: int, out: Path, progress="off") -> None:
    """One figure row per cell: rows of {panels, captions, label, margin}. `progress`: one step per row drawn and
    one for the writing (matplotlib spends most of a large grid's time making its axes and writing the PNG: 288 rows
    took minutes on a 2-core machine, seconds for the cells themselves)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle
    n_rows, n_cols = len(rows), len(COLUMNS)
    fig = plt.figure(figsize=(n_cols * CELL_IN, n_rows * ROW_IN + TITLE_IN), dpi=DPI)
    grid = fig.add_gridspec(n_rows, n_cols)  # as plt.subplots lays them out, made row by row to show progress
    bar = progress_bar(progress, n_rows + 1, "drawing", "row", log)
    try:
        for r, row in enumerate(rows):
            axes = [fig.add_subplot(grid[r, c]) for c in range(n_cols)]
            for c, (ax, image) in enumerate(zip(axes, row["panels"])):
                ax.imshow(image, interpolation="nearest" if image.shape[0] <= size else "antialiased")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(COLUMNS[c], fontsize=9)
                if c == 3:  # the centre window training crops from
                    m = row["margin"]
                    ax.add_patch(Rectangle((m - 0.5, m - 0.5), size, size, fill=False, edgecolor="yellow", lw=1.2))
                if c >= 5:
                    ax.set_xlabel(row["captions"][c - 5], fontsize=7.5)
            axes[0].set_ylabel(row["label"], fontsize=8)
            bar.update(1)
        fig.tight_layout(pad=0.4)
        fig.savefig(out)
        bar.update(1)
    finally:
        bar.close()
        plt.close(fig)


def _check_numbers(n: int, size: int, seed: int) -> None:
    if n < 1:
        raise PreviewError(f"--n must be >= 1 (the cells shown, one row each), got {n}")
    if not 1 <= size <= MAX_SIZE_PX:
        raise PreviewError(f"--size must be a size in px from 1 to {MAX_SIZE_PX}, got {size}")
    if not 0 <= seed < 2**32:
        raise PreviewError(f"--seed must be an integer in [0, 2**32), got {seed}")


def rows_shown(n: int, cells: pd.DataFrame) -> int:
    """`n`, capped to the labelled cells there are and to the rows one PNG can hold; a cap is said in one line."""
    labelled = int((cells["label"] >= 0).sum())
    if not labelled:  # pick_cells says what a preview needs
        return min(n, MAX_ROWS)
    shown = min(n, labelled, MAX_ROWS)
    if shown < n:
        why = (f"there are {labelled} labelled cells" if shown == labelled else
               f"one PNG holds at most {MAX_ROWS} rows (matplotlib's limit of 2**16 px)")
        log.warning("--n %d: %s; showing %d", n, why, shown)
    return shown


def preview(source: Path | None, cache: Path | None, n: int, size: int, seed: int, out: Path, *,
            overwrite: bool = False, progress="off") -> list[dict]:
    """Make the preview PNG at `out` (never replacing a file unless `overwrite`); returns its rows (panels, captions,
    label) for inspection. `progress`: pipeline.progress's mode, one step per cell."""
    if (source is None) == (cache is None):
        raise PreviewError("pass --source PATH (a source folder the build understands) or --cache PATH (a cache)")
    _check_numbers(n, size, seed)
    check_out(out, overwrite)
    reader = None
    if cache is not None:
        try:
            reader = CacheReader(cache)
        except CacheError as err:
            raise PreviewError(str(err)) from err
        if str(size) not in reader.manifest["sizes"]:
            raise PreviewError(f"size {size} is not in {cache} (cached: "
                               f"{' '.join(sorted(reader.manifest['sizes'], key=int))}); pass one of those as --size")
        config = PreprocessConfig.from_dict(reader.manifest["config"])
        root = Path(reader.manifest["source"]["root"])
        cells = pd.read_csv(Path(cache) / "split.csv", dtype={"patient": str})
    else:
        config = PreprocessConfig()
        root, cells = _cells_from_source(source)
    geometry = config.geometry(size)
    generator = torch.Generator().manual_seed(seed)
    chosen = pick_cells(cells, rows_shown(n, cells), seed)
    index = _cache_index(reader, size) if reader is not None else None
    rows = []
    bar = progress_bar(progress, len(chosen), "cells", "cell", log)
    try:
        for _, cell in chosen.iterrows():
            path = root / cell["path"]
            try:
                bgr = read_bgr(path)
            except ImageError as err:
                raise PreviewError(f"{path}: {err}") from err
            if reader is not None:
                stored = _cached_image(reader, size, cell["path"], index)
            else:
                square = center_crop(bgr, min(bgr.shape[:2]))
                stored = stored_image(enhance(square, config), geometry, config.reference_px)
            panels, captions = cell_panels(bgr, stored, config, size, generator)
            label = f"{'all (leukemic)' if cell['label'] == 1 else 'hem (normal)'}\npatient {cell['patient']}\n" \
                    f"{Path(cell['path']).name}"
            rows.append({"panels": panels, "captions": captions, "label": label, "margin": geometry.margin})
            bar.update(1)
    finally:
        bar.close()
    write_figure(out, lambda path: render(rows, size, path, progress), overwrite)
    return rows
