"""The pieces of a pretraining run as plain functions: build, one epoch, validation sums, restorations.

They know nothing of Ray or MLflow, so they are tested alone on tiny tensors.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from pipeline.epoch_stats import EpochStats
from pipeline.models import UNet3D
from pipeline.training.config import PretrainConfig

__all__ = ["build_model", "build_optimizer", "build_scheduler", "train_epoch", "validation_sums", "restore"]


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
def validation_sums(model: nn.Module, pairs, device: torch.device, bf16: bool = False) -> tuple[float, int]:
    """(sum of squared errors, number of voxels) over `pairs` of (corrupted, target) batches: summed (not
    averaged, in float64) so that ranks' shares add up to the loss of the whole split
    (`checkpoint.sum_across_ranks`)."""
    model.eval()
    total, n = 0.0, 0
    for x, y in pairs:
        with _autocast(device, bf16):
            out = model(x).float()
        total += float(nn.functional.mse_loss(out.double(), y.double(), reduction="sum"))
        n += y.numel()
    return total, n


@torch.no_grad()
def restore(model: nn.Module, x: torch.Tensor, device: torch.device, bf16: bool = False) -> torch.Tensor:
    """The model's restorations of `x` (one batch, kept together: batch-statistics norms depend on it), on CPU."""
    model.eval()
    with _autocast(device, bf16):
        return model(x.to(device)).float().cpu()
