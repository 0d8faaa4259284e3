"""Where work runs: Dask (a running scheduler, or a local cluster of single-threaded processes) and Ray (a
running cluster, or a local one that declares the resources our jobs ask for)."""

from __future__ import annotations

import contextlib
import os

__all__ = ["dask_client", "ensure_ray", "TRIAL_RESOURCE", "LOCAL_TRIAL_SLOTS"]

TRIAL_RESOURCE = "genesis_trial"
"""Custom resource a transfer-grid trial driver takes one unit of (instead of a CPU): declared by `ensure_ray`
for a local Ray and on the head node in ray_cluster.yaml."""
LOCAL_TRIAL_SLOTS = 1000


def ensure_ray(address: str | None = None, log_to_driver: bool = True) -> None:
    """Connect to `address` (or RAY_ADDRESS, as inside `ray job submit`), else start a local Ray with the
    `genesis_trial` resource; nothing when this process is already connected. Every entry point goes through
    here, so pretraining, a fine-tuning and a transfer grid run in one process share one Ray that fits all."""
    import ray

    if ray.is_initialized():
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        ray.init(resources={TRIAL_RESOURCE: LOCAL_TRIAL_SLOTS}, log_to_driver=log_to_driver)


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
