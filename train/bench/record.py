"""How the GPU check keeps going: each row and each part records its error instead of stopping the check, and the
check's subprocesses (pytest, pipeline.build, train.run, ...) run from the repository root.

Shared by the check's parts (the gpu, compile_modes and consistency parts of this package), so that a part in a
module of its own records its failures the way the others do.
"""
from __future__ import annotations

import logging
import subprocess
import time
import traceback
from pathlib import Path

import torch

log = logging.getLogger(__name__)
# The repository root (train/bench/ is two levels below it): `python -m train.run` and `pytest tests` started from
# here import this checkout, not whatever copy of the project the environment has installed.
ROOT = Path(__file__).resolve().parents[2]
TAIL_CHARS = 3000  # of a subprocess's output, kept in the result when it fails


def error_of(err: BaseException) -> dict:
    """The error text (with the file and line that raised it) and the traceback's tail, for the result."""
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
    record = {"error": f"{type(err).__name__}: {err}"[:600] + where,
              "traceback": "".join(traceback.format_exception(err))[-TAIL_CHARS:]}
    if isinstance(err, CommandFailed):
        record["output_tail"] = err.output_tail
    return record


def free(device: torch.device) -> None:
    """Give the caching allocator's unused blocks back, so the next row (or another process) sees them free."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(row: dict, fn, device: torch.device) -> dict:
    """`row` updated with fn()'s figures, or with the error that stopped it (the next row still runs)."""
    try:
        row.update(fn())
    except Exception as err:  # one failing measurement must not stop the check; its text is the record
        log.warning("%s failed: %s", row, err)
        row.update(error_of(err))
    finally:
        free(device)
    return row


def stage(fn, *args) -> dict:
    """One part's result with `status` (ok, failed: the part or one of its rows has an error, skipped) and
    `seconds`; an exception becomes the part's error."""
    start = time.perf_counter()
    try:
        result = fn(*args)
    except Exception as err:  # as in attempt: recorded, and the next part runs
        result = error_of(err)
    failed = "error" in result or any("error" in row for row in result.get("rows", []))
    result["status"] = "skipped" if "skipped" in result else "failed" if failed else "ok"
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def run_command(cmd: list[str], timeout_s: float) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished process, wall seconds) of `cmd` run from the repository root; output captured."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    return proc, time.perf_counter() - start


class CommandFailed(RuntimeError):
    """A subprocess of the check exited non-zero; the result keeps the tail of its output (where its own error is,
    e.g. train.run's `error: ...` line) as `output_tail`."""

    def __init__(self, what: str, proc: subprocess.CompletedProcess):
        self.output_tail = (proc.stdout + proc.stderr)[-TAIL_CHARS:]
        last = self.output_tail.strip().splitlines()[-1:] or ["no output"]
        super().__init__(f"{what} exited {proc.returncode}: {last[0][:300]}")
