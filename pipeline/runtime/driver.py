"""The one Ray Train driver: every stage that trains (pretrain, finetune, a transfer trial) fits through here.

The shape every stage shares: its own checks and MLflow run first (cheap, before Ray), then `recorded(...)`
starts Ray, fits a TorchTrainer (`fit`) and records the outcome on the run: FAILED with the cause in one line
(`pipeline.runtime.errors.failure_reason`), KILLED when interrupted, never left RUNNING.

Deterministic errors end the run at once, through public API only. Ray Train retries every worker error up to
`FailureConfig.max_failures` and offers no public hook to tell them apart, so the train function is wrapped
(`EndOnDeterministicError`): a worker that raises one of `DETERMINISTIC_ERRORS`, or meets a full disk
(`disk_full`: ENOSPC, EDQUOT, EFBIG; a retry would fill it again), writes the reason to a small file under the
run's storage folder (through pyarrow's filesystem, so a bucket works as a shared folder does). Alone, it then
returns: Ray Train sees a finished run. With peers it raises: Ray tears down the whole group (a peer waiting in a
collective is killed, never left hanging), and the workers of a restarted group find the file and return at once.
Either way the driver reads the file and marks the run FAILED with "...; a deterministic error: not retried" (or
"disk full: PATH (filesystem MOUNT: ...); not retried"), and no training is repeated. A fit that Ray saw end well
but whose MLflow run is not FINISHED (its rank 0 could not log its model or end the run) is a failure too, named
by the run's `error` tag when the worker could write it. Worker deaths, lost nodes and other runtime errors are
raised, and retried as before.

The storage path is a folder (local or shared) or a bucket, s3://BUCKET/PREFIX (`storage_filesystem`): Ray
Train then keeps its checkpoints in the bucket through pyarrow's S3 filesystem, so a worker group restarted
on other nodes, or a `--resume`, reads them back from there; no node needs a shared filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.runtime.errors import disk_full, failure_reason, is_deterministic, one_line

__all__ = ["Outcome", "EndOnDeterministicError", "scaling", "fit", "recorded", "FAILURE_KEY", "storage_filesystem",
           "run_config_storage"]

log = logging.getLogger(__name__)

FAILURE_KEY = "_genesis_failure_file"
"""The loop-config key through which the driver tells the workers where a deterministic error is written."""


@dataclass
class Outcome:
    """What a fit left: Ray Train's run folder, the last reported metrics, and the cause when it failed."""

    path: str
    metrics: dict = field(default_factory=dict)
    error: str | None = None


def storage_filesystem(storage: str) -> tuple[object, str]:
    """(pyarrow filesystem, path in it) of a storage location: a local folder, or s3://BUCKET/PREFIX.

    Ray Train keeps its checkpoints through pyarrow's filesystems. A bucket's is built here from the same AWS
    environment the stores use (`pipeline.storage.objects.s3_settings`: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL,
    the region), not left to `FileSystem.from_uri`, whose reading of the endpoint variables has varied between
    pyarrow releases (apache/arrow#49643). The keys are not passed: pyarrow reads them from the environment (or
    ~/.aws) in every process that opens the filesystem, so the pickled filesystem Ray ships to its workers
    carries none (a filesystem given explicit keys would pickle them)."""
    from pyarrow import fs

    from pipeline.storage.objects import is_remote, s3_settings, split_url

    storage = str(storage)
    if not is_remote(storage):
        path = storage[len("file://"):] if storage.startswith("file://") else storage
        return fs.LocalFileSystem(), path
    _scheme, bucket, prefix = split_url(storage)
    conf = s3_settings()
    options: dict = {"region": conf["region"], "connect_timeout": 5, "request_timeout": 120,
                     "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=3)}
    endpoint = conf.get("endpoint")
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        options.update(endpoint_override=(host or scheme).rstrip("/"), scheme=scheme if host else "https")
    if os.environ.get("AWS_SKIP_SIGNATURE", "").lower() in ("1", "true"):  # a public bucket, as the stores say
        options["anonymous"] = True
    return fs.S3FileSystem(**options), "/".join(p for p in (bucket, prefix) if p)


def run_config_storage(storage: str) -> dict:
    """RunConfig's `storage_path` and `storage_filesystem` for a storage location (see `storage_filesystem`):
    the plain path for a local folder, the bucket's filesystem and `BUCKET/PREFIX` for s3://."""
    from pipeline.storage.objects import is_remote

    if not is_remote(str(storage)):
        return {"storage_path": str(storage)}
    filesystem, path = storage_filesystem(storage)
    return {"storage_path": path, "storage_filesystem": filesystem}


def _open(uri: str):
    return storage_filesystem(uri)


def _read_failure(uri: str) -> str | None:
    try:
        filesystem, path = _open(uri)
        with filesystem.open_input_stream(path) as f:
            return json.loads(f.read().decode("utf-8"))["reason"]
    except (OSError, ValueError, KeyError):
        return None


def _write_failure(uri: str, reason: str) -> None:
    filesystem, path = _open(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(json.dumps({"reason": reason}).encode("utf-8"))


class EndOnDeterministicError:
    """A train function that ends the run, instead of being retried, when it meets a deterministic error."""

    def __init__(self, train_fn: Callable[[dict], None]):
        self.train_fn = train_fn

    def __call__(self, config: dict) -> None:
        import ray.train

        failure_file = config.get(FAILURE_KEY)
        if failure_file and _read_failure(failure_file) is not None:
            return  # a worker of this run met a deterministic error: nothing is left to do
        try:
            self.train_fn(config)
        except Exception as err:
            if failure_file and _read_failure(failure_file) is not None:
                return  # a peer (or an earlier attempt) met a deterministic error: this failure is its echo
            if not failure_file or not is_deterministic(err):
                raise
            context = ray.train.get_context()
            full = disk_full(err)
            reason = (f"{full} (worker rank {context.get_world_rank()}); not retried" if full else
                      f"{one_line(err)} (worker rank {context.get_world_rank()}); a deterministic error: not retried")
            log.warning("genesis: %s", reason)
            try:
                _write_failure(failure_file, reason)
            except Exception:  # noqa: BLE001 - the cause cannot be recorded
                if full and context.get_world_size() == 1:
                    return  # the storage is full too: a retry would fail the same way; the driver finds the
                    # MLflow run not FINISHED (the worker tagged its cause when it could) and marks it FAILED
                log.exception("genesis: could not write %s", failure_file)
                raise err from None  # Ray retries it as any error
            if context.get_world_size() > 1:
                raise  # Ray tears down the whole group (no peer is left waiting in a collective); a restarted
                # group finds the failure file and returns at once


def scaling(workers: int, gpus_per_worker: float):
    """Ray Train's ScalingConfig: `workers` workers of 1 CPU (plus a GPU share each when asked)."""
    from ray.train import ScalingConfig

    resources = {"CPU": 1, "GPU": gpus_per_worker} if gpus_per_worker else {"CPU": 1}
    return ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources)


def fit(train_fn: Callable[[dict], None], loop_config: dict, *, name: str, storage: str, workers: int,
        gpus_per_worker: float, max_failures: int, callbacks: list | None = None, keep: int = 2) -> Outcome:
    """Fit a TorchTrainer of `workers` workers on `train_fn(loop_config)`; never raises an Exception: what ended
    the fit is `Outcome.error`, one line."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage = str(storage)
    folder = f"{storage.rstrip('/')}/{name}"
    failure_file = f"{folder}/genesis-failure-{uuid.uuid4().hex[:12]}.json"
    try:
        trainer = TorchTrainer(
            EndOnDeterministicError(train_fn), train_loop_config={**loop_config, FAILURE_KEY: failure_file},
            scaling_config=scaling(workers, gpus_per_worker),
            run_config=RunConfig(name=name, **run_config_storage(storage),
                                 failure_config=FailureConfig(max_failures=max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=keep), callbacks=callbacks))
        result = trainer.fit()
        # in a bucket Ray's path has no scheme (BUCKET/PREFIX/NAME): the run folder is said as the user wrote it
        outcome = Outcome(path=folder if "://" in storage else str(result.path), metrics=dict(result.metrics or {}))
        if result.error:
            outcome.error = failure_reason(result.error)
    except Exception as exc:  # noqa: BLE001 - TrainingFailedError and friends: recorded as the run's cause
        outcome = Outcome(path=folder, error=failure_reason(exc))
    deterministic = _read_failure(failure_file)
    if deterministic is not None:
        outcome.error = deterministic
    return outcome


def recorded(tracker, run_id: str, work: Callable[[], Outcome], ray_address: str | None = None) -> Outcome:
    """Start (or join) Ray, run `work` (which fits) and record its outcome on MLflow run `run_id`: FAILED with the
    cause, or KILLED (re-raised) when interrupted; a run is never left RUNNING by the driver."""
    try:
        from pipeline.cluster import ensure_ray

        ensure_ray(ray_address)
        outcome = work()
    except Exception as exc:  # noqa: BLE001 - Ray would not start, or the work failed before fitting
        outcome = Outcome(path="", error=failure_reason(exc))
    except BaseException as exc:  # interrupted: the run is not left RUNNING
        tracker.mark_failed(run_id, reason=f"interrupted: {type(exc).__name__}", status="KILLED")
        raise
    if not outcome.error:
        outcome.error = _unfinished(tracker, run_id)
    if outcome.error:
        try:
            tracker.mark_failed(run_id, reason=outcome.error)
        except Exception as exc:  # noqa: BLE001 - e.g. the database's disk is full too: said, not raised
            outcome.error += f"; the MLflow run could not be marked FAILED: {disk_full(exc) or one_line(exc)}"
    return outcome


def _unfinished(tracker, run_id: str) -> str | None:
    """Why a fit that Ray Train saw end well did not finish its MLflow run (its rank 0 logs the model and ends
    the run last: a run still RUNNING means that step failed, e.g. on a full disk, and could not say so);
    None when the run is FINISHED."""
    try:
        run = tracker.run(run_id)
    except Exception as exc:  # noqa: BLE001 - the store cannot be read: say so instead of guessing
        return f"the MLflow run {run_id} cannot be read: {disk_full(exc) or one_line(exc)}"
    if run.info.status == "FINISHED":
        return None
    cause = run.data.tags.get("error")
    return cause or f"the training ended without finishing its MLflow run {run_id} (status {run.info.status})"
