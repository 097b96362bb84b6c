"""The build's image work in parallel: `results` runs `process` over (path, sizes) tasks through joblib (threads,
processes or a Dask cluster), in order, with a bounded number of results in memory whatever the image size.
"""
from __future__ import annotations

import contextlib
import os
import threading

from pipeline.config import PreprocessConfig

BACKENDS = ("threads", "processes", "dask")
# "dask" runs the image work on a Dask cluster through joblib's Dask backend (pip install -e '.[cluster]')
DEFAULT_BACKEND = "threads"  # see README "Build benchmark": threads beat processes on 2 cores (no array copy-back)
# Preprocessed images held at once between the workers and the shard writer (memory stays bounded at any size): the
# image work runs in windows of at most this many bytes of results, and never with more workers than images in one.
RESULT_BUDGET_BYTES = 512 * 2**20
MAX_WINDOW = 512  # images per window for small sizes (a window's tail leaves workers idle: ~0.1% at 2 jobs)


def process(path: str, config: PreprocessConfig, sizes: tuple[int, ...]):
    """Worker: (True, {size: stored image}) or (False, reason). Never raises for a bad image."""
    import cv2
    from pipeline.preprocess import ImageError, preprocess_file
    cv2.setNumThreads(1)  # one image per worker; OpenCV's own threads would oversubscribe the cores
    try:
        return True, preprocess_file(path, config, sizes)
    except ImageError as err:
        return False, str(err)
    except cv2.error as err:
        return False, f"OpenCV could not process it ({str(err).strip().splitlines()[-1]})"


def workers(jobs: int) -> int:
    return jobs if jobs > 0 else max(1, (os.cpu_count() or 1) + 1 + jobs)  # joblib's meaning of -1, -2, ...


def window_for(task_bytes: int, workers: int) -> tuple[int, int]:
    """(images per window, workers) so that one window's results fit RESULT_BUDGET_BYTES (at least one image)."""
    window = max(1, min(max(MAX_WINDOW, 32 * workers), RESULT_BUDGET_BYTES // max(task_bytes, 1)))
    return window, min(workers, window)


def results(tasks, config, backend: str, jobs: int, scheduler: str | None = None, window: int = MAX_WINDOW):
    """Results of `process` over `tasks` (path, sizes), in order, through joblib.

    joblib's generator starts a new task whenever one finishes, however far behind the consumer is, so the tasks run
    in windows of `window` (one joblib call each, on one pool): at most `window` results exist at once. When the
    consumer stops early (a bad image, an error while writing), the running window is waited for before the pool is
    shut down: a worker thread still inside OpenCV when the interpreter exits aborts the process ("terminate called
    without an active exception", SIGABRT) - joblib's own early exit does not wait for its threads."""
    if jobs == 1 and backend != "dask":
        for path, sizes in tasks:
            yield process(path, config, sizes)
        return
    import joblib
    with contextlib.ExitStack() as stack:
        if backend == "dask":
            from pipeline.dask_backend import dask_parallel_config
            stack.enter_context(dask_parallel_config(scheduler, jobs))  # DaskUnavailable: the build says why
            parallel = joblib.Parallel(n_jobs=-1, return_as="generator")
        else:
            parallel = joblib.Parallel(n_jobs=jobs, backend={"threads": "threading", "processes": "loky"}[backend],
                                       return_as="generator")
        stack.enter_context(parallel)  # one pool for every window
        stopping = threading.Event()

        def calls(part):  # joblib pulls tasks from this as workers free up; after `stopping`, no more
            for path, sizes in part:
                if stopping.is_set():
                    return
                yield joblib.delayed(process)(path, config, sizes)

        for start in range(0, len(tasks), window):
            outputs, consumed = parallel(calls(tasks[start:start + window])), False
            try:
                for result in outputs:  # not `yield from`: closing this generator must not close `outputs` early
                    yield result
                consumed = True
            finally:
                if not consumed:
                    stopping.set()
                    for _ in outputs:  # wait for the tasks already started (about 2 per worker) before the pool goes
                        pass
