"""Header fields that locate the voxels (issue 18, item 1): a NIfTI `vox_offset`, a MetaImage
`HeaderSize`, a NRRD `byte skip` and a DICOM PixelData length are checked against the file's
layout, and a disagreement is a failed row naming the field and its value.

Each case is a real file written by SimpleITK (or pydicom, for DICOM) and then patched byte-wise,
converted through `genesis convert`. Before the fix each of them converted "ok" with the voxels
shifted, read from the header text, or padded with zeros, and `stores verify` agreed, because the
wrong voxels were what was written.
"""

from __future__ import annotations

import gzip
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from pipeline.volume_store.store import VolumeStore

ARR = (np.arange(8 * 8 * 8, dtype=np.int16) * 7 - 900).reshape(8, 8, 8)  # 1024 voxel bytes, every value distinct


def _convert(src: Path, store: Path) -> dict:
    """Convert `src`; scan id -> catalog row (as a dict)."""
    main(["convert", str(src), "--store", str(store), "--workers", "1", "--no-progress"])
    return {r["scan_id"]: r for r in VolumeStore(store).catalog().to_dict("records")}


def _stored(store: Path, scan_id: str) -> np.ndarray:
    return VolumeStore(store).open_scan(scan_id)["0"][...]


def _written(tmp: Path, suffix: str) -> bytes:
    """ARR as SimpleITK writes it in the format of `suffix` (uncompressed), as bytes."""
    path = tmp / f"written{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(ARR), str(path), useCompression=False)
    return path.read_bytes()


def _vox_offset(nii: bytes, value: float) -> bytes:
    return nii[:108] + struct.pack("<f", value) + nii[112:]


# ---- NIfTI vox_offset -----------------------------------------------------------------------

def test_nifti_vox_offset_must_place_the_voxels_inside_the_file(tmp_path):
    nii = _written(tmp_path, ".nii")
    assert len(nii) == 352 + 1024 and struct.unpack("<f", nii[108:112])[0] == 352.0
    with_ext = nii[:348] + b"\x01\0\0\0" + struct.pack("<ii", 16, 0) + bytes(8) + nii[352:]  # one 16-byte extension
    files = {
        "good.nii": nii,
        "ext.nii": _vox_offset(with_ext, 368.0),  # a well-formed extension: still converts, voxels exact
        "zero.nii": _vox_offset(nii, 0.0),
        "huge.nii": _vox_offset(nii, 1e12),
        "negative.nii": _vox_offset(nii, -1e6),
        "flagbytes.nii": _vox_offset(nii, 348.0),
        "cut.nii": nii[:-100],
        "longext.nii": _vox_offset(with_ext[:352] + struct.pack("<i", 32) + with_ext[356:], 368.0),
        "pair.nii": nii[:344] + b"ni1\0" + nii[348:],
    }
    gz = {"zerogz.nii.gz": _vox_offset(nii, 0.0), "hugegz.nii.gz": _vox_offset(nii, 1e12),
          "negativegz.nii.gz": _vox_offset(nii, -1e6), "cutgz.nii.gz": nii[:-100], "goodgz.nii.gz": nii,
          "extgz.nii.gz": _vox_offset(with_ext, 368.0),
          "longextgz.nii.gz": _vox_offset(with_ext[:352] + struct.pack("<i", 32) + with_ext[356:], 368.0)}
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    for name, data in gz.items():
        (src / name).write_bytes(gzip.compress(data))
    rows = _convert(src, tmp_path / "store")
    for ok in ("good", "ext", "goodgz", "extgz"):
        assert rows[ok]["status"] == "ok", rows[ok]["error"]
        np.testing.assert_array_equal(_stored(tmp_path / "store", ok), ARR)
    expected = {
        "zero": "zero.nii: vox_offset 0 is inside the 348-byte header (at least 352 for a .nii)",
        "zerogz": "zerogz.nii.gz: vox_offset 0 is inside the 348-byte header (at least 352 for a .nii)",
        "huge": "huge.nii: vox_offset 999999995904 and 1024 voxel bytes need 999999996928 bytes, but huge.nii "
                "holds 1376",
        "hugegz": "hugegz.nii.gz: vox_offset 999999995904 and 1024 voxel bytes need 999999996928 bytes, but "
                  "hugegz.nii.gz holds 1376 once decompressed",
        "negative": "negative.nii: vox_offset -1000000 is negative (at least 352 for a .nii)",
        "negativegz": "negativegz.nii.gz: vox_offset -1000000 is negative (at least 352 for a .nii)",
        "flagbytes": "flagbytes.nii: vox_offset 348 is inside the 4 extension bytes after the 348-byte header "
                     "(at least 352 for a .nii)",
        "cut": "cut.nii: vox_offset 352 and 1024 voxel bytes need 1376 bytes, but cut.nii holds 1276",
        "cutgz": "cutgz.nii.gz: vox_offset 352 and 1024 voxel bytes need 1376 bytes, but cutgz.nii.gz holds 1276 "
                 "once decompressed",
        "longext": "longext.nii: extension at byte 352 (esize 32) runs to byte 384, past vox_offset 368 where the "
                   "voxels start",
        "longextgz": "longextgz.nii.gz: extension at byte 352 (esize 32) runs to byte 384, past vox_offset 368 "
                     "where the voxels start",
        "pair": "pair.nii: magic b'ni1' says the voxels are in a separate .img file, but a single-file NIfTI holds "
                "its own (magic 'n+1')",
    }
    for scan_id, reason in expected.items():
        row = rows[scan_id]
        assert row["status"] == "failed" and row["error"] == reason, (scan_id, row["error"])
        assert not (tmp_path / "store" / "scans" / scan_id).exists()


def test_nifti_magic_must_be_exact(tmp_path):
    """Only the whole magic makes a NIfTI: with "n+1x" ITK reads an Analyze 7.5 header, dropping the origin and
    direction (voxels right, geometry wrong, and verify would agree): a failed row naming the magic."""
    image = sitk.GetImageFromArray(ARR)
    image.SetOrigin((10.0, 20.0, 30.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(tmp_path / "w.nii"), useCompression=False)
    nii = (tmp_path / "w.nii").read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.nii").write_bytes(nii)
    for name, magic in (("x.nii", b"n+1x"), ("one.nii", b"n+1\x01")):
        (src / name).write_bytes(nii[:344] + magic + nii[348:])
    rows = _convert(src, tmp_path / "store")
    assert rows["good"]["status"] == "ok"
    for scan in ("x", "one"):
        assert rows[scan]["status"] == "failed" and "magic" in rows[scan]["error"], rows[scan]


def test_nifti_pair_and_gzip_ceiling(tmp_path):
    """The .hdr/.img rule (the offset is into the .img, 0 allowed) and the bound on reading a
    .nii.gz through: an offset past the per-scan limit is refused without inflating further."""
    from pipeline.ingest.limits import LimitError
    from pipeline.ingest.nifti import check_nifti_header

    sitk.WriteImage(sitk.GetImageFromArray(ARR), str(tmp_path / "p.hdr"))
    hdr = (tmp_path / "p.hdr").read_bytes()
    assert hdr[344:348] == b"ni1\0" and (tmp_path / "p.img").stat().st_size == 1024
    assert check_nifti_header(str(tmp_path / "p.hdr"), 10**6) == 1024
    for value, reason in [(2000.0, "p.hdr: vox_offset 2000 and 1024 voxel bytes need 3024 bytes, but p.img holds 1024"),
                          (-5.0, r"p.hdr: vox_offset -5 is negative \(the voxels' byte offset in p.img\)")]:
        (tmp_path / "p.hdr").write_bytes(_vox_offset(hdr, value))
        with pytest.raises(ValueError, match=reason):
            check_nifti_header(str(tmp_path / "p.hdr"), 10**6)
    nii = _written(tmp_path, ".nii")
    (tmp_path / "far.nii.gz").write_bytes(gzip.compress(_vox_offset(nii, 1e6) + bytes(20000)))
    with pytest.raises(LimitError, match=r"far.nii.gz: vox_offset 1000000 puts the voxels 976.6 KiB into the "
                                         r"decompressed file, beyond the per-scan limit of 4096 bytes"):
        check_nifti_header(str(tmp_path / "far.nii.gz"), 4096)


# ---- MetaImage HeaderSize, NRRD byte skip -----------------------------------------------------

def _with_field(data: bytes, before: bytes, line: bytes) -> bytes:
    """`line` inserted into a header just before the line that starts with `before`."""
    at = data.index(before)
    return data[:at] + line + data[at:]


def test_headersize_and_byte_skip_must_place_the_voxels_inside_the_file(tmp_path):
    mha = _written(tmp_path, ".mha")
    nrrd = _written(tmp_path, ".nrrd")
    assert mha.endswith(ARR.tobytes()) and nrrd.endswith(ARR.tobytes())
    sitk.WriteImage(sitk.GetImageFromArray(ARR), str(tmp_path / "mhd.mhd"), useCompression=False)
    mhd_text = (tmp_path / "mhd.mhd").read_bytes()
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "tailok.mha": _with_field(mha, b"ElementDataFile", b"HeaderSize = -1\n"),  # -1 is allowed: voxels end the file
        "inside.mha": _with_field(mha, b"ElementDataFile", b"HeaderSize = 10\n"),
        "big.mha": _with_field(mha, b"ElementDataFile", b"HeaderSize = 99999\n"),
        "tail.mha": _with_field(mha, b"ElementDataFile", b"HeaderSize = -1\n")[:-100],
        "big.mhd": _with_field(mhd_text, b"ElementDataFile", b"HeaderSize = 600\n").replace(b"mhd.raw", b"big.raw"),
        "big.raw": ARR.tobytes(),
        "tailok.nrrd": _with_field(nrrd, b"encoding", b"byte skip: -1\n"),
        "skip.nrrd": _with_field(nrrd, b"encoding", b"byte skip: 100\n"),
        "tail.nrrd": _with_field(nrrd, b"encoding", b"byte skip: -1\n")[:-100],
        "gz.nhdr": b"NRRD0004\ntype: short\ndimension: 3\nsizes: 8 8 8\nendian: little\nencoding: gzip\n"
                   b"byte skip: -1\ndata file: gz.raw\n",
        "gz.raw": gzip.compress(ARR.tobytes()),
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    header_end = len(files["tail.mha"]) + 100 - 1024
    with zipfile.ZipFile(src / "zipped.zip", "w") as zf:  # the same check on a zip member's declared size
        zf.writestr("zipped.mha", files["tail.mha"])
    rows = _convert(src, tmp_path / "store")
    ok_rows = {sid: r for sid, r in rows.items() if r["status"] == "ok"}
    assert sorted(r["source_path"].rsplit("/", 1)[-1] for r in ok_rows.values()) == ["tailok.mha", "tailok.nrrd"]
    for sid in ok_rows:
        np.testing.assert_array_equal(_stored(tmp_path / "store", sid), ARR)
    by_file = {r["source_path"].rsplit("/", 1)[-1]: r for r in rows.values()}
    expected = {
        "inside.mha": f"header inside.mha: HeaderSize 10 is inside the {header_end}-byte header text (the voxels of "
                      f"ElementDataFile = LOCAL start at byte {header_end} or later)",
        "big.mha": f"header big.mha: HeaderSize 99999 and 1024 voxel bytes need 101023 bytes, but the file holds "
                   f"{len(files['big.mha'])}",
        "tail.mha": f"header tail.mha: HeaderSize -1 (the voxels end the file) puts the 1024 voxel bytes inside the "
                    f"{header_end}-byte header: the file holds {header_end + 924} bytes, needs at least "
                    f"{header_end + 1024}",
        "zipped.zip!zipped.mha": f"header zipped.mha: HeaderSize -1 (the voxels end the file) puts the 1024 voxel "
                                 f"bytes inside the {header_end}-byte header: the file holds {header_end + 924} "
                                 f"bytes, needs at least {header_end + 1024}",
        "big.mhd": "header big.mhd: HeaderSize 600 and 1024 voxel bytes need 1624 bytes, but data file big.raw "
                   "holds 1024",
        "gz.nhdr": "header gz.nhdr: byte skip -1 is allowed only with raw encoding (encoding: gzip)",
    }
    for name, reason in expected.items():
        row = by_file[name]
        assert row["status"] == "failed" and row["error"] == reason, (name, row["error"])
    skip_end, nrrd_end = len(files["skip.nrrd"]) - 1024, len(files["tail.nrrd"]) + 100 - 1024
    assert by_file["skip.nrrd"]["error"] == (
        f"header skip.nrrd: byte skip 100 after the {skip_end}-byte header and 1024 voxel bytes need "
        f"{skip_end + 1124} bytes, but the file holds {skip_end + 1024}")
    assert by_file["tail.nrrd"]["error"] == (
        f"header tail.nrrd: byte skip -1 (the voxels end the file) puts the 1024 voxel bytes inside the "
        f"{nrrd_end}-byte header: the file holds {nrrd_end + 924} bytes, needs at least {nrrd_end + 1024}")


# ---- DICOM PixelData length -------------------------------------------------------------------

def _slice(k: int, rows: int, columns: int, bits: int) -> np.ndarray:
    return (np.arange(rows * columns) * 3 + k).astype("<u2" if bits == 16 else np.uint8).reshape(rows, columns)


def _series(folder: Path, uid: str, rows: int = 8, columns: int = 8, bits: int = 16,
            pixel_bytes: int | None = None, n: int = 8) -> list[Path]:
    """`n` CT slices written with pydicom (GDCM's writer would fix the length under test);
    `pixel_bytes`: the PixelData length to write instead of the one Rows x Columns needs."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    folder.mkdir(parents=True)
    need = rows * columns * bits // 8
    paths = []
    for k in range(n):
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = f"{uid}.{k + 1}"
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "CT", "P1", f"{uid}.0", uid
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 2.5 * k], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.InstanceNumber = [0.75, 0.75], k + 1
        voxels = _slice(k, rows, columns, bits).tobytes()
        size = need if pixel_bytes is None else pixel_bytes
        ds.PixelData = (voxels * 3)[:size] + bytes(size % 2)
        path = folder / f"IM{k:04d}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_dicom_pixel_data_length_must_match_its_header(tmp_path):
    src = tmp_path / "src"
    _series(src / "good", "1.2.826.0.1.3680043.2.1125.41")
    _series(src / "odd", "1.2.826.0.1.3680043.2.1125.42", rows=9, columns=9, bits=8)  # 81 bytes, padded to 82
    _series(src / "long", "1.2.826.0.1.3680043.2.1125.43", pixel_bytes=256)  # twice what 8x8 int16 needs
    cut = _series(src / "cut", "1.2.826.0.1.3680043.2.1125.44")
    cut[1].write_bytes(cut[1].read_bytes()[:-28])  # the file ends inside its PixelData
    rows = _convert(src, tmp_path / "store")
    for uid in ("1.2.826.0.1.3680043.2.1125.41", "1.2.826.0.1.3680043.2.1125.42"):
        assert rows[uid]["status"] == "ok", rows[uid]["error"]
    np.testing.assert_array_equal(_stored(tmp_path / "store", "1.2.826.0.1.3680043.2.1125.41"),
                                  np.stack([_slice(k, 8, 8, 16) for k in range(8)]))
    np.testing.assert_array_equal(_stored(tmp_path / "store", "1.2.826.0.1.3680043.2.1125.42"),
                                  np.stack([_slice(k, 9, 9, 8) for k in range(8)]))
    long_row = rows["1.2.826.0.1.3680043.2.1125.43"]
    assert long_row["status"] == "failed" and long_row["error"] == (
        "IM0000.dcm: PixelData (7FE0,0010) holds 256 bytes, but Rows x Columns (8x8, 1 sample(s) of 16 bits) "
        "need 128")
    cut_row = rows["1.2.826.0.1.3680043.2.1125.44"]
    assert cut_row["status"] == "failed" and cut_row["error"] == (
        "IM0001.dcm: PixelData (7FE0,0010) holds 100 bytes, but Rows x Columns (8x8, 1 sample(s) of 16 bits) "
        "need 128")


@pytest.mark.parametrize("bits, rows, columns, length, ok", [
    (8, 3, 3, 10, True),  # an odd 9 bytes padded to an even 10
    (8, 3, 3, 12, False),
    (16, 4, 4, 32, True),
    (16, 4, 4, 34, False),
])
def test_pixel_data_length_rule(bits, rows, columns, length, ok):
    from pipeline.ingest.dicom_header import SliceHeader, check_pixel_data

    header = SliceHeader(name="x.dcm", is_image=True, rows=rows, columns=columns, bits_allocated=bits,
                         pixel_data_length=length)
    if ok:
        check_pixel_data(header)
    else:
        with pytest.raises(ValueError, match=rf"x.dcm: PixelData \(7FE0,0010\) holds {length} bytes"):
            check_pixel_data(header)
