"""Read any `ScanSource` into an LPS `Volume`, and say how to recognise it again (checksums)."""

from __future__ import annotations

import hashlib
import mmap
import os
import zipfile

import SimpleITK as sitk
import xxhash

from pipeline.ingest.archive import read_zip_scan
from pipeline.ingest.dicom import read_dicom
from pipeline.ingest.headers import check_header_file, header_format
from pipeline.ingest.limits import DEFAULT_MAX_SCAN_BYTES, check_ceiling
from pipeline.ingest.nifti import check_nifti_header, nifti_nonfinite_count
from pipeline.ingest.scan_source import ScanSource
from pipeline.ingest.volume import Volume, check_geometry, volume_from_image

__all__ = ["read_source", "read_image", "source_files", "fingerprint", "checksum"]


def read_source(source: ScanSource, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> Volume:
    """Decode one scan; raises ValueError/RuntimeError with a one-line reason on bad input.

    `max_scan_bytes` bounds what one scan may need (decoded voxels, archive members extracted);
    ConvertSettings.max_scan_bytes passes it down.
    """
    if source.problem:
        raise ValueError(source.problem)
    if source.kind in ("dicom", "dicom-zip"):
        return read_dicom(source, max_scan_bytes)
    if source.kind in ("metaimage", "metaimage-zip"):
        image = _read_metaimage(source, max_scan_bytes)
    elif source.kind == "image":
        image = read_image(source.files[0], max_scan_bytes)
    elif source.kind == "image-zip":
        image = _read_zip_image(source, max_scan_bytes)
    else:
        raise ValueError(f"unknown source kind {source.kind!r}")
    xml = [path for _, path in source.labels if path.lower().endswith(".xml")]
    if xml:  # LIDC XML contours are placed by DICOM slice UIDs/positions: only a DICOM series has them
        raise ValueError(f"label {os.path.basename(xml[0])} is an XML annotation, readable only with a DICOM series")
    labels = {name: read_image(path, max_scan_bytes, what=f"label map '{name}'") for name, path in source.labels}
    modality = source.modality or "OT"
    return volume_from_image(image, modality=modality, labels=labels, identifiers=dict(source.identifiers))


def read_image(path: str, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES, what: str | None = None) -> sitk.Image:
    """Read one image file (scan or label map) after the checks its format needs.

    Detached-header formats go through `check_header_file` (their data file must be inside the
    scan's folder), NIfTI through its header and NaN checks; the decoded geometry is checked
    for every format.
    """
    name = os.path.basename(path)
    what = f"{what} {name}" if what else name
    if header_format(path) is not None:
        check_header_file(path, max_scan_bytes)
    elif path.lower().endswith((".nii", ".nii.gz")):
        check_nifti_header(path, max_scan_bytes)
        try:
            bad = nifti_nonfinite_count(path)
        except (OSError, EOFError, ValueError) as exc:
            raise ValueError(f"cannot read {name}: {exc}") from None
        if bad:
            raise ValueError(f"{bad} NaN/inf voxels in {name}")
    else:
        try:
            check_ceiling(what, os.path.getsize(path), max_scan_bytes)
        except OSError as exc:
            raise ValueError(f"cannot read {what}: {exc.strerror}") from None
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as exc:
        raise ValueError(f"cannot read {name}: {_itk_reason(exc)}") from None
    check_geometry(image, what)
    return image


def _read_metaimage(source: ScanSource, max_scan_bytes: int) -> sitk.Image:
    """MetaImage (.mhd + .raw), the LUNA16 format, from disk or from a zip through a private temporary folder.

    SimpleITK's own errors for a bad MetaImage are long ITK traces, and it opens whatever data file a
    header names; `read_image` parses the header as ITK does first (`headers.check_header_file`), so
    the usual archive damage (a truncated .raw, a missing data file, a header that is not MetaImage)
    and hostile headers (a data file outside the scan's folder) become one-line reasons.
    """
    if source.archive is None:
        return read_image(source.files[0], max_scan_bytes)
    return read_zip_scan(source, max_scan_bytes, read_image, prefix="genesis-mhd-")


def _read_zip_image(source: ScanSource, max_scan_bytes: int) -> sitk.Image:
    return read_zip_scan(source, max_scan_bytes, read_image, prefix="genesis-img-")


def _itk_reason(exc: Exception) -> str:
    """The informative last line of an ITK exception instead of its whole trace."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Description:" in ln or "Unable" in ln or "error" in ln.lower():
            return ln.split("Description:")[-1].strip()[:200]
    return (lines[-1] if lines else type(exc).__name__)[:200]


def source_files(source: ScanSource) -> list[str]:
    """The files on disk that a scan is made of (for fingerprints and checksums): a detached
    header brings its data file, for scans and label maps alike."""
    if source.archive:
        return [source.archive]
    files: list[str] = []
    for f in list(source.files) + [p for _, p in source.labels]:
        if header_format(f) is not None:
            try:
                files.extend(check_header_file(f, DEFAULT_MAX_SCAN_BYTES)[1])
                continue
            except (ValueError, OSError):
                pass
        files.append(f)
    return files


def fingerprint(source: ScanSource) -> str:
    """Cheap identity (names, sizes, mtimes): equal fingerprints mean no need to re-hash the bytes."""
    h = hashlib.sha256()
    h.update(repr((source.kind, source.files, source.labels)).encode("utf-8", "surrogateescape"))
    for f in source_files(source):
        try:
            st = os.stat(f)
            h.update(os.fsencode(f) + f":{st.st_size}:{st.st_mtime_ns}".encode())  # any name, even undecodable
        except OSError:
            h.update(os.fsencode(f) + b":missing")
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
        h.update(os.fsencode(os.path.basename(f)))
        try:
            with open(f, "rb") as fh:
                if os.fstat(fh.fileno()).st_size:
                    with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:  # hashed in place, no copy
                        h.update(view)
        except OSError:
            h.update(b"<missing>")
    return "xxh3-128:" + h.hexdigest()
