"""Read any `ScanSource` into an LPS `Volume`, and say how to recognise it again (checksums)."""

from __future__ import annotations

import hashlib
import mmap
import os
import zipfile

import numpy as np
import SimpleITK as sitk
import xxhash

from pipeline.ingest.archive import read_zip_scan
from pipeline.ingest.dicom import read_dicom
from pipeline.ingest.headers import check_header_file, header_format
from pipeline.ingest.limits import DEFAULT_MAX_SCAN_BYTES, check_ceiling
from pipeline.ingest.nifti import check_nifti_header, nifti_nonfinite_count
from pipeline.ingest.scan_source import ScanSource
from pipeline.ingest.volume import Volume, check_geometry, volume_from_image

__all__ = ["read_source", "read_image", "source_files", "fingerprint", "checksum", "check_label_values",
           "check_nodule_labels", "unknown_label_values", "describe_values"]


def read_source(source: ScanSource, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> Volume:
    """Decode one scan; raises ValueError/RuntimeError with a one-line reason on bad input.

    `max_scan_bytes` bounds what one scan may need (decoded voxels, archive members extracted);
    ConvertSettings.max_scan_bytes passes it down.
    """
    if source.problem:
        raise ValueError(source.problem)
    if source.kind in ("dicom", "dicom-zip"):
        volume = read_dicom(source, max_scan_bytes)
        check_nodule_labels(volume, source.scan_id)
        return volume
    if source.kind in ("metaimage", "metaimage-zip"):
        image = _read_metaimage(source, max_scan_bytes)
    elif source.kind == "image":
        image = read_image(source.files[0], max_scan_bytes)
        if source.channel is not None:
            image = _channel(image, source)
    elif source.kind == "image-zip":
        image = _read_zip_image(source, max_scan_bytes)
    else:
        raise ValueError(f"unknown source kind {source.kind!r}")
    xml = [path for _, path in source.labels if path.lower().endswith(".xml")]
    if xml:  # LIDC XML contours are placed by DICOM slice UIDs/positions: only a DICOM series has them
        raise ValueError(f"label {os.path.basename(xml[0])} is an XML annotation, readable only with a DICOM series")
    labels = {name: read_image(path, max_scan_bytes, what=f"label map '{name}'") for name, path in source.labels}
    label_attrs = {}
    if source.label_names:  # nnU-Net/MSD, LiTS, BraTS: only the values dataset.json or the dataset names, every read
        for name, path in source.labels:
            check_label_values(labels[name], source.label_values, _dataset_relative(path), source.label_authority)
    if source.from_dataset_json:
        label_attrs = {name: {"labels": source.dataset_description()["labels"]} for name, _ in source.labels}
    modality = source.modality or "OT"
    return volume_from_image(image, modality=modality, labels=labels, identifiers=dict(source.identifiers),
                             label_attrs=label_attrs)


def _dataset_relative(path: str) -> str:
    """`labelsTr/x.nii.gz`: how a file of a dataset root is named in its failed rows."""
    return "/".join((os.path.basename(os.path.dirname(path)), os.path.basename(path)))


def unknown_label_values(values: np.ndarray, allowed: tuple[int, ...]) -> list[float]:
    """The distinct values of `values` that are not in `allowed`, sorted; [] when all are. One membership pass
    over the voxels (np.isin), and np.unique only over the voxels that fail it, so a valid map costs no sort."""
    bad = np.isin(values, np.asarray(allowed, dtype=np.float64 if values.dtype.kind == "f" else np.int64),
                  invert=True)
    return np.unique(values[bad]).tolist() if bad.any() else []


def describe_values(values: list[float]) -> str:
    """`-1, 255` (the first ten, then how many more): values as a label map holds them, without a float's `.0`."""
    shown = ", ".join(f"{v:g}" for v in values[:10])
    return shown + (f" (and {len(values) - 10} more)" if len(values) > 10 else "")


def check_label_values(label: sitk.Image, allowed: tuple[int, ...], what: str, by: str = "dataset.json") -> None:
    """Refuse a label map holding values that `by` (dataset.json, or a dataset's documented convention) does not
    name: one line naming the file and the values."""
    extra = unknown_label_values(sitk.GetArrayViewFromImage(label), allowed)
    if extra:
        raise ValueError(f"{what} holds label value{'s' if len(extra) > 1 else ''} {describe_values(extra)} that "
                         f"{by} does not name ({', '.join(map(str, allowed))})")


def check_nodule_labels(volume: Volume, scan_id: str) -> None:
    """LIDC consensus labels are built here from the XML readings: nodule k is value k, so the map holds exactly
    the values 0..n for the n nodules its attributes list; anything else (a value beyond n, a negative one)
    means the map and its nodule list disagree, and the scan is a failed row instead of wrong labels."""
    for name, mask in volume.labels.items():
        nodules = (volume.label_attrs.get(name) or {}).get("nodules")
        if nodules is None:
            continue
        allowed = tuple(range(len(nodules) + 1))
        extra = unknown_label_values(mask, allowed)
        if extra:
            raise ValueError(f"{scan_id}: label '{name}' holds value{'s' if len(extra) > 1 else ''} "
                             f"{describe_values(extra)} beyond its {len(nodules)} consensus nodule(s) (0..{len(nodules)})")


def _channel(image: sitk.Image, source: ScanSource) -> sitk.Image:
    """Channel `source.channel` of an MSD image: the 4th axis of a 4-D NIfTI (or a vector image's
    component); a 3-D image is the one channel of a dataset naming one modality."""
    what = _dataset_relative(source.files[0])
    n = source.n_channels
    dim = image.GetDimension()
    if dim == 4:
        size = image.GetSize()
        if n is not None and size[3] != n:
            raise ValueError(f"{what} has {size[3]} channels on its 4th axis but dataset.json names {n} "
                             f"modalit{'y' if n == 1 else 'ies'}")
        if not 0 <= source.channel < size[3]:
            raise ValueError(f"{what} has no channel {source.channel} (it has {size[3]})")
        return sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, source.channel])
    components = image.GetNumberOfComponentsPerPixel()
    if dim == 3 and components > 1:
        if n is not None and components != n:
            raise ValueError(f"{what} has {components} components per voxel but dataset.json names {n} "
                             f"modalit{'y' if n == 1 else 'ies'}")
        return sitk.VectorIndexSelectionCast(image, source.channel)
    if dim == 3 and source.channel == 0 and n in (None, 1):
        return image
    raise ValueError(f"{what} is a {dim}-D image with one channel but dataset.json names {n} modalities "
                     f"(expected a 4-D image, channels on its 4th axis)")


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


def _dataset_json_identity(source: ScanSource) -> bytes:
    """What dataset.json adds to a scan (its channel of a 4-D file, the names stored with it, the label
    values it is checked against): part of its identity, so an edited dataset.json reconverts. Empty for
    every other source, whose checksums stay as they were (LiTS's and BraTS's documented label values are
    the code's, not the source's: checking them does not make a converted store convert again)."""
    if source.channel is None and not source.from_dataset_json:
        return b""
    return repr((source.channel, source.n_channels, source.channel_names, source.label_names)).encode()


def fingerprint(source: ScanSource) -> str:
    """Cheap identity (names, sizes, mtimes): equal fingerprints mean no need to re-hash the bytes."""
    h = hashlib.sha256()
    h.update(repr((source.kind, source.files, source.labels)).encode("utf-8", "surrogateescape"))
    h.update(_dataset_json_identity(source))
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
    h.update(_dataset_json_identity(source))
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
