"""One Ray Tune trial of a transfer grid: a function trainable that fits one TorchTrainer (Ray Train V2 inside
Tune: `TuneReportCallback` in the trainer's `ray.train.RunConfig`) running a group of fine-tunings of one task.

The trial creates each fine-tuning's MLflow run as a child of the grid's parent run right before it fits,
so a queued trial shows nothing as RUNNING. It fits through `pipeline.runtime.driver.fit`, as pretraining and
fine-tuning do, and never raises: whatever ends the trainer (a worker that kept dying past `max_failures`, or at
once a deterministic error) is written as the reason on each fine-tuning of the group that did not finish, and Tune
moves on to the next trial. Each child run is tagged with its trial (`genesis.trial`), so the driver's progress
line (`pipeline.transfer.progress`) times a fine-tuning from the end of the one before it.
"""

from __future__ import annotations

__all__ = ["run_trial", "child_tags", "create_child_run", "COMMAND"]

NOT_FINISHED = "the trial ended before this fine-tuning finished"
COMMAND = "genesis transfer"
"""The command that makes a grid's runs, parent and children, wherever they are created (the driver, a trial
in a Ray worker) and whatever the process ran before (the demo, `genesis reproduce`)."""


def child_tags(cell, settings: dict) -> dict[str, str]:
    """The tags that make a run one cell of one grid (read back by `pipeline.transfer.table`): the cell, its
    test fold, what its store is against the reference's data (`settings["stores"][task]`: store_folds,
    store_cases, store_protocol, from `pipeline.transfer.protocol.store_differences`), the epoch cap, and the
    process that launched the grid (`genesis.launched_by`, read on the driver: a Ray worker's own would name
    whatever last set the environment)."""
    tags = {"mlflow.parentRunId": settings["parent_run_id"], "genesis.grid": settings["grid_key"],
            "genesis.cell": cell.key, "task": cell.task, "init": cell.init,
            "label_fraction": str(cell.label_fraction), "seed": str(cell.seed), "preset": settings["preset"],
            "freeze_encoder": str(settings["freeze_encoder"]), "patch_store": cell.store_key,
            "epochs_cap": "" if settings.get("epochs") is None else str(settings["epochs"]),
            **{k: str(v) for k, v in settings.get("stores", {}).get(cell.task, {}).items()}}
    if cell.fold is not None:
        tags["fold"] = str(cell.fold)
    if settings.get("launched_by"):
        tags["genesis.launched_by"] = settings["launched_by"]
    return tags


def create_child_run(cell, settings: dict, extra_tags: dict[str, str] | None = None) -> str:
    """The cell's MLflow run, a child of the grid's parent: its tags (`child_tags`), the entry point `genesis
    transfer`, the params `fold` (fold-based tasks), `seed`, `label_fraction`, and its task: the artifact
    `task/<name>.yaml` with params and tags `task_file_sha256` and `task_source` (`settings["task_files"]`);
    returns its id."""
    from pipeline.runtime.tracking import Tracker

    tracker = Tracker.at(settings["tracking_uri"])
    task_file = (settings.get("task_files") or {}).get(cell.task)
    provenance = {"task_file_sha256": task_file["sha256"], "task_source": task_file["source"][:5000]} \
        if task_file else {}
    run_id = tracker.create_run(settings["experiment"], cell.name,
                                tags={**child_tags(cell, settings), **provenance, **(extra_tags or {})},
                                command=COMMAND)
    params = {"seed": str(cell.seed), "label_fraction": str(cell.label_fraction), **provenance}
    if cell.fold is not None:
        params["fold"] = str(cell.fold)
    tracker.log_params(run_id, params)
    if task_file:
        tracker.log_text(run_id, task_file["text"], f"task/{task_file['name']}.yaml")
    return run_id


def run_trial(config: dict, groups: list | None = None, init_refs: dict | None = None,
              settings: dict | None = None) -> dict:
    """`config["group"]` indexes `groups` (each: a list of (Cell, Prepared)); `init_refs`: init -> object ref
    of its state dict (None for scratch); `settings`: the grid's tracking URI, parent run, storage, resources."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.finetune.worker import train_group_per_worker
    from pipeline.runtime import driver
    from pipeline.runtime.tracking import Tracker
    from pipeline.transfer.progress import TRIAL_TAG

    index = config["group"]
    group = groups[index]
    tracker = Tracker.at(settings["tracking_uri"])
    trial_name = f"{settings['name']}-{group[0][0].task}-g{index}"
    loop_cells, run_ids = [], []
    for cell, prep in group:
        run_id = create_child_run(cell, settings, {TRIAL_TAG: trial_name})  # the progress line's time is its own
        run_ids.append(run_id)
        loop_cells.append(prep.loop_config(init=cell.init, tracking_uri=tracker.uri, run_id=run_id,
                                           gpus_per_worker=settings["gpus_per_trial"],
                                           fault_injection=settings.get("fault_injection")))
    used = {cell.init for cell, _ in group}
    error = driver.fit(train_group_per_worker,
                       {"cells": loop_cells, "init_states": {k: v for k, v in init_refs.items() if k in used}},
                       name=trial_name, storage=settings["storage"],
                       workers=settings["workers_per_trial"], gpus_per_worker=settings["gpus_per_trial"],
                       max_failures=settings["max_failures"], callbacks=[TuneReportCallback()]).error
    finished = 0
    for run_id in run_ids:
        status = tracker.run_status(run_id)
        finished += status == "FINISHED"
        if status == "RUNNING":  # a fine-tuning that failed on its own has its reason already
            tracker.mark_failed(run_id, reason=f"{NOT_FINISHED}: {error}" if error else NOT_FINISHED)
    return {"group": index, "task": group[0][0].task, "finetunings": len(run_ids), "finished": finished,
            "failed": len(run_ids) - finished, "error": error or ""}
