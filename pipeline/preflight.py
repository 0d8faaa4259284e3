"""Checks made before anything expensive starts, and the rule for errors that no retry can mend.

Every stage calls these before it starts Ray, Dask or an MLflow run, so a bad path, an unreachable tracking
server, an option out of range or a store too small fails in seconds with one line naming the option and the
value, instead of after a Ray start-up, minutes of MLflow retries or a worker group restarted on the same error:

- `output_dir`, `output_file`: a folder (file) that will be written: not a file (folder), not under a file,
  not on a read-only filesystem (a real write is tried: root's permissions, ACLs and network filesystems make
  `os.access` an unreliable witness).
- `shared_path`: inside a Ray job (`ray job submit`), the driver runs in a temporary folder of Ray's; a relative
  path there would land in it, on one node, and vanish with the job. Relative paths are resolved against
  GENESIS_SHARED_ROOT when it is set, else refused.
- `tracking_uri`: SQLite (its folder writable), a file store, or an MLflow server answering within seconds (a
  web server that answers but is no MLflow server is refused too); a scheme MLflow has no store for is refused;
  also bounds MLflow's own HTTP retries for this process (its default is 7 retries, about 4 minutes).
  `experiment`: a name MLflow accepts.
- `ray_resources`: workers, GPU shares and restarts in the ranges Ray accepts (a negative GPU share makes
  Ray Train wait forever for its placement group, -1 restarts is Ray's "retry forever"); a GPU asked of a local
  Ray on a machine without one; a `--ray-address` (or RAY_ADDRESS) where nothing listens (`ray.init` would retry
  the GCS for minutes): `ray_cluster`.
- `dask_scheduler`: a `--dask-scheduler` where nothing listens (Dask's client waits 30 s by default).

Errors that are deterministic (bad data, bad config, a bug: the same error again on a retry) are not retried by
Ray Train's FailureConfig, which retries every worker error: `torch_trainer` builds a TorchTrainer whose failure
policy ends the run at once when a worker raised one of `DETERMINISTIC_ERRORS`, and `failure_reason` names the
cause in one line for the run's report and its MLflow `error` tag. Worker deaths, node losses and other
runtime errors are retried as before.
"""

from __future__ import annotations

import base64
import errno
import functools
import logging
import math
import os
import socket
import ssl
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

__all__ = ["UsageError", "DETERMINISTIC_ERRORS", "SHARED_ROOT_ENV", "in_ray_job", "shared_path", "output_dir",
           "output_file", "tracking_uri", "experiment", "ray_resources", "ray_cluster", "dask_scheduler", "gpus",
           "max_failures", "deterministic_cause", "failure_reason", "torch_trainer", "mlflow_http_limits",
           "PROBE_TIMEOUT_S"]

log = logging.getLogger(__name__)

SHARED_ROOT_ENV = "GENESIS_SHARED_ROOT"
RAY_JOB_ENV = ("RAY_JOB_SUBMISSION_ID", "RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR")
"""Set in the entrypoint of `ray job submit` (the last by Ray's job supervisor; the first two as the issue names)."""
PROBE_TIMEOUT_S = 5.0
MLFLOW_HTTP_RETRIES = "5"
"""MLflow's backoff doubles from 2 s: 5 retries ride out about a minute of server trouble during a long run;
its default 7 is about 4 minutes of waiting before the first error is seen."""
MLFLOW_HTTP_TIMEOUT_S = "30"

DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NameError, ImportError, ZeroDivisionError,
    NotImplementedError, AssertionError)
"""Raised by bad data, bad configuration or a bug: a retry fails the same way. Worker deaths (RayActorError),
lost nodes, OSError and RuntimeError (CUDA, NCCL, a flaky filesystem) are not here: those are retried."""


class UsageError(ValueError):
    """Bad usage or input, found before any work started: `genesis` prints its one line and exits 2."""


# --------------------------------------------------------------------------- paths

def in_ray_job() -> bool:
    """Whether this process is the driver of a Ray job (its working folder is Ray's temporary one)."""
    if any(os.environ.get(name) for name in RAY_JOB_ENV):
        return True
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return bool(ray.get_runtime_context().get_submission_id())
        except Exception:  # noqa: BLE001 - an older or partial runtime context: not a job we can tell
            return False
    return False


def shared_path(value: str | os.PathLike | None, option: str, default: str | None = None) -> str | None:
    """`value` (or `default` when it is None) as an absolute path; URIs (`s3://...`) are returned as they are.

    Inside a Ray job a relative path resolves against GENESIS_SHARED_ROOT when that is set, and is refused
    otherwise, naming the option: Ray runs the job's driver in a temporary folder of its own."""
    text = os.fspath(value) if value is not None else default
    if text is None:
        return None
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    if in_ray_job():
        root = os.environ.get(SHARED_ROOT_ENV)
        if root:
            if not Path(root).expanduser().is_absolute():
                raise UsageError(f"{SHARED_ROOT_ENV}={root!r} must be an absolute path on a filesystem every "
                                 f"node shares")
            return str(Path(root).expanduser() / path)
        said = f"{option} {text!r}" if value is not None else f"{option} (default {text!r})"
        raise UsageError(f"{said} is a relative path inside a Ray job, whose driver runs in a temporary folder of "
                         f"Ray's: give an absolute path on a filesystem every node shares, or set "
                         f"{SHARED_ROOT_ENV} to the folder relative paths mean")
    return str(path.resolve())


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_probe(folder: Path, option: str, shown: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".genesis-write-check-", dir=folder)
    except OSError as err:
        why = "read-only filesystem" if err.errno == errno.EROFS else (err.strerror or str(err)).lower()
        raise UsageError(f"{option} {shown}: cannot write in {folder} ({why})") from None
    os.close(fd)
    os.unlink(name)


def output_dir(value: str | os.PathLike | None, option: str, default: str | None = None) -> str | None:
    """A folder that will be written (created when missing): absolute (see `shared_path`), not a file, not under
    a file, writable. URIs are returned unchecked (their filesystem says for itself)."""
    resolved = shared_path(value, option, default)
    if resolved is None or "://" in resolved:
        return resolved
    shown = os.fspath(value) if value is not None else resolved
    path = Path(resolved)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {shown}: is a file, not a folder")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UsageError(f"{option} {shown}: {existing} is a file, so no folder can be made under it")
    _write_probe(existing, option, shown)
    return resolved


def output_file(value: str | os.PathLike, option: str) -> str:
    """A file that will be written: its folder as `output_dir` says, and not itself a folder."""
    resolved = shared_path(value, option)
    path = Path(resolved)
    if path.is_dir():
        raise UsageError(f"{option} {value}: is a folder, not a file")
    output_dir(str(path.parent), option)
    return resolved


# --------------------------------------------------------------------------- MLflow

def mlflow_http_limits() -> None:
    """Bound MLflow's HTTP retries and timeout for this process and the local Ray it starts (their
    environment is inherited), unless the user set them."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", MLFLOW_HTTP_RETRIES)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", MLFLOW_HTTP_TIMEOUT_S)


def tracking_uri(uri: str | None, option: str = "--tracking-uri", timeout: float = PROBE_TIMEOUT_S) -> str:
    """The tracking URI the stage will use (as `pipeline.tracking.resolve_uri` makes it), checked: a SQLite
    database or file store whose folder can be written, an MLflow server that answers HTTP within `timeout` s,
    or another scheme MLflow has a tracking store for."""
    from pipeline.tracking import resolve_uri

    mlflow_http_limits()
    if uri is None:
        uri = "sqlite:///" + shared_path(None, option, default="mlflow.db")
    elif uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative to where it runs
        uri = "sqlite:///" + shared_path(uri[len("sqlite:///"):], option)
    uri = resolve_uri(uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if db.is_dir():
            raise UsageError(f"{option} {uri}: {db} is a folder, not a SQLite database file")
        output_dir(str(db.parent), option)
        if db.exists() and not os.access(db, os.W_OK):
            raise UsageError(f"{option} {uri}: {db} is not writable")
        return uri
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        _probe_server(uri, option, timeout)
    elif scheme in ("", "file"):
        output_dir(uri[len("file://"):] if scheme == "file" else uri, option)
    else:
        _check_scheme(uri, scheme, option)
    return uri


def _check_scheme(uri: str, scheme: str, option: str) -> None:
    """A scheme MLflow has no tracking store for (ftp://, a typo) fails when the first run is created, after
    the work has started: said here instead. The schemes are MLflow's registry, plugins included."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry
        from mlflow.tracking.registry import UnsupportedModelRegistryStoreURIException
    except ImportError:  # pragma: no cover - another MLflow layout: MLflow says it when the run is created
        return
    try:
        registry.get_store_builder(uri)
    except UnsupportedModelRegistryStoreURIException:
        known = ", ".join(sorted(s for s in registry._registry if s))
        raise UsageError(f"{option} {uri}: MLflow has no tracking store for the scheme {scheme!r}; use one of "
                         f"{known}, or a folder") from None


def experiment(name: str | None, option: str = "--experiment") -> str:
    """An MLflow experiment name: not empty, at most MLflow's 500 characters (MLflow would refuse it only when
    the run is created)."""
    if name is None or not str(name).strip():
        raise UsageError(f"{option} {name!r}: an experiment needs a name")
    if len(name) > 500:
        raise UsageError(f"{option}: a name of {len(name)} characters; MLflow allows at most 500")
    return name


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's client sends (MLFLOW_TRACKING_USERNAME/PASSWORD, or MLFLOW_TRACKING_TOKEN)."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def _tls_context() -> ssl.SSLContext | None:
    """The server verification MLflow's client applies (MLFLOW_TRACKING_INSECURE_TLS, ..._SERVER_CERT_PATH)."""
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        return ssl._create_unverified_context()  # noqa: S323 - what the user asked MLflow's client to do
    cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
    return ssl.create_default_context(cafile=cert) if cert else None


HEALTH_PATH, API_PATH = "/health", "/api/2.0/mlflow/experiments/search?max_results=1"


def _http_status(url: str, timeout: float) -> tuple[int, bytes]:
    """(status, first bytes of the body) of a GET; URLError and OSError when nothing answers."""
    req = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_tls_context()) as resp:
            return resp.status, resp.read(4096)
    except urllib.error.HTTPError as err:
        return err.code, b""


def _probe_server(uri: str, option: str, timeout: float) -> None:
    """An MLflow server answers /health with 200 (unauthenticated even on a basic-auth server) or its REST API
    with JSON; 401/403 is an authenticating server or proxy (credentials are MLflow's business). Anything else
    that answers HTTP (404 on both: another web server, a wrong port or path) is not a tracking server."""
    base = uri.rstrip("/")
    seen = []
    for path in (HEALTH_PATH, API_PATH):
        try:
            status, body = _http_status(base + path, timeout)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            reason = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else reason
            raise UsageError(f"{option} {uri}: the MLflow tracking server does not answer ({reason}; waited at "
                             f"most {timeout:g} s); start it, or give another URI") from None
        if status in (401, 403) or (status == 200 and path == HEALTH_PATH):
            return
        if 200 <= status < 300 and body.lstrip().startswith(b"{"):
            return
        seen.append(f"GET {path.split('?')[0]}: {status}")
    raise UsageError(f"{option} {uri}: answers HTTP but is not an MLflow tracking server ({', '.join(seen)}); "
                     f"give the address `mlflow server` listens on")


# --------------------------------------------------------------------------- addresses

def _host_port(address: str, default_port: int) -> tuple[str, int]:
    """(host, port) of HOST[:PORT] or SCHEME://HOST[:PORT] (IPv6 in brackets); ValueError when it is not one."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    host, port = parts.hostname, parts.port  # .port raises ValueError for a port out of range or not a number
    if not host or parts.path.strip("/") or parts.query:
        raise ValueError(address)
    return host, port if port is not None else default_port


def _connect(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` s, else why not."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except socket.gaierror as err:
        return f"unknown host: {err.strerror or err}"
    except OSError as err:
        return (err.strerror or str(err)).lower()


RAY_GCS_PORT, RAY_CLIENT_PORT = 6379, 10001


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
        host, port = _host_port(address, default)
    except ValueError:
        raise UsageError(f"{option} {address}: not a Ray address (HOST:PORT, ray://HOST:PORT or auto)") from None
    why = _connect(host, port, timeout)
    if why is not None:
        raise UsageError(f"{option} {address}: no Ray cluster answers at {host}:{port} ({why}); start it "
                         f"(`ray start --head`), or leave {option} out for a local Ray")


def dask_scheduler(address: str | None, option: str = "--dask-scheduler", timeout: float = PROBE_TIMEOUT_S) -> None:
    """A running Dask scheduler must accept a connection within `timeout` s (Dask's client waits 30 s), and be
    one this machine may use (`pipeline.dask_tls.client_security`: TLS certificates, or plain TCP on loopback)."""
    if not address:
        return
    from distributed.comm.addressing import parse_address, parse_host_port

    from pipeline.dask_tls import DEFAULT_PORT, LOCAL_SCHEMES, client_security

    client_security(address)  # refuses an address it cannot use safely, naming it
    try:
        scheme, location = parse_address(address, strict=False)
        if scheme in LOCAL_SCHEMES:
            return
        host, port = parse_host_port(location, DEFAULT_PORT)
    except (ValueError, TypeError):
        raise UsageError(f"{option} {address!r}: not a Dask scheduler address (tls://HOST:PORT)") from None
    why = _connect(host, int(port), timeout)
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


# --------------------------------------------------------------------------- errors inside Ray Train

def _base(error: BaseException) -> BaseException:
    """The user's exception inside Ray Train's and Ray's wrappers."""
    for _ in range(5):
        inner = getattr(error, "_base_exc", None) or getattr(error, "cause", None)
        if not isinstance(inner, BaseException) or inner is error:
            break
        error = inner
    return error


def deterministic_cause(error: BaseException) -> tuple[int | None, BaseException] | None:
    """(rank, exception) of the first worker whose error is deterministic, or None (also for non-worker errors)."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        base = _base(failures[rank])
        if isinstance(base, DETERMINISTIC_ERRORS):
            return rank, base
    base = _base(error)
    if base is not error and isinstance(base, DETERMINISTIC_ERRORS):
        return None, base
    return None


def _line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def failure_reason(error: BaseException) -> str:
    """One line naming what ended a Ray Train run: the deterministic error and its rank (not retried), else the
    first worker's error, else the error itself."""
    found = deterministic_cause(error)
    if found is not None:
        rank, base = found
        where = f" (worker rank {rank})" if rank is not None else ""
        return f"{_line(base)}{where}; a deterministic error: not retried"
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = sorted(failures)[0]
        return f"{_line(_base(failures[rank]))} (worker rank {rank}; after the restarts --max-failures allows)"
    return _line(error)


def torch_trainer(*args, **kwargs):
    """A Ray Train TorchTrainer that ends the run at once when a worker raises a deterministic error.

    Ray Train V2 (`DefaultFailurePolicy`) retries every worker-group error up to `FailureConfig.max_failures`
    and offers no public hook to tell them apart, so the trainer hands its controller our policy in place of
    the default one. Should a Ray release move these internals, the plain TorchTrainer is used (errors are then
    retried as Ray decides)."""
    return _trainer_class()(*args, **kwargs)


@functools.cache
def _trainer_class():
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
    except ImportError:  # pragma: no cover - another Ray layout
        log.warning("Ray Train's failure policy is not where expected: deterministic errors will be retried")
        return TorchTrainer

    class DeterministicErrorsEndTheRun(DefaultFailurePolicy):
        """Ray's default policy, except that a deterministic worker error is raised at once."""

        def make_decision(self, training_failed_error):
            if deterministic_cause(training_failed_error) is not None:
                log.warning("genesis: %s", failure_reason(training_failed_error))
                return FailureDecision.RAISE
            return super().make_decision(training_failed_error)

    class GenesisTorchTrainer(TorchTrainer):
        def _initialize_and_run_controller(self, **controller_init_kwargs):
            if "failure_policy" in controller_init_kwargs:
                controller_init_kwargs["failure_policy"] = DeterministicErrorsEndTheRun(
                    self.run_config.failure_config)
            return super()._initialize_and_run_controller(**controller_init_kwargs)

    if not hasattr(TorchTrainer, "_initialize_and_run_controller"):  # pragma: no cover - another Ray layout
        return TorchTrainer
    return GenesisTorchTrainer
