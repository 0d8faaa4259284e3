"""The MR recipe (ours, not the reference's): pretraining cubes from MR and every other non-CT modality.

The reference's recipe (`pipeline.patches.sampling`) assumes Hounsfield units and large CT volumes: a fixed
HU window, a -150 HU look-ahead rule that keeps mostly-lung crops, 100-voxel in-plane borders and at least 96
slices. MR intensities are arbitrary units that differ by scanner, sequence and gain, MR background is often
noise rather than 0, and MR volumes are often small (112 x 112 in-plane, a few dozen slices), so here:

- intensities: per scan, the `percentiles` (default 0.5 and 99.5) of its non-zero voxels map linearly to 0 and 1,
  clipped (float32). The non-zero voxels, because skull-stripped or masked data is 0 outside; a scan's gain and
  offset do not change its cubes;
- foreground: per scan, Otsu's threshold of its normalised voxels (256 bins over [0, 1], the threshold at a bin
  centre, as scikit-image's `threshold_otsu`; the rule dipy's `median_otsu` uses for head masks): it falls
  between the background, exact 0 or noise, and the tissue. A fixed `foreground_threshold` replaces it (0: every
  voxel above the low percentile, for a background that is exactly 0);
- acceptance: a crop is kept when at least `min_foreground` of its scan voxels (padding left out) are
  foreground, instead of the HU look-ahead: the crop holds tissue rather than air;
- size: an axis shorter than the smallest crop (a 24-slice volume, a 48 x 48 one, for a 32 x 64 x 64 cube) is
  padded with 0, the normalised background, evenly on both sides, to the crop's length (`mr_padding`); such a
  cube's start is negative on that axis (the crop reaches into the padding) and the store lists the padded scans;
- borders: min(border_z or border_yx, `border_fraction` of the axis, (axis - crop) // 2), so a crop always fits;
  no min_slices rule;
- draw: as the reference's, crop starts uniform over the region, the first `per_scan` accepted of at most
  per_scan x attempts_per_cube candidates, scales as `scale_axes` says; cubes are float32 in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.sampling import (CubeSample, box_sums, crop_sizes, draw_candidates, resize_in_plane,
                                       resize_trilinear)

__all__ = ["percentile_window", "normalise", "otsu_threshold", "foreground_threshold", "mr_padding", "pad",
           "mr_borders", "MrRegion", "mr_scan_region", "sample_mr_cubes"]

OTSU_BINS = 256


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


def otsu_threshold(unit: np.ndarray, bins: int = OTSU_BINS) -> float:
    """Otsu's threshold of values in [0, 1]: the centre of the last bin of the lower class that maximises the
    between-class variance (foreground: values above it). 0.0 when the values fill a single bin."""
    idx = np.minimum((unit.ravel() * bins).astype(np.int64), bins - 1)
    counts = np.bincount(idx, minlength=bins).astype(np.float64)
    centres = (np.arange(bins) + 0.5) / bins
    w0 = np.cumsum(counts)[:-1]
    w1 = counts.sum() - w0
    m0 = np.cumsum(counts * centres)[:-1]
    m1 = (counts * centres).sum() - m0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (m0 / w0 - m1 / w1) ** 2
    between = np.nan_to_num(between, nan=-1.0)
    if between.max() <= 0:
        return 0.0
    return float(centres[int(np.argmax(between))])


def foreground_threshold(unit: np.ndarray, config: PretrainPatchConfig) -> float:
    """A scan's foreground threshold on its normalised values: the configured one, else Otsu's of the scan."""
    if config.foreground_threshold is not None:
        return float(config.foreground_threshold)
    return otsu_threshold(unit)


def mr_padding(shape: tuple[int, int, int], config: PretrainPatchConfig) -> tuple[tuple[int, int], ...]:
    """(before, after) voxels of padding per axis (z, y, x): an axis shorter than the smallest crop is padded
    evenly (the odd voxel after) to the crop's length; other axes (0, 0)."""
    need = (int(v) for v in crop_sizes(config).min(axis=0))
    return tuple(((c - n) // 2, c - n - (c - n) // 2) if n < c else (0, 0) for n, c in zip(shape, need))


def pad(unit: np.ndarray, padding: tuple[tuple[int, int], ...]) -> np.ndarray:
    """A normalised scan padded with 0 (its background after normalisation); the scan itself when no padding."""
    return np.pad(unit, padding, constant_values=0.0) if any(a or b for a, b in padding) else unit


def mr_borders(shape: tuple[int, int, int], config: PretrainPatchConfig) -> tuple[int, int, int]:
    """(z, y, x) borders of a (padded) scan: the configured ones, capped at `border_fraction` of each axis and
    at half of what the axis holds beyond the smallest crop, so the crop always fits between them."""
    f = config.border_fraction
    need = (int(v) for v in crop_sizes(config).min(axis=0))
    configured = (config.border_z, config.border_yx, config.border_yx)
    return tuple(min(b, int(f * n), max(0, (n - c) // 2)) for b, n, c in zip(configured, shape, need))


@dataclass(frozen=True)
class MrRegion:
    """Where a scan's crops are drawn: `padding` of the normalised scan, then `region` of the padded scan (of
    `shape`)."""

    padding: tuple[tuple[int, int], ...]
    region: tuple[slice, ...]
    shape: tuple[int, int, int]

    @property
    def padded(self) -> bool:
        return any(a or b for a, b in self.padding)

    def scan_mask(self) -> np.ndarray:
        """1 on the scan's voxels, 0 on the padding, over the padded scan (uint8)."""
        mask = np.zeros(self.shape, dtype=np.uint8)
        mask[tuple(slice(a, n - b) for n, (a, b) in zip(self.shape, self.padding))] = 1
        return mask

    def offset(self) -> np.ndarray:
        """Add to a start within the region to get the start in the (unpadded) scan's voxels (< 0 in padding)."""
        return np.array([r.start - p[0] for r, p in zip(self.region, self.padding)])


def mr_scan_region(shape: tuple[int, int, int], config: PretrainPatchConfig) -> MrRegion:
    """The padding and the part of the padded scan crops are drawn from: every scan has room for the smallest
    crop (padding makes each axis at least as long, the borders leave it)."""
    padding = mr_padding(shape, config)
    padded = tuple(n + a + b for n, (a, b) in zip(shape, padding))
    borders = mr_borders(padded, config)
    return MrRegion(padding, tuple(slice(b, n - b) for b, n in zip(borders, padded)), padded)


def sample_mr_cubes(unit_region: np.ndarray, rng: np.random.Generator, config: PretrainPatchConfig,
                    threshold: float, layout: MrRegion | None = None) -> CubeSample | None:
    """Up to `per_scan` accepted cubes from a normalised region (`layout.region` of the `normalise`d scan,
    `pad`ded by `layout.padding`); a voxel is foreground above `threshold` (`foreground_threshold`, >= 0, so
    padding never is); `fractions` are the accepted crops' foreground shares of their scan voxels, padding left
    out (judged on the crop at native resolution): padding is not air the crop was drawn on, and a scan smaller
    than the cube would otherwise never pass."""
    n_attempts = config.per_scan * config.attempts_per_cube
    cands = draw_candidates(rng, unit_region.shape, config, n_attempts, lookahead=0)
    if cands is None:
        return None
    cube = tuple(config.cube_size)
    foreground = (unit_region > threshold).astype(np.uint8)
    if layout is None or not layout.padded:
        judged = np.prod(cands.sizes, axis=1)
    else:
        judged = box_sums(layout.scan_mask()[layout.region], cands.starts, cands.sizes)
    fractions = box_sums(foreground, cands.starts, cands.sizes) / judged
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
