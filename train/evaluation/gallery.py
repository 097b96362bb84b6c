"""A grid of cells as one PNG: per cell one or more pictures side by side (the evaluation view, a map over it) and a
caption (the call, its probability, the label, the patient, the file). `train.explain` and the evaluation's
mistakes figure draw through it, so both read the same way.

The PNG is drawn into a temporary file beside the target and renamed into place, so a kill leaves the old figure or
the new one, never half of one; `replace=False` refuses to write over a file that exists (an explanation the user
asked for is never lost to a second command)."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from train.augment.figure_file import write_figure  # noqa: E402
from train.evaluation.metrics import THRESHOLD  # noqa: E402
from train.evaluation.picks import CLASS_NAMES  # noqa: E402

PANEL_IN = 1.7  # inches per picture at 100 dpi: 170 px, legible at 100% whatever the cell's size in px
CAPTION_IN = 0.5  # three caption lines at 7.5 pt
GAP_IN = 0.12  # between tiles
TITLE_CHAR_IN = 0.075  # the width of an average character of the 9.5 pt title, with some room
DPI = 100
NAME_CHARS = 30  # a longer file name is shortened in the middle, keeping both ends


@dataclass(frozen=True)
class Tile:
    """One cell: its pictures, left to right ((H, W, 3) uint8 RGB each), and the facts under them."""
    panels: tuple[np.ndarray, ...]
    name: str  # file name
    patient: str
    prob_all: float
    label: int  # 0 hem, 1 all, -1 unknown
    kind: str  # why it was chosen (`picks`)


def short_name(name: str, chars: int = NAME_CHARS) -> str:
    if len(name) <= chars:
        return name
    keep = chars - 1
    return f"{name[:keep // 2]}…{name[len(name) - (keep - keep // 2):]}"


def caption(tile: Tile) -> str:
    """Why it is shown and the call (`mistake: all called hem`), the probability and patient, the file name."""
    call = CLASS_NAMES[int(tile.prob_all >= THRESHOLD)]
    verdict = f"{CLASS_NAMES[tile.label]} called {call}" if tile.label >= 0 else f"called {call} (no label)"
    return f"{tile.kind}: {verdict}\np(all) {tile.prob_all:.3f}, patient {tile.patient}\n{short_name(tile.name)}"


def _joined(panels: tuple[np.ndarray, ...]) -> np.ndarray:
    """The panels side by side with a white gap of 1/32 of their width (at least 1 px)."""
    gap = np.full((panels[0].shape[0], max(1, panels[0].shape[1] // 32), 3), 255, np.uint8)
    parts = [panels[0]]
    for panel in panels[1:]:
        parts += [gap, panel]
    return np.concatenate(parts, axis=1)


def draw(tiles: list[Tile], title: str, out: Path, columns: int, replace: bool, colorbar: str | None = None,
         empty_text: str = "no cells") -> None:
    """Draw `tiles` in rows of `columns` under `title` and write the PNG to `out` (see the module docstring).

    Every box is placed by hand on a fixed grid of inches: the evaluation draws this after every run, and with
    matplotlib's constrained layout measuring the captions 16 mistakes took 2.3 s, placed by hand 0.9 s (2-core
    machine, busy)."""
    panels = max((len(t.panels) for t in tiles), default=1)
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    tile_w, tile_h = panels * PANEL_IN * 1.04, PANEL_IN + CAPTION_IN  # 1.04: room for the gaps between panels
    width = max(columns * (tile_w + GAP_IN) + GAP_IN, 6.0)
    # a title wider than a narrow grid wraps instead of running off the figure
    title = "\n".join(textwrap.fill(line, int(width / TITLE_CHAR_IN)) for line in title.splitlines())
    title_h, bar_h = 0.18 * (title.count("\n") + 1) + 0.2, (0.75 if colorbar else 0.0)
    height = title_h + rows * (tile_h + GAP_IN) + bar_h
    fig = plt.figure(figsize=(width, height), dpi=DPI)
    fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=9.5)
    if not tiles:
        fig.text(0.5, (bar_h + rows * tile_h / 2) / height, empty_text, ha="center", va="center", fontsize=11)
    for k, tile in enumerate(tiles):
        left = GAP_IN + (k % columns) * (tile_w + GAP_IN)
        top = height - title_h - (k // columns) * (tile_h + GAP_IN)  # inches from the bottom
        image = _joined(tile.panels)
        image_w = PANEL_IN * image.shape[1] / image.shape[0]  # the gap between panels widens the picture a little
        ax = fig.add_axes((left / width, (top - tile_h) / height, image_w / width, PANEL_IN / height))
        ax.axis("off")
        # a small view is enlarged: show its pixels as they are rather than a blur the model never saw
        ax.imshow(image, interpolation="nearest" if image.shape[0] < PANEL_IN * DPI else "antialiased",
                  aspect="auto")
        wrong = tile.label >= 0 and int(tile.prob_all >= THRESHOLD) != tile.label
        fig.text(left / width, (top - 0.04) / height, caption(tile), ha="left", va="top", fontsize=7.5,
                 color="firebrick" if wrong else "black")
    if colorbar:
        bar_ax = fig.add_axes((0.3, 0.42 / height, 0.4, 0.1 / height))
        mappable = plt.cm.ScalarMappable(cmap="jet", norm=matplotlib.colors.Normalize(0, 1))
        bar = fig.colorbar(mappable, cax=bar_ax, orientation="horizontal")
        bar.set_label(colorbar, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    try:
        write_png(fig, Path(out), replace)
    finally:
        plt.close(fig)


def write_png(fig, out: Path, replace: bool) -> None:
    """`fig` to a temporary file beside `out`, then renamed to `out` (figure_file.write_figure, the rule of every
    figure command); with `replace=False` an `out` that exists is left as it is (FigureOutError)."""
    write_figure(out, lambda tmp: fig.savefig(tmp, format="png"), overwrite=replace)
