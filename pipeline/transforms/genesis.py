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

from .config import GenesisConfig
from .flip import apply_flip, sample_flip
from .local_shuffle import ShuffleBlocks, apply_local_shuffle, sample_local_shuffle
from .nonlinear import BezierParams, apply_nonlinear, sample_nonlinear
from .paint import (Box, apply_inpainting, apply_outpainting, paint_noise, sample_inpainting,
                    sample_outpainting)
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


def apply(cube, params: GenesisParams) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted, target), float32, same shape as ``cube`` ((D, H, W) or (1, D, H, W))."""
    cube = _as_cube(cube)
    shape = spatial_shape(cube.shape)
    if shape != tuple(params.shape):
        raise ValueError(f"cube spatial shape {shape} does not match the params' shape {params.shape}")
    image = cube.reshape(shape).astype(np.float32, copy=False)
    target = apply_flip(image, params.flip_axes)
    x = target
    if params.shuffle:
        x = apply_local_shuffle(x, params.shuffle_blocks)
    if params.nonlinear:
        x = apply_nonlinear(x, params.bezier, GenesisConfig(bezier_samples=params.bezier_samples))
    if params.paint == "inpaint":
        x = apply_inpainting(x, params.boxes, paint_noise(params.noise_seed, shape))
    elif params.paint == "outpaint":
        x = apply_outpainting(x, params.boxes, paint_noise(params.noise_seed, shape))
    if x is target:
        x = target.copy()
    return x.reshape(cube.shape), target.reshape(cube.shape)


def corrupt(cube, rng: np.random.Generator, config: GenesisConfig = GenesisConfig()):
    """`sample_params` + `apply`: one (corrupted, target) pair."""
    cube = _as_cube(cube)
    return apply(cube, sample_params(rng, cube.shape, config))
