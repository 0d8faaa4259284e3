"""The array core of task patch stores: the task's grid, normalise, choose centres, crop (with padding), resize.

Pure numpy/torch, no I/O: the store layer (`pipeline/patches/task_extract.py`) reads volumes
and hands them here. Every random draw takes a `numpy.random.Generator`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tasks.spec import Intensity

__all__ = ["intensity_bounds", "scale", "draw_voxels", "centred_start", "crop", "resize", "object_centres", "pos_neg_centres",
           "fraction_order", "target_mask", "oriented_crop", "to_task_grid", "inplane_scale"]

_SLAB = 16
"""Slices resized at a time by `to_task_grid`: a float copy of a whole 512 x 512 x 900 CT would cost 1 GB."""


def intensity_bounds(volume: np.ndarray | None, intensity: Intensity) -> tuple[float, float]:
    """(low, high) raw values that map to 0 and 1: the fixed window (CT HU), or per volume the
    percentiles of its non-zero voxels (MRI has no absolute unit, so a fixed window means nothing)."""
    if intensity.kind == "window":
        return float(intensity.low), float(intensity.high)
    fg = volume[volume != 0]
    if fg.size == 0:
        return 0.0, 1.0
    lo, hi = (float(x) for x in np.percentile(fg, [intensity.low, intensity.high]))
    return lo, (hi if hi > lo else lo + 1.0)


def scale(arr: np.ndarray, bounds: tuple[float, float]) -> np.ndarray:
    """Clip to `bounds` and map linearly to [0, 1] (float32)."""
    lo, hi = bounds
    out = np.clip(arr.astype(np.float32), lo, hi)
    out -= lo
    out *= 1.0 / (hi - lo)
    return out


def target_mask(label: np.ndarray, values: tuple[int, ...] | None) -> np.ndarray:
    """Binary target: every value > 0, or only the listed values."""
    return (label > 0) if values is None else np.isin(label, np.asarray(values))


def centred_start(centre_zyx: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Start of the crop of `size` whose voxel `size // 2` is the voxel nearest `centre`.

    The usual convention (`arr[c - 32:c + 32]` around a candidate): the finding sits at index 32 of
    a 64-voxel side, exactly in the middle of an odd side.
    """
    return (np.floor(np.asarray(centre_zyx, dtype=float) + 0.5) - np.asarray(size) // 2).astype(np.int64)


def crop(volume, start: np.ndarray, size: tuple[int, int, int], fill: float = 0) -> np.ndarray:
    """`volume[start:start+size]`, padded with `fill` where the crop leaves the volume.

    `volume` may be a numpy array or a Zarr array: only the part inside is read, so a crop of a
    stored scan touches only the chunks it needs."""
    start = np.asarray(start, dtype=np.int64)
    end = start + np.asarray(size)
    lo = np.maximum(start, 0)
    hi = np.minimum(end, volume.shape)
    out = np.full(tuple(size), fill, dtype=volume.dtype)
    if np.all(hi > lo):
        src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start))
        out[dst] = volume[src]
    return out


def oriented_crop(volume, centre_zyx, steps_zyx: np.ndarray, size: tuple[int, int, int],
                  fill: float = 0) -> np.ndarray:
    """A cube of `size` resampled trilinearly on a rotated grid: voxel (i, j, k) of the cube is the
    continuous index centre + (i - D//2) steps[0] + (j - H//2) steps[1] + (k - W//2) steps[2].

    `centre_zyx` sits at index size // 2, as in `centred_start`; `steps_zyx` (3, 3) is the index
    displacement of one step along each cube axis (`pipeline.tasks.geometry.cube_steps`). Only the
    block of `volume` (numpy or Zarr) the grid touches is read, padded with `fill` outside the volume
    (the grid is affine, so its bounding box is that of its points). Float32, in the volume's unit.
    """
    from scipy import ndimage  # trilinear = order-1 spline without prefilter; imported here: loaders never need it

    size = tuple(int(n) for n in size)
    steps = np.asarray(steps_zyx, dtype=float).reshape(3, 3)
    t = [np.arange(n, dtype=float) - n // 2 for n in size]
    points = (np.asarray(centre_zyx, dtype=float).reshape(1, 1, 1, 3)
              + t[0][:, None, None, None] * steps[0] + t[1][None, :, None, None] * steps[1]
              + t[2][None, None, :, None] * steps[2])
    lo = np.floor(points.reshape(-1, 3).min(axis=0)).astype(np.int64)
    hi = np.floor(points.reshape(-1, 3).max(axis=0)).astype(np.int64) + 2  # + the upper neighbour
    block = crop(volume, lo, tuple(int(v) for v in hi - lo), fill=fill).astype(np.float32, copy=False)
    coords = (points - lo).reshape(-1, 3).T
    out = ndimage.map_coordinates(block, coords, order=1, mode="nearest", prefilter=False, output=np.float32)
    return out.reshape(size)


def inplane_scale(spec) -> float:
    """The spec's in-plane resize factor (1 when it has none: specs older than the field)."""
    value = getattr(spec, "inplane_scale", 1.0)
    try:
        value = float(value)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"TaskSpec.inplane_scale of task {getattr(spec, 'name', '?')}: must be a number > 0, "
                         f"got {getattr(spec, 'inplane_scale', None)!r}")
    return value


def _resize_inplane(volume: np.ndarray, new_yx: tuple[int, int]) -> np.ndarray:
    """(Z, Y, X) -> (Z, new_y, new_x) float32: area averaging to shrink (every source voxel counts once,
    no aliasing), bilinear with half-pixel centres to enlarge; slab by slab to bound the memory."""
    out = np.empty((volume.shape[0],) + tuple(new_yx), dtype=np.float32)
    shrink = new_yx[0] <= volume.shape[1] and new_yx[1] <= volume.shape[2]
    for z in range(0, volume.shape[0], _SLAB):
        t = torch.from_numpy(np.ascontiguousarray(volume[z:z + _SLAB], dtype=np.float32))[:, None]
        r = (F.interpolate(t, size=new_yx, mode="area") if shrink
             else F.interpolate(t, size=new_yx, mode="bilinear", align_corners=False))
        out[z:z + _SLAB] = r[:, 0].numpy()
    return out


def _nearest_inplane(label: np.ndarray, new_yx: tuple[int, int]) -> np.ndarray:
    """(Z, Y, X) label map -> (Z, new_y, new_x), nearest at the new voxels' centres (old index
    floor((j + 1/2) r)): values are only copied, so the map stays integer with no value invented."""
    iy = np.minimum(np.floor((np.arange(new_yx[0]) + 0.5) * label.shape[1] / new_yx[0]).astype(np.int64),
                    label.shape[1] - 1)
    ix = np.minimum(np.floor((np.arange(new_yx[1]) + 0.5) * label.shape[2] / new_yx[1]).astype(np.int64),
                    label.shape[2] - 1)
    return label[:, iy[:, None], ix[None, :]]


def to_task_grid(channels: np.ndarray, label: np.ndarray | None, spacing_zyx, spec
                 ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, float, float]]:
    """The volume on the grid the task samples and evaluates at: (channels (C, Z, Y, X), label (Z, Y, X)
    or None, spacing (z, y, x) mm).

    With `spec.inplane_scale` s != 1, y and x are resized to round(n s) voxels (depth unchanged):
    image channels by area averaging (float32; bilinear if enlarging), the label map by nearest (its
    dtype and values kept), spacing x old / new so the extent in mm is unchanged. LCS has s = 0.5: the
    reference trains and evaluates on `3D_LiTS_NPY_256x256xZ` (keras/downstream_tasks/config.py:301),
    LiTS's 512 x 512 slices halved. With s = 1 the inputs come back untouched (the same objects).
    Positions on this grid map to world mm through `pipeline.tasks.geometry.resized_geometry`.
    """
    s = inplane_scale(spec)
    spacing = tuple(float(v) for v in spacing_zyx)
    if s == 1.0:
        return channels, label, spacing
    shape = channels.shape[-3:]
    if label is not None and tuple(label.shape) != tuple(shape):
        raise ValueError(f"to_task_grid: label shape {tuple(label.shape)} differs from the image's {tuple(shape)}")
    new_yx = (max(1, round(shape[1] * s)), max(1, round(shape[2] * s)))
    out = np.stack([_resize_inplane(ch, new_yx) for ch in channels])
    new_label = None if label is None else _nearest_inplane(label, new_yx)
    new_spacing = (spacing[0], spacing[1] * (shape[1] / new_yx[0]), spacing[2] * (shape[2] / new_yx[1]))
    return out, new_label, new_spacing


def resize(arr: np.ndarray, size: tuple[int, int, int], label: bool) -> np.ndarray:
    """Resize a (C, D, H, W) crop to `size`: trilinear for images, nearest for masks."""
    if arr.shape[-3:] == tuple(size):
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    out = F.interpolate(t, size=tuple(size), mode="nearest" if label else "trilinear",
                        align_corners=None if label else False)[0].numpy()
    return out.astype(arr.dtype)


def object_centres(label: np.ndarray) -> dict[int, np.ndarray]:
    """Centroid (z, y, x voxels) of every object id > 0 in an instance label map (one pass over its voxels)."""
    flat = np.flatnonzero(label)
    if flat.size == 0:
        return {}
    ids = label.reshape(-1)[flat].astype(np.int64)
    coords = np.unravel_index(flat, label.shape)
    counts = np.bincount(ids)
    present = np.flatnonzero(counts)
    sums = [np.bincount(ids, weights=c, minlength=len(counts)) for c in coords]
    return {int(k): np.array([s[k] / counts[k] for s in sums]) for k in present}


def _clamp_centres(centres: np.ndarray, shape: tuple[int, ...], size: tuple[int, int, int]) -> np.ndarray:
    """Move centres so their crop lies inside the volume where it fits (as MONAI's crop samplers do)."""
    half = (np.asarray(size) - 1) / 2.0
    lo = half
    hi = np.asarray(shape) - 1 - half
    return np.where(hi >= lo, np.clip(centres, lo, np.maximum(hi, lo)), (np.asarray(shape) - 1) / 2.0)


def draw_voxels(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray | None:
    """`k` flat indices drawn uniformly among the True voxels of `mask`; None when it has none.

    By rejection from uniform draws over the whole volume, so a large class (background is most of
    a CT) never needs a list of its indices (8 bytes per voxel); a class under 1% is listed instead.
    """
    flat = mask.reshape(-1)
    share = np.count_nonzero(flat) / flat.size
    if share == 0:
        return None
    if share < 0.01:
        idx = np.flatnonzero(flat)
        return idx[rng.integers(0, idx.size, k)]
    out = np.empty(0, dtype=np.int64)
    while out.size < k:
        draw = rng.integers(0, flat.size, int((k - out.size) / share * 1.3) + 8)
        out = np.concatenate([out, draw[flat[draw]]])
    return out[:k]


def pos_neg_centres(mask: np.ndarray, body: np.ndarray, n: int, pos: float, neg: float,
                    size: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`n` crop centres: on a target voxel with probability pos / (pos + neg), else on a background
    voxel inside `body` (MONAI's RandCropByPosNegLabel with image_threshold); returns (centres, is_positive).

    A class that is empty gives its draws to the other one.
    """
    want_pos = rng.random(n) < pos / (pos + neg)
    background = body & ~mask
    if not background.any():
        background = ~mask
    fg = draw_voxels(mask, int(want_pos.sum()) or 1, rng) if want_pos.any() else None
    bg = draw_voxels(background, int((~want_pos).sum()) or 1, rng) if (~want_pos).any() else None
    if fg is None and want_pos.any():  # no target in this scan: background instead
        want_pos[:] = False
        bg = draw_voxels(background, n, rng)
    elif bg is None and (~want_pos).any():
        want_pos[:] = True
        fg = draw_voxels(mask, n, rng)
    flat = np.empty(n, dtype=np.int64)
    if want_pos.any():
        flat[want_pos] = fg[: int(want_pos.sum())]
    if (~want_pos).any():
        flat[~want_pos] = bg[: int((~want_pos).sum())]
    centres = np.stack(np.unravel_index(flat, mask.shape), axis=1).astype(float)
    return _clamp_centres(centres, mask.shape, size), want_pos


def fraction_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded order of rows, stratified by label, for nested label fractions.

    Each stratum is shuffled and its k-th member gets the key (k + 0.5) / n_stratum; sorting by
    key interleaves the strata in proportion, so every prefix (10%, 25%, 50%, ...) keeps the
    label ratio and a smaller fraction is always inside a larger one. Returns each row's rank.
    """
    labels = np.asarray(labels)
    keys = np.empty(len(labels), dtype=float)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        members = members[rng.permutation(len(members))]
        keys[members] = (np.arange(len(members)) + 0.5) / len(members)
    tiebreak = rng.random(len(labels))
    order = np.lexsort((tiebreak, keys))
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels))
    return rank
