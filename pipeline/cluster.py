"""Where Dask work runs: a running scheduler, or a local cluster of single-threaded processes."""

from __future__ import annotations

import contextlib
import os

__all__ = ["dask_client"]


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None):
    """A Dask client: the given scheduler, else a local cluster of `workers` single-threaded processes.

    With one worker the cluster runs in this process (threads, no process start-up), which is
    also what one wants under a debugger.
    """
    from distributed import Client, LocalCluster

    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    import dask

    # Workers fork from this process, which has already imported SimpleITK, zarr and the
    # task code: 0.1 s to start two workers instead of 1-2 s with spawn. Override with
    # DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD=spawn if a library misbehaves after fork.
    method = os.environ.get("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", "fork")
    with (dask.config.set({"distributed.worker.multiprocessing-method": method}),
          LocalCluster(n_workers=workers, threads_per_worker=1, processes=workers > 1, dashboard_address=None,
                       silence_logs=40) as cluster,
          Client(cluster) as client):
        yield client
