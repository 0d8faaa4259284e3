"""Everything a run needs to continue exactly: model, optimizer, scheduler, counters, RNG states; and the
per-epoch steps every Ray Train loop of the project shares (report with a checkpoint, early stopping, means and
sums over the ranks). Test faults are `pipeline.runtime.hooks`'."""

from __future__ import annotations

import os
import random
import tempfile

import numpy as np
import torch

__all__ = ["save_state", "load_state", "restore_rng", "STATE_FILE", "report_epoch",
           "mean_across_ranks", "sum_across_ranks", "resume_from_checkpoint"]

STATE_FILE = "state.pt"


def save_state(directory: str, *, model, optimizer, scheduler, epoch: int, best_val: float, bad_epochs: int,
               best_model: dict, config: dict, stopped_early: bool = False, cell: str | None = None) -> str:
    """`cell`: which fine-tuning of a group wrote it (its MLflow run id), so only that one resumes from it."""
    path = os.path.join(directory, STATE_FILE)
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "best_val": best_val, "bad_epochs": bad_epochs, "best_model": best_model,
        "config": config, "stopped_early": stopped_early, "cell": cell,
        "rng": _rng_state(),
    }, path)
    return path


def _rng_state() -> dict:
    """Global RNG states as tensors and plain numbers, so the file loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached], "python": list(random.getstate()[1])}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate((3, tuple(state["python"]), None))


def load_state(directory: str) -> dict:
    """Checkpoints are our own files, but are still loaded without running code (weights_only)."""
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def report_epoch(rank: int, metrics: dict, **state) -> None:
    """Rank 0 saves `state` (save_state's fields) as this epoch's checkpoint; every rank reports, as Ray Train
    requires, so a restarted worker group resumes from the last finished epoch."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            save_state(tmp, **state)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def track_best(model, val_loss: float, best_val: float, bad_epochs: int, best_model: dict | None
               ) -> tuple[float, int, dict | None]:
    """One epoch of early-stopping bookkeeping: a better validation loss keeps a CPU copy of the weights and
    resets the count of epochs without improvement; returns (best_val, bad_epochs, best_model).

    Counted as Keras 2.2.4's EarlyStopping(monitor='val_loss', mode='min', min_delta=0) and
    ModelCheckpoint(save_best_only=True) count (the reference's fine-tuning callbacks,
    keras/downstream_tasks/utils.py lines 124-134): "better" is strictly lower (a NaN never is), and a caller
    that stops when `bad_epochs >= patience` stops on the same epoch as Keras's `wait >= patience`."""
    if val_loss < best_val:
        return val_loss, 0, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return best_val, bad_epochs + 1, best_model


def mean_across_ranks(value: float, device) -> float:
    """The mean of a per-rank number over the DDP group (the number itself without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / dist.get_world_size()
    return value


def sum_across_ranks(values: list[float], device) -> list[float]:
    """Per-rank numbers (e.g. a loss sum and a count) summed over the DDP group, in float64 (themselves
    without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]
    return [float(v) for v in values]


def resume_from_checkpoint(model, optimizer, scheduler, key: str | None = None
                           ) -> tuple[int, float, int, dict | None, bool]:
    """Load Ray Train's latest checkpoint (a restarted worker group, or `--resume`) into the model, optimizer,
    scheduler and RNGs; returns (start_epoch, best_val, bad_epochs, best_model, stopped). A run that stopped
    early stays stopped; one that ran out of epochs continues when given more. Without a checkpoint, or with one
    another fine-tuning of the same group wrote (`key` differs from its `cell`): a fresh start."""
    import math

    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return 0, math.inf, 0, None, False
    with checkpoint.as_directory() as d:
        state = load_state(d)
    if key is not None and state.get("cell") not in (None, key):
        return 0, math.inf, 0, None, False
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return (state["epoch"] + 1, state["best_val"], state["bad_epochs"], state["best_model"],
            state.get("stopped_early", False))
