"""The build through joblib's Dask backend: a local cluster, or a running scheduler at `--scheduler ADDRESS`.

Image work runs on the Dask workers; the arrays come back to the building process, which alone writes the shards
(single owner, atomic renames), so the cache bytes are the same as with any other backend. Workers on other
machines must see the source images at the same absolute paths and have this package installed.
"""
from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)


class DaskUnavailable(RuntimeError):
    pass


@contextlib.contextmanager
def dask_parallel_config(scheduler: str | None, jobs: int):
    """joblib.parallel_config(backend="dask") around a Client; a LocalCluster of `jobs` workers without address."""
    try:
        import joblib
        from dask.distributed import Client, LocalCluster
    except ImportError as err:
        raise DaskUnavailable("--backend dask needs Dask: pip install -e '.[cluster]'") from err
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker",
                 "distributed.core", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.WARNING)  # cluster start/stop chatter would bury the build's output
    with contextlib.ExitStack() as stack:
        if scheduler:
            client = stack.enter_context(Client(scheduler))
        else:
            workers = jobs if jobs > 0 else os.cpu_count() or 1
            # One single-threaded worker process per core, as loky would run; no dashboard (no open ports needed).
            cluster = stack.enter_context(LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                       dashboard_address=None))
            client = stack.enter_context(Client(cluster))
        log.info("dask: %d workers at %s", len(client.scheduler_info()["workers"]), client.scheduler.address)
        stack.enter_context(joblib.parallel_config(backend="dask"))
        yield
