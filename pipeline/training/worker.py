"""`train_loop_per_worker`: what each Ray Train worker runs. It only wires the pieces together:
this rank's share of each global batch, DDP model, this rank's share of the validation batches (loss
reduced as sum and count), checkpoints, and MLflow on rank 0."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["train_loop_per_worker"]


def train_loop_per_worker(cfg: dict) -> None:
    """One pretraining worker. When it raises, rank 0 first ends its MLflow run and, for an error no retry mends
    (a full disk among them), marks it FAILED with the cause and drops the model it may have logged
    (`pipeline.runtime.tracking.record_failure`)."""
    import ray.train

    try:
        _train(cfg)
    except Exception as exc:
        if ray.train.get_context().get_world_rank() == 0:
            from pipeline.runtime.tracking import record_failure

            record_failure(cfg["tracking_uri"], cfg["mlflow_run_id"], exc)
        raise


def _train(cfg: dict) -> None:
    import ray.train

    from pipeline import degenerate
    from pipeline.training.pictures import restoration_check
    import ray.train.torch

    from pipeline.data.cubes import CubeStreamConfig, PatchCubes
    from pipeline.data.genesis_batches import genesis_pairs
    from pipeline.data.validation import FIXED_CORRUPTION, ValidationCubes
    from pipeline.patches.config import preprocessing_of
    from pipeline.patches.store import PatchStore
    from pipeline.runtime import hooks
    from pipeline.training.checkpoint import (mean_across_ranks, report_epoch, resume_from_checkpoint,
                                              sum_across_ranks, track_best)
    from pipeline.training.config import PretrainConfig, per_worker_batch, precision
    from pipeline.training.steps import (build_model, build_optimizer, build_scheduler, restore, train_epoch,
                                         validation_sums)

    config = PretrainConfig.from_dict(cfg["pretrain"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    hooks.worker_started(cfg.get("fault_injection"), rank)
    batch = per_worker_batch(config.batch_size, world)
    torch.manual_seed(config.seed)  # the model's initial weights; every other draw has its own generator

    model = build_model(config)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    start_epoch, best_val, bad_epochs, best_model, stopped = resume_from_checkpoint(model, optimizer, scheduler)
    ddp_model = ray.train.torch.prepare_model(model)

    data = PatchCubes(cfg["patches"], CubeStreamConfig(split="train", seed=config.seed, batch_size=config.batch_size,
                                                       distinct_scans=config.distinct_scans,
                                                       buffer_size=config.read_block), rank=rank, world_size=world)
    if len(data) < batch:
        raise ValueError(f"{cfg['patches']}: {len(data)} training cubes per worker, fewer than the per-worker batch "
                         f"{batch} (global batch {config.batch_size} over {world} workers)")
    val = ValidationCubes(cfg["patches"], batch_size=config.batch_size, cubes=config.val_cubes, seed=config.seed,
                          rank=rank, world_size=world)

    logger = tracker = fig_x = fig_y = None
    if rank == 0:
        from pipeline.runtime.tracking import Tracker
        from pipeline.training.pictures import figure_pairs

        store = PatchStore(cfg["patches"])
        preprocessing = preprocessing_of(store.attrs)
        fig_x, fig_y = figure_pairs(store.read_cubes(val.first(config.figure_cubes))[:, 0], config.seed)
        tracker = Tracker.at(cfg["tracking_uri"])
        logger = tracker.logger(cfg["mlflow_run_id"], system_metrics=cfg.get("system_metrics", True))
        logger.log_params({
            "pretrain": config.to_dict(), "patches": {"path": cfg["patches"], "key": store.key},
            "recipe": preprocessing["recipe"], "modality": preprocessing.get("modality") or "",
            "ray": {"workers": world, "gpus_per_worker": cfg.get("gpus_per_worker", 0)},
            "batch": {"global": config.batch_size, "per_worker": batch, "lr": config.lr,
                      "lr_rule": "the global batch is split across workers; lr unscaled"},
            "precision": precision(config, device.type),
            "validation": {"split": val.split, "cubes": len(val), "batches": val.n_batches,
                           "rule": (store.attrs.get("validation") or {}).get("rule", "the scans' own tags"),
                           "corruption": "afresh each epoch from (seed, epoch)" if config.val_recorrupt
                           else "the same every epoch"}})
        if start_epoch == 0:
            logger.log_patch_store(cfg["patches"], store.key, store.index)

    generator = torch.Generator(device=device)
    epoch = start_epoch - 1
    for epoch in range(start_epoch, config.epochs if not stopped else start_epoch):
        data.set_epoch(epoch)
        generator.manual_seed(int(np.random.default_rng([config.seed, epoch, rank]).integers(2**62)))
        stats = train_epoch(ddp_model, genesis_pairs(data.batches(), device, generator), optimizer, device, config)
        train_loss = mean_across_ranks(stats.loss, device)
        sse, voxels = validation_sums(model, val.pairs(epoch if config.val_recorrupt else FIXED_CORRUPTION, device),
                                      device, config.bf16)
        sse, voxels = sum_across_ranks([sse, voxels], device)
        val_loss = sse / voxels
        lr = optimizer.param_groups[0]["lr"]
        if config.scheduler == "plateau":
            scheduler.step(val_loss)
        else:
            scheduler.step()
        best_val, bad_epochs, best_model = track_best(model, val_loss, best_val, bad_epochs, best_model)
        stopped_early = bad_epochs >= config.patience
        stop = stopped_early or epoch + 1 == config.epochs
        cubes_per_s = mean_across_ranks(stats.cubes_per_s, device) * world
        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "best_val_loss": best_val,
                   "lr": lr, "cubes_per_s": cubes_per_s, "data_share": mean_across_ranks(stats.data_share, device),
                   "epoch_seconds": stats.seconds, "data_seconds": stats.data_seconds, "bad_epochs": bad_epochs,
                   "stopped": float(stop)}
        if logger:
            restored, logged = None, {k: v for k, v in metrics.items() if k != "epoch"}
            if epoch % config.image_every == 0 or stop:  # flat restorations (pipeline.degenerate): in the same
                restored = restore(model, fig_x, device, config.bf16)  # batch, so the epoch's line shows them
                logged["restoration_spread"] = restoration_check(fig_y, restored)[0]
            logger.log_metrics(logged, step=epoch)
            if restored is not None:
                _log_figure(logger, fig_x, fig_y, restored, f"epoch {epoch}: validation MSE {val_loss:.5f}",
                            f"restoration/epoch_{epoch:04d}.png")
        report_epoch(rank, metrics, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch,
                     best_val=best_val, bad_epochs=bad_epochs, best_model=best_model, config=config.to_dict(),
                     stopped_early=stopped_early)
        hooks.after_epoch(cfg.get("fault_injection"), rank, epoch)
        if stop:
            break

    if logger:
        import tempfile

        from pipeline.model_io.model_format import log_model
        from pipeline.runtime.errors import full_disk_names
        from pipeline.runtime.tracking import PRETRAINED_MODEL

        final = build_model(config)
        final.load_state_dict(best_model)
        final.eval()
        spread, flat = restoration_check(fig_y, restore(final.to(device), fig_x, device, config.bf16))
        final.cpu()
        logger.log_metrics({"final_restoration_spread": spread}, step=epoch)
        if flat:  # the run says so, not only its pictures
            tracker.client.set_tag(cfg["mlflow_run_id"], degenerate.TAG, flat)
        # how a scan becomes the model's input: recipe, intensity rule, cube size, modality, and the store
        with full_disk_names(tempfile.gettempdir()):  # MLflow writes the model there before copying it
            info = log_model(final, preprocessing={**preprocessing, "patch_store": store.key})
        logger.log_metrics({"final_best_val_loss": best_val}, step=epoch)
        tracker.register_model(info.model_uri, cfg.get("register_as", PRETRAINED_MODEL), metric=best_val,
                               tags={"patch_store": store.key, "preset": config.preset, "run_id": cfg["mlflow_run_id"],
                                     "recipe": preprocessing["recipe"], **({degenerate.TAG: flat} if flat else {})})
        logger.end()


def _log_figure(logger, x, y, restored, title: str, name: str) -> None:
    import matplotlib.pyplot as plt

    from pipeline.training.pictures import restoration_figure

    fig = restoration_figure(x, y, restored, title)
    logger.log_figure(fig, name)
    plt.close(fig)
