"""LCS at the reference's resolution: volumes halved in-plane (its data path `3D_LiTS_NPY_256x256xZ`,
keras/downstream_tasks/config.py:301) before cubes are sampled, by one pure function that the store
build and whole-volume evaluation share (`pipeline.tasks.sampling.to_task_grid`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.patches.store import PatchStore
from pipeline.sample_data.lits import write_lits_sample
from pipeline.tasks import sampling as S
from pipeline.tasks.geometry import index_to_world, resized_geometry
from pipeline.tasks.registry import get_task
from pipeline.volume_store.store import VolumeStore

LCS = get_task("lcs")


def _spec(scale: float):
    return dataclasses.replace(LCS, inplane_scale=scale)


def _case(shape=(5, 12, 10), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(-1000, 1000, size=(2,) + shape).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    label[:, 2:8, 2:6] = 1  # a liver
    label[1:4, 4:6, 2:4] = 2  # a tumour inside it
    return image, label


def test_lcs_is_halved_in_plane_as_the_reference():
    assert LCS.inplane_scale == 0.5 and get_task("bms").inplane_scale == 1.0


def test_halved_in_plane_depth_unchanged_labels_kept():
    image, label = _case()
    out, lab, spacing = S.to_task_grid(image, label, (2.5, 0.7, 0.8), _spec(0.5))
    assert out.shape == (2, 5, 6, 5) and lab.shape == (5, 6, 5) and out.dtype == np.float32
    assert spacing == (2.5, 1.4, 1.6)  # the extent in mm is unchanged
    # images: each new voxel is the mean of the 2 x 2 voxels it covers (area)
    expected = image.astype(np.float64).reshape(2, 5, 6, 2, 5, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    # labels: copied (nearest), never averaged: same dtype, integers, the same label set
    assert lab.dtype == label.dtype and set(np.unique(lab)) == set(np.unique(label)) == {0, 1, 2}
    np.testing.assert_array_equal(lab, label[:, 1::2, 1::2])
    # no label map (a test scan evaluated whole may still have one; a store of images only has not)
    assert S.to_task_grid(image, None, (1, 1, 1), _spec(0.5))[1] is None


def test_odd_sizes_and_enlarging():
    image, label = _case(shape=(3, 11, 9))
    out, lab, spacing = S.to_task_grid(image, label, (1.0, 1.0, 1.0), _spec(0.5))
    assert out.shape == (2, 3, 6, 4) and lab.shape == (3, 6, 4)
    assert spacing == pytest.approx((1.0, 11 / 6, 9 / 4))
    big, lab2, spacing2 = S.to_task_grid(image, label, (1.0, 1.0, 1.0), _spec(2.0))
    assert big.shape == (2, 3, 22, 18) and spacing2 == (1.0, 0.5, 0.5)
    assert set(np.unique(lab2)) == set(np.unique(label))
    assert image.min() <= big.min() and big.max() <= image.max()  # bilinear: no overshoot


def test_scale_one_returns_the_inputs_untouched():
    image, label = _case()
    out, lab, spacing = S.to_task_grid(image, label, (2.5, 0.7, 0.8), _spec(1.0))
    assert out is image and lab is label and spacing == (2.5, 0.7, 0.8)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), "half"])
def test_a_bad_scale_names_the_field(bad):
    class Spec:
        name = "mine"
        inplane_scale = bad

    with pytest.raises(ValueError, match="TaskSpec.inplane_scale of task mine.*" + repr(bad)[:4]):
        S.inplane_scale(Spec())


def test_resized_geometry_puts_each_new_voxel_at_the_centre_of_what_it_covers():
    d = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    attrs = {"spacing": [2.5, 0.7, 0.8], "origin": [-300.0, 10.0, -20.0], "direction": d.reshape(-1).tolist()}
    new = resized_geometry(attrs, (5, 12, 10), (5, 6, 5))
    assert new["spacing"] == pytest.approx([2.5, 1.4, 1.6]) and new["direction"] == attrs["direction"]
    for z, j, i in [(0, 0, 0), (3, 5, 4), (4, 2, 1)]:
        covered = [(z, 2 * j + a, 2 * i + b) for a in (0, 1) for b in (0, 1)]
        np.testing.assert_allclose(index_to_world([z, j, i], new)[0], index_to_world(covered, attrs).mean(axis=0),
                                   atol=1e-9)


def test_lcs_store_cubes_come_from_the_halved_grid(tmp_path):
    summary = write_lits_sample(tmp_path / "lits", n_scans=4, seed=0, small=True)
    store = tmp_path / "vs"
    assert main(["convert", str(summary.out_dir), "--store", str(store), "--workers", "1", "--no-progress"]) == 0
    assert main(["patches", "task", "lcs", "--store", str(store), "--out", str(tmp_path / "ps"), "--workers", "1",
                 "--no-progress", "--per-scan", "3"]) == 0
    ps = PatchStore(next((tmp_path / "ps").glob("task-lcs-*")))
    assert ps.attrs["config"]["task"]["inplane_scale"] == 0.5
    vs = VolumeStore(store)
    assert len(ps.index) > 0
    for case, rows in ps.index.groupby("case_id"):
        group = vs.open_scan(case)
        attrs = dict(group.attrs)["genesis"]
        volume = group["0"][...]
        label = group["labels"]["segmentation"]["0"][...]
        grid, grid_label, spacing = S.to_task_grid(volume[None], label, attrs["spacing"], LCS)
        assert grid.shape[1:] == (volume.shape[0], volume.shape[1] // 2, volume.shape[2] // 2)
        bounds = S.intensity_bounds(None, LCS.intensity)
        geometry = resized_geometry(attrs, volume.shape, grid.shape[1:])
        for r in rows.itertuples():
            start = np.array([r.z, r.y, r.x])
            size = (r.crop_d, r.crop_h, r.crop_w)
            want = S.scale(S.crop(grid[0], start, size, fill=bounds[0]), bounds)
            np.testing.assert_allclose(ps.cubes[r.row, 0], want, atol=1e-6)
            np.testing.assert_array_equal(ps.masks[r.row, 0],
                                          S.crop((grid_label > 0).view(np.uint8), start, size, fill=0))
            centre = index_to_world(start + (np.array(size) - 1) / 2, geometry)[0]
            np.testing.assert_allclose([r.center_x_mm, r.center_y_mm, r.center_z_mm], centre, atol=1e-6)
            # the centre was drawn on the halved grid: inside it, not only inside the stored one
            assert np.all((0 <= start + np.array(size) // 2) & (start + np.array(size) // 2 < grid.shape[1:]))
