"""The Models Genesis cube sampler (`infinite_generator_from_one_volume`) as a pure array core.

The reference draws a crop start uniformly in its `randint` ranges, takes a window `len_depth`
slices deeper than the cube, scores every cube voxel 1 when it is dense (>= -150 HU), 0.5 when
only the voxel one slice deeper is, else 0 (`1 - k / (len_depth - 1)` for the first dense slice
k), and rejects the crop when the score sum exceeds 0.15 x the cube's voxel count; it keeps the
first `scale` crops that pass, out of at most 50 x `scale` attempts.

Here all candidates of a scan are drawn at once and, when they need no resizing, judged at once:
the per-voxel scores of the whole region are one small-integer map, and a summed-volume table of
it gives every candidate's score sum in eight lookups. Candidates that are resized in-plane (the
reference's multi-scale option) are scored after resizing, as the reference does, one by one in
draw order until enough are accepted. Acceptance keeps the reference's semantics: the first
`per_scan` candidates in draw order that pass are kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.patches.config import PretrainPatchConfig

__all__ = ["Candidates", "hu_to_unit", "crop_sizes", "scan_region", "draw_candidates", "voxel_scores",
           "box_sums", "linear_resize_matrix", "resize_in_plane", "resize_trilinear", "sample_cubes", "CubeSample"]


def hu_to_unit(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU window and scale linearly to [0, 1] (float32).

    This exact arithmetic (float32, multiply by the reciprocal) defines the values the model sees;
    stores that keep clipped HU decode with this same function, so the floats are bit-identical.
    """
    lo, hi = window
    out = np.clip(hu.astype(np.float32), lo, hi)
    out -= lo
    out *= 1.0 / (hi - lo)
    return out


@dataclass(frozen=True)
class Candidates:
    starts: np.ndarray   # (n, 3) int64, relative to the region
    sizes: np.ndarray    # (n, 3) int64 crop sizes (the cube part of the window; the window is lookahead slices deeper)
    scales: np.ndarray   # (n,) float64


def crop_sizes(config: PretrainPatchConfig) -> np.ndarray:
    """(n_scales, 3) crop (d, h, w) per scale: "yx" enlarges rows and columns only (the reference), "zyx" all."""
    cube = np.asarray(config.cube_size, dtype=np.int64)
    scales = np.asarray(config.scales, dtype=np.float64)
    sizes = np.rint(cube[None, :] * scales[:, None]).astype(np.int64)
    if config.scale_axes == "yx":
        sizes[:, 0] = cube[0]
    return sizes


def scan_region(shape: tuple[int, int, int], config: PretrainPatchConfig) -> tuple[tuple[slice, ...], str | None]:
    """The part of a scan that crop windows can touch, and why the scan is skipped (None when it is not).

    The reference's start ranges are z in [bz, Z - d - L - 1 - bz], y in [b, Y - h - 1 - b], x likewise;
    a window (d + L, h, w) from the last start ends one voxel before Z - bz (Y - b, X - b). So the
    region is [bz, Z - 1 - bz) x [b, Y - 1 - b) x [b, X - 1 - b) and every window that fits in it
    starts inside the reference's ranges (and every such start fits).
    """
    z, y, x = shape
    bz, b = config.border_z, config.border_yx
    region = (slice(bz, z - 1 - bz), slice(b, y - 1 - b), slice(b, x - 1 - b))
    if z < config.min_slices:
        return region, f"{z} slices, fewer than min_slices={config.min_slices}"
    d, h, w = (int(v) for v in crop_sizes(config).min(axis=0))
    L = config.lookahead
    hi = (z - d - L - 1 - bz, y - h - 1 - b, x - w - 1 - b)
    if hi[0] < bz or hi[1] < b or hi[2] < b:
        return region, (f"shape {z}x{y}x{x} leaves no crop start for a {d}x{h}x{w} crop: the reference's ranges are "
                        f"z in [{bz}, {hi[0]}], y in [{b}, {hi[1]}], x in [{b}, {hi[2]}]")
    return region, None


def draw_candidates(rng: np.random.Generator, region_shape: tuple[int, int, int], config: PretrainPatchConfig,
                    n: int, lookahead: int | None = None) -> Candidates | None:
    """`n` random crops whose windows (`lookahead` slices deeper than the crop; default the config's, the MR
    recipe passes 0) fit in the region, uniform over the starts; draws of a scale whose window does not fit
    are dropped; None when no scale fits at all."""
    sizes_per_scale = crop_sizes(config)
    scales = np.asarray(config.scales, dtype=np.float64)
    window = sizes_per_scale + np.array([config.lookahead if lookahead is None else lookahead, 0, 0])
    room = np.asarray(region_shape)[None, :] - window + 1  # valid starts per axis (<= 0 when too big)
    fits = np.all(room >= 1, axis=1)
    if not fits.any():
        return None
    which = rng.integers(0, len(scales), size=n)
    starts = rng.integers(0, np.maximum(room, 1)[which])
    ok = fits[which]
    return Candidates(starts=starts[ok], sizes=sizes_per_scale[which][ok], scales=scales[which][ok])


def _dense(values: np.ndarray, threshold: float, window: tuple[float, float]) -> np.ndarray:
    """values >= threshold after clipping to the window (the reference clips before it compares)."""
    lo, hi = window
    if threshold <= lo:
        return np.ones(values.shape, dtype=bool)
    if threshold > hi:
        return np.zeros(values.shape, dtype=bool)
    return values >= threshold


def voxel_scores(dense: np.ndarray, lookahead: int) -> np.ndarray:
    """Per-voxel acceptance score in units of 1 / (lookahead - 1), for the first len(dense) - lookahead + 2 slices.

    lookahead - 1 - k for the first k < lookahead - 1 with dense[z + k], else 0 (the reference's
    `1 - k / (len_depth - 1)`, where k = len_depth - 1 scores 0 whether that slice is dense or not).
    """
    steps = lookahead - 1
    n = dense.shape[0] - steps + 1
    out = np.zeros((max(n, 0),) + dense.shape[1:], dtype=np.int8 if steps < 128 else np.int32)
    for k in range(steps - 1, -1, -1):  # the shallowest dense slice wins: write it last
        out[dense[k:k + n]] = steps - k
    return out


def _summed_volume(values: np.ndarray) -> np.ndarray:
    dtype = np.int32 if int(values.max(initial=0)) * values.size < 2**31 else np.int64
    s = np.zeros(tuple(d + 1 for d in values.shape), dtype=dtype)
    np.cumsum(values, axis=0, dtype=dtype, out=s[1:, 1:, 1:])
    np.cumsum(s[1:, 1:, 1:], axis=1, out=s[1:, 1:, 1:])
    np.cumsum(s[1:, 1:, 1:], axis=2, out=s[1:, 1:, 1:])
    return s


def box_sums(values: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Sum of `values` inside every box (start, size), vectorised over a summed-volume table."""
    s = _summed_volume(values)
    z0, y0, x0 = starts.T
    z1, y1, x1 = (starts + sizes).T
    return (s[z1, y1, x1] - s[z0, y1, x1] - s[z1, y0, x1] - s[z1, y1, x0]
            + s[z0, y0, x1] + s[z0, y1, x0] + s[z1, y0, x0] - s[z0, y0, x0])


def resize_trilinear(unit: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """3D scales: trilinear (align_corners=False) resize of a whole crop to the cube."""
    t = torch.from_numpy(np.ascontiguousarray(unit))[None, None]
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()


def linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1D linear interpolation on pixel centres (torch's align_corners=False, and
    scikit-image's order-1 `resize` mapping): out[i] samples in at (i + 0.5) * n_in / n_out - 0.5."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - w1)
    np.add.at(m, (np.arange(n_out), i1), w1)
    return m.astype(np.float32)


def resize_in_plane(unit: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear in-plane resize of (S, h, w) to (S, H, W), slices untouched (the reference's crop_rows/crop_cols)."""
    my = linear_resize_matrix(unit.shape[1], size[0])
    mx = linear_resize_matrix(unit.shape[2], size[1])
    return np.ascontiguousarray(my @ unit @ mx.T, dtype=np.float32)


@dataclass(frozen=True)
class CubeSample:
    cubes: np.ndarray       # (k, D, H, W) float32 in [0, 1]
    starts: np.ndarray      # (k, 3) crop starts relative to the region
    sizes: np.ndarray       # (k, 3)
    scales: np.ndarray      # (k,)
    fractions: np.ndarray   # (k,) acceptance score sum / judged voxel count (<= max_dense_fraction)
    attempts: int           # candidates drawn
    candidates: Candidates  # all of them, in draw order
    accepted: np.ndarray    # (k,) indices into candidates of the cubes above
    n_tried: int            # the first n_tried candidates were judged; `accepted` are those of them that passed


def sample_cubes(hu_region: np.ndarray, rng: np.random.Generator, config: PretrainPatchConfig) -> CubeSample | None:
    """Up to `per_scan` accepted cubes from an HU region (`scan_region`'s part of a scan)."""
    n_attempts = config.per_scan * config.attempts_per_cube
    cands = draw_candidates(rng, hu_region.shape, config, n_attempts)
    if cands is None:
        return None
    cube = tuple(config.cube_size)
    L, window = config.lookahead, config.hu_window
    steps = L - 1
    in_plane = (config.scale_axes == "yx") & np.any(cands.sizes != np.asarray(cube), axis=1)
    n = len(cands.scales)
    totals = np.full(n, np.nan)
    native = ~in_plane
    if native.any():  # scored on the crop at native resolution: vectorised
        dense = _dense(hu_region, config.dense_hu, window)
        totals[native] = box_sums(voxel_scores(dense, L), cands.starts[native], cands.sizes[native]) / steps
    judged = np.where(in_plane[:, None], np.asarray(cube), cands.sizes)
    # the reference's `lung_max * input_rows * input_cols * input_deps`, rows = x, cols = y, in its order
    limits = config.max_dense_fraction * judged[:, 2] * judged[:, 1] * judged[:, 0]
    resized: dict[int, np.ndarray] = {}
    if not in_plane.any():
        keep = np.flatnonzero(totals <= limits)[: config.per_scan]
        n_tried = int(keep[-1]) + 1 if len(keep) == config.per_scan else n
    else:
        lo, hi = window
        unit_threshold = (config.dense_hu - lo) / (hi - lo)  # the reference's HU_thred
        keep_list = []
        n_tried = n
        for i in range(n):
            if len(keep_list) == config.per_scan:
                n_tried = i
                break
            if in_plane[i]:  # the reference resizes the whole window in-plane, then scores it
                (z, y, x), (d, h, w) = cands.starts[i], cands.sizes[i]
                win = resize_in_plane(hu_to_unit(hu_region[z:z + d + steps, y:y + h, x:x + w], window), cube[1:])
                dense = _dense(win, unit_threshold, (0.0, 1.0))
                totals[i] = int(voxel_scores(dense, L)[:d].sum(dtype=np.int64)) / steps
                resized[i] = win[:d]
            if totals[i] <= limits[i]:
                keep_list.append(i)
        keep = np.asarray(keep_list, dtype=np.int64)
    cubes = np.empty((len(keep),) + cube, dtype=np.float32)
    for j, k in enumerate(keep):
        if k in resized:
            cubes[j] = resized[k]
            continue
        (z, y, x), (d, h, w) = cands.starts[k], cands.sizes[k]
        crop = hu_to_unit(hu_region[z:z + d, y:y + h, x:x + w], window)
        cubes[j] = crop if crop.shape == cube else resize_trilinear(crop, cube)
    fractions = totals[keep] / np.prod(judged[keep], axis=1) if len(keep) else np.zeros(0)
    return CubeSample(cubes=cubes, starts=cands.starts[keep], sizes=cands.sizes[keep], scales=cands.scales[keep],
                      fractions=fractions, attempts=n, candidates=cands, accepted=keep, n_tried=n_tried)
