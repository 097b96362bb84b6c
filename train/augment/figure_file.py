"""Where a figure command writes its `--out`, one rule for every such command (train.preview, train.compare), as
train.predict treats its CSVs: an existing file is never replaced unless `--overwrite` is given, the folder must
exist, and the name must end in a format matplotlib writes - all checked before any work. The figure is drawn to a
temporary file and renamed into place, so a failure leaves the old file (or none), never half of one.

It lives in the augment room because that is the one room both figure-drawing rooms (augment, evaluation) may
import."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


class FigureOutError(ValueError):
    """An --out the command will not write; the message says what to pass instead."""


def formats() -> tuple[str, ...]:
    """The file suffixes matplotlib's default canvas writes (png, pdf, svg, ...)."""
    from matplotlib.figure import Figure
    return tuple(sorted(Figure().canvas.get_supported_filetypes()))


def check_out(out: Path, overwrite: bool = False) -> None:
    """FigureOutError unless the command may write `out` (see the module's rule)."""
    out = Path(out)
    if out.is_dir():
        raise FigureOutError(f"--out {out} is a folder; pass a file name in it, e.g. {out / 'figure.png'}")
    if os.path.lexists(out) and not overwrite:
        raise FigureOutError(f"--out {out} already exists; it is never replaced silently: pass another --out, or "
                             f"--overwrite to replace it")
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in formats():
        raise FigureOutError(f"--out {out}: {'no file type' if not suffix else f'.{suffix} is not a figure format'}; "
                             f"end the name in one of {', '.join('.' + f for f in formats())}, e.g. "
                             f"{out.with_suffix('.png').name}")
    folder = out.parent
    if not folder.is_dir():
        raise FigureOutError(f"--out {out}: folder {folder} does not exist; create it (mkdir -p {folder}) or pass "
                             f"another --out")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FigureOutError(f"--out {out}: folder {folder} is not writable; pass --out in a writable folder")


def write_figure(out: Path, draw: Callable[[Path], None], overwrite: bool = False) -> None:
    """`draw(path)` saves the figure to a temporary file beside `out` (same suffix, so matplotlib writes the same
    format), which is then renamed to `out`; refused as `check_out` refuses, checked again before the rename."""
    out = Path(out)
    check_out(out, overwrite)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    try:
        draw(tmp)
        if os.path.lexists(out) and not overwrite:  # made by something else meanwhile: still not ours to replace
            raise FigureOutError(f"--out {out} appeared while the figure was drawn and was left as it is; pass "
                                 f"another --out, or --overwrite")
        os.replace(tmp, out)
    except OSError as err:
        raise FigureOutError(f"cannot write {out}: {err.strerror or err}; pass --out in a writable folder with free "
                             f"space") from None
    finally:
        if tmp.exists():
            tmp.unlink()
