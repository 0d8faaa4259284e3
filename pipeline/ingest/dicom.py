"""DICOM series: grouped by SeriesInstanceUID, ordered by slice position, checked for gaps.

Headers are read with pydicom (fast, no pixel data) to group and order the slices; voxels are
decoded by SimpleITK's series reader (GDCM), which applies rescale slope/intercept. Missing or
irregularly spaced slices make a volume whose geometry is a lie, so such a series is refused
with the positions where it breaks rather than silently resampled. GDCM also turns bad header
numbers into plausible ones and allocates whatever a header declares, so every slice header is
checked (`dicom_header`) before GDCM reads a voxel.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections import defaultdict

import numpy as np
import pydicom
import SimpleITK as sitk

from pipeline.ingest.archive import extract_members
from pipeline.ingest.dicom_header import check_pixel_data, check_series_size, read_slice_header
from pipeline.ingest.lidc import ConsensusConfig, lidc_header, read_lidc_labels
from pipeline.ingest.limits import DEFAULT_MAX_SCAN_BYTES, check_ceiling
from pipeline.ingest.scan_source import ScanSource
from pipeline.ingest.volume import Volume, check_geometry, volume_from_image

__all__ = ["group_series", "group_series_in_zip", "read_dicom", "order_slices"]

_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "ImagePositionPatient",
         "ImageOrientationPatient", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"]  # to group a series
LIDC_LABEL = "nodules"  # the label name of LIDC-IDRI consensus nodules (labels/nodules in the store)
SPACING_TOLERANCE = 0.05  # relative deviation from the median slice gap that still counts as regular


def _header(fp) -> pydicom.Dataset | None:
    try:
        return pydicom.dcmread(fp, stop_before_pixels=True, specific_tags=_TAGS + ["PixelData"])
    except Exception:  # pydicom raises many types on non-DICOM input
        return None


def _group(headers: list[tuple[str, pydicom.Dataset | None]], source_path: str, archive: str | None,
           kind: str) -> list[ScanSource]:
    series: dict[str, list[str]] = defaultdict(list)
    meta: dict[str, pydicom.Dataset] = {}
    scans: list[ScanSource] = []
    for name, ds in headers:
        uid = getattr(ds, "SeriesInstanceUID", None) if ds is not None else None
        if uid is None:
            scans.append(ScanSource(
                scan_id=os.path.basename(name), kind="unknown", dataset="dicom", files=(name,),
                source_path=f"{archive}!{name}" if archive else name, archive=archive,
                problem="not a DICOM image file (no SeriesInstanceUID)"))
            continue
        series[str(uid)].append(name)
        meta.setdefault(str(uid), ds)
    folders = {uid: _series_folder(names) for uid, names in series.items()} if not archive else {}
    lidc = _LidcIndex(folders)
    for uid, names in sorted(series.items()):
        ds = meta[uid]
        ids = {k: str(getattr(ds, k)) for k in ("StudyInstanceUID", "PatientID") if getattr(ds, k, None)}
        ids["SeriesInstanceUID"] = uid
        common = os.path.commonpath(names) if not archive else archive
        xml = lidc.xml_for(uid) if not archive else None
        scans.append(ScanSource(
            scan_id=uid, kind=kind, dataset="lidc" if xml else "dicom", files=tuple(sorted(names)),
            source_path=common if not archive else archive, archive=archive,
            modality=str(getattr(ds, "Modality", "") or "OT"), identifiers=tuple(sorted(ids.items())),
            labels=((LIDC_LABEL, xml),) if xml else ()))
    return scans


def _series_folder(names: list[str]) -> str:
    """The folder holding a series' files (their common folder, not a file when there is one)."""
    return os.path.commonpath([os.path.dirname(os.path.abspath(n)) for n in names])


class _LidcIndex:
    """Which LIDC-IDRI XML annotates which series, looking only in each series' own folder.

    TCIA puts one LIDC XML in the series folder. It belongs to a series when its
    ResponseHeader's SeriesInstanceUid names it; when no XML of the folder names the series,
    the folder's only LIDC XML is taken if the folder holds only that series (some copies lack
    or mistype the UID). Zipped series are not searched (their labels would need the XML
    member extracted beside the slices).
    """

    def __init__(self, folders: dict[str, str]) -> None:
        self.folders = folders
        self.per_folder: dict[str, list[tuple[str, str | None]]] = {}

    def _xmls(self, folder: str) -> list[tuple[str, str | None]]:
        if folder not in self.per_folder:
            found = []
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            for name in names:
                path = os.path.join(folder, name)
                if name.lower().endswith(".xml") and not name.startswith(".") and os.path.isfile(path):
                    is_lidc, uid = lidc_header(path)
                    if is_lidc:
                        found.append((path, uid))
            self.per_folder[folder] = found
        return self.per_folder[folder]

    def xml_for(self, series_uid: str) -> str | None:
        folder = self.folders.get(series_uid)
        if folder is None:
            return None
        xmls = self._xmls(folder)
        named = [p for p, uid in xmls if uid == series_uid]
        if named:
            return named[0]
        alone = sum(1 for f in self.folders.values() if f == folder) == 1
        return xmls[0][0] if len(xmls) == 1 and alone else None


def group_series(files: list[str]) -> list[ScanSource]:
    """One `ScanSource` per SeriesInstanceUID among `files`; non-DICOM files become failed sources."""
    return _group([(f, _header(f)) for f in files], source_path="", archive=None, kind="dicom")


def group_series_in_zip(archive: str, members: list[str]) -> list[ScanSource]:
    headers = []
    with zipfile.ZipFile(archive) as zf:
        for name in members:
            with zf.open(name) as fh:
                headers.append((name, _header(fh)))
    return _group(headers, source_path=archive, archive=archive, kind="dicom-zip")


def order_slices(files: list[str], max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES,
                 names: dict[str, str] | None = None) -> list[str]:
    """Sort slice files along the slice normal; raise when slices are missing, repeated or uneven.

    Every header is checked first (`dicom_header`): its numbers, the series' decoded size
    against `max_scan_bytes`, and each slice's PixelData length, all before a voxel is read.
    Reasons name each file by `names[path]` (archive members) or its file name.
    """
    def label(f: str) -> str:
        return (names or {}).get(f) or os.path.basename(f)

    slices = [(h, f) for h, f in ((read_slice_header(f, label(f)), f) for f in files) if h.is_image]  # not a report
    if not slices:
        raise ValueError("empty series: no image slices")
    headers = [h for h, _ in slices]
    check_series_size(headers, max_scan_bytes)
    for h in headers:
        check_pixel_data(h)
    multi = [h for h in headers if h.frames > 1]
    if multi:
        if len(files) == 1:
            return [files[0]]  # an enhanced (multi-frame) object: the file is the volume
        raise ValueError(f"series mixes a multi-frame file ({multi[0].name}) with other files")
    rows = []
    for h, f in slices:
        if h.position is None or h.orientation is None:
            raise ValueError(f"slice {h.name} has no ImagePositionPatient/ImageOrientationPatient")
        rows.append((h.normal_position, f))
    if len(rows) < 2:
        raise ValueError(f"series has {len(rows)} image slice; a volume needs at least 2")
    rows.sort()
    pos = np.array([r[0] for r in rows])
    gaps = np.diff(pos)
    if np.any(gaps < 1e-3):
        i = int(np.argmin(gaps))
        raise ValueError(f"duplicate slice position {pos[i]:.3f} mm ({label(rows[i][1])}, {label(rows[i + 1][1])})")
    median = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - median) > SPACING_TOLERANCE * median)
    if bad.size:
        i = int(bad[0])
        kind = "missing slices" if gaps[i] > median else "irregular slice spacing"
        raise ValueError(f"{kind}: gap of {gaps[i]:.3f} mm between positions {pos[i]:.3f} and {pos[i + 1]:.3f} mm "
                         f"where the series spacing is {median:.3f} mm ({bad.size} uneven gaps)")
    return [r[1] for r in rows]


def read_dicom(source: ScanSource, max_scan_bytes: int = DEFAULT_MAX_SCAN_BYTES) -> Volume:
    """Read one series (from a folder or, through a private temp folder, from a zip); the series'
    files together may not exceed the per-scan ceiling."""
    if source.archive:
        with tempfile.TemporaryDirectory(prefix="genesis-dicom-") as tmp:
            with zipfile.ZipFile(source.archive) as zf:
                paths = extract_members(zf, list(source.files), tmp, max_scan_bytes)
            return _read_files(paths, source, max_scan_bytes, names=dict(zip(paths, source.files)))
    try:
        total = sum(os.path.getsize(f) for f in source.files)
    except OSError as exc:
        raise ValueError(f"cannot read {exc.filename}: {exc.strerror}") from None
    check_ceiling(f"series of {len(source.files)} files", total, max_scan_bytes)
    return _read_files(list(source.files), source, max_scan_bytes)


def _read_files(files: list[str], source: ScanSource, max_scan_bytes: int,
                names: dict[str, str] | None = None) -> Volume:
    ordered = order_slices(files, max_scan_bytes, names)
    if len(ordered) == 1:
        image = sitk.ReadImage(ordered[0])
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(ordered)
        image = reader.Execute()
    check_geometry(image, f"series {source.scan_id}")
    labels, attrs = _xml_labels(source, ordered, image)
    return volume_from_image(image, modality=source.modality or "OT", labels=labels,
                             identifiers=dict(source.identifiers), label_attrs=attrs)


def _xml_labels(source: ScanSource, ordered: list[str], image: sitk.Image) -> tuple[dict[str, sitk.Image], dict]:
    """LIDC XML labels rasterised on the series' own grid, before the LPS reorientation.

    The label image copies the CT image's geometry, so `volume_from_image` reorients both the
    same way and they stay voxel-exact after LPS. Other label files of a DICOM series are not
    read here (DICOM discovery attaches none). An XML none of whose contours lands on the
    series (each outside the image or matching no slice) fails the scan: an empty nodule label
    would pass for "no nodules"; contours that partly miss are named in the label's attributes
    (`contour_summary`).
    """
    labels: dict[str, sitk.Image] = {}
    attrs: dict[str, dict] = {}
    for name, path in source.labels:
        if not path.lower().endswith(".xml"):
            raise ValueError(f"label '{name}' of a DICOM series must be an LIDC XML file, got {os.path.basename(path)}")
        if len(ordered) < 2:
            raise ValueError(f"LIDC labels {os.path.basename(path)} need a series of single-slice files")
        result = read_lidc_labels(path, ordered, ConsensusConfig())
        if result.contours.all_missed:
            columns, rows, slices = image.GetSize()
            raise ValueError(f"{result.contours.summary}: none lands on the series ({slices} slices of "
                             f"{rows}x{columns} pixels; an XML of another series?)")
        if result.mask.shape != tuple(reversed(image.GetSize())):
            raise ValueError(f"LIDC labels {os.path.basename(path)}: grid {result.mask.shape} differs from the "
                             f"series' {tuple(reversed(image.GetSize()))}")
        label = sitk.GetImageFromArray(result.mask)
        label.CopyInformation(image)
        labels[name] = label
        attrs[name] = result.attrs()
    return labels, attrs
