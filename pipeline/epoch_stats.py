"""`EpochStats`: what one training epoch reports, for pretraining and fine-tuning alike.

A module of its own (no torch, nothing of `pipeline`) so that both `training.steps` and
`finetune.steps` use the one class without either importing the other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EpochStats"]


@dataclass
class EpochStats:
    """One epoch of one rank, as `train_epoch` measured it."""

    loss: float  # the cube-weighted mean of the batch losses (nan when no cube came)
    cubes: int
    seconds: float  # wall time of the whole epoch
    data_seconds: float = 0.0  # the part of it spent waiting for the next batch (pretraining measures it)

    @property
    def cubes_per_s(self) -> float:
        return self.cubes / self.seconds if self.seconds else 0.0

    @property
    def data_share(self) -> float:
        """Share of the epoch's step time spent waiting for the next (corrupted) batch."""
        return self.data_seconds / self.seconds if self.seconds else 0.0
