"""`genesis pretrain`: Models Genesis pretraining on Ray Train (V2), recorded in MLflow.

The driver only decides names and places: the Ray Train run (its storage path holds the
checkpoints), the MLflow run (created here, logged into by rank 0), and how many restarts a
run may take. A killed worker restarts the worker group from the last checkpoint, in the same
MLflow run; `--resume` continues a stopped run the same way. The config's batch is the global
batch, split evenly across the workers at the reference's lr; a split that does not divide, or a
train split smaller than one batch, is refused here before an MLflow run or Ray exists, as are the paths,
tracking server and numbers the runtime and cluster checks cover. Ray, the fit and the run's FAILED/KILLED record
are `pipeline.runtime.driver`'s, shared with fine-tuning and the transfer grid: a deterministic error inside a
worker (bad data, a bug) ends the run at once, named in its report and in the MLflow run's `error` tag (FAILED);
only worker and node failures take the restarts `max_failures` allows. While it trains, the driver prints one
line per epoch (`pipeline.training.progress`), Ray's own output being off unless `--verbose`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

from pipeline import degenerate
from pipeline.training.config import PretrainConfig, per_worker_batch

__all__ = ["pretrain", "check_data", "validation_warning", "PretrainResult", "RUN_FILE"]

RUN_FILE = "genesis_run.json"


@dataclass
class PretrainResult:
    name: str
    path: str
    mlflow_run_id: str
    tracking_uri: str
    metrics: dict
    error: str | None
    warnings: tuple[str, ...] = ()
    """What the user must know about the run (validation on training cubes), printed first by `report`."""

    def report(self) -> str:
        from pipeline.runtime.tracking import Tracker

        m = self.metrics or {}
        lines = [f"WARNING: {w}" for w in self.warnings]
        lines += [f"run {self.name}: {'FAILED: ' + self.error if self.error else 'finished'}",
                 f"  epochs {int(m.get('epoch', -1)) + 1}, train loss {m.get('train_loss', float('nan')):.5f}, "
                 f"validation loss {m.get('val_loss', float('nan')):.5f} (best {m.get('best_val_loss', float('nan')):.5f})",
                 *([f"  DEGENERATE: {flat}"] if (flat := degenerate.restoration_flag(
                     m.get("final_restoration_spread", math.nan))) else []),
                 f"  checkpoints: {self.path}",
                 f"  MLflow run: {Tracker.at(self.tracking_uri).ui_hint(self.mlflow_run_id)}"]
        return "\n".join(lines)


def _latest_run(storage) -> str | None:
    """The newest run under a storage tree (`pipeline.storage.objects.Tree`): by its run file's `created` time
    (a bucket keeps no usable modification time), by the file's mtime on disk for runs written before."""
    runs = []
    for name in storage.listdir():
        try:
            meta = json.loads(storage.read(f"{name}/{RUN_FILE}"))
        except (OSError, ValueError):  # not a run folder (or one still being written)
            continue
        local = storage.local
        created = meta.get("created") or ((local / name / RUN_FILE).stat().st_mtime if local else 0.0)
        runs.append((created, name))
    return max(runs)[1] if runs else None


def validation_warning(store) -> str | None:
    """Why this store's pretraining would validate on its training cubes (no validation cube), None when it
    would not: said in the run's report and its MLflow tag `validation`, never silently."""
    if (store.index["split"] == "validation").any():
        return None
    note = (store.attrs.get("validation") or {}).get("note")
    return note or (f"{store.path} has no validation cubes: pretraining validates on its training cubes (rebuild "
                    f"it with `genesis patches pretrain`, which draws a validation share of the scans)")


def check_data(store, config: PretrainConfig, workers: int) -> None:
    """What would make every worker fail at its start, said before Ray starts: a task store, a cube the U-Net
    cannot pool three times, a global batch that does not split across the workers, a train split smaller than
    one global batch, or a worker whose share of it is smaller than its batch (each rank's share computed as
    the worker computes it)."""
    from pipeline.data.cubes import CubeStreamConfig, PatchCubes

    if store.is_task:
        raise ValueError(f"{store.path} is a {store.purpose} patch store; pretraining needs a pretraining store "
                         f"(`genesis patches pretrain`)")
    shape = tuple(int(s) for s in store.cubes.shape[2:])
    if any(s % 8 for s in shape):
        raise ValueError(f"{store.path}: cubes of {'x'.join(map(str, shape))} voxels; the U-Net pools three times, "
                         f"so every side must be a multiple of 8")
    batch = per_worker_batch(config.batch_size, workers)
    n_train = int((store.index["split"] == "train").sum())
    if n_train < config.batch_size:
        raise ValueError(f"{store.path}: the train split has {n_train} cubes, fewer than one global batch of "
                         f"{config.batch_size}; extract more scans or lower --batch-size")
    stream = CubeStreamConfig(split="train", seed=config.seed, batch_size=config.batch_size,
                              distinct_scans=config.distinct_scans, buffer_size=config.read_block)
    for rank in range(workers):
        share = len(PatchCubes(store.path, stream, rank=rank, world_size=workers))
        if share < batch:
            raise ValueError(f"{store.path}: worker {rank} of {workers} gets {share} training cubes per epoch, "
                             f"fewer than its batch of {batch}; use fewer workers or a larger store")


def pretrain(patches: str, config: PretrainConfig, *, workers: int = 2, gpus_per_worker: float = 0,
             ray_address: str | None = None, tracking_uri: str | None = None,
             experiment: str = "genesis-pretraining", storage_path: str | None = None, name: str | None = None,
             resume: bool = False, max_failures: int = 3, register_as: str | None = None,
             system_metrics: bool = True, fault_injection: dict | None = None,
             resume_epochs: int | None = None) -> PretrainResult:
    from pipeline.cluster import ray_resources
    from pipeline.patches.config import preprocessing_of
    from pipeline.patches.store import PatchStore
    from pipeline.runtime import driver
    from pipeline.runtime.errors import failure_reason
    from pipeline.runtime.paths import output_dir, store_location
    from pipeline.runtime.tracking import PRETRAINED_MODEL, Tracker, check_experiment, check_uri
    from pipeline.storage.objects import open_tree

    # everything that can be wrong before Ray and the MLflow run exist, each naming its option
    ray_resources(workers=workers, gpus_per_worker=gpus_per_worker, ray_address=ray_address, failures=max_failures)
    check_experiment(experiment)
    store = PatchStore(patches)  # fails early, naming the path, when it is not a patch store
    warning = None if store.is_task else validation_warning(store)
    storage = output_dir(storage_path, "--storage-path", default="ray_results")  # a folder or s3://, checked
    runs = open_tree(storage)
    patches = store_location(patches)
    if resume:
        name = name or _latest_run(runs)
        if not name or not runs.exists(f"{name}/{RUN_FILE}"):
            raise ValueError(f"--resume: no run {'named ' + repr(name) if name else 'found'} under {storage}")
        meta = json.loads(runs.read(f"{name}/{RUN_FILE}"))
        if meta["patches_key"] != store.key:
            raise ValueError(f"--resume: run {name} trained on patch store {meta['patches_key']}, not {store.key}")
        run_id, uri = meta["mlflow_run_id"], check_uri(meta["tracking_uri"])
        # the run continues with its own settings; only a longer schedule may be asked for
        config = PretrainConfig.from_dict(meta["config"]).with_overrides(epochs=resume_epochs)
        check_data(store, config, workers)
        tracker = Tracker(uri)
    else:
        check_data(store, config, workers)  # before an MLflow run or Ray exists
        tracker = Tracker.open(tracking_uri)
        name = name or f"genesis-pretrain-{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        tags = {"preset": config.preset, "patch_store": store.key,
                "recipe": preprocessing_of(store.attrs)["recipe"]}
        if warning:
            tags["validation"] = f"on training cubes: {warning}"
        run_id = tracker.create_run(experiment, name, tags=tags, command="genesis pretrain")
        try:  # beside Ray's checkpoints, on disk or in the bucket: what `--resume` continues from
            runs.write(f"{name}/{RUN_FILE}", json.dumps({
                "mlflow_run_id": run_id, "tracking_uri": tracker.uri, "patches": patches,
                "patches_key": store.key, "config": config.to_dict(), "created": time.time()}, indent=1).encode())
        except BaseException as exc:  # the run exists now: never leave it RUNNING
            tracker.mark_failed(run_id, reason=failure_reason(exc))
            raise

    loop_config = {"pretrain": config.to_dict(), "patches": patches, "tracking_uri": tracker.uri,
                   "mlflow_run_id": run_id, "gpus_per_worker": gpus_per_worker,
                   "register_as": register_as or PRETRAINED_MODEL, "system_metrics": system_metrics,
                   # tests only (pipeline.runtime.hooks): {"rank": 1, "epoch": 1, "marker": path} kills that worker
                   # once; {"attempts": path} counts the worker starts
                   "fault_injection": fault_injection}

    def work() -> driver.Outcome:
        from pipeline.training.progress import epoch_lines
        from pipeline.training.worker import train_loop_per_worker

        with epoch_lines(tracker, run_id, config.epochs):  # one line per epoch on this console, from rank 0's log
            return driver.fit(train_loop_per_worker, loop_config, name=name, storage=str(storage), workers=workers,
                              gpus_per_worker=gpus_per_worker, max_failures=max_failures)

    outcome = driver.recorded(tracker, run_id, work, ray_address)
    return PretrainResult(name=name, path=outcome.path or f"{storage.rstrip('/')}/{name}", mlflow_run_id=run_id,
                          tracking_uri=tracker.uri, metrics=outcome.metrics, error=outcome.error,
                          warnings=(warning,) if warning else ())
