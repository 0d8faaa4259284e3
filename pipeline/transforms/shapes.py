"""Cube shape checks shared by the numpy and torch paths."""

from __future__ import annotations

from .config import MIN_SIDE


def spatial_shape(shape) -> tuple[int, int, int]:
    """(D, H, W) from a cube shape (D, H, W) or (1, D, H, W); raises ValueError otherwise."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4 and shape[0] == 1:
        shape = shape[1:]
    if len(shape) != 3:
        raise ValueError(
            f"cube shape must be (D, H, W) or (1, D, H, W), got {shape}; "
            "pass one single-channel cube, e.g. (32, 64, 64)")
    if min(shape) < MIN_SIDE:
        raise ValueError(
            f"cube shape {shape} has a side below {MIN_SIDE} voxels, too small for the "
            "out-painting box rules; use cubes of at least 14 voxels per axis")
    return shape  # type: ignore[return-value]
