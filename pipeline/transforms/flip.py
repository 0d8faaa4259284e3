"""Flip: up to ``max_flips`` flips along random spatial axes while a p=flip_rate coin comes up.

Deviation from the reference (a fixed bug): the reference draws the axis from [0, 1, 2] of a
(1, x, y, z) array, so it flips the channel axis and never the slice axis. Here the axis is drawn
from the three spatial axes (0, 1, 2) of the (D, H, W) cube.
"""

from __future__ import annotations

import numpy as np

from .config import GenesisConfig


def sample_flip(rng: np.random.Generator, config: GenesisConfig = GenesisConfig()) -> tuple[int, ...]:
    """The spatial axes to flip, in order (0 = D/z, 1 = H/y, 2 = W/x)."""
    axes: list[int] = []
    while len(axes) < config.max_flips and rng.random() < config.flip_rate:
        axes.append(int(rng.integers(3)))
    return tuple(axes)


def flip_parity(axes: tuple[int, ...]) -> tuple[bool, bool, bool]:
    """Flips commute, so only the parity of the number of flips per axis matters."""
    return tuple(axes.count(a) % 2 == 1 for a in range(3))  # type: ignore[return-value]


def apply_flip(cube: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """``cube`` (D, H, W) flipped along each axis of ``axes`` in turn (a contiguous copy)."""
    odd = [a for a, p in enumerate(flip_parity(axes)) if p]
    return np.ascontiguousarray(np.flip(cube, axis=odd) if odd else cube)


def flip(cube: np.ndarray, rng: np.random.Generator, config: GenesisConfig = GenesisConfig()):
    """Draw flips and apply them to a (D, H, W) cube; returns (flipped, axes)."""
    axes = sample_flip(rng, config)
    return apply_flip(cube, axes), axes
