"""Progress output that suits where it goes: `--progress auto|on|off` for every long-running command.

- on: tqdm bars on stderr (carriage-return redraws: for a terminal).
- auto (the default): bars when stderr is a terminal; otherwise plain log lines, at most one per `every_fraction`
  of the work or per `every_s` seconds, so a log file gets a readable record instead of redraws.
- off: no progress output (results, warnings and errors still print). `--no-progress` is kept as its alias.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

MODES = ("auto", "on", "off")


def add_progress_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--progress", choices=MODES, default="auto",
                        help="progress bars (on), plain log lines (the default when stderr is not a terminal), "
                             "or nothing (off); default auto: bars only on a terminal")
    parser.add_argument("--no-progress", dest="progress", action="store_const", const="off",
                        default=argparse.SUPPRESS, help="the same as --progress off")


def normalise(mode) -> str:
    """A mode from MODES; True/False (the older boolean options) mean auto/off."""
    if mode is True:
        return "auto"
    if mode is False or mode is None:
        return "off"
    if mode not in MODES:
        raise ValueError(f"progress must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def bars(mode, stream=None) -> bool:
    """Whether to draw tqdm bars: on, or auto with a terminal on `stream` (stderr)."""
    mode = normalise(mode)
    if mode != "auto":
        return mode == "on"
    isatty = getattr(stream or sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def lines(mode, stream=None) -> bool:
    """Whether to log plain progress lines instead: auto without a terminal."""
    return normalise(mode) == "auto" and not bars(mode, stream)


class LineProgress:
    """tqdm's `update`/`close` as plain log lines: at most one per `every_fraction` of `total` or `every_s` seconds,
    and one at the end."""

    def __init__(self, total: int, desc: str, unit: str, log: logging.Logger, every_fraction: float = 0.1,
                 every_s: float = 30.0, clock=time.monotonic):
        self.total, self.desc, self.unit, self.log = total, desc, unit, log
        self.every_fraction, self.every_s, self.clock = every_fraction, every_s, clock
        self.n = 0
        self._start = self._last_time = clock()
        self._last_n = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        step = self.every_fraction * self.total
        if self.n < self.total and self.n - self._last_n < step and now - self._last_time < self.every_s:
            return
        if self.n >= self.total and self._last_n >= self.total:
            return
        self._emit(now)

    def _emit(self, now: float) -> None:
        elapsed = now - self._start
        rate = f", {self.n / elapsed:.0f} {self.unit}/s" if elapsed > 0 else ""
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        self.log.info("%s: %d/%d %s%s, %.1f s%s", self.desc, self.n, self.total, self.unit, share, elapsed, rate)
        self._last_n, self._last_time = self.n, now

    def close(self) -> None:
        if self.n and self._last_n != self.n:
            self._emit(self.clock())


class _Silent:
    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def progress_bar(mode, total: int, desc: str, unit: str, log: logging.Logger, **tqdm_kwargs):
    """A tqdm bar, a LineProgress or a silent counter, as `mode` and stderr decide."""
    if bars(mode):
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit=unit, **tqdm_kwargs)
    if lines(mode):
        return LineProgress(total, desc, unit, log)
    return _Silent()
