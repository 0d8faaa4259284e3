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
from conftest import ct_array, make_image, write_mhd

from pipeline.cli import main
from pipeline.ingest import discover, read_source
from pipeline.volume_store import ConvertSettings, VolumeStore

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
