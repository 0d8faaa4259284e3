"""Pretraining configuration: one frozen dataclass, three named presets.

`paper` is the reference recipe; `stable` is what to use when `paper` collapses to a constant
output (users of the reference report this with SGD at lr 1.0); `tiny` shows the loss falling
on a CPU in minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["PretrainConfig", "PRESETS", "preset"]


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    preset: str = "custom"
    base_channels: int = 32
    """U-Net width (32 = the reference's 19,073,665 parameters)."""
    norm: str = "batch_stats"
    """batch_stats (reference), batch or instance."""
    optimizer: str = "sgd"
    """sgd | adam."""
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "step"
    """step (StepLR step_size/gamma, per epoch) | plateau (ReduceLROnPlateau on validation loss)."""
    step_size: int = 40
    gamma: float = 0.5
    grad_clip: float = 0.0
    """Max gradient norm; 0 = no clipping."""
    batch_size: int = 6
    """Cubes per worker per step."""
    epochs: int = 10_000
    steps_per_epoch: int = 0
    """Limit of training steps per epoch; 0 = one pass over this worker's share of the train split."""
    patience: int = 50
    """Epochs without a better validation loss before stopping."""
    val_pairs: int = 64
    """Fixed validation (corrupted, target) pairs, drawn once per run from the validation split."""
    seed: int = 0
    buffer_size: int = 128
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU)."""
    image_every: int = 1
    """Log a restoration PNG every this many epochs."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        checks = {
            "base_channels": self.base_channels >= 1, "lr": self.lr > 0, "batch_size": self.batch_size >= 1,
            "epochs": self.epochs >= 1, "patience": self.patience >= 1, "val_pairs": self.val_pairs >= 1,
            "steps_per_epoch": self.steps_per_epoch >= 0, "step_size": self.step_size >= 1,
            "gamma": 0 < self.gamma <= 1, "grad_clip": self.grad_clip >= 0, "image_every": self.image_every >= 1,
            "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}.{field} has an invalid value {getattr(self, field)!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"{name}.optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.scheduler not in ("step", "plateau"):
            raise ValueError(f"{name}.scheduler must be step or plateau, got {self.scheduler!r}")
        if self.norm not in ("batch_stats", "batch", "instance"):
            raise ValueError(f"{name}.norm must be batch_stats, batch or instance, got {self.norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, **kw) -> PretrainConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def paper() -> PretrainConfig:
    """The reference: SGD lr 1.0, momentum 0.9, StepLR(40, 0.5), batch 6, patience 50, MSE."""
    return PretrainConfig(preset="paper")


def stable() -> PretrainConfig:
    """Adam at 1e-3 with gradient clipping and a plateau schedule: restores instead of collapsing."""
    return PretrainConfig(preset="stable", optimizer="adam", lr=1e-3, weight_decay=1e-5, scheduler="plateau",
                          gamma=0.5, step_size=10, grad_clip=1.0)


def tiny() -> PretrainConfig:
    """A CPU run of a few minutes: 4-channel U-Net, short epochs, the stable optimiser."""
    return PretrainConfig(preset="tiny", base_channels=4, optimizer="adam", lr=3e-3, scheduler="plateau",
                          step_size=5, grad_clip=1.0, batch_size=4, epochs=8, steps_per_epoch=6, patience=8,
                          val_pairs=8, buffer_size=32)


PRESETS = {"paper": paper, "stable": stable, "tiny": tiny}


def preset(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
