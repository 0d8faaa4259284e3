"""Where work runs: Dask (a running scheduler, or a local cluster of single-threaded processes) and Ray (a
running cluster, or a local one that declares the resources our jobs ask for); and the checks, made before any
work starts, that a named cluster answers and that the worker numbers asked of it are ones it can give.

A named Ray cluster or Dask scheduler must accept a TCP connection within seconds: `ray.init` would otherwise
retry the GCS for minutes, and Dask's client waits 30 s. Each check raises `UsageError` naming the option and the
value (`genesis` prints that one line and exits 2).

Local Dask workers die with the process that started them. Dask's own guard (a pipe whose
closing a thread in each worker notices) needs that thread to run: a worker stuck in a long call
that holds the GIL, or stopped, outlives a killed driver and keeps writing into a store a rerun is
already rebuilding. So each local worker also asks the kernel to SIGKILL it when its parent dies
(Linux `PR_SET_PDEATHSIG`; elsewhere a thread polls the parent's pid).

A local cluster's Dask logs stay quiet (critical only): a task that raises reaches the driver as that exception,
which the command line prints as its one line; Dask's own "Compute Failed ... Traceback" record of it, printed
first by the worker, would bury that line under a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import signal
import sys
import threading
import time

from pipeline.runtime.errors import UsageError
from pipeline.runtime.net import connect, host_port
from pipeline.runtime.tracking import PROBE_TIMEOUT_S
from pipeline.services.dask_tls import LOCAL_SCHEMES, client_security, scheduler_address

__all__ = ["dask_client", "client_security", "ensure_ray", "die_with_parent", "TRIAL_RESOURCE",
           "LOCAL_TRIAL_SLOTS", "ray_cluster", "dask_scheduler", "ray_resources", "gpus", "max_failures",
           "RAY_GCS_PORT", "RAY_CLIENT_PORT", "set_verbose", "verbose"]

_DRIVER_PID = "genesis-driver-pid"
"""Dask config key: the pid of the process whose local workers must die with it (inherited by the workers)."""
_PR_SET_PDEATHSIG = 1

TRIAL_RESOURCE = "genesis_trial"
"""Custom resource a transfer-grid trial driver takes one unit of (instead of a CPU): declared by `ensure_ray`
for a local Ray and on the head node in ray_cluster.yaml."""
LOCAL_TRIAL_SLOTS = 1000
RAY_GCS_PORT, RAY_CLIENT_PORT = 6379, 10001


# --------------------------------------------------------------------------- addresses

def ray_cluster(address: str | None, option: str = "--ray-address", timeout: float = PROBE_TIMEOUT_S) -> None:
    """A Ray cluster where one is named (`address`, else RAY_ADDRESS) must accept a connection within `timeout`
    s: `ray.init` would otherwise retry the GCS for minutes. "auto" and "local" are Ray's to resolve."""
    if not address:
        address, option = os.environ.get("RAY_ADDRESS"), "RAY_ADDRESS"
    if not address or address.strip().lower() in ("auto", "local"):
        return
    scheme = address.split("://", 1)[0].lower() if "://" in address else ""
    if scheme not in ("", "ray", "http", "https"):
        raise UsageError(f"{option} {address}: not a Ray address (HOST:PORT, ray://HOST:PORT or auto)")
    default = {"ray": RAY_CLIENT_PORT, "http": 80, "https": 443}.get(scheme, RAY_GCS_PORT)
    try:
        host, port = host_port(address, default)
    except ValueError:
        raise UsageError(f"{option} {address}: not a Ray address (HOST:PORT, ray://HOST:PORT or auto)") from None
    why = connect(host, port, timeout)
    if why is not None:
        raise UsageError(f"{option} {address}: no Ray cluster answers at {host}:{port} ({why}); start it "
                         f"(`ray start --head`), or leave {option} out for a local Ray")


def dask_scheduler(address: str | None, option: str = "--dask-scheduler", timeout: float = PROBE_TIMEOUT_S) -> None:
    """A running Dask scheduler must accept a connection within `timeout` s (Dask's client waits 30 s), and be
    one this machine may use (`client_security`: TLS certificates, or plain TCP on loopback)."""
    if not address:
        return
    client_security(address)  # refuses an address it cannot use safely, naming it
    scheme, host, port = scheduler_address(address, option)
    if scheme in LOCAL_SCHEMES:
        return
    why = connect(host, port, timeout)
    if why is not None:
        raise UsageError(f"{option} {address}: no Dask scheduler answers at {host}:{port} ({why}); start it, or "
                         f"leave {option} out for a local cluster")


# --------------------------------------------------------------------------- numbers

def gpus(value: float, option: str) -> float:
    """A GPU share per worker as Ray accepts it: finite, >= 0; above 1 only whole GPUs."""
    if not (value >= 0 and math.isfinite(value)):  # also NaN
        raise UsageError(f"{option} {value:g}: must be >= 0 and finite (a share of one GPU, e.g. 0.25, or "
                         f"whole GPUs)")
    if value > 1 and value != int(value):
        raise UsageError(f"{option} {value:g}: above 1 Ray assigns whole GPUs only (use an integer, or a share <= 1)")
    return value


def max_failures(value: int, option: str = "--max-failures") -> int:
    """Worker-group restarts: >= 0, or -1, Ray's "retry forever" (worker and node failures only: a
    deterministic error ends the run whatever this says)."""
    if value < -1:
        raise UsageError(f"{option} {value}: must be >= 0 restarts, or -1 to retry forever")
    return value


def ray_resources(*, workers: int, gpus_per_worker: float, ray_address: str | None, failures: int | None = None,
                  workers_option: str = "--workers", gpus_option: str = "--gpus-per-worker") -> None:
    """Worker count, GPU share and restarts in range; a GPU asked of a local Ray (no cluster named, no
    RAY_ADDRESS) on a machine that has none would wait forever for its placement group; a named cluster that
    does not answer (`ray_cluster`)."""
    if workers < 1:
        raise UsageError(f"{workers_option} {workers}: must be >= 1")
    gpus(gpus_per_worker, gpus_option)
    if failures is not None:
        max_failures(failures)
    ray_cluster(ray_address)  # also when this process is connected already: a named address must answer
    if gpus_per_worker > 0 and not ray_address and not os.environ.get("RAY_ADDRESS"):
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            have = ray.cluster_resources().get("GPU", 0)
        else:
            import torch

            have = torch.cuda.device_count()
        if have < gpus_per_worker:
            raise UsageError(f"{gpus_option} {gpus_per_worker:g}: the local Ray would have {have:g} GPU(s); "
                             f"name a cluster with GPUs (--ray-address) or use 0 for CPU workers")


# --------------------------------------------------------------------------- Ray and Dask


_VERBOSE = {"on": os.environ.get("GENESIS_VERBOSE", "").strip().lower() not in ("", "0", "false", "no", "off")}
"""GENESIS_VERBOSE=1 is `--verbose` for every command (0, false, no, off or unset: not)."""

_NOISE = ("worker processes have been started on node",)
"""Lines Ray's driver prints on its own that a command's user cannot act on (raylet's "N PYTHON worker processes
have been started ... maximum expected startup concurrency" warning: a Tune grid of Ray Train runs starts more
workers than a small machine's CPUs, by design). Kept in the raylet's log; off the console unless `--verbose`."""


def set_verbose(on: bool) -> None:
    """`--verbose`: show Ray's and MLflow's own console output (Tune's status tables, Ray's records and warnings,
    the workers' output). Off by default, so a command prints its own progress lines only; that output still goes
    to Ray's session logs (the worker logs)."""
    _VERBOSE["on"] = bool(on)


def verbose() -> bool:
    """Whether `--verbose` (or GENESIS_VERBOSE) asked for Ray's and MLflow's own console output."""
    return _VERBOSE["on"]


class _Quiet:
    """A text stream that passes everything through but the lines naming one of `_NOISE` (with the newline that
    `print` writes after them); installed on stdout by `ensure_ray` when not verbose, where Ray's driver prints
    raylet's messages whatever `log_to_driver` says."""

    def __init__(self, stream):
        self.stream = stream
        self._dropped = False
        self._lock = threading.Lock()  # Ray's threads and the progress lines' thread print at once

    def write(self, text: str) -> int:
        with self._lock:
            dropped, self._dropped = self._dropped, False
            if text == "\n" and dropped:
                return len(text)
            if not any(n in text for n in _NOISE):
                return self.stream.write(text)
            lines = text.splitlines(keepends=True)  # drop the noisy lines only, keep the others of the chunk
            kept = "".join(line for line in lines if not any(n in line for n in _NOISE))
            self._dropped = not text.endswith("\n") and any(n in lines[-1] for n in _NOISE)
            if kept:
                self.stream.write(kept)
            return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def ensure_ray(address: str | None = None, log_to_driver: bool = False) -> None:
    """Connect to `address` (or RAY_ADDRESS, as inside `ray job submit`), else start a local Ray with the
    `genesis_trial` resource; nothing when this process is already connected. Every entry point goes through
    here, so pretraining, a fine-tuning and a transfer grid run in one process share one Ray that fits all.

    Ray's own console output is off unless `verbose()` (`--verbose`): the workers' and Ray Train's controller's
    output (`log_to_driver`, also on with `log_to_driver=True`, `--worker-logs`), the driver's Ray records below
    ERROR (the token warning, "Started a local Ray instance", Tune's INFO lines), raylet's worker-pool warning.
    All of it is still in Ray's session logs (`/tmp/ray/session_latest/logs`)."""
    import ray

    if ray.is_initialized():
        return
    ray_cluster(address)  # a named cluster where nothing listens: one line in seconds, not minutes of GCS retries
    shown = verbose()
    options = {"log_to_driver": bool(log_to_driver) or shown}
    if not shown:
        options["logging_level"] = logging.ERROR
        if sys.stdout is not None and not isinstance(sys.stdout, _Quiet):  # None: a closed stdout (`>&-`)
            sys.stdout = _Quiet(sys.stdout)
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, **options)
    else:
        ray.init(resources={TRIAL_RESOURCE: LOCAL_TRIAL_SLOTS}, **options)


@contextlib.contextmanager
def dask_client(workers: int, scheduler: str | None):
    """A Dask client: the given scheduler, else a local cluster of `workers` single-threaded processes.

    With one worker the cluster runs in this process (threads, no process start-up), which is
    also what one wants under a debugger. Local worker processes die with this process (see the
    module docstring), so a killed run leaves no worker writing behind it.

    A running scheduler is reached as `client_security` says (pipeline/services/dask_tls.py): tls:// with the
    certificates GENESIS_DASK_TLS_DIR names (or Dask's config), plain tcp:// on loopback only unless
    GENESIS_ALLOW_INSECURE_DASK=1; anything else is one line and exit 2 before any connection. The local
    cluster listens on 127.0.0.1 only, its HTTP servers included.
    """
    from distributed import Client, LocalCluster

    if scheduler:  # someone else's workers: their lifetime is not ours to tie
        dask_scheduler(scheduler)  # nothing listening: one line in seconds, not Dask's 30 s of retries
        try:  # it listens; a handshake that does not complete (not Dask, TLS refused) is not waited on for long
            client = Client(scheduler, security=client_security(scheduler), timeout=f"{3 * PROBE_TIMEOUT_S:g}s")
        except (OSError, TimeoutError) as err:
            raise UsageError(f"--dask-scheduler {scheduler}: accepts connections but does not answer as a Dask "
                             f"scheduler ({' '.join(str(err).split())[:200]})") from None
        with client:
            yield client
        return
    import dask

    # Workers fork from this process, which has already imported SimpleITK, zarr and the
    # task code: 0.1 s to start two workers instead of 1-2 s with spawn. Override with
    # DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD=spawn if a library misbehaves after fork.
    # obstore's Rust runtime does not survive a fork once it has been used (the worker dies of SIGSEGV): a process
    # that has opened a bucket spawns its workers. Local runs never import obstore, and keep fork.
    default = "spawn" if "obstore" in sys.modules else "fork"
    method = os.environ.get("DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD", default)
    processes = workers > 1
    # the preload ties each worker process's life to ours (added to any the user configured)
    preload = {"preload": [*dask.config.get("distributed.worker.preload", []), __name__]} if processes else {}
    # The scheduler and each worker start an HTTP server (metrics, /info pages) even without a dashboard, on
    # every interface when their address names no host, as in-process (inproc://) clusters' do: pin them to
    # loopback. `host` would break inproc://, which opens no socket of its own.
    loopback = {"host": "127.0.0.1"} if processes else {}
    with (dask.config.set({"distributed.worker.multiprocessing-method": method, _DRIVER_PID: os.getpid()}),
          LocalCluster(n_workers=workers, threads_per_worker=1, processes=processes, dashboard_address=None,
                       scheduler_kwargs={"dashboard_address": "127.0.0.1:0"}, worker_dashboard_address="127.0.0.1:0",
                       silence_logs=logging.CRITICAL, **loopback, **preload) as cluster,
          Client(cluster) as client):
        yield client


def dask_setup(worker) -> None:
    """Dask preload hook, run in each local worker process as it starts (`preload=["pipeline.cluster"]`)."""
    import dask

    driver = dask.config.get(_DRIVER_PID, None)
    if driver is not None and int(driver) != os.getpid():
        die_with_parent(int(driver))


def die_with_parent(parent_pid: int) -> None:
    """End this process when `parent_pid`, its parent, dies - however it dies and whatever this process is doing.

    PR_SET_PDEATHSIG makes the kernel send SIGKILL, which needs no cooperation from a busy or
    stopped process. Strictly it fires when the parent's thread that forked us ends: for Dask that
    is the thread watching this worker, which lives as long as the worker does. The parent may
    already be gone by the time this runs (the signal is only armed for a death still to come):
    then exit at once.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        threading.Thread(target=_exit_when_orphaned, args=(parent_pid,), name="die-with-parent",
                         daemon=True).start()


def _exit_when_orphaned(parent_pid: int, every: float = 0.5) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every)
    os._exit(1)
