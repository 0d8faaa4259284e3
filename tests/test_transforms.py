"""Tests of pipeline.transforms: exact properties under fixed seeds, numpy vs torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.transforms import (GenesisConfig, apply, apply_batch, apply_flip, apply_inpainting,
                                 apply_local_shuffle, apply_nonlinear, apply_outpainting,
                                 corrupt, corrupt_batch, paint_noise, reference_nonlinear,
                                 sample_inpainting, sample_local_shuffle, sample_nonlinear,
                                 sample_outpainting, sample_params)
from pipeline.transforms.paint import box_mask

SHAPE = (16, 20, 24)  # small (D, H, W) cubes keep the suite fast
SMALL = GenesisConfig(shuffle_blocks=500)


def cube(seed=0, shape=SHAPE):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def test_fixed_seed_gives_identical_outputs():
    x = cube()
    a = corrupt(x, np.random.default_rng(7), SMALL)
    b = corrupt(x, np.random.default_rng(7), SMALL)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("shape", [SHAPE, (1, *SHAPE), (32, 64, 64)])
def test_shape_dtype_range_and_target_is_flipped_original(shape):
    x = cube(1, shape)
    rng = np.random.default_rng(3)
    for _ in range(6):
        p = sample_params(rng, shape, SMALL)
        out, target = apply(x, p)
        assert out.shape == x.shape and target.shape == x.shape
        assert out.dtype == np.float32 and target.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        spatial = x.reshape(x.shape[-3:])
        expected = spatial
        for axis in p.flip_axes:
            expected = np.flip(expected, axis)
        np.testing.assert_array_equal(target.reshape(spatial.shape), expected)


def test_flip_axes_are_spatial_and_slice_axis_flips():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        seen.update(sample_params(rng, SHAPE, GenesisConfig(local_shuffle_rate=0.0)).flip_axes)
    assert seen == {0, 1, 2}
    x = cube()
    np.testing.assert_array_equal(apply_flip(x, (0,)), x[::-1])
    np.testing.assert_array_equal(apply_flip(x, (2, 2)), x)


def test_outpainting_keeps_boxes_and_noises_outside():
    x = cube(2)
    rng = np.random.default_rng(5)
    boxes = sample_outpainting(rng, SHAPE)
    noise = paint_noise(11, SHAPE)
    out = apply_outpainting(x, boxes, noise)
    mask = box_mask(SHAPE, boxes)
    assert 1 <= len(boxes) <= 5 and mask.any() and (~mask).any()
    np.testing.assert_array_equal(out[mask], x[mask])
    np.testing.assert_array_equal(out[~mask], noise[~mask])
    for box in boxes:
        assert all(o >= 3 and o + s <= side - 3 for o, s, side in zip(box.origin, box.size, SHAPE))


def test_inpainting_changes_only_inside_boxes():
    x = cube(3)
    rng = np.random.default_rng(1)
    boxes = ()
    while not boxes:
        boxes = sample_inpainting(rng, SHAPE)
    out = apply_inpainting(x, boxes, paint_noise(4, SHAPE))
    mask = box_mask(SHAPE, boxes)
    np.testing.assert_array_equal(out[~mask], x[~mask])
    assert (out[mask] != x[mask]).mean() > 0.99
    for box in boxes:
        for s, side in zip(box.size, SHAPE):
            assert side // 6 <= s <= side // 3


def test_local_shuffle_moves_values_only_within_blocks():
    x = cube(4)
    blocks = sample_local_shuffle(np.random.default_rng(2), SHAPE, SMALL)
    out = apply_local_shuffle(x, blocks)
    covered = np.zeros(SHAPE, bool)
    for o, s in zip(blocks.origins, blocks.sizes):
        covered[o[0]:o[0] + s[0], o[1]:o[1] + s[1], o[2]:o[2] + s[2]] = True
    np.testing.assert_array_equal(out[~covered], x[~covered])
    assert np.isin(out, x).all()
    assert (out != x).any()
    # the last block of all is written last: its voxels are a permutation of its original ones
    o, s = blocks.origins[-1], blocks.sizes[-1]
    sl = tuple(slice(a, a + b) for a, b in zip(o, s))
    np.testing.assert_array_equal(np.sort(out[sl].ravel()), np.sort(x[sl].ravel()))


def test_local_shuffle_block_sizes_follow_axis_convention():
    blocks = sample_local_shuffle(np.random.default_rng(0), (32, 64, 64))
    assert len(blocks.sizes) == 10_000
    assert tuple(blocks.sizes.max(0)) == (3, 6, 6) and tuple(blocks.sizes.min(0)) == (1, 1, 1)


def test_nonlinear_is_monotone_in_the_drawn_direction():
    values = np.linspace(0, 1, 2001, dtype=np.float32).reshape(1, 1, -1)
    rng = np.random.default_rng(0)
    directions = set()
    for _ in range(40):
        p = sample_nonlinear(rng)
        y = apply_nonlinear(values, p).ravel()
        diff = np.diff(y)
        assert (diff <= 1e-7).all() if p.decreasing else (diff >= -1e-7).all()
        directions.add(p.decreasing)
    assert directions == {True, False}


def test_nonlinear_table_matches_100000_point_reference():
    x = cube(5, (32, 64, 64))
    rng = np.random.default_rng(10)
    worst = 0.0
    for _ in range(40):
        p = sample_nonlinear(rng)
        worst = max(worst, float(np.abs(apply_nonlinear(x, p) - reference_nonlinear(x, p)).max()))
    assert worst < 1e-3


def test_operation_frequencies_match_rates():
    rng = np.random.default_rng(123)
    cfg = GenesisConfig(shuffle_blocks=1)
    n = 4000
    draws = [sample_params(rng, SHAPE, cfg) for _ in range(n)]

    def check(count, p):
        assert abs(count - n * p) <= 4.5 * np.sqrt(n * p * (1 - p)), (count, p)

    check(sum(d.shuffle for d in draws), 0.5)
    check(sum(d.nonlinear for d in draws), 0.9)
    check(sum(d.paint == "inpaint" for d in draws), 0.18)
    check(sum(d.paint == "outpaint" for d in draws), 0.72)
    check(sum(d.paint == "none" for d in draws), 0.10)
    check(sum(len(d.flip_axes) >= 1 for d in draws), 0.4)
    check(sum(len(d.flip_axes) == 3 for d in draws), 0.4 ** 3)


def test_torch_path_matches_numpy_on_same_params():
    rng = np.random.default_rng(8)
    cubes = rng.random((12, *SHAPE), dtype=np.float32)
    params = [sample_params(rng, SHAPE, SMALL) for _ in range(12)]
    out, target = apply_batch(torch.from_numpy(cubes[:, None]), params)
    for i, p in enumerate(params):
        ref_out, ref_target = apply(cubes[i], p)
        np.testing.assert_allclose(out[i, 0].numpy(), ref_out, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(target[i, 0].numpy(), ref_target)
    assert {p.paint for p in params} >= {"inpaint", "outpaint"}
    assert any(p.shuffle for p in params) and any(p.nonlinear for p in params)


def test_corrupt_batch_deterministic_shape_dtype_range():
    batch = torch.from_numpy(np.random.default_rng(0).random((6, 1, *SHAPE), dtype=np.float32))
    a = corrupt_batch(batch, torch.Generator().manual_seed(3), SMALL)
    b = corrupt_batch(batch, torch.Generator().manual_seed(3), SMALL)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
        assert u.shape == batch.shape and u.dtype == torch.float32
        assert float(u.min()) >= 0.0 and float(u.max()) <= 1.0
    assert not torch.equal(a[0], a[1])


@pytest.mark.parametrize("field,value", [("flip_rate", 1.5), ("paint_rate", -0.1),
                                         ("shuffle_blocks", -1), ("bezier_samples", 1)])
def test_invalid_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        GenesisConfig(**{field: value})


@pytest.mark.parametrize("shape", [(2, 16, 16, 16), (16, 16), (8, 64, 64)])
def test_bad_cube_shape_raises(shape):
    with pytest.raises(ValueError, match="shape"):
        corrupt(np.zeros(shape, np.float32), np.random.default_rng(0))


def test_bad_batch_shape_raises():
    with pytest.raises(ValueError, match="shape"):
        corrupt_batch(torch.zeros(2, 16, 16, 16), torch.Generator())


def test_tensor_path_matches_numpy_on_same_params(monkeypatch):
    """The whole-batch tensor path (what CUDA batches run) reproduces `apply`, on the CPU."""
    from pipeline.transforms import batched
    monkeypatch.setattr(batched, "_CPU_KERNELS", False)
    rng = np.random.default_rng(9)
    cubes = rng.random((10, *SHAPE), dtype=np.float32)
    params = [sample_params(rng, SHAPE, SMALL) for _ in range(10)]
    out, target = apply_batch(torch.from_numpy(cubes[:, None]), params)
    for i, p in enumerate(params):
        ref_out, ref_target = apply(cubes[i], p)
        np.testing.assert_allclose(out[i, 0].numpy(), ref_out, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(target[i, 0].numpy(), ref_target)
    assert any(p.shuffle for p in params) and any(p.paint == "outpaint" for p in params)


@pytest.mark.parametrize("draw_with_kernels", [True, False])
def test_cpu_kernels_match_tensor_path_on_torch_drawn_params(monkeypatch, draw_with_kernels):
    """Torch-drawn params (seed form or materialised keys/noise) give the same batch either way."""
    from pipeline.transforms import batched
    cfg = GenesisConfig(shuffle_blocks=300, local_shuffle_rate=0.7)
    batch = torch.from_numpy(np.random.default_rng(1).random((8, 1, *SHAPE), dtype=np.float32))
    monkeypatch.setattr(batched, "_CPU_KERNELS", draw_with_kernels)
    params = batched.sample_batch_params(torch.Generator().manual_seed(4), 8, SHAPE, cfg)
    assert (params.key_seeds is not None) == draw_with_kernels
    assert bool(params.shuffle.any()) and bool((params.paint > 0).any())
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(batched, "_CPU_KERNELS", kernels)
        results.append(apply_batch(batch, params))
    (k_out, k_target), (t_out, t_target) = results
    torch.testing.assert_close(k_out, t_out, atol=1e-5, rtol=0)
    assert torch.equal(k_target, t_target)
