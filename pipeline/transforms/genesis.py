"""The whole Models Genesis corruption of one cube: `sample_params` draws, `apply` applies.

Order as in the reference: flip (input and target together), local shuffle, non-linear map,
then in-painting or out-painting (which paints the image as it is after shuffle/non-linear).
The target is the flipped original. See the module docstrings of `flip`, `local_shuffle`,
`nonlinear` and `paint` for the deviations from the reference (the flip-axis fix, the tabulated
Bezier curve, one noise field per cube).

Axis convention: cubes are (D, H, W) = (z, y, x), optionally with a leading channel of 1; the
reference's 64 x 64 x 32 (x, y, z) cube is stored as (32, 64, 64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels
from .config import GenesisConfig
from .flip import flip_parity, sample_flip
from .local_shuffle import _NO_KEYS, ShuffleBlocks, check_blocks, sample_local_shuffle
from .nonlinear import TABLE_CELLS, BezierParams, sample_nonlinear
from .paint import Box, inpaint_into, outpaint_into, paint_noise, sample_inpainting, sample_outpainting
from .shapes import spatial_shape

PAINT_MODES = ("none", "inpaint", "outpaint")


@dataclass(frozen=True, eq=False)
class GenesisParams:
    """One draw of every random choice of the corruption of one cube."""

    shape: tuple[int, int, int]
    flip_axes: tuple[int, ...]
    shuffle: bool
    nonlinear: bool
    paint: str
    shuffle_blocks: ShuffleBlocks | None = None
    bezier: BezierParams | None = None
    boxes: tuple[Box, ...] = ()
    noise_seed: int = 0
    bezier_samples: int = GenesisConfig().bezier_samples

    def __post_init__(self) -> None:
        if self.paint not in PAINT_MODES:
            raise ValueError(f"GenesisParams.paint must be one of {PAINT_MODES}, got {self.paint!r}")
        if self.shuffle and self.shuffle_blocks is None:
            raise ValueError("GenesisParams.shuffle is True but shuffle_blocks is None")
        if self.nonlinear and self.bezier is None:
            raise ValueError("GenesisParams.nonlinear is True but bezier is None")


def sample_params(rng: np.random.Generator, shape, config: GenesisConfig = GenesisConfig()) -> GenesisParams:
    """Draw the corruption of one cube of spatial shape (D, H, W) (or (1, D, H, W))."""
    shape = spatial_shape(shape)
    flip_axes = sample_flip(rng, config)
    shuffle = bool(rng.random() < config.local_shuffle_rate)
    blocks = sample_local_shuffle(rng, shape, config) if shuffle else None
    nonlinear = bool(rng.random() < config.nonlinear_rate)
    bezier = sample_nonlinear(rng) if nonlinear else None
    paint, boxes, noise_seed = "none", (), 0
    if rng.random() < config.paint_rate:
        if rng.random() < config.inpaint_share:
            paint, boxes = "inpaint", sample_inpainting(rng, shape, config)
        else:
            paint, boxes = "outpaint", sample_outpainting(rng, shape, config)
        noise_seed = int(rng.integers(2**63))
    return GenesisParams(shape=shape, flip_axes=flip_axes, shuffle=shuffle, nonlinear=nonlinear,
                         paint=paint, shuffle_blocks=blocks, bezier=bezier, boxes=boxes,
                         noise_seed=noise_seed, bezier_samples=config.bezier_samples)


def _as_cube(cube) -> np.ndarray:
    cube = np.asarray(cube)
    spatial_shape(cube.shape)
    if not np.issubdtype(cube.dtype, np.floating):
        raise ValueError(f"cube dtype must be floating point (values in [0, 1]), got {cube.dtype}")
    return cube


def apply_arrays(image: np.ndarray, flips, shuffle, bezier, paint: int, boxes, noise,
                 out: np.ndarray, target: np.ndarray) -> None:
    """The corruption of one contiguous (D, H, W) float32 ``image`` into ``out``/``target``
    (preallocated, contiguous), from plain values; shared by `apply` and the CPU torch path.

    ``flips``: 3 parities; ``shuffle``: None or (origins (N, 3) int64, sizes (N, 3) int64,
    keys int64 (empty: use seed), key_start, key_seed); ``bezier``: None or (a, b, c, d,
    decreasing, samples); ``paint``: 0 none, 1 in-painting, 2 out-painting; ``boxes``: (origin,
    size) pairs; ``noise``: a (D, H, W) float32 array or an int seed (`paint_noise`).
    Compiled kernels release the GIL, so cubes can run on several threads.
    """
    d, h, w = image.shape
    odd = tuple(a for a in range(3) if flips[a])
    np.copyto(target, np.flip(image, axis=odd) if odd else image)
    if shuffle is not None:
        origins, sizes, keys, key_start, key_seed = shuffle
        np.copyto(out, target)
        _kernels.shuffle_cube(target.reshape(-1), out.reshape(-1), origins, sizes, keys,
                              key_start, key_seed, h, w)
        x = out
    else:
        x = target
    if bezier is not None:
        a, b, c, dd, decreasing, samples = bezier
        table = np.empty(TABLE_CELLS + 1, np.float64)
        _kernels.bezier_table(a, b, c, dd, decreasing, samples, TABLE_CELLS, table)
        _kernels.table_lookup(x.reshape(-1), table, TABLE_CELLS, out.reshape(-1))
        x = out
    if paint and boxes is not None:
        field = paint_noise(noise, (d, h, w)) if isinstance(noise, (int, np.integer)) else noise
        (inpaint_into if paint == 1 else outpaint_into)(out, x, boxes, field)
        x = out
    if x is not out:
        np.copyto(out, x)


def apply(cube, params: GenesisParams) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted, target), float32, same shape as ``cube`` ((D, H, W) or (1, D, H, W))."""
    cube = _as_cube(cube)
    shape = spatial_shape(cube.shape)
    if shape != tuple(params.shape):
        raise ValueError(f"cube spatial shape {shape} does not match the params' shape {params.shape}")
    image = np.ascontiguousarray(cube.reshape(shape), dtype=np.float32)
    shuffle = None
    if params.shuffle:
        blocks = params.shuffle_blocks
        origins, sizes = check_blocks(blocks, shape)
        shuffle = (origins, sizes, _NO_KEYS, 0, blocks.key_seed)
    bezier = None
    if params.nonlinear:
        bezier = (*(float(v) for v in params.bezier.points), bool(params.bezier.decreasing),
                  int(params.bezier_samples))
    paint = {"none": 0, "inpaint": 1, "outpaint": 2}[params.paint]
    boxes = [(b.origin, b.size) for b in params.boxes]
    out = np.empty(shape, np.float32)
    target = np.empty(shape, np.float32)
    apply_arrays(image, flip_parity(params.flip_axes), shuffle, bezier, paint, boxes,
                 params.noise_seed, out, target)
    return out.reshape(cube.shape), target.reshape(cube.shape)


def corrupt(cube, rng: np.random.Generator, config: GenesisConfig = GenesisConfig()):
    """`sample_params` + `apply`: one (corrupted, target) pair."""
    cube = _as_cube(cube)
    return apply(cube, sample_params(rng, cube.shape, config))
