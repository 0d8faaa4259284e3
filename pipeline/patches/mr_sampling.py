"""The MR recipe (ours, not the reference's): pretraining cubes from MR and every other non-CT modality.

The reference's recipe (`pipeline.patches.sampling`) assumes Hounsfield units and large CT volumes: a fixed
HU window, a -150 HU look-ahead rule that keeps mostly-lung crops, 100-voxel in-plane borders and at least 96
slices. MR intensities are arbitrary units that differ by scanner, sequence and gain, and MR volumes are often
small (112 x 112 in-plane, a few dozen slices), so here:

- intensities: per scan, the `percentiles` (default 0.5 and 99.5) of its non-zero voxels map linearly to 0 and 1,
  clipped (float32). The non-zero voxels, because MR background (and skull-stripped or masked data) is 0; a
  scan's gain and offset do not change its cubes;
- acceptance: a crop is kept when at least `min_foreground` of its voxels are foreground (normalised value above
  `foreground_threshold`, by default: above the low percentile), instead of the HU look-ahead: the crop holds
  tissue rather than air;
- borders: min(border_z or border_yx, `border_fraction` of the axis), so a small volume still yields cubes;
  no min_slices rule (a scan needs only room for the crop);
- draw: as the reference's, crop starts uniform over the region, the first `per_scan` accepted of at most
  per_scan x attempts_per_cube candidates, scales as `scale_axes` says; cubes are float32 in [0, 1].
"""

from __future__ import annotations

import numpy as np

from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.sampling import (CubeSample, box_sums, crop_sizes, draw_candidates, resize_in_plane,
                                       resize_trilinear)

__all__ = ["percentile_window", "normalise", "mr_borders", "mr_scan_region", "sample_mr_cubes"]


def percentile_window(volume: np.ndarray, percentiles: tuple[float, float]) -> tuple[tuple[float, float] | None, str | None]:
    """((low, high) intensities, None) of a scan: its percentiles over the non-zero voxels; (None, why) when
    there is no such window (no non-zero voxel, or all of them alike)."""
    values = volume[volume != 0]
    if values.size == 0:
        return None, "every voxel is 0: no intensity to normalise"
    lo, hi = (float(v) for v in np.percentile(values.astype(np.float64), list(percentiles)))
    if not hi > lo:
        return None, (f"the {percentiles[0]:g} and {percentiles[1]:g} percentiles of its non-zero voxels are equal "
                      f"({lo:g}): widen --percentiles")
    return (lo, hi), None


def normalise(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """(volume - low) / (high - low) clipped to [0, 1], float32 (the values the model sees)."""
    lo, hi = window
    out = volume.astype(np.float32)
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
    return out


def mr_borders(shape: tuple[int, int, int], config: PretrainPatchConfig) -> tuple[int, int, int]:
    """(z, y, x) borders: the configured ones, capped at `border_fraction` of each axis."""
    z, y, x = shape
    f = config.border_fraction
    return (min(config.border_z, int(f * z)), min(config.border_yx, int(f * y)), min(config.border_yx, int(f * x)))


def mr_scan_region(shape: tuple[int, int, int], config: PretrainPatchConfig
                   ) -> tuple[tuple[slice, ...], str | None]:
    """The part of a scan crops are drawn from, and why the scan is skipped (None when it is not): the scan
    less its borders must hold the smallest crop on every axis."""
    bz, by, bx = mr_borders(shape, config)
    region = (slice(bz, shape[0] - bz), slice(by, shape[1] - by), slice(bx, shape[2] - bx))
    room = [s.stop - s.start for s in region]
    d, h, w = (int(v) for v in crop_sizes(config).min(axis=0))
    if room[0] < d or room[1] < h or room[2] < w:
        z, y, x = shape
        options = []
        if room[0] < d:
            options.append("--border-z" if bz and z >= d else "--size (fewer slices)")
        if room[1] < h or room[2] < w:
            options.append("--border-yx" if (by or bx) and y >= h and x >= w else "--size (fewer rows/columns)")
        return region, (f"shape {z}x{y}x{x} less borders z {bz}, y {by}, x {bx} leaves {room[0]}x{room[1]}x{room[2]}, "
                        f"too small for a {d}x{h}x{w} crop; lower {' and '.join(options)}")
    return region, None


def sample_mr_cubes(unit_region: np.ndarray, rng: np.random.Generator, config: PretrainPatchConfig
                    ) -> CubeSample | None:
    """Up to `per_scan` accepted cubes from a normalised region (`mr_scan_region`'s part of `normalise`d scan);
    `fractions` are the accepted crops' foreground shares (judged on the crop at native resolution)."""
    n_attempts = config.per_scan * config.attempts_per_cube
    cands = draw_candidates(rng, unit_region.shape, config, n_attempts, lookahead=0)
    if cands is None:
        return None
    cube = tuple(config.cube_size)
    foreground = (unit_region > config.foreground_threshold).astype(np.uint8)
    fractions = box_sums(foreground, cands.starts, cands.sizes) / np.prod(cands.sizes, axis=1)
    passed = np.flatnonzero(fractions >= config.min_foreground)
    keep = passed[: config.per_scan]
    n = len(cands.scales)
    n_tried = int(keep[-1]) + 1 if len(keep) == config.per_scan else n
    cubes = np.empty((len(keep),) + cube, dtype=np.float32)
    for j, k in enumerate(keep):
        (z, y, x), (d, h, w) = cands.starts[k], cands.sizes[k]
        crop = unit_region[z:z + d, y:y + h, x:x + w]
        if crop.shape == cube:
            cubes[j] = crop
        elif config.scale_axes == "yx":
            cubes[j] = resize_in_plane(crop, cube[1:])
        else:
            cubes[j] = resize_trilinear(np.ascontiguousarray(crop), cube)
    np.clip(cubes, 0.0, 1.0, out=cubes)  # linear resizing stays in range; this only guards rounding
    return CubeSample(cubes=cubes, starts=cands.starts[keep], sizes=cands.sizes[keep], scales=cands.scales[keep],
                      fractions=fractions[keep], attempts=n, candidates=cands, accepted=keep, n_tried=n_tried)
