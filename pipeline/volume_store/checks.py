"""Voxel checks and the stored dtype: what makes a decoded volume fit to be stored."""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from pipeline.ingest.limits import DEFAULT_MAX_SCAN_BYTES, LimitError, check_ceiling
from pipeline.ingest.volume import Volume

__all__ = ["check_and_cast", "resample", "resampled_size"]

INT16 = np.iinfo(np.int16)


def check_and_cast(volume: Volume, min_side: int) -> Volume:
    """Refuse volumes that are too small or hold NaN/inf; store CT as int16 Hounsfield units."""
    shape = volume.shape
    if min(shape) < min_side:
        raise ValueError(f"volume too small to be useful: shape (z,y,x)={shape} has a side under {min_side} voxels")
    v = volume.voxels
    if np.issubdtype(v.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(v)))
        if bad:
            raise ValueError(f"{bad} NaN/inf voxels of {v.size}")
    if volume.modality == "CT" and v.dtype != np.int16:
        lo, hi = float(v.min()), float(v.max())
        if lo < INT16.min or hi > INT16.max:
            raise ValueError(f"CT values {lo:g}..{hi:g} do not fit int16 Hounsfield units")
        if np.issubdtype(v.dtype, np.floating):
            v = np.rint(v)
        volume.voxels = v.astype(np.int16)
    if v.dtype == np.bool_:
        volume.voxels = v.astype(np.uint8)
    for name, label in volume.labels.items():
        if label.dtype.kind not in "iub":
            if not np.all(np.isfinite(label)) or not np.array_equal(label, np.rint(label)):
                raise ValueError(f"label map '{name}' has non-integer values")
        volume.labels[name] = label.astype(np.uint8 if label.max() <= 255 and label.min() >= 0 else np.int32)
    return volume


def _image(arr: np.ndarray, volume: Volume) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(reversed(volume.spacing)))
    img.SetOrigin(tuple(reversed(volume.origin)))
    img.SetDirection(volume.direction)
    return img


_MAX_SIDE = 2**31 - 1  # ITK's resampler takes each side as a 32-bit size


def resampled_size(volume: Volume, spacing: tuple[float, float, float], max_scan_bytes: int) -> tuple[int, int, int]:
    """The (z, y, x) size resampling to `spacing` makes, refused when the image and its labels
    at that size would pass the per-scan ceiling (checked before a voxel is resampled: a fine
    spacing on a CT asks for tens of gigabytes)."""
    sides = [n * s / t for n, s, t in zip(volume.shape, volume.spacing, spacing)]
    itemsize = volume.voxels.dtype.itemsize + sum(v.dtype.itemsize for v in volume.labels.values())
    mm = "x".join(f"{t:g}" for t in spacing)
    if not all(math.isfinite(v) and round(v) <= _MAX_SIDE for v in sides):
        raise LimitError(f"resampling to spacing {mm} mm (z,y,x; --spacing) makes "
                         f"{'x'.join(f'{v:.3g}' for v in sides)} voxels (about {math.prod(sides) * itemsize:.3g} bytes), a side over {_MAX_SIDE}, more "
                         f"than ITK can address")
    size = tuple(max(1, int(round(v))) for v in sides)
    what = (f"resampling to spacing {mm} mm (z,y,x; --spacing) into {'x'.join(map(str, size))} voxels of "
            f"{itemsize} bytes{' (image and labels)' if volume.labels else ''}")
    check_ceiling(what, math.prod(size) * itemsize, max_scan_bytes)
    return size  # type: ignore[return-value]


def resample(volume: Volume, spacing: tuple[float, float, float],
             max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> Volume:
    """Resample to `spacing` (z, y, x mm) over the same physical extent: linear for images, nearest for labels.

    The output size is checked against `max_scan_bytes` first (`resampled_size`)."""
    size = list(reversed(resampled_size(volume, spacing, max_scan_bytes)))
    ref = _image(volume.voxels, volume)
    out_spacing = tuple(reversed(spacing))
    interp = sitk.sitkLinear

    def run(img: sitk.Image, method: int, default: float) -> np.ndarray:
        res = sitk.Resample(img, size, sitk.Transform(), method, img.GetOrigin(), out_spacing,
                            img.GetDirection(), default, img.GetPixelID())
        return sitk.GetArrayFromImage(res)

    default = float(volume.voxels.min())
    volume.voxels = run(ref, interp, default)
    volume.labels = {k: run(_image(v, volume), sitk.sitkNearestNeighbor, 0) for k, v in volume.labels.items()}
    volume.spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    return volume
