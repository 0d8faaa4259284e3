"""What a killed fine-tuning leaves in MLflow, and how the next run clears it.

A SIGKILLed `genesis finetune` (or a transfer grid's child) cannot close its MLflow run: the run stays RUNNING,
and when the kill came after the model was registered, `genesis-<task>` keeps a version of a run that never
finished (and `models:/genesis-<task>/latest` may name it). The next run that finds it - the next fine-tuning of
the same task, patch store and init (its run's `genesis.holder` is dead: `pipeline.storage.leases`), or the next
attempt of the same grid (it holds the grid's lease, so every RUNNING child is an earlier attempt's) - marks the
run KILLED with the reason, says so, and removes the versions the run registered (removed, not tagged: a version
of a run that never finished must not be `latest`, nor be picked by anyone later; the rerun registers anew).
"""

from __future__ import annotations

__all__ = ["close_killed", "close_dead_finetunes", "registered_version"]


def _versions(tracker, task: str, run_id: str) -> list:
    from pipeline.runtime.tracking import finetuned_model_name

    name = finetuned_model_name(task)
    try:
        return list(tracker.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"))
    except Exception:  # noqa: BLE001 - no such registered model yet: nothing to find
        return []


def registered_version(tracker, task: str, run_id: str) -> str | None:
    """The version of `genesis-<task>` that run `run_id` registered (the newest, should there be several), or
    None when it registered none: what a run's summary names, never `latest` (another run's, perhaps)."""
    versions = _versions(tracker, task, run_id)
    return str(max(int(v.version) for v in versions)) if versions else None


def close_killed(tracker, run, reason: str) -> list[str]:
    """Mark `run` (an MLflow Run left RUNNING by a killed process) KILLED with `reason` in its `error` tag, and
    remove the versions it registered; one line per thing done."""
    from pipeline.runtime.tracking import finetuned_model_name

    run_id = run.info.run_id
    task = run.data.tags.get("task")
    versions = _versions(tracker, task, run_id) if task else []  # found first: closing the run may drop them
    tracker.mark_failed(run_id, reason=reason, status="KILLED")
    lines = [f"closed run {run_id} ({run.info.run_name}) as KILLED: {reason}"]
    for v in versions:
        name = finetuned_model_name(task)
        try:
            tracker.client.delete_model_version(name, v.version)
        except Exception as err:  # noqa: BLE001 - already gone (the Tracker drops a failed run's models), or not
            if _exists(tracker, name, v.version):
                lines.append(f"could not remove {name} version {v.version} of that run: {err}")
                continue
        lines.append(f"removed {name} version {v.version}, registered by that run")
    return lines


def _exists(tracker, name: str, version) -> bool:
    try:
        tracker.client.get_model_version(name, str(version))
        return True
    except Exception:  # noqa: BLE001 - not found
        return False


def close_dead_finetunes(tracker, experiment: str, task: str, store_key: str, init: str) -> list[str]:
    """Runs of `experiment` of the same task, patch store and init that are RUNNING while their holder is dead
    (`pipeline.storage.leases.dead_holder`: its pid is gone from this host, or its lease expired): closed
    (`close_killed`). Runs without a holder tag (older ones, other tools') and live ones are left alone."""
    from pipeline.storage.leases import dead_holder

    exp_id = tracker.experiment_id(experiment)
    if exp_id is None:
        return []
    runs = tracker.search_runs([exp_id], f"tags.task = '{task}' and tags.patch_store = '{store_key}' and "
                                         f"attributes.status = 'RUNNING'")
    lines = []
    for run in runs:
        if run.data.tags.get("init") != init:
            continue
        dead = dead_holder(run)
        if dead is not None:
            holder, why = dead
            lines += close_killed(tracker, run, f"interrupted: its process was killed ({why})")
    return lines
