"""Untrusted sources (issue 9, sections 1-2): a source file gives only its own voxels, and an
archive or header cannot make a scan take more than its bytes. Each case is a file an attacker
or a damaged archive could hand to `genesis convert`; before the fix each of them converted
another file's bytes, extracted gigabytes, or stored an invented number."""

from __future__ import annotations

import os
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import ct_array, make_image, write_mhd, zip_folder

from pipeline.cli import main
from pipeline.ingest import discover, read_source
from pipeline.ingest.limits import LimitError
from pipeline.volume_store.settings import ConvertSettings
from pipeline.volume_store.store import VolumeStore

SECRET = bytes(range(256)) * 2  # 512 bytes: an 8x8x8 uint8 image's worth


@pytest.fixture
def secret(tmp_path) -> Path:
    """A file outside every source folder, which no conversion may read."""
    p = tmp_path / "outside" / "secret.bin"
    p.parent.mkdir()
    p.write_bytes(SECRET)
    return p


def _mhd_text(data: str, extra: str = "", dims: str = "8 8 8", etype: str = "MET_UCHAR") -> str:
    return f"ObjectType = Image\nNDims = 3\nDimSize = {dims}\nElementType = {etype}\n{extra}ElementDataFile = {data}\n"


def _nhdr_text(data: str, extra: str = "", sizes: str = "8 8 8") -> str:
    return f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {sizes}\nencoding: raw\n{extra}data file: {data}\n"


def _only(found):
    assert len(found.scans) == 1, found.scans
    return found.scans[0]


def _refused(path, match: str, **kw) -> str:
    """The one scan under `path` is refused with `match` in its reason (and never decoded)."""
    with pytest.raises(ValueError, match=match) as exc:
        read_source(_only(discover([path])), **kw)
    return str(exc.value)


# ---- 1. a source file can only give its own voxels -------------------------------------------

def test_nhdr_naming_a_file_outside_is_a_failed_row(tmp_path, secret, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "evil.nhdr").write_text(_nhdr_text(str(secret)), encoding="utf-8")
    (src / "ok.nrrd").parent.mkdir(exist_ok=True)
    sitk.WriteImage(make_image(np.full((8, 8, 8), 7, np.uint8)), str(src / "ok.nrrd"))
    store = tmp_path / "store"
    code = main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"])
    assert code == 1
    cat = VolumeStore(store).catalog().set_index("scan_id")
    assert cat.loc["ok", "status"] == "ok"
    assert cat.loc["evil", "status"] == "failed"
    assert "outside the scan's folder" in cat.loc["evil", "error"] and str(secret) in cat.loc["evil", "error"]
    assert not (store / "scans" / "evil").exists()
    assert "FAILED evil" in capsys.readouterr().out


@pytest.mark.parametrize("name, text", [
    ("rel.nhdr", _nhdr_text("../outside/secret.bin")),
    ("spaced.nhdr", _nhdr_text("x.raw", sizes="8 8 8").replace("data file: x.raw", "DataFile: ../outside/secret.bin")),
    ("abs.mhd", None),  # ElementDataFile = /abs/secret.bin
    ("colon.mhd", None),  # MetaIO also takes ':' as the separator
])
def test_detached_header_pointing_outside_is_refused(tmp_path, secret, name, text):
    src = tmp_path / "src"
    src.mkdir()
    if name == "abs.mhd":
        text = _mhd_text(str(secret))
    elif name == "colon.mhd":
        text = _mhd_text("x").replace("ElementDataFile = x", f"ElementDataFile: {secret}")
    (src / name).write_text(text, encoding="utf-8")
    (tmp_path / "src" / "x.raw").write_bytes(bytes(512))
    _refused(src / name, "outside the scan's folder")


def test_data_file_symlink_resolving_outside_is_refused(tmp_path, secret):
    src = tmp_path / "src"
    src.mkdir()
    (src / "scan.mhd").write_text(_mhd_text("scan.raw"), encoding="utf-8")
    (src / "scan.raw").symlink_to(secret)
    # read through the header given explicitly: the header check alone must refuse it
    reason = _refused(src / "scan.mhd", "outside the scan's folder")
    assert str(secret) in reason


def test_mha_label_map_beside_nifti_cannot_read_outside(tmp_path, secret):
    src = tmp_path / "src"
    src.mkdir()
    sitk.WriteImage(make_image(ct_array(np.random.default_rng(0), (8, 8, 8)), spacing=(1, 1, 1), origin=(0, 0, 0)),
                    str(src / "case.nii.gz"))
    (src / "case_seg.mha").write_text(_mhd_text(str(secret)), encoding="utf-8")
    scan = _only(discover([src]))
    assert scan.labels == (("seg", str(src / "case_seg.mha")),)
    with pytest.raises(ValueError, match="outside the scan's folder"):
        read_source(scan)


def test_mha_inside_zip_cannot_read_outside(tmp_path, secret):
    z = tmp_path / "scans.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("a/evil.mha", _mhd_text(str(secret)))
        zf.writestr("a/evil2.mhd", _mhd_text("../../outside/secret.bin"))
    scans = {s.scan_id: s for s in discover([z]).scans}
    for scan_id in ("evil", "evil2"):
        with pytest.raises(ValueError, match="outside the scan's folder"):
            read_source(scans[scan_id])


@pytest.mark.parametrize("extra, reason", [
    # Python's splitlines ends a line at a form feed, ITK's MetaIO does not: the old check saw
    # "ElementDataFile = good.raw", ITK read the second ElementDataFile
    ("Comment = x\fElementDataFile = good.raw\n", "byte 0x0c"),
    ("Comment = x\rElementDataFile = good.raw\n", "byte 0x0d"),
    # too few spacing values: MetaIO reads on into the next line (taking 0, swallowing that line)
    ("ElementSpacing = 1 1\nElementDataFile = good.raw\n", "ElementSpacing = '1 1' has 2 values, expected 3"),
])
def test_header_that_itk_reads_differently_is_refused(tmp_path, secret, extra, reason):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.raw").write_bytes(bytes(512))
    (src / "hidden.mhd").write_bytes(_mhd_text(str(secret), extra=extra).encode("ascii"))
    _refused(src / "hidden.mhd", reason)


def test_symlinks_outside_the_tree_are_failed_rows_not_silent(tmp_path, rng):
    outside = tmp_path / "elsewhere"
    write_mhd(outside / "far.mhd", ct_array(rng, (8, 8, 8)))
    sitk.WriteImage(make_image(ct_array(rng, (8, 8, 8))), str(outside / "lone.nii.gz"))
    src = tmp_path / "src"
    write_mhd(src / "real" / "near.mhd", ct_array(rng, (8, 8, 8)))
    (src / "link.nii.gz").symlink_to(outside / "lone.nii.gz")
    (src / "linked_out").symlink_to(outside, target_is_directory=True)
    (src / "linked_in").symlink_to(src / "real", target_is_directory=True)
    found = discover([src])
    by_id = {s.scan_id: s for s in found.scans}
    assert "points outside the source tree" in by_id["link"].problem
    assert "symlinked folder" in by_id["linked_out"].problem and "not searched" in by_id["linked_out"].problem
    assert "far" not in by_id
    # the folder linked from inside the tree is found once, through its real path
    assert [s.source_path for s in found.scans if s.scan_id == "near"] == [str(src / "real" / "near.mhd")]


# ---- 2. resource limits on untrusted archives ------------------------------------------------

def test_zip_member_larger_than_its_header_is_refused_before_extraction(tmp_path, monkeypatch):
    """A small zip holding a huge .raw (here 64 MiB of zeros, 70 KB compressed, for a header that
    needs 1 KiB): refused from the declared size, nothing written to the temp folder."""
    z = tmp_path / "subset0.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("subset0/1.2.3.mhd", _mhd_text("1.2.3.raw", etype="MET_SHORT"))
        with zf.open("subset0/1.2.3.raw", "w", force_zip64=True) as fh:
            block = bytes(1 << 20)
            for _ in range(64):
                fh.write(block)
    assert z.stat().st_size < 1 << 20
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    scan = _only(discover([z]))
    with pytest.raises(ValueError, match=r"declares 67108864 bytes .* needs 1024"):
        read_source(scan)
    assert list(temp.iterdir()) == []


def test_per_scan_ceiling_refuses_and_leaves_no_temp_files(tmp_path, rng, monkeypatch):
    arr = ct_array(rng, (16, 32, 32))  # 32 KiB of int16
    write_mhd(tmp_path / "src" / "subset1" / "9.9.mhd", arr)
    with zipfile.ZipFile(tmp_path / "subset1.zip", "w") as zf:
        for p in (tmp_path / "src" / "subset1").iterdir():
            zf.write(p, f"subset1/{p.name}")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    zipped = _only(discover([tmp_path / "subset1.zip"]))
    np.testing.assert_array_equal(read_source(zipped).voxels, arr)  # under the default ceiling
    for scan in (zipped, _only(discover([tmp_path / "src"]))):
        with pytest.raises(ValueError, match="over the per-scan limit of 20000 bytes"):
            read_source(scan, max_scan_bytes=20_000)
    assert list(temp.iterdir()) == []


def test_copy_stops_at_the_running_limit_and_removes_the_partial_file(tmp_path):
    from pipeline.ingest.limits import LimitError, copy_member

    z = tmp_path / "a.zip"
    with zipfile.ZipFile(z, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", bytes(100_000))
    with zipfile.ZipFile(z) as zf:
        with pytest.raises(LimitError, match="more than 4096 bytes"):
            copy_member(zf, zf.getinfo("big.bin"), str(tmp_path / "out.bin"), 4096)
        assert not (tmp_path / "out.bin").exists()
        assert copy_member(zf, zf.getinfo("big.bin"), str(tmp_path / "ok.bin"), 100_000) == 100_000


def test_max_scan_bytes_is_a_setting_outside_the_hash():
    assert ConvertSettings().max_scan_bytes == 4 * 2**30
    assert ConvertSettings(max_scan_bytes=10).hash == ConvertSettings().hash
    assert "max_scan_bytes" not in ConvertSettings().to_dict()
    with pytest.raises(ValueError, match="max_scan_bytes"):
        ConvertSettings(max_scan_bytes=0)


@pytest.mark.parametrize("dims, extra, reason", [
    ("8 -8 8", "", "DimSize value -8 must be a positive size"),
    ("8 0 8", "", "DimSize value 0 must be a positive size"),
    ("99999999999999999999 8 8", "", "over the per-scan limit"),
    ("8 8 8", "ElementSpacing = 1 0 1\n", "ElementSpacing value 0 must be positive"),
    ("8 8 8", "ElementSpacing = 1 -2 1\n", "ElementSpacing value -2 must be positive"),
    ("8 8 8", "ElementSpacing = 1 nan 1\n", "ElementSpacing value 'nan' is not a number"),
    ("8 8 8", "Offset = inf 0 0\n", "Offset value 'inf' is not a number"),
    ("8 8 8", "Offset = 1e999 0 0\n", "Offset value '1e999' overflows"),
])
def test_bad_metaimage_numbers_name_field_and_value(tmp_path, dims, extra, reason):
    (tmp_path / "s.raw").write_bytes(bytes(512))
    (tmp_path / "s.mhd").write_text(_mhd_text("s.raw", extra=extra, dims=dims), encoding="utf-8")
    _refused(tmp_path / "s.mhd", reason)


@pytest.mark.parametrize("extra, sizes, reason", [
    ("space origin: (inf,0,0)\n", "8 8 8", "space origin"),
    ("spacings: 1 nan 1\n", "8 8 8", "spacings value 'nan'"),
    ("", "8 0 8", "sizes value 0"),
])
def test_bad_nrrd_numbers_name_field_and_value(tmp_path, extra, sizes, reason):
    (tmp_path / "s.raw").write_bytes(bytes(512))
    (tmp_path / "s.nhdr").write_text(_nhdr_text("s.raw", extra=extra, sizes=sizes), encoding="utf-8")
    _refused(tmp_path / "s.nhdr", reason)


@pytest.mark.parametrize("offset, fmt, value, reason", [
    (80, "<f", 0.0, r"pixdim\[1\] \(spacing\) is 0"),
    (84, "<f", float("nan"), r"pixdim\[2\] \(spacing\) is nan"),
    (268, "<f", float("inf"), r"qoffset \(origin\) \(inf"),
    (42, "<h", -5, r"dim\[1\] \(size\) is -5"),
])
def test_bad_nifti_numbers_name_field_and_value(tmp_path, offset, fmt, value, reason):
    path = tmp_path / "s.nii"
    sitk.WriteImage(make_image(np.ones((8, 8, 8), np.int16)), str(path))
    raw = bytearray(path.read_bytes())
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw))
    _refused(path, reason)


def test_infinite_origin_never_becomes_zero(tmp_path):
    """Stored through `genesis convert`: the row fails with the field, no scan claims origin 0,0,0."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "s.raw").write_bytes(bytes(range(256)) * 4 * 8)
    (src / "s.mhd").write_text(_mhd_text("s.raw", extra="Offset = -inf 0 0\n", dims="16 16 16"), encoding="utf-8")
    store = tmp_path / "store"
    assert main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"]) == 1
    row = VolumeStore(store).catalog().set_index("scan_id").loc["s"]
    assert row["status"] == "failed" and "Offset value '-inf'" in row["error"]
    assert not os.path.exists(store / "scans" / "s")


# ---- 1-2 (continued): DICOM header numbers and sizes, resampling, singular directions, skips ----

def _dicom_series(folder: Path, n: int = 4, rows: int = 8, columns: int = 8, frames: int | None = None,
                  pixel_bytes: int | None = None, **tags: str) -> list[Path]:
    """`n` slices of a CT series written with pydicom, so that a tag can hold any text (GDCM's
    writer would normalise a hostile value). `tags`: keyword -> value text, where '{z}' is the
    slice's position along its normal. `pixel_bytes` writes a PixelData shorter than the header
    needs (a few bytes standing for gigabytes)."""
    import warnings

    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    text = {"ImagePositionPatient": "-100\\-90\\{z}", "ImageOrientationPatient": "1\\0\\0\\0\\1\\0",
            "PixelSpacing": "0.75\\0.75", "RescaleSlope": "1", "RescaleIntercept": "0", **tags}
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.7.{k + 1}"
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "CT", "P1"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.8", "1.2.826.0.1.3680043.2.1125.9"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.InstanceNumber = k + 1
        if frames:
            ds.NumberOfFrames = frames
        with warnings.catch_warnings():  # pydicom warns about the very values under test
            warnings.simplefilter("ignore")
            for keyword, value in text.items():
                ds.add_new(keyword, dictionary_VR(keyword), value.replace("{z}", f"{2.5 * k:g}"))
        size = rows * columns * (frames or 1)
        ds.PixelData = (np.arange(size, dtype="<i2") % 1000).tobytes() if pixel_bytes is None else bytes(pixel_bytes)
        path = folder / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_dicom_series_helper_reads_back(tmp_path):
    """The control for the DICOM cases below: the helper's untouched series converts."""
    _dicom_series(tmp_path / "s")
    vol = read_source(_only(discover([tmp_path / "s"])))
    assert vol.shape == (4, 8, 8) and vol.spacing == (2.5, 0.75, 0.75) and vol.origin == (0.0, -90.0, -100.0)
    np.testing.assert_array_equal(vol.voxels[2].ravel(), np.arange(64))


@pytest.mark.parametrize("tags, reason", [
    ({"ImagePositionPatient": "inf\\0\\{z}"}, r"ImagePositionPatient \(0020,0032\) 'inf\\0\\0' has a value 'inf' "
                                              r"that is not finite"),
    ({"PixelSpacing": "0\\0"}, r"PixelSpacing \(0028,0030\) '0\\0' must be two positive numbers"),
    ({"PixelSpacing": "nan\\1"}, r"PixelSpacing \(0028,0030\) 'nan\\1' has a value 'nan' that is not finite"),
    ({"PixelSpacing": "-0.7\\0.7"}, r"PixelSpacing \(0028,0030\) '-0.7\\0.7' must be two positive numbers"),
    ({"RescaleSlope": "inf"}, r"RescaleSlope \(0028,1053\) 'inf' is not finite"),
    ({"RescaleIntercept": "nan"}, r"RescaleIntercept \(0028,1052\) 'nan' is not finite"),
    ({"ImageOrientationPatient": "0\\0\\0\\0\\0\\0"},
     r"ImageOrientationPatient \(0020,0037\) '0\\0\\0\\0\\0\\0' is not two independent directions"),
    ({"ImageOrientationPatient": "1\\0\\0\\1\\0\\0"}, r"ImageOrientationPatient \(0020,0037\) .* zero or parallel"),
])
def test_bad_dicom_numbers_name_tag_and_value(tmp_path, tags, reason):
    """GDCM turned each of these into a plausible number (origin 0,0,0, spacing 1 mm, slope
    ignored) or, for the orientation, into "duplicate slice position 0.000 mm"."""
    _dicom_series(tmp_path / "s", **tags)
    reason_text = _refused(tmp_path / "s", reason)
    assert "IM0000.dcm" in reason_text and "duplicate slice" not in reason_text


def test_dicom_infinite_origin_never_becomes_zero(tmp_path):
    _dicom_series(tmp_path / "src" / "series", n=8, ImagePositionPatient="-inf\\0\\{z}")
    store = tmp_path / "store"
    assert main(["convert", str(tmp_path / "src"), "--store", str(store), "--workers", "1", "--no-progress"]) == 1
    row = VolumeStore(store).catalog().iloc[0]
    assert row["status"] == "failed" and "ImagePositionPatient (0020,0032) '-inf\\0\\0'" in row["error"]
    assert [p.name for p in (store / "scans").iterdir()] == ["zarr.json"]  # the empty group, no scan


@pytest.mark.parametrize("n, frames, reason", [
    (2, None, r"series of 2 slices of 4000x4000 voxels \(Rows x Columns of IM0000.dcm\) at 2 bytes per decoded "
              r"voxel needs 64000000 bytes \(61.0 MiB\), over the per-scan limit of 10000000 bytes"),
    (1, 4, r"multi-frame IM0000.dcm of 4 frames of 4000x4000 voxels \(NumberOfFrames x Rows x Columns\) at 2 bytes "
           r"per decoded voxel needs 128000000 bytes"),
])
def test_dicom_declared_size_over_the_ceiling_is_refused_from_the_headers(tmp_path, n, frames, reason):
    """Files of a few hundred bytes declaring 4000x4000 slices (the hostile tester's 40000x40000
    or 65535^2 x 2000 frames, scaled down): refused from Rows x Columns (x frames) x slices
    before GDCM allocates the volume, not read as zeros or failing with a MemoryError."""
    paths = _dicom_series(tmp_path / "s", n=n, rows=4000, columns=4000, frames=frames, pixel_bytes=128)
    assert sum(p.stat().st_size for p in paths) < 2000
    with pytest.raises(LimitError, match=reason):
        read_source(_only(discover([tmp_path / "s"])), max_scan_bytes=10_000_000)
    zipped = zip_folder(tmp_path / "s", tmp_path / "s.zip", arc_prefix="series/")
    with pytest.raises(LimitError, match=reason.replace("IM0000.dcm", "series/IM0000.dcm")):
        read_source(_only(discover([zipped])), max_scan_bytes=10_000_000)


def test_dicom_pixel_data_shorter_than_its_header_is_refused(tmp_path):
    """GDCM read the missing bytes as zeros: a slice of 32x32 int16 needs 2048 bytes."""
    _dicom_series(tmp_path / "s", rows=32, columns=32, pixel_bytes=128)
    _refused(tmp_path / "s", r"IM0000.dcm: PixelData \(7FE0,0010\) holds 128 bytes, but Rows x Columns \(32x32, "
                              r"1 sample\(s\) of 16 bits\) need 2048")


def test_resampling_checks_the_output_size_first(rng):
    """--spacing 0.04,0.04,0.04 on a CT asked for a 13.8 GB resample: the size is refused first."""
    from pipeline.ingest.volume import IDENTITY, Volume
    from pipeline.volume_store.checks import resample

    voxels = ct_array(rng)  # 24x32x40 at 2.5x0.8x0.7 mm
    vol = Volume(voxels=voxels.copy(), spacing=(2.5, 0.8, 0.7), origin=(0.0, 0.0, 0.0), direction=IDENTITY,
                 source_direction=IDENTITY, modality="CT", labels={"seg": np.zeros(voxels.shape, np.uint8)})
    with pytest.raises(LimitError, match=r"resampling to spacing 0.04x0.04x0.04 mm \(z,y,x; --spacing\) into "
                                         r"1500x640x700 voxels of 3 bytes \(image and labels\) needs 2016000000 "
                                         r"bytes .* over the per-scan limit of 100000000 bytes"):
        resample(vol, (0.04, 0.04, 0.04), max_scan_bytes=100_000_000)
    np.testing.assert_array_equal(vol.voxels, voxels)  # untouched
    with pytest.raises(LimitError, match=r"spacing 1e-09x1x1 mm .* makes 6e\+10x25.6x28 voxels .* more than ITK "
                                         r"can address"):
        resample(vol, (1e-9, 1.0, 1.0), max_scan_bytes=2**62)
    assert resample(vol, (5.0, 1.6, 1.4), max_scan_bytes=100_000).shape == (12, 16, 20)
    for bad in [(1.0, float("inf"), 1.0), (1.0, float("nan"), 1.0)]:
        with pytest.raises(ValueError, match="positive finite"):
            ConvertSettings(spacing=bad)


def test_convert_with_a_vanishing_spacing_is_a_failed_row_naming_the_size(tmp_path, rng):
    """`--spacing 1e-9,...` gave a SWIG TypeError per scan."""
    write_mhd(tmp_path / "src" / "a.mhd", ct_array(rng, (8, 8, 8)))
    store = tmp_path / "store"
    assert main(["convert", str(tmp_path / "src"), "--store", str(store), "--workers", "1", "--no-progress",
                 "--spacing", "1e-9,1e-9,1e-9"]) == 1
    row = VolumeStore(store).catalog().set_index("scan_id").loc["a"]
    assert row["status"] == "failed"
    assert "resampling to spacing 1e-09x1e-09x1e-09 mm" in row["error"] and "more than ITK can address" in row["error"]
    assert "TypeError" not in row["error"]


@pytest.mark.parametrize("name, text, reason", [
    ("s.mhd", _mhd_text("s.raw", extra="TransformMatrix = 0 0 0 0 0 0 0 0 0\n"),
     r"TransformMatrix = 0 0 0 0 0 0 0 0 0 is not an invertible direction matrix \(determinant 0"),
    ("s.mhd", _mhd_text("s.raw", extra="TransformMatrix = 1 0 0 1 0 0 0 0 1\n"),
     r"TransformMatrix = 1 0 0 1 0 0 0 0 1 is not an invertible direction matrix"),
    ("s.nhdr", _nhdr_text("s.raw", extra="space: left-posterior-superior\n"
                                         "space directions: (1,0,0) (2,0,0) (0,0,1)\n"),
     r"space directions: \(1,0,0\) \(2,0,0\) \(0,0,1\) is not an invertible direction matrix"),
])
def test_singular_direction_names_the_field(tmp_path, name, text, reason):
    """ITK said only "Image(0x7fb1...): Bad direction, determinant is 0"."""
    (tmp_path / "s.raw").write_bytes(bytes(512))
    (tmp_path / name).write_text(text, encoding="utf-8")
    assert "ITK" not in _refused(tmp_path / name, reason)


@pytest.mark.parametrize("extra, reason", [
    ("line skip: 99999999999\n", r"line skip 99999999999 is more lines than data file s.raw \(512 bytes\) can hold"),
    ("line skip: 3\n", r"data file s.raw is 512 bytes, too small for header s.nhdr: line skip 3 .* need at least 515"),
    ("line skip: -1\n", r"line skip value '-1' is not a number of lines"),
    ("byte skip: 9223372036854775807\n", r"byte skip 9223372036854775807 is past the end of data file s.raw"),
])
def test_nrrd_skips_are_checked_against_the_data_file(tmp_path, extra, reason):
    """ITK's reason for `line skip: 99999999999` was "ReadImageInformation: Error reading x.nhdr:"."""
    (tmp_path / "s.raw").write_bytes(bytes(512))
    (tmp_path / "s.nhdr").write_text(_nhdr_text("s.raw", extra=extra), encoding="utf-8")
    _refused(tmp_path / "s.nhdr", reason)


def test_nrrd_line_skip_that_fits_still_reads(tmp_path):
    voxels = bytes(range(256)) * 2
    (tmp_path / "s.raw").write_bytes(b"a text line\nanother\n" + voxels)
    (tmp_path / "s.nhdr").write_text(_nhdr_text("s.raw", extra="line skip: 2\n"), encoding="utf-8")
    vol = read_source(_only(discover([tmp_path / "s.nhdr"])))
    np.testing.assert_array_equal(vol.voxels.ravel(), np.frombuffer(voxels, np.uint8))
