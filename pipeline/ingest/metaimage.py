"""MetaImage (.mhd + .raw), the LUNA16 format, with the header checked before SimpleITK reads it.

SimpleITK's own errors for a bad MetaImage are long ITK traces; checking the header first
turns the usual archive damage (a truncated .raw, a data file that is missing, a header that
is not MetaImage) into a one-line reason naming the file.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import PurePosixPath

import numpy as np
import SimpleITK as sitk

from pipeline.ingest.sources import ScanSource, safe_member

__all__ = ["parse_header", "check_metaimage", "read_metaimage_image", "data_file_of"]

_ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
                  "MET_LONG": 8, "MET_ULONG": 8, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
                  "MET_DOUBLE": 8}


def parse_header(path: str) -> dict[str, str]:
    """Key = value lines of a .mhd header, up to ElementDataFile (which ends the header)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536)
    except OSError as exc:
        raise ValueError(f"cannot read header {os.path.basename(path)}: {exc.strerror}") from exc
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"header {os.path.basename(path)} does not parse: not a text MetaImage header") from None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        if "=" not in line:
            raise ValueError(f"header {os.path.basename(path)} does not parse: line {line.strip()[:60]!r} has no '='")
        key, value = (s.strip() for s in line.split("=", 1))
        fields[key] = value
        if key == "ElementDataFile":
            break
    for key in ("NDims", "DimSize", "ElementType", "ElementDataFile"):
        if key not in fields:
            raise ValueError(f"header {os.path.basename(path)} does not parse: no {key} field")
    return fields


def data_file_of(header: dict[str, str]) -> str | None:
    """The data file a header names, or None when the data is inside the header file (LOCAL)."""
    name = header["ElementDataFile"]
    if name.upper() == "LOCAL":
        return None
    if name.upper().startswith("LIST") or "%" in name:
        raise ValueError(f"multi-file ElementDataFile {name!r} is not supported")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts:
        raise ValueError(f"ElementDataFile {name!r} points outside the scan's folder")
    return name


def check_metaimage(path: str) -> list[str]:
    """Validate header and data file size; return the files that make up the image."""
    header = parse_header(path)
    try:
        dims = [int(v) for v in header["DimSize"].split()]
        ndims = int(header["NDims"])
    except ValueError:
        raise ValueError(f"header {os.path.basename(path)} does not parse: bad NDims/DimSize") from None
    if len(dims) != ndims or ndims != 3:
        raise ValueError(f"header {os.path.basename(path)}: expected a 3-D image, NDims={ndims} DimSize={dims}")
    etype = header["ElementType"]
    if etype not in _ELEMENT_BYTES:
        raise ValueError(f"header {os.path.basename(path)}: unknown ElementType {etype!r}")
    data = data_file_of(header)
    if data is None:
        return [path]
    data_path = os.path.join(os.path.dirname(path), data)
    if not os.path.exists(data_path):
        raise ValueError(f"data file {data} named by {os.path.basename(path)} is missing")
    compressed = header.get("CompressedData", "False").lower() == "true"
    if not compressed:
        channels = int(header.get("ElementNumberOfChannels", "1"))
        need = int(np.prod(dims)) * channels * _ELEMENT_BYTES[etype]
        have = os.path.getsize(data_path)
        if have < need:
            raise ValueError(f"truncated data file {data}: {have} bytes, header {os.path.basename(path)} "
                             f"needs {need} ({'x'.join(map(str, dims))} {etype})")
    return [path, data_path]


def read_metaimage_image(source: ScanSource) -> sitk.Image:
    """Read a MetaImage from disk, or from a zip through a private temporary folder."""
    if source.archive is None:
        check_metaimage(source.files[0])
        return sitk.ReadImage(source.files[0])
    member = source.files[0]
    if not safe_member(member):
        raise ValueError(f"unsafe path in archive: {member!r}")
    with zipfile.ZipFile(source.archive) as zf, tempfile.TemporaryDirectory(prefix="genesis-mhd-") as tmp:
        local_header = os.path.join(tmp, PurePosixPath(member).name)
        with zf.open(member) as src, open(local_header, "wb") as dst:
            dst.write(src.read())
        data = data_file_of(parse_header(local_header))
        if data is not None:
            data_member = str(PurePosixPath(member).parent / data)
            try:
                info = zf.getinfo(data_member)
            except KeyError:
                raise ValueError(f"data file {data} named by {PurePosixPath(member).name} is missing "
                                 f"from {os.path.basename(source.archive)}") from None
            with zf.open(info) as src, open(os.path.join(tmp, data), "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
        check_metaimage(local_header)
        image = sitk.ReadImage(local_header)
        # Detach from the temporary file before it is removed.
        return image
