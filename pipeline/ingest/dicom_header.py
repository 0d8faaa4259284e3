"""The numbers of a DICOM slice header, checked before GDCM decodes a voxel.

GDCM turns bad header numbers into plausible lies rather than errors: an ImagePositionPatient
of `inf` becomes an origin of 0,0,0, a PixelSpacing of `0\\0` or `nan\\1` becomes 1 mm, a
RescaleSlope of `inf` is ignored, a PixelData element shorter than Rows x Columns needs is read
as zeros and a longer one is cut without a word. It also allocates whatever Rows x Columns x
slices asks for, so two tiny files declaring 40000x40000 slices cost gigabytes (or a
MemoryError) before anything else can say no.

So each slice's header is parsed here from its raw text (never through GDCM), every number
GDCM would use is checked with its tag name and value in the reason, and the series' decoded
size is checked against the per-scan ceiling from the headers alone, before pixel data is read.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from pipeline.ingest.limits import check_ceiling

__all__ = ["SliceHeader", "read_slice_header", "check_series_size", "check_pixel_data"]

HEADER_TAGS = ["SeriesInstanceUID", "StudyInstanceUID", "PatientID", "Modality", "ImagePositionPatient",
               "ImageOrientationPatient", "InstanceNumber", "Rows", "Columns", "NumberOfFrames", "PixelSpacing",
               "RescaleSlope", "RescaleIntercept", "BitsAllocated", "SamplesPerPixel", "PixelData"]
_DEFER = 4096  # values longer than this (the pixel data) are not read, only their length
_MIN_DIRECTION = 1e-3  # a row/column direction shorter than this (or a normal, when crossed) is degenerate


@dataclass(frozen=True)
class SliceHeader:
    """What one DICOM file's header says about its voxels, after the checks."""

    name: str
    is_image: bool
    """False for a file without Rows (a structured report or other non-image object in the series)."""
    rows: int = 0
    columns: int = 0
    frames: int = 1
    samples: int = 1
    bits_allocated: int = 16
    decoded_bytes: int = 2
    """Bytes per voxel of the image GDCM hands out: the stored size, or more once rescaled."""
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, ...] | None = None
    pixel_data_length: int | None = None
    """The PixelData element's declared length; None when absent or of undefined length (encapsulated)."""
    compressed: bool = False

    @property
    def stored_bytes(self) -> int:
        """Bytes the uncompressed PixelData must hold for Rows x Columns x frames x samples."""
        return (self.rows * self.columns * self.frames * self.samples * self.bits_allocated + 7) // 8

    @property
    def normal_position(self) -> float:
        """Position along the slice normal (mm): what slices are ordered and spaced by."""
        o, p = self.orientation, self.position
        assert o is not None and p is not None
        n = (o[1] * o[5] - o[2] * o[4], o[2] * o[3] - o[0] * o[5], o[0] * o[4] - o[1] * o[3])
        return sum(a * b for a, b in zip(n, p))


def _field(ds: pydicom.Dataset, keyword: str) -> tuple[str, str] | None:
    """(`Keyword (gggg,eeee)`, raw value text) of a text element, None when absent or empty.

    The raw text, not pydicom's conversion: the reason must quote what the file says, and
    a value pydicom cannot convert must be reported, not raised from deep inside it."""
    tag = Tag(keyword)
    if tag not in ds:
        return None
    elem = ds.get_item(tag)
    value = elem.value
    if isinstance(elem, RawDataElement):
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else str(value or "")
    elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = "" if value is None else str(value)
    text = text.strip(" \x00")
    if not text:
        return None
    return f"{keyword} ({tag.group:04X},{tag.element:04X})", text


def _numbers(name: str, ds: pydicom.Dataset, keyword: str, count: int) -> list[float] | None:
    """The finite decimal numbers of a DS element (None when absent), or a reason naming it."""
    found = _field(ds, keyword)
    if found is None:
        return None
    label, text = found
    parts = [p.strip() for p in text.split("\\")]
    if len(parts) != count:
        raise ValueError(f"{name}: {label} '{text}' has {len(parts)} values, expected {count}")
    values = []
    for p in parts:
        try:
            v = float(p)
        except ValueError:
            which = "is" if count == 1 else f"has a value {p!r} that is"
            raise ValueError(f"{name}: {label} '{text}' {which} not a number") from None
        if not math.isfinite(v):
            which = "is" if count == 1 else f"has a value {p!r} that is"
            raise ValueError(f"{name}: {label} '{text}' {which} not finite")
        values.append(v)
    return values


def _integer(name: str, ds: pydicom.Dataset, keyword: str, default: int) -> int:
    tag = Tag(keyword)
    if tag not in ds:
        return default
    try:
        value = ds[tag].value
        if value in (None, ""):
            return default
        return int(str(value).strip())
    except Exception:  # pydicom raises several types on a malformed value
        found = _field(ds, keyword)
        label, text = found if found else (keyword, "")
        raise ValueError(f"{name}: {label} '{text}' is not an integer") from None


def _check_orientation(name: str, ds: pydicom.Dataset, iop: list[float]) -> None:
    row, col = iop[:3], iop[3:]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2], row[0] * col[1] - row[1] * col[0])
    if min(math.hypot(*row), math.hypot(*col), math.hypot(*normal)) < _MIN_DIRECTION:
        label, text = _field(ds, "ImageOrientationPatient")  # type: ignore[misc]
        raise ValueError(f"{name}: {label} '{text}' is not two independent directions (row and column vectors "
                         f"zero or parallel), so the slices have no normal to be ordered along")


def read_slice_header(path: str, name: str | None = None) -> SliceHeader:
    """Parse and check one DICOM file's header (its pixel data is not read, only its length).

    Raises ValueError naming the file (`name`, e.g. its archive member; else its file name),
    the tag and its value for a number that is not finite, a spacing that is not positive, an
    orientation with no normal, a size of zero.
    """
    name = name or os.path.basename(path)
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER, specific_tags=HEADER_TAGS)
    except Exception as exc:  # pydicom raises many types on damaged input
        raise ValueError(f"cannot read the DICOM header of {name}: {exc}") from None
    if Tag("Rows") not in ds:
        return SliceHeader(name=name, is_image=False)
    rows, columns = _integer(name, ds, "Rows", 0), _integer(name, ds, "Columns", 0)
    frames = _integer(name, ds, "NumberOfFrames", 1)
    samples, bits = _integer(name, ds, "SamplesPerPixel", 1), _integer(name, ds, "BitsAllocated", 16)
    for keyword, value in (("Rows", rows), ("Columns", columns), ("NumberOfFrames", frames),
                           ("SamplesPerPixel", samples), ("BitsAllocated", bits)):
        if value < 1:
            tag = Tag(keyword)
            raise ValueError(f"{name}: {keyword} ({tag.group:04X},{tag.element:04X}) is {value}, must be at least 1")
    spacing = _numbers(name, ds, "PixelSpacing", 2)
    if spacing is not None and min(spacing) <= 0:
        label, text = _field(ds, "PixelSpacing")  # type: ignore[misc]
        raise ValueError(f"{name}: {label} '{text}' must be two positive numbers (mm between rows, columns)")
    position = _numbers(name, ds, "ImagePositionPatient", 3)
    orientation = _numbers(name, ds, "ImageOrientationPatient", 6)
    if orientation is not None:
        _check_orientation(name, ds, orientation)
    slope = _numbers(name, ds, "RescaleSlope", 1)
    intercept = _numbers(name, ds, "RescaleIntercept", 1)
    stored = samples * max(1, (bits + 7) // 8)
    s, i = (slope or [1.0])[0], (intercept or [0.0])[0]
    if (s, i) == (1.0, 0.0):
        decoded = stored
    elif s.is_integer() and i.is_integer():
        decoded = max(stored, 4)  # GDCM widens to the integer type that holds the rescaled range
    else:
        decoded = max(stored, 8)  # non-integral rescale: float64
    pixel_length = None
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if Tag("PixelData") in ds:
        elem = ds.get_item(Tag("PixelData"))
        if isinstance(elem, RawDataElement):  # raw: its declared length, cut to the bytes the file holds
            deflated = bool(syntax is not None and syntax.is_deflated)  # positions are in the inflated stream
            pixel_length = None if elem.length == 0xFFFFFFFF else _held_length(path, elem, deflated)
        else:  # already decoded by pydicom (small values, some transfer syntaxes)
            pixel_length = len(elem.value) if isinstance(elem.value, (bytes, bytearray)) else None
    return SliceHeader(
        name=name, is_image=True, rows=rows, columns=columns, frames=frames, samples=samples, bits_allocated=bits,
        decoded_bytes=decoded, position=tuple(position) if position else None,  # type: ignore[arg-type]
        orientation=tuple(orientation) if orientation else None, pixel_data_length=pixel_length,
        compressed=bool(syntax is not None and syntax.is_compressed))


def _held_length(path: str, elem: RawDataElement, deflated: bool) -> int:
    """The bytes a raw element's value really has: pydicom keeps the declared length even when the
    file ends sooner (a short value is read, and then shorter; a deferred one is only a position)."""
    if elem.value is not None:
        return min(int(elem.length), len(elem.value))
    if deflated:
        return int(elem.length)
    try:
        left = os.path.getsize(path) - int(elem.value_tell)
    except (OSError, TypeError):
        return int(elem.length)
    return max(0, min(int(elem.length), left))


def check_series_size(slices: list[SliceHeader], max_scan_bytes: int) -> None:
    """Refuse a series whose decoded voxels would pass the per-scan ceiling, from the headers alone.

    GDCM allocates the first slice's Rows x Columns for every slice, so the largest slice
    times the number of slices is what the series may cost."""
    biggest = max(slices, key=lambda h: h.rows * h.columns * h.frames)
    per_voxel = max(h.decoded_bytes for h in slices)
    count = len(slices)
    if biggest.frames > 1:
        what = (f"multi-frame {biggest.name} of {biggest.frames} frames of {biggest.rows}x{biggest.columns} voxels "
                f"(NumberOfFrames x Rows x Columns) at {per_voxel} bytes per decoded voxel")
    else:
        what = (f"series of {count} slice{'s' if count != 1 else ''} of {biggest.rows}x{biggest.columns} voxels "
                f"(Rows x Columns of {biggest.name}) at {per_voxel} bytes per decoded voxel")
    check_ceiling(what, count * biggest.rows * biggest.columns * biggest.frames * per_voxel, max_scan_bytes)


def check_pixel_data(header: SliceHeader) -> None:
    """Refuse uncompressed PixelData whose length is not what its header's numbers need.

    Shorter, GDCM reads zeros for the rest; longer, it reads the first bytes and drops the rest,
    so Rows, Columns, frames, samples or bits disagree with the voxels actually stored (a
    half-size Rows reads half the slice as the whole). DICOM pads an odd length with one byte,
    so that one extra byte is allowed."""
    if header.compressed or header.pixel_data_length is None:
        return
    need = header.stored_bytes
    length = header.pixel_data_length
    if length != need and not (need % 2 and length == need + 1):
        frames = f"x{header.frames} frames" if header.frames > 1 else ""
        padded = f" (or {need + 1}, padded to an even length)" if need % 2 else ""
        raise ValueError(f"{header.name}: PixelData (7FE0,0010) holds {length} bytes, but "
                         f"Rows x Columns{' x NumberOfFrames' if frames else ''} ({header.rows}x{header.columns}"
                         f"{frames}, {header.samples} sample(s) of {header.bits_allocated} bits) need {need}{padded}")
