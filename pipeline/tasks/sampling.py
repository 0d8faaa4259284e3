"""The array core of task patch stores: normalise, choose centres, crop (with padding), resize.

Pure numpy/torch, no I/O: the store layer (`pipeline/patches/task_extract.py`) reads volumes
and hands them here. Every random draw takes a `numpy.random.Generator`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.tasks.spec import Intensity

__all__ = ["intensity_bounds", "scale", "draw_voxels", "centred_start", "crop", "resize", "object_centres", "pos_neg_centres",
           "fraction_order", "target_mask"]


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
