"""The cube sampler against a plain-loop transcription of the reference's `infinite_generator_from_one_volume`.

The reference (MrGiovanni/ModelsGenesis, infinite_generator_3D.py) works on (x, y, z) arrays; the
transcription below keeps its loop and its axis order, and is fed our (z, y, x) data transposed.
Every candidate the vectorised sampler judged (all accepted cubes and every rejection before the
last acceptance) must get the same verdict from the loop, and every start must lie inside the
reference's `randint` ranges. Borders and cube are small so the loops stay fast; the defaults
(the reference's values) are checked separately.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.sampling import (Candidates, box_sums, draw_candidates, hu_to_unit, resize_in_plane,
                                       sample_cubes, scan_region, voxel_scores)
from pipeline.sample_data.phantom import generate_phantom, tiny_config

HU_MIN, HU_MAX = -1000.0, 1000.0
HU_THRED = (-150.0 - HU_MIN) / (HU_MAX - HU_MIN)  # the reference's setup_config.HU_thred

SMALL = dict(cube_size=(8, 16, 16), per_scan=10, attempts_per_cube=50, border_yx=4, border_z=2, min_slices=16)


def reference_scaled(img_xyz: np.ndarray) -> np.ndarray:
    """The reference's intensity step: clip in place, then 1.0 * (img - min) / (max - min) (float64)."""
    img = img_xyz.astype(np.float64)
    img[img < HU_MIN] = HU_MIN
    img[img > HU_MAX] = HU_MAX
    return 1.0 * (img - HU_MIN) / (HU_MAX - HU_MIN)


def reference_accepts(crop_window: np.ndarray, input_rows: int, input_cols: int, input_deps: int,
                      len_depth: int = 3, lung_max: float = 0.15) -> bool:
    """The reference's acceptance loop, transcribed (crop_window is (x, y, z), input_deps + len_depth deep)."""
    d_img = np.zeros((input_rows, input_cols, input_deps), dtype=float)
    for d in range(input_deps):
        for i in range(input_rows):
            for j in range(input_cols):
                for k in range(len_depth):
                    if crop_window[i, j, d + k] >= HU_THRED:
                        d_img[i, j, d] = k
                        break
                    if k == len_depth - 1:
                        d_img[i, j, d] = k
    d_img = d_img.astype("float32")
    d_img /= (len_depth - 1)
    d_img = 1.0 - d_img
    return not np.sum(d_img) > lung_max * input_rows * input_cols * input_deps


def reference_ranges(shape_zyx, crop_zyx, cfg: PretrainPatchConfig) -> list[tuple[int, int]]:
    """The reference's randint(a, b) bounds (inclusive), in our (z, y, x) order."""
    size_z, size_y, size_x = shape_zyx
    input_deps, crop_cols, crop_rows = crop_zyx
    len_border, len_border_z, len_depth = cfg.border_yx, cfg.border_z, cfg.lookahead
    return [(0 + len_border_z, size_z - input_deps - len_depth - 1 - len_border_z),
            (0 + len_border, size_y - crop_cols - 1 - len_border),
            (0 + len_border, size_x - crop_rows - 1 - len_border)]


def slab_phantom(rng, shape=(30, 48, 64)) -> np.ndarray:
    """Lung (-850 HU) with thin dense plates (1 slice thick, ~40 HU), denser towards high x.

    Thin plates make the look-ahead term matter: a plate voxel at z + 1 adds 0.5 to the air voxel
    above it, so crops with 10-15% dense voxels score 0.15-0.22: kept by a plain dense-fraction rule,
    rejected by the reference.
    """
    vol = np.full(shape, -850.0)
    z, y, x = shape
    density = np.linspace(0.0, 0.3, x)[None, None, :]
    plates = rng.random((z, y // 4 + 1, x // 4 + 1))
    plates = np.repeat(np.repeat(plates, 4, axis=1), 4, axis=2)[:, :y, :x]
    vol[plates < density] = 40.0
    vol += rng.normal(0, 20, shape)
    return np.rint(vol).astype(np.int16)


def lung_phantom() -> np.ndarray:
    """The project's synthetic chest CT (body, lungs, vessels, nodules), tiny size."""
    return generate_phantom(tiny_config(), np.random.default_rng(5))[1].volume


@pytest.mark.parametrize("volume", ["slab", "lung"])
@pytest.mark.parametrize("scales,axes", [((1.0,), "yx"), ((1.0, 1.5), "yx")])
def test_every_judged_candidate_gets_the_reference_verdict(volume, scales, axes):
    vol = slab_phantom(np.random.default_rng(0)) if volume == "slab" else lung_phantom()
    cfg = PretrainPatchConfig(**SMALL, scales=scales, scale_axes=axes)
    region, reason = scan_region(vol.shape, cfg)
    assert reason is None
    offset = np.array([r.start for r in region])
    sample = sample_cubes(vol[region], np.random.default_rng(1), cfg)
    cands, n_tried = sample.candidates, sample.n_tried
    img_xyz = reference_scaled(vol.transpose(2, 1, 0))  # the reference's img_array after its intensity step
    D, H, W = cfg.cube_size
    verdicts, old_rule_kept_reference_rejects = [], 0
    for i in range(n_tried):
        start, (d, h, w) = cands.starts[i] + offset, cands.sizes[i]
        for axis, (lo, hi) in enumerate(reference_ranges(vol.shape, (d, h, w), cfg)):
            assert lo <= start[axis] <= hi
        z, y, x = start
        crop_window = img_xyz[x:x + w, y:y + h, z:z + d + cfg.lookahead]
        if (h, w) != (H, W):  # the reference resizes the whole window in-plane; ours is bilinear without anti-aliasing
            zyx = resize_in_plane(hu_to_unit(vol[z:z + d + cfg.lookahead, y:y + h, x:x + w], cfg.hu_window), (H, W))
            crop_window = zyx.transpose(2, 1, 0).astype(np.float64)
        ok = reference_accepts(crop_window, W, H, D)
        verdicts.append(ok)
        if not ok and np.mean(crop_window[:, :, :D] >= HU_THRED) <= 0.15:
            old_rule_kept_reference_rejects += 1
    verdicts = np.array(verdicts)
    accepted_by_reference = np.flatnonzero(verdicts)[: cfg.per_scan]
    kept = list(sample.accepted)
    assert kept == list(accepted_by_reference)
    assert len(kept) == cfg.per_scan or n_tried == sample.attempts
    assert (verdicts == np.isin(np.arange(n_tried), kept)).all()  # nothing judged and passed was skipped
    assert np.all(sample.fractions <= 0.15)
    if volume == "slab":  # the look-ahead term mattered on this scan
        assert old_rule_kept_reference_rejects > 0 and (~verdicts).sum() > 0
    for cube, start, (d, h, w) in zip(sample.cubes, sample.starts + offset, sample.sizes):
        z, y, x = start
        if (h, w) == (H, W):  # the reference keeps crop_window[:, :, :input_deps]: the same voxels, float32
            ref = img_xyz[x:x + w, y:y + h, z:z + D].transpose(2, 1, 0)
            np.testing.assert_allclose(cube, ref, rtol=0, atol=1e-7)
            np.testing.assert_array_equal(cube, hu_to_unit(vol[z:z + D, y:y + h, x:x + w], cfg.hu_window))


def test_starts_cover_exactly_the_reference_ranges():
    cfg = PretrainPatchConfig(**{**SMALL, "scales": (1.0, 1.5)})
    shape = (27, 40, 43)
    region, reason = scan_region(shape, cfg)
    assert reason is None
    region_shape = tuple(r.stop - r.start for r in region)
    cands = draw_candidates(np.random.default_rng(0), region_shape, cfg, 20000)
    offset = np.array([r.start for r in region])
    for size in ((8, 16, 16), (8, 24, 24)):
        mine = np.all(cands.sizes == size, axis=1)
        starts = cands.starts[mine] + offset
        for axis, (lo, hi) in enumerate(reference_ranges(shape, size, cfg)):
            assert starts[:, axis].min() == lo and starts[:, axis].max() == hi  # every start reachable, no other


def test_default_borders_are_the_reference_ones():
    cfg = PretrainPatchConfig()
    assert (cfg.border_yx, cfg.border_z, cfg.lookahead) == (100, 30, 3)  # len_border, len_border_z, len_depth
    assert (cfg.max_dense_fraction, cfg.dense_hu, cfg.hu_window) == (0.15, -150, (-1000, 1000))
    assert cfg.per_scan * cfg.attempts_per_cube == 50 * 32 and cfg.scale_axes == "yx"
    assert scan_region((96, 265, 265), cfg)[1] is None  # z in [30, 30], x, y in [100, 100]
    deeper = PretrainPatchConfig(min_slices=0, cube_size=(33, 64, 64))
    assert "z in [30, 29]" in scan_region((96, 265, 265), deeper)[1]
    assert scan_region((95, 512, 512), cfg)[1] == "95 slices, fewer than min_slices=96"
    assert "x in [100, 99]" in scan_region((120, 512, 264), cfg)[1]
    region, _ = scan_region((120, 512, 400), cfg)
    assert region == (slice(30, 89), slice(100, 411), slice(100, 299))


def test_voxel_scores_and_box_sums_match_a_loop(rng):
    dense = rng.random((9, 7, 6)) < 0.3
    for lookahead in (2, 3, 4):
        got = voxel_scores(dense, lookahead)
        steps = lookahead - 1
        assert got.shape == (9 - steps + 1, 7, 6)
        for z, y, x in np.ndindex(got.shape):
            k = next((k for k in range(steps) if dense[z + k, y, x]), steps)
            assert got[z, y, x] == steps - k
    values = rng.integers(0, 3, size=(10, 12, 9))
    starts, sizes = np.array([[0, 0, 0], [2, 3, 1], [5, 4, 3]]), np.array([[4, 8, 9], [8, 9, 8], [5, 8, 6]])
    got = box_sums(values, starts, sizes)
    for (z, y, x), (d, h, w), g in zip(starts, sizes, got):
        assert g == values[z:z + d, y:y + h, x:x + w].sum()


def test_in_plane_resize_is_torch_bilinear_and_leaves_slices_alone(rng):
    import torch
    import torch.nn.functional as F

    unit = rng.random((5, 24, 36)).astype(np.float32)
    got = resize_in_plane(unit, (16, 16))
    want = F.interpolate(torch.from_numpy(unit)[None], size=(16, 16), mode="bilinear", align_corners=False)[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(resize_in_plane(unit, (24, 36)), unit)  # same size: untouched


def test_3d_scales_stay_an_option():
    vol = np.full((40, 48, 48), -900, dtype=np.int16)
    cfg = PretrainPatchConfig(**{**SMALL, "border_yx": 0, "border_z": 0, "per_scan": 30}, scales=(1.0, 1.5),
                              scale_axes="zyx")
    s = sample_cubes(vol[scan_region(vol.shape, cfg)[0]], np.random.default_rng(0), cfg)
    assert {tuple(v) for v in s.sizes} == {(8, 16, 16), (12, 24, 24)} and s.cubes.shape == (30, 8, 16, 16)
    np.testing.assert_allclose(s.cubes, 0.05, atol=1e-6)
    yx = PretrainPatchConfig(**{**SMALL, "border_yx": 0, "border_z": 0, "per_scan": 30}, scales=(1.0, 1.5))
    s = sample_cubes(vol[scan_region(vol.shape, yx)[0]], np.random.default_rng(0), yx)
    assert {tuple(v) for v in s.sizes} == {(8, 16, 16), (8, 24, 24)}
    assert isinstance(s.candidates, Candidates)
