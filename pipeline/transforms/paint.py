"""In-painting and out-painting with U[0, 1) noise.

Boxes are (origin, size) in (z, y, x). In-painting: up to ``inpaint_max_boxes`` boxes (each one
while a p=inpaint_box_prob coin comes up, so possibly none), sides S//6..S//3, filled with
noise. Out-painting: the whole cube becomes noise, then the image is restored inside one box plus
up to ``outpaint_max_extra_boxes`` more (each while a p=outpaint_box_prob coin comes up), sides
S - U{3S//7..4S//7}. Both keep ``paint_border`` voxels from every face.

The noise is one U[0, 1) float32 field over the whole cube drawn from a seed; in-painting uses it
inside the boxes, out-painting outside them. (The reference draws one noise array per box; the
distribution of every painted voxel is the same.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import _kernels
from .config import GenesisConfig
from .shapes import spatial_shape


@dataclass(frozen=True)
class Box:
    origin: tuple[int, int, int]
    size: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(o, o + s) for o, s in zip(self.origin, self.size))  # type: ignore[return-value]


def _box(rng: np.random.Generator, shape, low, high, border: int, complement: bool) -> Box:
    size = []
    origin = []
    for side, lo, hi in zip(shape, low, high):
        drawn = int(rng.integers(lo, hi + 1))
        s = side - drawn if complement else drawn
        size.append(s)
        origin.append(int(rng.integers(border, side - s - border + 1)))
    return Box(origin=tuple(origin), size=tuple(size))  # type: ignore[arg-type]


def sample_inpainting(rng: np.random.Generator, shape,
                      config: GenesisConfig = GenesisConfig()) -> tuple[Box, ...]:
    shape = spatial_shape(shape)
    boxes = []
    while len(boxes) < config.inpaint_max_boxes and rng.random() < config.inpaint_box_prob:
        boxes.append(_box(rng, shape, [s // 6 for s in shape], [s // 3 for s in shape],
                          config.paint_border, complement=False))
    return tuple(boxes)


def sample_outpainting(rng: np.random.Generator, shape,
                       config: GenesisConfig = GenesisConfig()) -> tuple[Box, ...]:
    shape = spatial_shape(shape)
    low, high = [3 * s // 7 for s in shape], [4 * s // 7 for s in shape]
    boxes = [_box(rng, shape, low, high, config.paint_border, complement=True)]
    while len(boxes) < 1 + config.outpaint_max_extra_boxes and rng.random() < config.outpaint_box_prob:
        boxes.append(_box(rng, shape, low, high, config.paint_border, complement=True))
    return tuple(boxes)


def paint_noise(seed: int, shape) -> np.ndarray:
    """The U[0, 1) float32 noise field of a painting seed (24-bit values from the SplitMix64
    stream of ``seed``; see `_kernels.noise_field`)."""
    out = np.empty(spatial_shape(shape), np.float32)
    _kernels.noise_field(int(seed), out.reshape(-1))
    return out


def box_mask(shape, boxes) -> np.ndarray:
    mask = np.zeros(spatial_shape(shape), dtype=bool)
    for box in boxes:
        mask[box.slices] = True
    return mask


def _slices(box) -> tuple[slice, slice, slice]:
    """A `Box`, or a plain (origin, size) pair as the batched path passes them, as index slices."""
    origin, size = (box.origin, box.size) if isinstance(box, Box) else box
    return tuple(slice(int(o), int(o) + int(s)) for o, s in zip(origin, size))  # type: ignore[return-value]


def inpaint_into(out: np.ndarray, image: np.ndarray, boxes, noise: np.ndarray) -> None:
    """In-paint in place: ``out`` becomes ``image`` with every box filled from ``noise``. ``out`` may be
    ``image``; the one in-painting of `apply_inpainting` and of the per-cube kernels (`genesis.apply_arrays`)."""
    if image is not out:
        np.copyto(out, image, casting="unsafe")
    for box in boxes:
        sl = _slices(box)
        out[sl] = noise[sl]


def outpaint_into(out: np.ndarray, image: np.ndarray, boxes, noise: np.ndarray) -> None:
    """Out-paint in place: ``out`` becomes ``noise`` with every box kept from ``image``. ``out`` may be
    ``image`` (the kept boxes are copied before the noise covers them); the one out-painting of
    `apply_outpainting` and of the per-cube kernels (`genesis.apply_arrays`)."""
    slices = [_slices(box) for box in boxes]
    shared = np.may_share_memory(out, image)
    kept = [image[sl].copy() if shared else image[sl] for sl in slices]
    np.copyto(out, noise, casting="unsafe")
    for sl, k in zip(slices, kept):
        out[sl] = k


def apply_inpainting(cube: np.ndarray, boxes, noise: np.ndarray) -> np.ndarray:
    out = np.empty(np.shape(cube), np.float32)
    inpaint_into(out, cube, boxes, noise)
    return out


def apply_outpainting(cube: np.ndarray, boxes, noise: np.ndarray) -> np.ndarray:
    out = np.empty(np.shape(noise), np.float32)
    outpaint_into(out, cube, boxes, noise)
    return out


def inpainting(cube: np.ndarray, rng: np.random.Generator, config: GenesisConfig = GenesisConfig()):
    """Draw boxes and noise and in-paint a (D, H, W) cube."""
    boxes = sample_inpainting(rng, cube.shape, config)
    return apply_inpainting(cube, boxes, paint_noise(int(rng.integers(2**63)), cube.shape))


def outpainting(cube: np.ndarray, rng: np.random.Generator, config: GenesisConfig = GenesisConfig()):
    """Draw boxes and noise and out-paint a (D, H, W) cube."""
    boxes = sample_outpainting(rng, cube.shape, config)
    return apply_outpainting(cube, boxes, paint_noise(int(rng.integers(2**63)), cube.shape))
