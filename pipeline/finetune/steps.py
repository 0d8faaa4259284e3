"""The pieces of a fine-tuning run as plain functions (no Ray, no MLflow): loss, optimiser, schedule,
one training epoch, validation loss, predictions. Tested alone on tiny tensors.

The optimiser and its schedule are the reference's as its code runs them (keras/downstream_tasks/utils.py,
Keras 2.2.4 per keras/downstream_tasks/requirements.txt): `compile(optimizer='adam')` (lines 80-98), i.e. Keras's
Adam at its defaults, and `ReduceLROnPlateau(monitor='val_loss', factor=0.5, patience=6, min_delta=0.0001,
min_lr=1e-6)` (lines 135-136), whose patience is counted as `KerasReduceLROnPlateau` counts it. Early stopping
(`EarlyStopping(monitor='val_loss', patience=config.patience, mode='min')`, lines 124-128) and the best weights
(`ModelCheckpoint(save_best_only=True)`) are `pipeline.training.checkpoint.track_best` with the worker's
`bad_epochs >= patience`: Keras 2.2.4's EarlyStopping counts `wait += 1` on an epoch whose loss is not below the
best (min_delta 0) and stops when `wait >= patience`, the same epoch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import torch
import torch.nn as nn

from pipeline.epoch_stats import EpochStats
from pipeline.finetune.config import FinetuneConfig
from pipeline.models.norms import per_cube_statistics

__all__ = ["loss_function", "soft_dice_loss", "build_optimizer", "build_scheduler", "KerasReduceLROnPlateau",
           "train_epoch", "evaluate_loss", "predict", "DICE_SMOOTH", "KERAS_ADAM_EPSILON"]

#: Keras's `K.epsilon()`, the epsilon of `Adam()` when none is given (PyTorch's default is 1e-8).
KERAS_ADAM_EPSILON = 1e-7

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
    """Adam at `config.lr` over the trainable parameters (a frozen encoder is left out), with Keras's defaults:
    betas (0.9, 0.999), epsilon 1e-7. One difference is left: Keras adds epsilon to sqrt(v) before the bias
    correction, PyTorch after it, which differs only while sqrt(v) is of the order of epsilon."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr, betas=(0.9, 0.999),
                            eps=KERAS_ADAM_EPSILON)


class KerasReduceLROnPlateau:
    """Keras 2.2.4's `ReduceLROnPlateau` (keras/callbacks.py, `on_epoch_end`) on a torch optimiser, mode "min".

    Per epoch, `step(val_loss)`: an improvement is `val_loss < best - min_delta` (best := val_loss, wait := 0);
    otherwise `wait += 1`, and when `wait >= patience` every lr above `min_lr` becomes `max(lr * factor, min_lr)`
    and wait := 0 (then `cooldown` epochs without counting; the reference's is 0). So with patience 6 the lr is
    cut at the end of the 6th epoch in a row without improvement; PyTorch's ReduceLROnPlateau cuts only after
    the 7th (`num_bad_epochs > patience`). A NaN loss is not an improvement, as `np.less` says.

    `state_dict()` / `load_state_dict()` carry the counters (plain numbers: checkpoints load with
    weights_only=True); the state of a PyTorch ReduceLROnPlateau (older checkpoints) is read as well.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, factor: float, patience: int, min_delta: float,
                 min_lr: float, cooldown: int = 0) -> None:
        if not 0 < factor < 1:
            raise ValueError(f"KerasReduceLROnPlateau.factor must be in (0, 1), got {factor}")
        if patience < 1 or cooldown < 0 or min_delta < 0 or min_lr < 0:
            raise ValueError(f"KerasReduceLROnPlateau: patience >= 1, cooldown >= 0, min_delta >= 0, min_lr >= 0; "
                             f"got {patience}, {cooldown}, {min_delta}, {min_lr}")
        self.optimizer = optimizer
        self.factor, self.patience, self.min_delta = float(factor), int(patience), float(min_delta)
        self.min_lr, self.cooldown = float(min_lr), int(cooldown)
        self.best = math.inf
        self.wait = 0
        self.cooldown_counter = 0

    def step(self, val_loss: float) -> bool:
        """One epoch's validation loss; returns True when the learning rate was cut."""
        current = float(val_loss)
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        if current < self.best - self.min_delta:
            self.best = current
            self.wait = 0
        elif self.cooldown_counter <= 0:
            self.wait += 1
            if self.wait >= self.patience:
                cut = False
                for group in self.optimizer.param_groups:
                    if group["lr"] > self.min_lr:
                        group["lr"] = max(group["lr"] * self.factor, self.min_lr)
                        cut = True
                if cut:
                    self.cooldown_counter = self.cooldown
                    self.wait = 0
                return cut
        return False

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"kind": "keras", "best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict) -> None:
        if "num_bad_epochs" in state:  # a PyTorch ReduceLROnPlateau's state (checkpoints of older versions)
            self.best, self.wait = float(state["best"]), int(state["num_bad_epochs"])
            self.cooldown_counter = int(state.get("cooldown_counter", 0))
            return
        self.best, self.wait = float(state["best"]), int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])


def build_scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig) -> KerasReduceLROnPlateau:
    """The reference's reduce-on-plateau, counted as Keras counts it (`KerasReduceLROnPlateau`); call
    `.step(val_loss)` once per epoch."""
    return KerasReduceLROnPlateau(optimizer, factor=config.plateau_factor, patience=config.plateau_patience,
                                  min_delta=config.plateau_min_delta, min_lr=config.min_lr)


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
    """Cube-weighted mean of the batch losses over `batches`, in eval mode, as Keras's val_loss. The predictions
    do not depend on the batches (a "batch_stats" model predicts cube by cube, as at test time); the soft Dice
    loss itself pools each batch, as the reference's does."""
    model.eval()
    total, n = 0.0, 0
    with per_cube_statistics(model):
        for x, y in batches:
            total += float(loss_fn(model(x.to(device)), y.to(device))) * len(x)
            n += len(x)
    return total / n if n else float("nan")


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, config: FinetuneConfig, device: torch.device) -> torch.Tensor:
    """Probabilities on CPU: sigmoid of the classifier's logits (N,), the U-Net's output (N, 1, D, H, W).
    Each cube's output is independent of the rest of `x`: "batch" norms use their running statistics, a
    "batch_stats" model predicts cube by cube (`pipeline.models.norms.per_cube_statistics`)."""
    model.eval()
    with per_cube_statistics(model):
        out = model(x.to(device))
    if config.kind == "classification":
        out = torch.sigmoid(out)[:, 0]
    return out.float().cpu()
