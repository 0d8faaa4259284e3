"""Everything a run needs to continue exactly: model, optimizer, scheduler, counters, RNG states."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["save_state", "load_state", "restore_rng", "STATE_FILE"]

STATE_FILE = "state.pt"


def save_state(directory: str, *, model, optimizer, scheduler, epoch: int, best_val: float, bad_epochs: int,
               best_model: dict, config: dict, stopped_early: bool = False) -> str:
    path = os.path.join(directory, STATE_FILE)
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "best_val": best_val, "bad_epochs": bad_epochs, "best_model": best_model,
        "config": config, "stopped_early": stopped_early,
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
