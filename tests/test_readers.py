"""Readers: volumes written in each format come back with exact voxels and LPS geometry."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ct_array, make_image, write_dicom_series, write_mhd, zip_folder

from pipeline.ingest import discover, read_source

FLIP_X_SWAP_YZ = (-1, 0, 0, 0, 0, 1, 0, 1, 0)  # x flipped; y and z exchanged: a non-LPS source


def _only(found):
    assert len(found.scans) == 1, found.scans
    return found.scans[0]


def _assert_same_world(src_img: sitk.Image, vol, n=200, seed=0):
    """Every sampled source voxel sits, with its value, at the same world point in the LPS volume."""
    rng = np.random.default_rng(seed)
    src = sitk.GetArrayFromImage(src_img)
    size = src_img.GetSize()
    spacing = np.array(vol.spacing[::-1])
    origin = np.array(vol.origin[::-1])
    direction = np.array(vol.direction).reshape(3, 3)
    inv = np.linalg.inv(direction * spacing)
    for _ in range(n):
        idx = tuple(int(rng.integers(0, s)) for s in size)
        p = np.array(src_img.TransformIndexToPhysicalPoint(idx))
        j = np.rint(inv @ (p - origin)).astype(int)  # x, y, z
        assert vol.voxels[j[2], j[1], j[0]] == src[idx[2], idx[1], idx[0]]


@pytest.mark.parametrize("suffix", [".mhd", ".nii", ".nii.gz", ".nrrd"])
def test_identity_direction_roundtrip_exact(tmp_path, rng, suffix):
    arr = ct_array(rng)
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(make_image(arr), str(path))
    vol = read_source(_only(discover([path])))
    np.testing.assert_array_equal(vol.voxels, arr)
    assert vol.voxels.dtype == np.int16
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
    assert vol.origin == pytest.approx((-300.0, -110.0, -120.0))
    assert vol.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))


@pytest.mark.parametrize("suffix", [".mhd", ".nii.gz", ".nrrd"])
def test_non_identity_direction_reoriented_to_lps(tmp_path, rng, suffix):
    arr = ct_array(rng, shape=(20, 24, 28))
    img = make_image(arr, spacing=(0.6, 0.9, 2.0), origin=(10.0, 20.0, 30.0), direction=FLIP_X_SWAP_YZ)
    path = tmp_path / f"odd{suffix}"
    sitk.WriteImage(img, str(path))
    vol = read_source(_only(discover([path])))
    assert vol.source_direction == pytest.approx(FLIP_X_SWAP_YZ)
    assert vol.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    # axes permuted: source (x,y,z) sizes 28,24,20 with y<->z exchanged -> LPS (x,y,z) = 28,20,24
    assert vol.shape == (24, 20, 28)
    assert vol.spacing == pytest.approx((0.9, 2.0, 0.6))
    _assert_same_world(img, vol)
    np.testing.assert_array_equal(np.sort(vol.voxels, axis=None), np.sort(arr, axis=None))


def test_luna16_folder_metadata_and_subset(tmp_path, rng):
    arr = ct_array(rng)
    write_mhd(tmp_path / "subset3" / "1.3.6.1.4.1.14519.5.2.1.6279.6001.1.mhd", arr)
    src = _only(discover([tmp_path]))
    assert src.scan_id == "1.3.6.1.4.1.14519.5.2.1.6279.6001.1"
    assert (src.dataset, src.subset, src.modality) == ("luna16", "subset3", "CT")
    assert open(src.files[0]).read().count("ElementDataFile = 1.3.6.1.4.1.14519.5.2.1.6279.6001.1.raw") == 1
    np.testing.assert_array_equal(read_source(src).voxels, arr)


def test_luna16_zip_reads_members_and_refuses_escaping_paths(tmp_path, rng):
    arr = ct_array(rng)
    write_mhd(tmp_path / "src" / "subset0" / "1.2.3.mhd", arr)
    z = zip_folder(tmp_path / "src", tmp_path / "subset0.zip")
    with zipfile.ZipFile(z, "a") as zf:
        zf.writestr("../evil.mhd", "NDims = 3\n")
    found = discover([z])
    by_id = {s.scan_id: s for s in found.scans}
    assert by_id["1.2.3"].kind == "metaimage-zip" and by_id["1.2.3"].subset == "subset0"
    np.testing.assert_array_equal(read_source(by_id["1.2.3"]).voxels, arr)
    assert "unsafe path" in by_id["evil"].problem
    assert not (tmp_path / "evil.mhd").exists() and not list(tmp_path.glob("subset0/*"))


def test_dicom_series_ordered_by_position(tmp_path, rng):
    arr = ct_array(rng, shape=(12, 32, 24))
    write_dicom_series(tmp_path / "study" / "series", arr)
    src = _only(discover([tmp_path / "study"]))
    assert src.scan_id == "1.2.826.0.1.3680043.2.1125.1" and src.dataset == "dicom" and src.modality == "CT"
    vol = read_source(src)
    np.testing.assert_array_equal(vol.voxels, arr)
    assert vol.spacing == pytest.approx((2.5, 0.75, 0.75))
    assert vol.origin == pytest.approx((-200.0, -90.0, -100.0))
    assert vol.identifiers["PatientID"] == "PATIENT1"


def test_dicom_two_series_in_one_zip(tmp_path, rng):
    a, b = ct_array(rng, shape=(6, 16, 16)), ct_array(rng, shape=(8, 16, 16))
    write_dicom_series(tmp_path / "d" / "a", a, series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "d" / "b", b, series_uid="1.2.3.2")
    found = discover([zip_folder(tmp_path / "d", tmp_path / "dicom.zip")])
    by_id = {s.scan_id: s for s in found.scans}
    assert set(by_id) == {"1.2.3.1", "1.2.3.2"}
    np.testing.assert_array_equal(read_source(by_id["1.2.3.1"]).voxels, a)
    np.testing.assert_array_equal(read_source(by_id["1.2.3.2"]).voxels, b)


@pytest.mark.parametrize("positions, reason", [
    ([0, 2.5, 5, 10, 12.5, 15], "missing slices"),
    ([0, 2.5, 5, 6, 8.5, 11], "irregular slice spacing"),
    ([0, 2.5, 2.5, 5, 7.5, 10], "duplicate slice position"),
])
def test_dicom_gaps_are_refused_with_reason(tmp_path, rng, positions, reason):
    write_dicom_series(tmp_path / "s", ct_array(rng, shape=(6, 16, 16)), positions=[float(p) for p in positions])
    with pytest.raises(ValueError, match=reason):
        read_source(_only(discover([tmp_path / "s"])))


def test_lits_pairs_volume_with_segmentation(tmp_path, rng):
    arr = ct_array(rng, shape=(16, 16, 16))
    seg = (rng.random((16, 16, 16)) > 0.8).astype(np.uint8)
    sitk.WriteImage(make_image(arr), str(tmp_path / "volume-7.nii"))
    sitk.WriteImage(make_image(seg), str(tmp_path / "segmentation-7.nii"))
    src = _only(discover([tmp_path]))
    assert (src.scan_id, src.dataset, src.subset, src.modality) == ("volume-7", "lits", "train", "CT")
    vol = read_source(src)
    np.testing.assert_array_equal(vol.labels["segmentation"], seg)


def test_brats_case_folder_one_scan_per_sequence_with_seg(tmp_path, rng):
    case = tmp_path / "Brats18_TCIA_001_1"
    case.mkdir()
    seg = rng.choice(np.array([0, 1, 2, 4], dtype=np.uint8), (16, 16, 16))
    for seq in ("flair", "t1", "t1ce", "t2"):
        sitk.WriteImage(make_image(rng.random((16, 16, 16)).astype(np.float32)), str(case / f"{case.name}_{seq}.nii.gz"))
    sitk.WriteImage(make_image(seg), str(case / f"{case.name}_seg.nii.gz"))
    found = discover([tmp_path])
    assert sorted(s.scan_id for s in found.scans) == sorted(f"{case.name}_{q}" for q in ("flair", "t1", "t1ce", "t2"))
    flair = next(s for s in found.scans if s.scan_id.endswith("_flair"))
    assert flair.dataset == "brats" and flair.modality == "MR"
    np.testing.assert_array_equal(read_source(flair).labels["seg"], seg)


def test_missing_path_is_usage_error(tmp_path):
    from pipeline.ingest import SourceError

    with pytest.raises(SourceError, match="does not exist"):
        discover([tmp_path / "nope"])


def test_luna16_lung_masks_become_labels_not_scans(tmp_path, rng):
    arr = ct_array(rng, shape=(16, 20, 24))
    mask = (rng.random((16, 20, 24)) > 0.5).astype(np.uint8)
    write_mhd(tmp_path / "subset1" / "1.2.3.4.mhd", arr)
    write_mhd(tmp_path / "seg-lungs-LUNA16" / "1.2.3.4.mhd", mask)
    src = _only(discover([tmp_path]))
    assert src.labels == (("lungs", str(tmp_path / "seg-lungs-LUNA16" / "1.2.3.4.mhd")),)
    np.testing.assert_array_equal(read_source(src).labels["lungs"], mask)


def test_multi_frame_dicom_file_is_one_volume(tmp_path, rng):
    arr = ct_array(rng, shape=(6, 16, 16))
    img = make_image(arr)
    img.SetMetaData("0008|0060", "CT")
    sitk.WriteImage(img, str(tmp_path / "enhanced.dcm"))  # GDCM writes a 3-D image as one multi-frame object
    vol = read_source(_only(discover([tmp_path])))
    np.testing.assert_array_equal(vol.voxels, arr)
    assert vol.spacing == pytest.approx((2.5, 0.8, 0.7))
