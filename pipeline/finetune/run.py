"""`finetune`: one fine-tuning run (one task, one init, one label fraction, one seed) on Ray Train (V2),
recorded in MLflow and registered as `genesis-<task>`.

Everything that can be wrong deterministically (unknown task or preset, a store of another task, a test fold
the store lacks, an empty training or validation split, an init that does not fit the model) raises ValueError
here, before Ray starts, so it is never retried; so are the paths, tracking server and numbers. Ray, the fit and
the run's record are `pipeline.runtime.driver`'s (shared with pretraining and the transfer grid): a deterministic
error raised inside a worker ends the run at once, the MLflow run FAILED with the cause; only worker failures are
retried (`max_failures`, from the last epoch's checkpoint).

A fold-based task store (ECC) holds every fold; a fine-tuning runs one (`test_fold`, default the store's
first) and reads the store's view of it (`PatchStore.for_fold`).

Kills: the run carries `genesis.holder` (its process, renewed while it works: `pipeline.storage.leases`), so the
next fine-tuning of the same task, patch store and init knows a RUNNING run whose process is gone was killed: it
closes it as KILLED, says so, and removes the model versions it registered (`pipeline.finetune.leftovers`). The
summary names the exact version this run registered (`models:/genesis-<task>/<version>`), or none: never
`latest`, which may be another run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["finetune", "FinetuneResult", "task_of_store", "prepare", "Prepared", "COMMAND"]

COMMAND = "genesis finetune"
"""The entry point a fine-tuning's run records (named here: the process may have run other stages before)."""


def _fold_view(store, fold: int | None, path: str):
    """The store a fine-tuning reads: test fold `fold` of a fold-based store (a ValueError naming the folds it
    has when it lacks it), the store itself otherwise. A fold-based store needs a fold, another store takes
    none."""
    folds = store.folds
    if fold is None:
        if folds:
            raise ValueError(f"{path} holds folds {', '.join(map(str, folds))}: choose the test fold "
                             f"(--test-fold K)")
        return store
    if not folds:
        raise ValueError(f"--test-fold {fold}: {path} is not fold-based (it holds no folds)")
    if fold not in folds:
        raise ValueError(f"--test-fold {fold}: {path} holds folds {', '.join(map(str, folds))}, not fold {fold}")
    return store.for_fold(fold)


@dataclass
class FinetuneResult:
    name: str
    task: str
    init: str
    path: str
    mlflow_run_id: str
    tracking_uri: str
    registered_as: str
    metrics: dict
    error: str | None
    registered_version: str | None = None
    """The version of `registered_as` that this run registered; None when it registered none (it failed)."""
    closed: tuple[str, ...] = ()
    """What this run found left by killed runs of the same task, store and init, and closed (`leftovers`)."""

    def report(self) -> str:
        from pipeline.runtime.tracking import Tracker

        m = self.metrics or {}
        test = {k[5:]: v for k, v in sorted(m.items()) if k.startswith("test_") and not k.endswith("_n_nan")}
        model = (f"models:/{self.registered_as}/{self.registered_version}" if self.registered_version else
                 "none registered by this run")
        lines = [*self.closed, f"fine-tuning {self.name} ({self.task}, init {self.init}): "
                 f"{'FAILED: ' + self.error if self.error else 'finished'}",
                 f"  best validation loss {m.get('final_best_val_loss', m.get('best_val_loss', float('nan'))):.5f}",
                 "  test: " + (", ".join(f"{k} {_fmt(v)}" for k, v in test.items()) or "-"),
                 f"  model: {model}",
                 f"  checkpoints: {self.path}",
                 f"  MLflow run: {Tracker.at(self.tracking_uri).ui_hint(self.mlflow_run_id)}"]
        return "\n".join(lines)


def _fmt(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:.4f}"


def task_of_store(task: str, store) -> tuple[object, str]:
    """(TaskSpec, where it came from) of a fine-tuning on `store`: `task` is a built-in (or this process's
    registered) task's name, a task file's path, or the name of a user's task whose store recorded its task file
    (`PatchStore.task_spec`). The data fields the store was built with (cube size, channels, intensity, crop size,
    target values) override the task's, so a store built with overrides is read as it is. The source is `builtin`,
    the task file's path, or `patch store <path>`."""
    from pipeline.tasks.registry import get_task, resolve_task, task_names, task_source
    from pipeline.tasks.task_file import is_task_file

    stored_task = store.attrs.get("task")
    if is_task_file(task):
        spec = resolve_task(task)
        source = task_source(spec.name)
    elif task.lower() in task_names():
        spec, source = get_task(task), task_source(task)
    else:
        spec = store.task_spec() if stored_task == task.lower() else None
        if spec is None:
            if stored_task != task.lower():
                raise ValueError(f"{store.path} is a patch store of task {stored_task!r}, not {task.lower()!r}")
            raise ValueError(f"unknown task {task!r}: not a built-in task, and {store.path} records no task file; "
                             f"give the task file's path (--task FILE.yaml)")
        source = f"patch store {store.path}"
    if stored_task != spec.name:
        raise ValueError(f"{store.path} is a patch store of task {stored_task!r}, not {spec.name!r}")
    data = store.attrs.get("config", {}).get("task", {})
    sampling = data.get("sampling", {})
    changes = {"cube_size": tuple(store.attrs["cube_shape"])}
    if data.get("channels") is not None:
        changes["channels"] = tuple(data["channels"])
    if sampling.get("crop_size") is not None:
        changes["sampling.crop_size"] = tuple(sampling["crop_size"])
    if sampling.get("target_values") is not None:
        changes["sampling.target_values"] = tuple(sampling["target_values"])
    if data.get("intensity"):
        changes.update({f"intensity.{k}": v for k, v in data["intensity"].items()})
    try:
        return spec.with_overrides(**changes), source
    except (ValueError, TypeError):
        return spec.with_overrides(cube_size=changes["cube_size"]), source


@dataclass
class Prepared:
    """A fine-tuning checked before Ray starts: the spec and config it runs with and its rows."""
    patches: str
    store_key: str
    spec: object
    config: object
    train_rows: list[int]
    val_rows: list[int]
    fold: int | None = None
    """The test fold of a fold-based store (the worker opens `PatchStore(patches).for_fold(fold)`)."""
    task_source: str = "builtin"
    """Where the task came from (`task_of_store`): recorded on the run with its task file."""

    def task_record(self):
        """The task file, digest and source that the run records (`pipeline.tasks.task_file.TaskRecord`)."""
        from pipeline.tasks.task_file import task_record

        return task_record(self.spec, self.task_source)

    def loop_config(self, *, init: str, tracking_uri: str, run_id: str, gpus_per_worker: float = 0,
                    fault_injection: dict | None = None) -> dict:
        """What the Ray Train loop reads (without the init's weights, which travel separately)."""
        from pipeline.runtime.tracking import finetuned_model_name

        return {"finetune": self.config.to_dict(), "spec": self.spec, "patches": self.patches, "init": init,
                "tracking_uri": tracking_uri, "mlflow_run_id": run_id, "train_rows": self.train_rows,
                "val_rows": self.val_rows, "register_as": finetuned_model_name(self.spec.name), "fold": self.fold,
                "gpus_per_worker": gpus_per_worker, "fault_injection": fault_injection}


def prepare(patches: str, task: str, *, preset: str = "tiny", freeze_encoder: bool = False,
            label_fraction: float = 1.0, seed: int = 0, workers: int = 1, epochs: int | None = None,
            fold: int | None = None) -> Prepared:
    """Everything that can be wrong deterministically about one fine-tuning, as a ValueError naming it. `fold`:
    the test fold of a fold-based store (required there, refused elsewhere)."""
    import numpy as np

    from pipeline.finetune.config import preset as make_preset
    from pipeline.patches.store import PatchStore
    from pipeline.runtime.paths import store_location
    from pipeline.storage.objects import is_remote
    from pipeline.tasks.registry import resolve_task
    from pipeline.tasks.task_file import is_task_file

    if is_task_file(task):
        resolve_task(task)  # a task file is checked first: its errors name the file, the key and the value
    if not is_remote(patches) and not Path(patches).is_dir():  # a bucket's store: PatchStore says what is wrong
        raise ValueError(f"{patches}: no such patch store")
    store = PatchStore(patches)
    if not store.is_task:
        raise ValueError(f"{patches} is a pretraining patch store; fine-tuning needs a task store "
                         f"(`genesis patches task {task}`)")
    spec, source = task_of_store(task, store)
    store = _fold_view(store, fold, patches)
    config = make_preset(preset, spec).with_overrides(freeze_encoder=freeze_encoder, label_fraction=label_fraction,
                                                      seed=seed, max_epochs=epochs)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    train_rows = np.sort(store.fraction_rows(label_fraction))
    val_rows = np.sort(store.rows("validation"))
    if len(train_rows) < workers:
        raise ValueError(f"{patches}: {len(train_rows)} training cubes at label fraction {label_fraction}, fewer "
                         f"than the {workers} worker(s); use a larger fraction or store")
    if not len(val_rows):
        raise ValueError(f"{patches}: no validation cubes (early stopping and best weights need them)")
    if config.evaluation == "whole_volume":
        if not (store.scans["split"] == "test").any():
            raise ValueError(f"{patches}: scans.parquet lists no test case")
    elif not len(store.rows("test")):
        raise ValueError(f"{patches}: no test cubes")
    return Prepared(patches=store_location(patches), store_key=store.key, spec=spec, config=config,
                    train_rows=train_rows.tolist(), val_rows=val_rows.tolist(), fold=fold, task_source=source)


def finetune(patches: str, task: str, init: str = "scratch", *, preset: str = "tiny", freeze_encoder: bool = False,
             label_fraction: float = 1.0, seed: int = 0, workers: int = 1, gpus_per_worker: float = 0,
             tracking_uri: str | None = None, experiment: str = "genesis-finetune", storage_path: str | None = None,
             name: str | None = None, max_failures: int = 1, epochs: int | None = None,
             ray_address: str | None = None, test_fold: int | None = None,
             fault_injection: dict | None = None) -> FinetuneResult:
    """One fine-tuning. `test_fold`: a fold-based task's test fold; None: its first fold (fold 1 of ECC), so a
    fine-tuning is one fold; `genesis transfer` runs every fold."""
    from pipeline.cluster import ray_resources
    from pipeline.finetune.init import check_init, read_init
    from pipeline.finetune.leftovers import close_dead_finetunes, registered_version
    from pipeline.patches.store import PatchStore
    from pipeline.runtime import driver
    from pipeline.runtime.paths import output_dir
    from pipeline.runtime.hooks import stop_point
    from pipeline.runtime.tracking import Tracker, check_experiment, check_uri
    from pipeline.storage.leases import RunHeartbeat
    from pipeline.storage.objects import is_remote

    ray_resources(workers=workers, gpus_per_worker=gpus_per_worker, ray_address=ray_address, failures=max_failures)
    check_experiment(experiment)
    if test_fold is None and (is_remote(patches) or Path(patches).is_dir()):
        try:
            test_fold = (PatchStore(patches).folds or (None,))[0]
        except ValueError:  # not a patch store: prepare() says so
            pass
    prep = prepare(patches, task, preset=preset, freeze_encoder=freeze_encoder, label_fraction=label_fraction,
                   seed=seed, workers=workers, epochs=epochs, fold=test_fold)
    spec, config = prep.spec, prep.config
    storage = output_dir(storage_path, "--storage-path", default="ray_results")
    uri = check_uri(tracking_uri)
    init_state = read_init(init, uri)
    check_init(config, init_state, init)
    tracker = Tracker(uri)  # the store is opened once nothing deterministic is left to refuse
    closed = tuple(f"genesis finetune: {line}" for line in
                   close_dead_finetunes(tracker, experiment, spec.name, prep.store_key, init))
    for line in closed:
        print(line, flush=True)

    name = name or f"genesis-finetune-{spec.name}-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    tags = {"task": spec.name, "preset": preset, "init": init, "label_fraction": str(label_fraction),
            "seed": str(seed), "patch_store": prep.store_key}
    if prep.fold is not None:
        tags["fold"] = str(prep.fold)
    record = prep.task_record()
    run_id = tracker.create_run(experiment, name, tags={**tags, **record.tags()}, command=COMMAND)
    heartbeat = RunHeartbeat(tracker.client, run_id, COMMAND)  # the next run can tell if this one was killed
    stop_point("finetune:run")
    tracker.log_params(run_id, record.tags())
    tracker.log_text(run_id, record.text, record.artifact_file)  # the whole task, as the run used it
    loop_config = prep.loop_config(init=init, tracking_uri=tracker.uri, run_id=run_id,
                                   gpus_per_worker=gpus_per_worker, fault_injection=fault_injection)

    def work() -> driver.Outcome:
        from pipeline.finetune.worker import train_loop_per_worker
        from pipeline.training.progress import epoch_lines

        # one line per epoch on this console, from rank 0's log (the same metric names as pretraining's)
        with epoch_lines(tracker, run_id, prep.config.optimisation.max_epochs):
            return driver.fit(train_loop_per_worker, {**loop_config, "init_state": init_state}, name=name,
                              storage=storage, workers=workers, gpus_per_worker=gpus_per_worker,
                              max_failures=max_failures)

    try:
        outcome = driver.recorded(tracker, run_id, work, ray_address)
    finally:
        heartbeat.stop()
    return FinetuneResult(name=name, task=spec.name, init=init, path=outcome.path or f"{storage.rstrip('/')}/{name}",
                          mlflow_run_id=run_id, tracking_uri=tracker.uri, registered_as=loop_config["register_as"],
                          metrics=tracker.run_metrics(run_id), error=outcome.error,
                          registered_version=registered_version(tracker, spec.name, run_id), closed=closed)
