"""LiTS and BraTS sample data: determinism, ground truth, realism checks, and `genesis convert`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from pipeline.sample_data.brats import SEQUENCES, write_brats_sample
from pipeline.finetune.config import TINY_SEGMENTATION
from pipeline.sample_data.lits import (SMALL_INPLANE, TINY_INPLANE, draw_lits, render_lits, small_lits_config,
                                     write_lits_sample)
from pipeline.sample_data.registry_files import NILEARN_WHEEL, PYRADIOMICS_SDIST, fetch
from pipeline.volume_store.store import VolumeStore


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _lps_array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS"))


def _convert(source: Path, store: Path) -> int:
    return main(["convert", str(source), "--store", str(store), "--workers", "1", "--no-progress"])


# --- LiTS ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lits(tmp_path_factory):
    return write_lits_sample(tmp_path_factory.mktemp("lits") / "sample", n_scans=3, seed=3, small=True)


def test_lits_rerun_is_byte_identical_and_layout_is_lits(lits, tmp_path):
    again = write_lits_sample(tmp_path / "again", n_scans=3, seed=3, small=True)
    assert _files(lits.out_dir) == _files(again.out_dir)
    names = sorted(p.name for p in lits.out_dir.iterdir())
    assert names == ["sample_data.json"] + [f"{k}-{i}.nii" for k in ("segmentation", "volume") for i in range(3)]
    image = sitk.ReadImage(str(lits.volume_path(0)))
    assert image.GetPixelID() == sitk.sitkInt16 and image.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    assert write_lits_sample(lits.out_dir, n_scans=3, seed=3, small=True).reused
    assert sum(len(s.tumours) for s in lits.scans) > 0, "seed 3 should draw some tumours"


def test_lits_manifest_counts_equal_the_label_maps(lits):
    for scan in lits.scans:
        seg = _array(lits.segmentation_path(scan.index))
        assert set(np.unique(seg)) <= {0, 1, 2}
        assert scan.liver_voxels == int((seg == 1).sum()) and scan.target_voxels == int((seg > 0).sum())
        assert scan.tumour_voxels == int((seg == 2).sum())
        tumours = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.ReadImage(str(lits.segmentation_path(scan.index))) == 2))
        assert int(tumours.max()) == len(scan.tumours)  # each tumour is one component
        assert sorted(int((tumours == k).sum()) for k in range(1, len(scan.tumours) + 1)) == sorted(
            t.voxels for t in scan.tumours)


def test_lits_liver_cannot_be_found_by_thresholding():
    config = small_lits_config()
    for seed in range(3):
        params = draw_lits(config, np.random.default_rng(seed))
        volume, labels, _ = render_lits(config, params)
        band = (volume >= params.liver_hu - 20) & (volume <= params.liver_hu + 20)
        outside = int((band & (labels == 0)).sum())
        assert outside > 0.2 * int((labels > 0).sum()), (seed, outside)
        tumour = labels == 2
        if tumour.any():  # hypodense: below the liver
            assert volume[tumour].mean() < volume[labels == 1].mean() - 15


def test_lits_small_default_is_unchanged_and_inplane_keeps_the_field_of_view():
    """The inplane knob must leave the default small sample as it was (other tests pin numbers on it)."""
    assert small_lits_config() == small_lits_config(SMALL_INPLANE)
    assert small_lits_config().shape == (48, 96, 96) and small_lits_config().spacing_mm == (5.0, 3.4, 3.4)
    tiny = small_lits_config(TINY_INPLANE)
    assert tiny.shape == (48, TINY_INPLANE, TINY_INPLANE) and tiny.spacing_mm == (5.0, 5.1, 5.1)
    assert [n * sp for n, sp in zip(tiny.shape, tiny.spacing_mm)] == pytest.approx(
        [n * sp for n, sp in zip(small_lits_config().shape, small_lits_config().spacing_mm)])
    # why 64: LCS halves a scan in-plane, and the tiny preset's in-plane input must then show the whole slice
    from pipeline.tasks.registry import get_task
    assert TINY_INPLANE * get_task("lcs").inplane_scale == TINY_SEGMENTATION[1] == TINY_SEGMENTATION[2]
    with pytest.raises(ValueError, match="inplane"):
        small_lits_config(16)


def test_lits_inplane_draws_the_same_scans_at_another_resolution(lits, tmp_path):
    coarse = write_lits_sample(tmp_path / "coarse", n_scans=2, seed=3, small=True, inplane=TINY_INPLANE)
    assert [s.shape_zyx for s in coarse.scans] == [(48, TINY_INPLANE, TINY_INPLANE)] * 2
    assert _array(coarse.volume_path(0)).shape == (48, TINY_INPLANE, TINY_INPLANE)
    drawn = [draw_lits(c, np.random.default_rng(7)) for c in (small_lits_config(TINY_INPLANE), small_lits_config())]
    assert drawn[0].liver_lobes == drawn[1].liver_lobes and drawn[0].tumour_radius_mm == drawn[1].tumour_radius_mm
    # the same draw per scan (liver intensity, contrast phase); the smooth fields that deform the liver are
    # drawn on the grid, so its shape differs in detail, but it stays a liver-sized share of the abdomen
    for a, b in zip(coarse.scans, lits.scans[:2]):
        assert (a.liver_hu, a.contrast) == (b.liver_hu, b.contrast)
        mm3 = [s.target_voxels * float(np.prod(s.spacing_zyx_mm)) for s in (a, b)]
        assert 0.5 < mm3[0] / mm3[1] < 2.0 and 0.02 < a.target_voxels / np.prod(a.shape_zyx) < 0.3
    assert write_lits_sample(tmp_path / "coarse", n_scans=2, seed=3, small=True, inplane=TINY_INPLANE).reused
    with pytest.raises(FileExistsError):  # another resolution is another sample, never silently reused
        write_lits_sample(tmp_path / "coarse", n_scans=2, seed=3, small=True)
    with pytest.raises(ValueError, match="small"):
        write_lits_sample(tmp_path / "full", n_scans=1, small=False, inplane=TINY_INPLANE)


def test_lits_converts_with_segmentation_labels_in_lps(lits, tmp_path):
    store = tmp_path / "store"
    assert _convert(lits.out_dir, store) == 0
    cat = VolumeStore(store).catalog().set_index("scan_id")
    assert sorted(cat.index) == [f"volume-{k}" for k in range(3)]
    assert (cat["dataset"] == "lits").all() and (cat["subset"] == "train").all() and (cat["status"] == "ok").all()
    for scan in lits.scans:
        group = VolumeStore(store).open_scan(f"volume-{scan.index}")
        np.testing.assert_array_equal(group["0"][...], _lps_array(lits.volume_path(scan.index)))
        np.testing.assert_array_equal(group["labels/segmentation/0"][...],
                                      _lps_array(lits.segmentation_path(scan.index)))
        assert int((group["labels/segmentation/0"][...] > 0).sum()) == scan.target_voxels


@pytest.mark.parametrize("change, expect", [("origin", "origin"), ("spacing", "spacing")])
def test_lits_label_off_the_image_grid_is_a_failed_row(lits, tmp_path, change, expect):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(lits.volume_path(1), data / "volume-1.nii")
    seg = sitk.ReadImage(str(lits.segmentation_path(1)))
    if change == "origin":
        seg.SetOrigin(tuple(o + d for o, d in zip(seg.GetOrigin(), (0.0, 0.0, 5.0))))
    else:
        seg.SetSpacing(tuple(s * f for s, f in zip(seg.GetSpacing(), (1.0, 1.0, 0.5))))
    sitk.WriteImage(seg, str(data / "segmentation-1.nii"))
    store = tmp_path / "store"
    assert _convert(data, store) == 1
    row = VolumeStore(store).catalog().set_index("scan_id").loc["volume-1"]
    assert row["status"] == "failed" and expect in row["error"] and "segmentation" in row["error"]


# --- BraTS ---------------------------------------------------------------------------------------

def _need(item) -> None:
    path, reason = fetch(item)
    if path is None:
        pytest.skip(f"{item.requirement} not available offline: {reason}")


@pytest.fixture(scope="module")
def brats(tmp_path_factory):
    _need(NILEARN_WHEEL)
    return write_brats_sample(tmp_path_factory.mktemp("brats") / "sample", n_scans=1, seed=5, small=True,
                              include_real=False)


def test_brats_rerun_is_byte_identical(brats, tmp_path):
    again = write_brats_sample(tmp_path / "again", n_scans=1, seed=5, small=True, include_real=False)
    assert _files(brats.out_dir) == _files(again.out_dir)
    (case,) = brats.cases
    assert case.folder == f"HGG/{case.case}" and case.case.startswith("Brats18_") and case.case.endswith("_1")
    assert sorted(p.name for p in (brats.out_dir / case.folder).iterdir()) == sorted(
        f"{case.case}_{s}.nii.gz" for s in (*SEQUENCES, "seg"))


def test_brats_labels_counts_and_contrasts(brats):
    (case,) = brats.cases
    seg = _array(case.path(brats.out_dir, "seg"))
    assert set(np.unique(seg)) == {0, 1, 2, 4}  # an HGG case: core, oedema, enhancing rim
    assert case.label_voxels == {str(v): int((seg == v).sum()) for v in (1, 2, 4)}
    assert case.whole_tumour_voxels == int((seg > 0).sum()) and seg.shape == case.shape_zyx
    assert min(seg.shape) >= 32 and seg.shape[0] >= 50 and min(seg.shape[1:]) >= 100  # the BMS crop fits
    flair, t1ce, t2 = (_array(case.path(brats.out_dir, s)).astype(float) for s in ("flair", "t1ce", "t2"))
    normal = (seg == 0) & (flair > 0)
    assert flair[seg == 2].mean() > 1.3 * np.percentile(flair[normal], 75)  # oedema bright on FLAIR
    assert t1ce[seg == 4].mean() > 1.2 * np.percentile(t1ce[normal], 75)    # enhancing rim bright on t1ce
    assert t1ce[seg == 1].mean() < t1ce[seg == 4].mean() / 2                # necrotic core dark
    csf = normal & (t2 > np.percentile(t2[normal], 95))
    assert flair[csf].mean() < np.median(flair[normal])                     # CSF: bright T2, dark FLAIR


def test_brats_converts_one_scan_per_sequence_with_seg(tmp_path):
    _need(NILEARN_WHEEL)
    _need(PYRADIOMICS_SDIST)
    sample = write_brats_sample(tmp_path / "sample", n_scans=1, seed=2, small=True)
    store = tmp_path / "store"
    assert _convert(sample.out_dir, store) == 0
    vs = VolumeStore(store)
    cat = vs.catalog().set_index("scan_id")
    expected = {f"{c.case}_{s}": (c, s) for c in sample.cases for s in c.sequences}
    assert sorted(cat.index) == sorted(expected) and len(expected) == 4 + 2
    assert (cat["dataset"] == "brats").all() and (cat["status"] == "ok").all()
    for scan_id, (case, seq) in expected.items():
        group = vs.open_scan(scan_id)
        assert group.attrs["genesis"]["source"]["identifiers"] == {"case": case.case, "sequence": seq}
        label = group["labels/seg/0"][...]
        np.testing.assert_array_equal(label, _lps_array(case.path(sample.out_dir, "seg")))
        assert int((label > 0).sum()) == case.whole_tumour_voxels
    real = [c for c in sample.cases if c.grade == "PYRADIOMICS"]
    assert [c.sequences for c in real] == [("t1ce",), ("t1ce",)] and "t1ce" in sample.real_status
