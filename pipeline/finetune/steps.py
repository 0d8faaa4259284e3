"""The pieces of a fine-tuning run as plain functions (no Ray, no MLflow): loss, optimiser, schedule,
one training epoch, validation loss, predictions. Tested alone on tiny tensors."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.finetune.config import FinetuneConfig

__all__ = ["loss_function", "soft_dice_loss", "build_optimizer", "build_scheduler", "train_epoch", "evaluate_loss",
           "predict", "EpochStats", "DICE_SMOOTH"]

#: The reference's smoothing of the soft Dice (keras/downstream_tasks: smooth = 1).
DICE_SMOOTH = 1.0


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """1 - soft Dice over the whole batch, as the reference's Keras `dice_coef_loss`:
    1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth), on sigmoid probabilities."""
    p, t = prob.reshape(-1), target.reshape(-1)
    return 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)


def loss_function(config: FinetuneConfig):
    """(model output, target) -> loss: BCE on the classifier's logits, 1 - soft Dice on the U-Net's sigmoid."""
    if config.kind == "classification":
        return nn.BCEWithLogitsLoss()
    return soft_dice_loss


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """Adam at the task's lr over the trainable parameters (a frozen encoder is left out)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)


def build_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig):
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=config.plateau_factor,
                                                      patience=config.plateau_patience,
                                                      threshold=config.plateau_min_delta, threshold_mode="abs",
                                                      min_lr=config.min_lr)


@dataclass
class EpochStats:
    loss: float
    cubes: int
    seconds: float

    @property
    def cubes_per_s(self) -> float:
        return self.cubes / self.seconds if self.seconds else 0.0


def train_epoch(model: nn.Module, batches: Iterable, optimizer, loss_fn, device: torch.device) -> EpochStats:
    """One pass over `batches` of (x, y); the loss is the cube-weighted mean of the batch losses."""
    model.train()
    tick, total, n = time.perf_counter(), 0.0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(x)
        n += len(x)
    return EpochStats(loss=total / n if n else float("nan"), cubes=n, seconds=time.perf_counter() - tick)


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: Iterable, loss_fn, device: torch.device) -> float:
    """Cube-weighted mean loss over `batches`, in eval mode (the reference's batch-statistics norm still
    normalises with each batch's statistics)."""
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        total += float(loss_fn(model(x.to(device)), y.to(device))) * len(x)
        n += len(x)
    return total / n if n else float("nan")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, config: FinetuneConfig, device: torch.device) -> torch.Tensor:
    """Probabilities on CPU: sigmoid of the classifier's logits (N,), the U-Net's output (N, 1, D, H, W)."""
    model.eval()
    out = model(x.to(device))
    if config.kind == "classification":
        out = torch.sigmoid(out)[:, 0]
    return out.float().cpu()
