"""Batches of cubes -> (corrupted, target) pairs, computed on the training device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pipeline.transforms import GenesisConfig, corrupt_batch

__all__ = ["genesis_pairs"]


def genesis_pairs(batches: Iterable[torch.Tensor], device: torch.device | str, generator: torch.Generator,
                  config: GenesisConfig = GenesisConfig()) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Move each (B, 1, D, H, W) batch to `device` and corrupt it there (the GPU when training runs on one).

    `generator` must live on `device` for CUDA batches; seeded per rank and epoch by the caller,
    so the corruptions of a run are reproducible.
    """
    for batch in batches:
        batch = batch.to(device, non_blocking=True)
        yield corrupt_batch(batch, generator, config)
