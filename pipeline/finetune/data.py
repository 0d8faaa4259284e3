"""Batches for fine-tuning, read from a task patch store: cubes as network input, labels or masks as targets.

Rows are read batch by batch (a store may not fit in memory); the order of each epoch is a seeded
permutation (`numpy.random.Generator` from (seed, epoch)), and each Ray worker takes every world-th row
of it, so a run is repeatable for a given number of workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.finetune.config import FinetuneConfig

__all__ = ["to_input", "centre_crop", "epoch_rows", "batches", "read_batch"]


def centre_crop(arr: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """The centred (.., size) part of (.., D, H, W); the same slices for cubes and masks."""
    starts = [(s - t) // 2 for s, t in zip(arr.shape[-3:], size)]
    if any(st < 0 for st in starts):
        raise ValueError(f"cannot centre-crop {arr.shape[-3:]} to {tuple(size)}: the crop is larger")
    sl = tuple(slice(st, st + t) for st, t in zip(starts, size))
    return arr[(Ellipsis, *sl)]


def to_input(cubes: np.ndarray, config: FinetuneConfig, label: bool = False) -> np.ndarray:
    """Stored cubes (N, C, D, H, W) -> network input by `config.input_rule` (masks: label=True)."""
    size = tuple(config.input_size)
    if config.input_rule == "stored" or tuple(cubes.shape[-3:]) == size:
        return cubes
    if config.input_rule == "centre_crop":
        return np.ascontiguousarray(centre_crop(cubes, size))
    t = torch.from_numpy(np.ascontiguousarray(cubes, dtype=np.float32))
    out = F.interpolate(t, size=size, mode="nearest" if label else "area").numpy()
    return out.astype(cubes.dtype)


def epoch_rows(rows: np.ndarray, seed: int, epoch: int, rank: int = 0, world: int = 1) -> np.ndarray:
    """This worker's rows for `epoch`: a permutation seeded by (seed, epoch), every world-th from `rank`
    (the last len % world rows of the permutation are left out of that epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(np.sort(np.asarray(rows)))
    # every worker gets the same number of rows (DDP needs the same number of steps on each rank)
    return order[: len(order) // world * world][rank::world]


def read_batch(store, rows: np.ndarray, config: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs (N, C, D, H, W) float32, targets): labels (N, 1) float32 for classification,
    masks (N, 1, D, H, W) float32 for segmentation."""
    x = to_input(store.read(rows), config)
    if config.kind == "classification":
        labels = store.index["label"].to_numpy()[np.asarray(rows)]  # index row i is store row i
        y = torch.from_numpy(labels.astype(np.float32)[:, None])
    else:
        y = torch.from_numpy(to_input(store.read(rows, "masks"), config, label=True).astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), y


def batches(store, rows: np.ndarray, config: FinetuneConfig, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`rows` in the given order, `batch_size` at a time (the last batch may be smaller)."""
    rows = np.asarray(rows)
    for i in range(0, len(rows), batch_size):
        yield read_batch(store, rows[i:i + batch_size], config)
