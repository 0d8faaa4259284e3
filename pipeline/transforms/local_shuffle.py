"""Local pixel shuffling: a compiled kernel on the CPU, whole-batch tensor ops on CUDA.

The reference loops over 10,000 blocks: each block (sides 1..S//10 per axis, uniform origin)
is cut from the ORIGINAL cube, its voxels shuffled, and written into the output, later blocks
overwriting earlier ones. Here, with T = the total number of block voxels (about 245,000 for a
(32, 64, 64) cube):

- every (block b, local slot j) pair is one element of a flat array, in block order (slots in C
  order within the block); its destination voxel is ``origin_b + offset(j)``; each element has
  a 24-bit key (`shuffle_keys`: the SplitMix64 stream of ``key_seed``);
- block b's permutation is a Fisher-Yates shuffle driven by its elements' keys (exact rule in
  `_kernels`); slot j receives the original value of slot ``perm[j]``;
- "later blocks overwrite earlier ones" = every voxel takes the value its LAST writer gives it.
  The CPU kernel (`_kernels.shuffle_cube`) visits the blocks last to first, so each voxel is
  written once, by its owner, and blocks that own no voxel are skipped; the tensor path
  (`batched`) takes a scatter-max of element indices, then one gather.

Axis convention: cubes are (D, H, W) = (z, y, x); for the reference's 64 x 64 x 32 (x, y, z)
cube stored as (32, 64, 64), block sides are drawn from 1..3 (z) x 1..6 (y) x 1..6 (x).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import _kernels
from .config import GenesisConfig
from .shapes import spatial_shape

_NO_KEYS = np.zeros(0, np.int64)

KEY_BITS = _kernels.KEY_BITS
"""Shuffle keys are integers in [0, 2**24)."""


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
    # one uniform draw per choice: side = 1 + floor(u * max), origin = floor(u' * (S - side + 1))
    u = rng.random((n, 6))
    sizes = 1 + (u[:, :3] * maxes).astype(np.int32)
    origins = (u[:, 3:] * (np.array(shape) - sizes + 1)).astype(np.int32)
    return ShuffleBlocks(origins=origins, sizes=sizes, key_seed=int(rng.integers(2**63)))


def shuffle_keys(blocks: ShuffleBlocks) -> np.ndarray:
    """The T permutation keys (int64 in [0, 2**24)), in block/slot order: a counter-based hash
    of ``key_seed`` and the element index (see `_kernels`), so the compiled kernel computes
    them on the fly and the torch path gets the same keys."""
    return _kernels.hash_keys(blocks.key_seed, 0, blocks.total)


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


def check_blocks(blocks: ShuffleBlocks, shape) -> tuple[np.ndarray, np.ndarray]:
    """(origins, sizes) as contiguous int64; ValueError if a block does not fit ``shape``."""
    sizes = np.ascontiguousarray(blocks.sizes, dtype=np.int64)
    origins = np.ascontiguousarray(blocks.origins, dtype=np.int64)
    if sizes.ndim != 2 or sizes.shape[1:] != (3,) or origins.shape != sizes.shape:
        raise ValueError(f"shuffle blocks must be (N, 3) origins and sizes, got {origins.shape}, {sizes.shape}")
    if np.any(origins < 0) or np.any(origins + sizes > np.array(shape)) or np.any(sizes < 1):
        raise ValueError(f"shuffle blocks do not fit in a cube of shape {shape}")
    return origins, sizes


def apply_local_shuffle(cube: np.ndarray, blocks: ShuffleBlocks, keys: np.ndarray | None = None) -> np.ndarray:
    """The shuffled copy of a (D, H, W) float32 cube (deterministic given ``blocks``)."""
    shape = spatial_shape(cube.shape)
    _, h, w = shape
    origins, sizes = check_blocks(blocks, shape)
    if keys is None:
        keys = _NO_KEYS
    else:
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if keys.shape != (blocks.total,):
            raise ValueError(f"keys has shape {keys.shape}, the blocks have {blocks.total} voxels")
    flat = np.ascontiguousarray(cube, dtype=np.float32).reshape(-1)
    out = flat.copy()
    _kernels.shuffle_cube(flat, out, origins, sizes, keys, 0, blocks.key_seed, h, w)
    return out.reshape(shape)


def local_pixel_shuffling(cube: np.ndarray, rng: np.random.Generator,
                          config: GenesisConfig = GenesisConfig()) -> np.ndarray:
    """Draw blocks and shuffle a (D, H, W) cube (always; the rate is applied by `sample_params`)."""
    return apply_local_shuffle(cube, sample_local_shuffle(rng, cube.shape, config))
