"""The pieces of a pretraining run as plain functions: build, one epoch, fixed validation.

They know nothing of Ray or MLflow, so they are tested alone on tiny tensors.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from pipeline.models import UNet3D
from pipeline.training.config import PretrainConfig
from pipeline.transforms import GenesisConfig, corrupt

__all__ = ["build_model", "build_optimizer", "build_scheduler", "train_epoch", "evaluate",
           "fixed_validation_pairs", "EpochStats"]


def build_model(config: PretrainConfig) -> UNet3D:
    return UNet3D(base_channels=config.base_channels, norm=config.norm)


def build_optimizer(model: nn.Module, config: PretrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: PretrainConfig):
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=config.step_size, gamma=config.gamma)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=config.gamma, patience=config.step_size)


@dataclass
class EpochStats:
    loss: float
    cubes: int
    seconds: float
    data_seconds: float

    @property
    def cubes_per_s(self) -> float:
        return self.cubes / self.seconds if self.seconds else 0.0


def _autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def train_epoch(model: nn.Module, pairs, optimizer: torch.optim.Optimizer, device: torch.device,
                config: PretrainConfig) -> EpochStats:
    """One pass over `pairs` (an iterator of (corrupted, target) batches on `device`); MSE loss."""
    model.train()
    total, n, data_s = 0.0, 0, 0.0
    t0 = time.perf_counter()
    it = iter(pairs)
    step = 0
    while not config.steps_per_epoch or step < config.steps_per_epoch:
        td = time.perf_counter()
        try:
            x, y = next(it)
        except StopIteration:
            break
        data_s += time.perf_counter() - td
        with _autocast(device, config.bf16):
            out = model(x)
        loss = nn.functional.mse_loss(out.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        total += float(loss.detach()) * x.shape[0]
        n += x.shape[0]
        step += 1
    return EpochStats(loss=total / n if n else math.nan, cubes=n, seconds=time.perf_counter() - t0,
                      data_seconds=data_s)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
             bf16: bool = True) -> tuple[float, torch.Tensor]:
    """Mean MSE over fixed pairs, and the restorations (on CPU) for pictures."""
    model.eval()
    total, outs = 0.0, []
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        with _autocast(device, bf16):
            out = model(xb).float()
        total += float(nn.functional.mse_loss(out, yb, reduction="sum"))
        outs.append(out.cpu())
    return total / y.numel(), torch.cat(outs)


def fixed_validation_pairs(cubes: np.ndarray, seed: int, genesis: GenesisConfig = GenesisConfig()
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupt the validation cubes once with a seeded generator (the reference re-draws them at every
    evaluation, which makes the validation loss, and so early stopping, noisy)."""
    rng = np.random.default_rng([seed, 0xA11D])
    xs, ys = zip(*(corrupt(c, rng, genesis) for c in cubes))
    x = torch.from_numpy(np.stack(xs)).reshape(len(cubes), 1, *cubes.shape[-3:])
    y = torch.from_numpy(np.stack(ys)).reshape(len(cubes), 1, *cubes.shape[-3:])
    return x, y
