"""Streaming cubes out of a patch store for training: sharded by rank, shuffled through a seeded buffer.

Nothing is loaded whole: each epoch the store's rows are put in a seeded order of shards (a
shard is one scan's run of rows, one file read), split into equal contiguous parts per rank
(DDP needs every rank to see the same number of batches), read one shard at a time and
shuffled through a bounded buffer. Memory is the buffer plus one shard, whatever the store's
size. The order depends only on (seed, epoch, rank, world size), so a run resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.patches.store import PatchStore

__all__ = ["CubeStreamConfig", "PatchCubes", "ray_rank_and_world", "epoch_rows"]


@dataclass(frozen=True, kw_only=True)
class CubeStreamConfig:
    split: str = "train"
    """Which rows: train | validation | test | all."""
    shuffle: bool = True
    buffer_size: int = 128
    """Cubes held for shuffling (128 cubes of 32x64x64 float32 = 64 MiB)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "test", "all"):
            raise ValueError(f"CubeStreamConfig.split must be train|validation|test|all, got {self.split!r}")
        if self.buffer_size < 1:
            raise ValueError(f"CubeStreamConfig.buffer_size must be >= 1, got {self.buffer_size}")


def ray_rank_and_world() -> tuple[int, int]:
    """(rank, world size) inside a Ray Train worker, (0, 1) elsewhere."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    except Exception:
        return 0, 1


def epoch_rows(rows: np.ndarray, per_shard: int, seed: int, epoch: int, shuffle: bool,
               rank: int, world_size: int) -> np.ndarray:
    """This rank's rows for an epoch: shards in a seeded order, cut into equal contiguous parts."""
    rows = np.sort(rows)
    shard_ids = rows // per_shard
    bounds = np.flatnonzero(np.diff(shard_ids)) + 1
    shards = np.split(rows, bounds)
    if shuffle:
        order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(shards))
        shards = [shards[i] for i in order]
    flat = np.concatenate(shards) if shards else rows
    per_rank = len(flat) // world_size
    return flat[rank * per_rank:(rank + 1) * per_rank]


class PatchCubes(IterableDataset):
    """Yields cubes (C, D, H, W) float32 from a patch store; use with a DataLoader for batches."""

    def __init__(self, path, config: CubeStreamConfig = CubeStreamConfig(), rank: int | None = None,
                 world_size: int | None = None):
        super().__init__()
        self.path = str(path)
        self.config = config
        if rank is None or world_size is None:
            rank, world_size = ray_rank_and_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        store = PatchStore(self.path)
        self.per_shard = store.shard_rows
        self._rows = store.rows(None if config.split == "all" else config.split)
        if len(self._rows) < world_size:
            raise ValueError(f"{self.path}: split {config.split!r} has {len(self._rows)} cubes, fewer than "
                             f"the {world_size} ranks that must share it")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._rows) // self.world_size

    def _my_rows(self) -> np.ndarray:
        rows = epoch_rows(self._rows, self.per_shard, self.config.seed, self.epoch, self.config.shuffle,
                          self.rank, self.world_size)
        info = get_worker_info()
        if info is not None and info.num_workers > 1:  # DataLoader workers split this rank's part
            rows = np.array_split(rows, info.num_workers)[info.id]
        return rows

    def __iter__(self):
        store = PatchStore(self.path)  # opened per iterator: safe in DataLoader worker processes
        rows = self._my_rows()
        info = get_worker_info()
        rng = np.random.default_rng([self.config.seed, self.epoch, self.rank, info.id if info else 0])
        # contiguous runs of one shard are read together (one file read each)
        cuts = np.flatnonzero(np.diff(rows // self.per_shard) != 0) + 1
        buffer: list[np.ndarray] = []
        for run in np.split(rows, cuts):
            if not len(run):
                continue
            block = store.read(run)
            for cube in block:
                if not self.config.shuffle:
                    yield torch.from_numpy(cube)
                    continue
                buffer.append(cube)
                if len(buffer) >= self.config.buffer_size:
                    i = int(rng.integers(len(buffer)))
                    buffer[i], buffer[-1] = buffer[-1], buffer[i]
                    yield torch.from_numpy(buffer.pop())
        while buffer:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield torch.from_numpy(buffer.pop())
