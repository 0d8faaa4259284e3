"""Validation pairs: the validation split (or a share of it drawn across scans) in fixed batches, dealt
to the ranks in turn, corrupted from a seed per (corruption key, batch).

The reference validates on every cube of LUNA16 subsets 5-6, corrupted afresh at each evaluation.
Here the batches are fixed for the run (global batches of different scans, `sampling.epoch_order`
with a key of its own), and batch j is corrupted with a generator seeded from (seed, corruption
key, j) on whichever rank evaluates it. So a batch gives the same pair on any number of ranks and
the loss reduced over ranks (sum and count) equals the loss of one process; the corruption key is
the epoch for fresh corruptions each epoch (reproducible), or a constant for the same pairs every
epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pipeline.data.cubes import split_rows
from pipeline.data.sampling import epoch_order
from pipeline.transforms import GenesisConfig, corrupt_batch

__all__ = ["ValidationCubes", "FIXED_CORRUPTION", "batch_seed"]

_ORDER_SALT = 0x7A11D
FIXED_CORRUPTION = -1
"""Corruption key of validation pairs that stay the same every epoch."""


def batch_seed(seed: int, key: int, batch: int) -> int:
    """A 63-bit torch seed for one validation batch (key: the epoch, or FIXED_CORRUPTION)."""
    material = [seed, 0xC0DE, batch] if key == FIXED_CORRUPTION else [seed, 0xE90C, key, batch]
    return int(np.random.default_rng(material).integers(2**63))


class ValidationCubes:
    """Validation batches of one run. `cubes=0`: the whole split; n > 0: the first n cubes of the run's
    validation order (spread over the scans). The split falls back to train when the store has no validation
    cubes (a store of a few scans), which `split` then says."""

    def __init__(self, path, *, batch_size: int, cubes: int = 0, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        from pipeline.patches.store import PatchStore

        if batch_size < 1 or cubes < 0:
            raise ValueError(f"batch_size must be >= 1 and cubes >= 0, got {batch_size} and {cubes}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.path = str(path)
        store = PatchStore(self.path)
        self.split = "validation" if (store.index["split"] == "validation").any() else "train"
        rows, scans = split_rows(store, self.split)
        order = epoch_order(scans, batch_size, (seed, _ORDER_SALT))
        if cubes:
            order = order[:cubes]
        self.rows, self.scans = rows[order], scans[order]
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def n_batches(self) -> int:
        return -(-len(self.rows) // self.batch_size)

    def my_batches(self) -> list[int]:
        """Indices of the batches this rank evaluates (j = rank, rank + world, ...)."""
        return list(range(self.rank, self.n_batches, self.world_size))

    def batch_rows(self, j: int) -> np.ndarray:
        return self.rows[j * self.batch_size:(j + 1) * self.batch_size]

    def pairs(self, key: int, device, genesis: GenesisConfig = GenesisConfig()
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(corrupted, target) of this rank's batches on `device`; `key`: the epoch, or FIXED_CORRUPTION."""
        from pipeline.patches.store import PatchStore

        store = PatchStore(self.path)
        device = torch.device(device)
        generator = torch.Generator(device=device)
        for j in self.my_batches():
            cubes = torch.from_numpy(store.read_cubes(self.batch_rows(j))).to(device)
            generator.manual_seed(batch_seed(self.seed, key, j))
            yield corrupt_batch(cubes, generator, genesis)

    def first(self, n: int) -> np.ndarray:
        """The first n rows of the validation order (different scans first): the restoration figure's cubes."""
        return self.rows[:n]
