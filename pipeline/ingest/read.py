"""Read any `ScanSource` into an LPS `Volume`, and say how to recognise it again (checksums)."""

from __future__ import annotations

import hashlib
import mmap
import os
import zipfile

import SimpleITK as sitk
import xxhash

from pipeline.ingest.dicom import read_dicom
from pipeline.ingest.nifti import nifti_nonfinite_count
from pipeline.ingest.metaimage import check_metaimage, read_metaimage_image
from pipeline.ingest.sources import ScanSource
from pipeline.ingest.volume import Volume, volume_from_image

__all__ = ["read_source", "source_files", "fingerprint", "checksum"]


def read_source(source: ScanSource) -> Volume:
    """Decode one scan; raises ValueError/RuntimeError with a one-line reason on bad input."""
    if source.problem:
        raise ValueError(source.problem)
    if source.kind in ("dicom", "dicom-zip"):
        return read_dicom(source)
    if source.kind in ("metaimage", "metaimage-zip"):
        image = read_metaimage_image(source)
    elif source.kind == "image":
        image = _read_image(source.files[0])
    elif source.kind == "image-zip":
        image = _read_zip_image(source)
    else:
        raise ValueError(f"unknown source kind {source.kind!r}")
    xml = [path for _, path in source.labels if path.lower().endswith(".xml")]
    if xml:  # LIDC XML contours are placed by DICOM slice UIDs/positions: only a DICOM series has them
        raise ValueError(f"label {os.path.basename(xml[0])} is an XML annotation, readable only with a DICOM series")
    labels = {name: _read_image(path) for name, path in source.labels}
    modality = source.modality or "OT"
    return volume_from_image(image, modality=modality, labels=labels, identifiers=dict(source.identifiers))


def _read_image(path: str) -> sitk.Image:
    if path.lower().endswith(".mhd"):
        check_metaimage(path)
    if path.lower().endswith((".nii", ".nii.gz")):
        try:
            bad = nifti_nonfinite_count(path)
        except (OSError, EOFError, ValueError) as exc:
            raise ValueError(f"cannot read {os.path.basename(path)}: {exc}") from None
        if bad:
            raise ValueError(f"{bad} NaN/inf voxels in {os.path.basename(path)}")
    try:
        return sitk.ReadImage(path)
    except RuntimeError as exc:
        raise ValueError(f"cannot read {os.path.basename(path)}: {_itk_reason(exc)}") from None


def _read_zip_image(source: ScanSource) -> sitk.Image:
    import tempfile
    from pathlib import PurePosixPath

    with zipfile.ZipFile(source.archive) as zf, tempfile.TemporaryDirectory(prefix="genesis-img-") as tmp:
        local = os.path.join(tmp, PurePosixPath(source.files[0]).name)
        with zf.open(source.files[0]) as src, open(local, "wb") as dst:
            dst.write(src.read())
        return _read_image(local)


def _itk_reason(exc: Exception) -> str:
    """The informative last line of an ITK exception instead of its whole trace."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Description:" in ln or "Unable" in ln or "error" in ln.lower():
            return ln.split("Description:")[-1].strip()[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def source_files(source: ScanSource) -> list[str]:
    """The files on disk that a scan is made of (for fingerprints and checksums)."""
    if source.archive:
        return [source.archive]
    files = list(source.files) + [p for _, p in source.labels]
    if source.kind == "metaimage":
        try:
            files = check_metaimage(source.files[0]) + [p for _, p in source.labels]
        except ValueError:
            pass
    return files


def fingerprint(source: ScanSource) -> str:
    """Cheap identity (names, sizes, mtimes): equal fingerprints mean no need to re-hash the bytes."""
    h = hashlib.sha256()
    h.update(repr((source.kind, source.files, source.labels)).encode())
    for f in source_files(source):
        try:
            st = os.stat(f)
            h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"{f}:missing".encode())
    return h.hexdigest()


def checksum(source: ScanSource) -> str:
    """Content hash of the scan's bytes; for zip members the archive's own CRCs (no decompression).

    XXH3-128 rather than SHA-256: it detects changed sources just as well (this is not a
    security boundary) at about 10 GB/s instead of 1.7, which matters when every scan is
    hashed on every conversion.
    """
    h = hashlib.sha256()
    if source.archive:
        with zipfile.ZipFile(source.archive) as zf:
            for name in source.files:
                info = zf.getinfo(name)
                h.update(f"{name}:{info.file_size}:{info.CRC:08x}".encode())
                if name.lower().endswith(".mhd"):
                    stem = name[:-4]
                    for ext in (".raw", ".zraw"):
                        try:
                            di = zf.getinfo(stem + ext)
                            h.update(f"{di.filename}:{di.file_size}:{di.CRC:08x}".encode())
                        except KeyError:
                            pass
        return "zipcrc-sha256:" + h.hexdigest()
    h = xxhash.xxh3_128()
    for f in source_files(source):
        h.update(os.path.basename(f).encode())
        try:
            with open(f, "rb") as fh:
                if os.fstat(fh.fileno()).st_size:
                    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:  # hashed in place, no copy
                        h.update(view)
        except OSError:
            h.update(b"<missing>")
    return "xxh3-128:" + h.hexdigest()
