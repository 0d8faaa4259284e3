"""One Ray Tune trial of a transfer grid: a function trainable that fits one TorchTrainer (Ray Train V2 inside
Tune: `TuneReportCallback` in the trainer's `ray.train.RunConfig`) running a group of fine-tunings of one task.

The trial creates each fine-tuning's MLflow run as a child of the grid's parent run right before it fits,
so a queued trial shows nothing as RUNNING. It never raises: whatever ends the trainer (a worker that kept
dying past `max_failures`, or at once a deterministic error: `pipeline.preflight.torch_trainer`) is written as
the reason on each fine-tuning of the group that did not finish,
and Tune moves on to the next trial.
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
    transfer`, and the params `fold` (fold-based tasks), `seed`, `label_fraction`; returns its id."""
    from pipeline.tracking import _client, create_run

    uri = settings["tracking_uri"]
    run_id = create_run(uri, settings["experiment"], cell.name, tags={**child_tags(cell, settings),
                                                                       **(extra_tags or {})}, command=COMMAND)
    client = _client(uri)
    params = {"seed": str(cell.seed), "label_fraction": str(cell.label_fraction)}
    if cell.fold is not None:
        params["fold"] = str(cell.fold)
    for k, v in params.items():
        client.log_param(run_id, k, v)
    return run_id


def run_trial(config: dict, groups: list | None = None, init_refs: dict | None = None,
              settings: dict | None = None) -> dict:
    """`config["group"]` indexes `groups` (each: a list of (Cell, Prepared)); `init_refs`: init -> object ref
    of its state dict (None for scratch); `settings`: the grid's tracking URI, parent run, storage, resources."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.preflight import failure_reason, torch_trainer

    from pipeline.finetune.run import scaling
    from pipeline.finetune.worker import train_group_per_worker
    from pipeline.tracking import mark_failed, run_status

    index = config["group"]
    group = groups[index]
    uri = settings["tracking_uri"]
    loop_cells, run_ids = [], []
    for cell, prep in group:
        run_id = create_child_run(cell, settings)
        run_ids.append(run_id)
        loop_cells.append(prep.loop_config(init=cell.init, tracking_uri=uri, run_id=run_id,
                                           gpus_per_worker=settings["gpus_per_trial"],
                                           fault_injection=settings.get("fault_injection")))
    used = {cell.init for cell, _ in group}
    trainer = torch_trainer(
        train_group_per_worker,
        train_loop_config={"cells": loop_cells, "init_states": {k: v for k, v in init_refs.items() if k in used}},
        scaling_config=scaling(settings["workers_per_trial"], settings["gpus_per_trial"]),
        run_config=RunConfig(name=f"{settings['name']}-{group[0][0].task}-g{index}", storage_path=settings["storage"],
                             failure_config=FailureConfig(max_failures=settings["max_failures"]),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=[TuneReportCallback()]),
    )
    error = None
    try:
        result = trainer.fit()
        if result.error:
            error = failure_reason(result.error)
    except Exception as exc:  # noqa: BLE001 - recorded on the group's runs; the grid goes on
        error = failure_reason(exc)
    finished = 0
    for run_id in run_ids:
        status = run_status(uri, run_id)
        finished += status == "FINISHED"
        if status == "RUNNING":  # a fine-tuning that failed on its own has its reason already
            mark_failed(uri, run_id, reason=f"{NOT_FINISHED}: {error}" if error else NOT_FINISHED)
    return {"group": index, "task": group[0][0].task, "finetunings": len(run_ids), "finished": finished,
            "failed": len(run_ids) - finished, "error": error or ""}
