"""One Ray Tune trial of a transfer grid: a function trainable that fits one TorchTrainer (Ray Train V2 inside
Tune: `TuneReportCallback` in the trainer's `ray.train.RunConfig`) running a group of fine-tunings of one task.

The trial creates each fine-tuning's MLflow run as a child of the grid's parent run right before it fits,
so a queued trial shows nothing as RUNNING. It never raises: whatever ends the trainer (a worker that kept
dying past `max_failures`, or at once a deterministic error: `pipeline.preflight.torch_trainer`) is written as
the reason on each fine-tuning of the group that did not finish,
and Tune moves on to the next trial.
"""

from __future__ import annotations

__all__ = ["run_trial", "child_tags"]

NOT_FINISHED = "the trial ended before this fine-tuning finished"


def child_tags(cell, settings: dict) -> dict[str, str]:
    """The tags that make a run one cell of one grid (read back by `pipeline.transfer.table`)."""
    return {"mlflow.parentRunId": settings["parent_run_id"], "genesis.grid": settings["grid_key"],
            "genesis.cell": cell.key, "task": cell.task, "init": cell.init,
            "label_fraction": str(cell.label_fraction), "seed": str(cell.seed), "preset": settings["preset"],
            "freeze_encoder": str(settings["freeze_encoder"]), "patch_store": cell.store_key}


def run_trial(config: dict, groups: list | None = None, init_refs: dict | None = None,
              settings: dict | None = None) -> dict:
    """`config["group"]` indexes `groups` (each: a list of (Cell, Prepared)); `init_refs`: init -> object ref
    of its state dict (None for scratch); `settings`: the grid's tracking URI, parent run, storage, resources."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.preflight import failure_reason, torch_trainer

    from pipeline.finetune.run import scaling
    from pipeline.finetune.worker import train_group_per_worker
    from pipeline.tracking import create_run, mark_failed, run_status

    index = config["group"]
    group = groups[index]
    uri = settings["tracking_uri"]
    loop_cells, run_ids = [], []
    for cell, prep in group:
        run_id = create_run(uri, settings["experiment"], cell.name, tags=child_tags(cell, settings))
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
