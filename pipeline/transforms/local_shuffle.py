"""Local pixel shuffling, vectorised: no Python loop over blocks or voxels.

The reference loops over 10,000 blocks: each block (sides 1..S//10 per axis, uniform origin)
is cut from the ORIGINAL cube, its voxels shuffled, and written into the output, later blocks
overwriting earlier ones. Here, with T = the total number of block voxels (about 245,000 for a
(32, 64, 64) cube):

- every (block b, local slot j) pair is one element of a flat array, in block order; its
  destination voxel is ``origin_b + offset(j)``;
- block b's permutation is the stable argsort of its elements' random keys (the keys are 24-bit
  integers, drawn from ``key_seed``), done for all blocks at once by sorting ``(b, key)``; the
  element at sorted position ``start_b + j`` gives slot j its source voxel;
- "later blocks overwrite earlier ones" = every voxel takes the value its LAST writer (largest
  element index) gives it: a scatter-max of element indices, then one gather.

Axis convention: cubes are (D, H, W) = (z, y, x); for the reference's 64 x 64 x 32 (x, y, z)
cube stored as (32, 64, 64), block sides are drawn from 1..3 (z) x 1..6 (y) x 1..6 (x).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .config import GenesisConfig
from .shapes import spatial_shape

KEY_BITS = 24
"""Shuffle keys are integers in [0, 2**24): exact in float64 composites and in int64 packing."""


@dataclass(frozen=True, eq=False)
class ShuffleBlocks:
    """The blocks of one local shuffle: ``origins`` and ``sizes`` are (N, 3) in (z, y, x)."""

    origins: np.ndarray
    sizes: np.ndarray
    key_seed: int
    """Seed of the per-element permutation keys (see `shuffle_keys`)."""

    @property
    def total(self) -> int:
        return int(np.prod(self.sizes, axis=1, dtype=np.int64).sum())


def max_block_sides(shape, config: GenesisConfig = GenesisConfig()) -> tuple[int, int, int]:
    """Largest block side per axis: side // divisor, at least 1 ((3, 6, 6) for (32, 64, 64))."""
    return tuple(max(1, s // config.shuffle_block_divisor) for s in spatial_shape(shape))  # type: ignore[return-value]


def sample_local_shuffle(rng: np.random.Generator, shape,
                         config: GenesisConfig = GenesisConfig()) -> ShuffleBlocks:
    shape = spatial_shape(shape)
    n = config.shuffle_blocks
    maxes = np.array(max_block_sides(shape, config))
    sizes = rng.integers(1, maxes + 1, size=(n, 3))
    origins = rng.integers(0, np.array(shape) - sizes + 1)
    return ShuffleBlocks(origins=origins.astype(np.int32), sizes=sizes.astype(np.int32),
                         key_seed=int(rng.integers(2**63)))


def shuffle_keys(blocks: ShuffleBlocks) -> np.ndarray:
    """The T permutation keys (int64 in [0, 2**24)), in block/slot order."""
    return np.random.default_rng(blocks.key_seed).integers(0, 2**KEY_BITS, blocks.total, dtype=np.int64)


@lru_cache(maxsize=16)
def offset_table(shape: tuple[int, int, int], maxes: tuple[int, int, int]) -> np.ndarray:
    """(classes, max volume) int64: flat voxel offset of local slot j in a block of each size.

    Size class of a block with sides (sz, sy, sx) = ((sz-1) * MY + (sy-1)) * MX + (sx-1);
    local slots are numbered in C order within the block.
    """
    _, h, w = shape
    mz, my, mx = maxes
    table = np.zeros((mz * my * mx, mz * my * mx), dtype=np.int64)
    for sz in range(1, mz + 1):
        for sy in range(1, my + 1):
            for sx in range(1, mx + 1):
                z, y, x = np.meshgrid(np.arange(sz), np.arange(sy), np.arange(sx), indexing="ij")
                offsets = ((z * h + y) * w + x).ravel()
                table[((sz - 1) * my + (sy - 1)) * mx + (sx - 1), :offsets.size] = offsets
    table.setflags(write=False)
    return table


def apply_local_shuffle(cube: np.ndarray, blocks: ShuffleBlocks, keys: np.ndarray | None = None) -> np.ndarray:
    """The shuffled copy of a (D, H, W) float32 cube (deterministic given ``blocks``)."""
    shape = spatial_shape(cube.shape)
    d, h, w = shape
    sizes = blocks.sizes.astype(np.int64)
    origins = blocks.origins.astype(np.int64)
    maxes = tuple(int(m) for m in sizes.max(axis=0)) if len(sizes) else (1, 1, 1)
    if np.any(origins < 0) or np.any(origins + sizes > np.array(shape)) or np.any(sizes < 1):
        raise ValueError(f"shuffle blocks do not fit in a cube of shape {shape}")
    table = offset_table(shape, maxes)
    mz, my, mx = maxes
    vmax = mz * my * mx
    vol = sizes.prod(axis=1)
    total = int(vol.sum())
    if keys is None:
        keys = shuffle_keys(blocks)
    start = np.cumsum(vol) - vol
    size_class = ((sizes[:, 0] - 1) * my + (sizes[:, 1] - 1)) * mx + (sizes[:, 2] - 1)
    origin_flat = (origins[:, 0] * h + origins[:, 1]) * w + origins[:, 2]
    block_of = np.repeat(np.arange(len(vol), dtype=np.int64), vol)
    slot_in_table = np.repeat(size_class * vmax - start, vol) + np.arange(total)
    dest = np.repeat(origin_flat, vol) + table.ravel()[slot_in_table]
    # (block, key) order; exact: block < 2**29 and key < 2**24 fit a float64 mantissa
    order = np.argsort(block_of + keys * (1.0 / 2**KEY_BITS), kind="stable")
    src = dest[order]
    last_writer = np.full(d * h * w, -1, dtype=np.int64)
    np.maximum.at(last_writer, dest, np.arange(total, dtype=np.int64))
    flat = np.ascontiguousarray(cube, dtype=np.float32).reshape(-1)
    out = flat.copy()
    covered = last_writer >= 0
    out[covered] = flat[src[last_writer[covered]]]
    return out.reshape(shape)


def local_pixel_shuffling(cube: np.ndarray, rng: np.random.Generator,
                          config: GenesisConfig = GenesisConfig()) -> np.ndarray:
    """Draw blocks and shuffle a (D, H, W) cube (always; the rate is applied by `sample_params`)."""
    return apply_local_shuffle(cube, sample_local_shuffle(rng, cube.shape, config))
