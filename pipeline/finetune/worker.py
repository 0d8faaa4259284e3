"""The Ray Train loops of fine-tuning: wires the data, model, optimiser, checkpoints and MLflow (rank 0); the
steps themselves are plain functions in steps.py, the test evaluation is evaluate.py.

- `train_loop_per_worker`: one fine-tuning (`genesis finetune`).
- `train_group_per_worker`: several fine-tunings one after the other in one worker group (a trial of
  `genesis transfer`), so that the ~25 s start-up of a Ray Train run is paid once per group, not per
  fine-tuning. Each keeps its own MLflow run; a fine-tuning whose run is FINISHED is skipped (a restarted
  group continues with the next one), and a checkpoint resumes only the fine-tuning that wrote it.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["train_loop_per_worker", "train_group_per_worker", "open_store"]


def open_store(path: str, fold: int | None = None):
    """The task store a fine-tuning reads: for a fold-based task (ECC) the view of test fold `fold` (its
    training, validation and test rows: `PatchStore.for_fold`), else the store itself."""
    from pipeline.patches.store import PatchStore

    store = PatchStore(path)
    return store if fold is None else store.for_fold(int(fold))


def train_loop_per_worker(cfg: dict) -> None:
    try:
        _run_one(cfg, cfg.get("init_state"))
    except Exception as exc:
        _record(cfg, exc)
        raise


def _record(cfg: dict, exc: Exception) -> None:
    """Rank 0 ends its MLflow run and, for an error no retry mends (a full disk among them), marks it FAILED with
    the cause and drops the model it may have logged or registered (`record_failure`)."""
    import ray.train

    from pipeline.runtime.tracking import record_failure

    if ray.train.get_context().get_world_rank() == 0:
        record_failure(cfg["tracking_uri"], cfg["mlflow_run_id"], exc)


def train_group_per_worker(cfg: dict) -> None:
    """`cfg["cells"]`: one loop config per fine-tuning (as `train_loop_per_worker` takes, each with its own
    `mlflow_run_id`); `cfg["init_states"]`: init name -> state dict or an object ref to one (shared by cells).

    With one worker an exception in one fine-tuning fails only that fine-tuning (its run is marked FAILED
    with the reason, not retried) and the group goes on. With several workers it propagates (a peer's
    collective would otherwise hang): a deterministic error ends the group at once (`pipeline.runtime.driver`),
    any other makes Ray Train restart the group (`max_failures`)."""
    import ray
    import ray.train

    from pipeline.runtime.errors import disk_full, one_line
    from pipeline.runtime.tracking import RunLogger, Tracker

    world = ray.train.get_context().get_world_size()
    states = cfg.get("init_states", {})
    for cell in cfg["cells"]:
        tracker = Tracker.at(cell["tracking_uri"])
        if tracker.run_status(cell["mlflow_run_id"]) == "FINISHED":
            continue
        state = states.get(cell["init"])
        if isinstance(state, ray.ObjectRef):
            state = ray.get(state)
        try:
            _run_one(cell, state)
        except Exception as exc:  # noqa: BLE001 - reported on the fine-tuning's run, the group goes on
            if world > 1:
                _record(cell, exc)
                raise
            RunLogger.end_active("FAILED")  # else the next fine-tuning's logger finds this one active
            tracker.mark_failed(cell["mlflow_run_id"], reason=disk_full(exc) or one_line(exc))


def _run_one(cfg: dict, init_state: dict | None) -> None:
    import ray.train
    import ray.train.torch

    from pipeline.finetune.config import FinetuneConfig
    from pipeline.finetune.data import batches, epoch_rows
    from pipeline.finetune.init import apply_init, build_model, freeze_encoder
    from pipeline.finetune.steps import build_optimizer, build_scheduler, evaluate_loss, loss_function, train_epoch
    from pipeline.runtime import hooks
    from pipeline.training.checkpoint import mean_across_ranks, report_epoch, resume_from_checkpoint, track_best

    config = FinetuneConfig.from_dict(cfg["finetune"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # the initial weights of what the init does not cover (head, scratch)

    model = apply_init(build_model(config), init_state, cfg["init"])
    if config.freeze_encoder:
        freeze_encoder(model)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    loss_fn = loss_function(config)
    start_epoch, best_val, bad_epochs, best_model, stopped = resume_from_checkpoint(model, optimizer, scheduler,
                                                                                     key=cfg["mlflow_run_id"])
    model.to(device)
    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model

    store = open_store(cfg["patches"], cfg.get("fold"))
    train_rows, val_rows = np.asarray(cfg["train_rows"]), np.asarray(cfg["val_rows"])

    logger = None
    if rank == 0:
        from pipeline.runtime.tracking import Tracker

        logger = Tracker.at(cfg["tracking_uri"]).logger(cfg["mlflow_run_id"],
                                                        system_metrics=cfg.get("system_metrics", False))
        if start_epoch == 0:
            idx = store.index.set_index("row")
            fold = {} if cfg.get("fold") is None else {"fold": cfg["fold"]}
            logger.log_params({**fold, "finetune": config.to_dict(), "init": cfg["init"],
                               "patches": {"path": cfg["patches"], "key": store.key},
                               "ray": {"workers": world, "gpus_per_worker": cfg.get("gpus_per_worker", 0)},
                               "data": {"train_rows": len(train_rows), "validation_rows": len(val_rows),
                                        "train_patients": int(idx.loc[train_rows, "patient_id"].nunique())}})
            logger.log_dict({"train_rows": train_rows.tolist(),
                             "train_case_ids": sorted(set(idx.loc[train_rows, "case_id"])),
                             "train_patient_ids": sorted(set(idx.loc[train_rows, "patient_id"])),
                             "validation_patient_ids": sorted(set(idx.loc[val_rows, "patient_id"]))},
                            "data/training_rows.json")
            logger.log_patch_store(cfg["patches"], store.key, store.index, context="fine-tuning")

    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.max_epochs if not stopped else start_epoch):
        rows = epoch_rows(train_rows, config.seed, epoch, rank, world)
        stats = train_epoch(ddp_model, batches(store, rows, config, config.batch_size), optimizer, loss_fn, device)
        train_loss = mean_across_ranks(stats.loss, device)
        # every rank scores the whole validation split with the same weights: one number, no gather
        val_loss = evaluate_loss(model, batches(store, val_rows, config, config.batch_size), loss_fn, device)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(val_loss)
        best_val, bad_epochs, best_model = track_best(model, val_loss, best_val, bad_epochs, best_model)
        stopped_early = bad_epochs >= config.patience
        stop = stopped_early or epoch + 1 >= config.max_epochs
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best_val_loss": best_val,
                   "lr": lr, "epoch_seconds": stats.seconds, "cubes_per_s": stats.cubes_per_s * world,
                   "bad_epochs": bad_epochs, "stopped": float(stop)}
        if logger:
            logger.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        report_epoch(rank, metrics, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                     best_val=best_val, bad_epochs=bad_epochs, best_model=best_model, config=config.to_dict(),
                     stopped_early=stopped_early, cell=cfg["mlflow_run_id"])
        hooks.after_epoch(cfg.get("fault_injection"), rank, epoch)
        if stop:
            break

    if logger:
        _finish(cfg, config, store, best_model, best_val, epoch, device, logger)


def _finish(cfg, config, store, best_model, best_val, epoch, device, logger) -> None:
    """Rank 0: the best weights on the test split; metrics, predictions.csv, figures, the registered model."""
    import tempfile

    import matplotlib.pyplot as plt

    from pipeline.finetune.evaluate import evaluate_test, model_preprocessing
    from pipeline.finetune.init import build_model
    from pipeline.model_io.model_format import log_finetuned_model
    from pipeline.runtime.errors import full_disk_names
    from pipeline.runtime.tracking import Tracker
    from pipeline.tasks.task_file import task_file_text

    final = build_model(config)
    final.load_state_dict(best_model)
    final.to(device).eval()
    result = evaluate_test(final, store, config, cfg["spec"], device)
    logger.log_metrics({**result.metrics, "final_best_val_loss": best_val}, step=epoch)
    for key, value in result.tags.items():  # genesis.degenerate: a background-only or chance result (pipeline.degenerate)
        Tracker.at(cfg["tracking_uri"]).client.set_tag(cfg["mlflow_run_id"], key, value)
    logger.log_table_csv(result.predictions, "predictions.csv")
    if result.settings:
        logger.log_dict(result.settings, "test/sliding_window.json")
    for fig, name in result.figures:
        logger.log_figure(fig, name)
        plt.close(fig)
    final.cpu()
    spec = cfg["spec"]  # the model carries its task file and how to apply it (`genesis predict` reads both)
    with full_disk_names(tempfile.gettempdir()):  # MLflow writes the model there before copying it
        info = log_finetuned_model(final, in_channels=config.in_channels, kind=config.kind,
                                   task_file=task_file_text(spec),
                                   preprocessing=model_preprocessing(spec, config, store))
    Tracker.at(cfg["tracking_uri"]).register_finetuned(
        info.model_uri, cfg["register_as"],
        tags={**{k: f"{v:.6g}" for k, v in result.metrics.items()}, **result.tags, "task": config.task, "init": cfg["init"],
              "preset": config.preset, "label_fraction": config.label_fraction, "freeze_encoder": config.freeze_encoder,
              "seed": config.seed, "patch_store": store.key, "run_id": cfg["mlflow_run_id"],
              **({} if cfg.get("fold") is None else {"fold": cfg["fold"]}),
              "output": "logits" if config.kind == "classification" else "probabilities"})
    logger.end()
