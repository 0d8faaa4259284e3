"""Batches of cubes -> (corrupted, target) pairs, computed on the training device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pipeline.data.prefetch import prefetch
from pipeline.transforms import GenesisConfig, corrupt_batch

__all__ = ["genesis_pairs"]


def genesis_pairs(batches: Iterable[torch.Tensor], device: torch.device | str, generator: torch.Generator,
                  config: GenesisConfig = GenesisConfig(), ahead: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Move each (B, 1, D, H, W) batch to `device` and corrupt it there (the GPU when training runs on one).

    `generator` must live on `device` for CUDA batches; seeded per rank and epoch by the caller,
    so the corruptions of a run are reproducible. On a GPU the next `ahead` pairs are made in a background
    thread on their own stream while the step runs (`prefetch`: same pairs, in the same order); on the CPU
    they are made in line, since there the corruption and the step share the same cores.
    """
    def pairs() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in batches:
            yield corrupt_batch(batch.to(device, non_blocking=True), generator, config)

    return prefetch(pairs(), depth=ahead, device=device)
