"""NIfTI checks that ITK does not make: ITK's NIfTI reader turns NaN/inf into 0 without a word.

A volume with NaN holes is damaged data; storing zeros in their place would hide that, so for
floating-point NIfTI files the raw voxels are scanned for non-finite values first. The header's
numbers are checked before any voxel is read: sizes (a .nii.gz of a few KB can declare
terabytes), spacing and origin (named with their field and value when zero, negative or not
finite).

Where the voxels start is checked too, because ITK does not: a `vox_offset` inside the header
(0), past the file's end (1e12) or negative reads the header's own bytes, or zeros, as voxels,
and a file shorter than its header's offset plus voxel bytes reads as zeros at the end. So a
single-file NIfTI must say `n+1`/`n+2` (never "my voxels are in another file"), its offset must
lie past the header and its 4 extension bytes and past every extension it flags, and the file
(decompressed, for .nii.gz; read through, at most `max_scan_bytes` beyond the offset) must
hold the offset plus the voxel bytes. A .hdr/.img pair is held to the same rule on its .img.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from pipeline.ingest.limits import LimitError, check_ceiling, human_bytes

__all__ = ["nifti_nonfinite_count", "check_nifti_header"]

_FLOAT_TYPES = {16: "f4", 64: "f8"}
_CHUNK = 1 << 20
_EXTENSION_BYTES = 4  # the extension flag after the header of a single-file NIfTI


def nifti_nonfinite_count(path: str) -> int:
    """Number of NaN/inf voxels in a float NIfTI-1/2 file (0 for integer data or unknown layouts)."""
    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as fh:
        head = fh.read(540)
        if len(head) < 348:
            return 0
        for endian in "<>":
            size = struct.unpack(endian + "i", head[:4])[0]
            if size == 348:
                dims = struct.unpack(endian + "8h", head[40:56])
                datatype = struct.unpack(endian + "h", head[70:72])[0]
                offset = int(struct.unpack(endian + "f", head[108:112])[0])
                break
            if size == 540:
                datatype = struct.unpack(endian + "h", head[12:14])[0]
                dims = struct.unpack(endian + "8q", head[16:80])
                offset = struct.unpack(endian + "q", head[168:176])[0]
                break
        else:
            return 0
        if datatype not in _FLOAT_TYPES:
            return 0
        n = int(np.prod([max(1, d) for d in dims[1:dims[0] + 1]])) if 0 < dims[0] <= 7 else 0
        fh.seek(offset)
        data = np.frombuffer(fh.read(n * int(_FLOAT_TYPES[datatype][1])), dtype=endian + _FLOAT_TYPES[datatype])
    return int(data.size - np.count_nonzero(np.isfinite(data)))


def check_nifti_header(path: str, max_scan_bytes: int) -> int:
    """Validate a NIfTI-1/2 header's sizes, spacing and placement; return the voxel bytes it declares."""
    name = os.path.basename(path)
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            head = fh.read(540 + _EXTENSION_BYTES)
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read {name}: {exc}") from None
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            hdr_size, magic, vox_offset = 348, head[344:348], struct.unpack(endian + "f", head[108:112])[0]
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            pixdim = struct.unpack(endian + "8f", head[76:108])
            qform, sform = struct.unpack(endian + "2h", head[252:256])
            qoffset = struct.unpack(endian + "3f", head[268:280])
            srows = struct.unpack(endian + "12f", head[280:328])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            hdr_size, magic, vox_offset = 540, head[4:12], struct.unpack(endian + "q", head[168:176])[0]
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dims = struct.unpack(endian + "8q", head[16:80])
            pixdim = struct.unpack(endian + "8d", head[104:168])
            qform, sform = struct.unpack(endian + "2i", head[344:352])
            qoffset = struct.unpack(endian + "3d", head[376:400])
            srows = struct.unpack(endian + "12d", head[400:496])
            break
    else:
        return 0  # not a NIfTI header this code knows: ITK's reader gives the reason
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise ValueError(f"{name}: dim[0] (number of dimensions) is {ndim}, expected 1..7")
    for i in range(1, ndim + 1):
        if dims[i] < 1:
            raise ValueError(f"{name}: dim[{i}] (size) is {dims[i]}, must be positive")
    if bitpix < 1 or bitpix % 8:
        raise ValueError(f"{name}: bitpix is {bitpix}, not a whole number of bytes")
    check_ceiling(f"{name} ({'x'.join(str(d) for d in dims[1:ndim + 1])}, {bitpix} bits)",
                  math.prod(dims[1:ndim + 1]) * (bitpix // 8), max_scan_bytes)
    for i in range(1, min(ndim, 3) + 1):
        if not (math.isfinite(pixdim[i]) and pixdim[i] > 0):
            raise ValueError(f"{name}: pixdim[{i}] (spacing) is {pixdim[i]:g}, must be a positive finite number")
    if qform > 0 and not all(math.isfinite(v) for v in qoffset):
        raise ValueError(f"{name}: qoffset (origin) {tuple(float(v) for v in qoffset)} is not finite")
    if sform > 0 and not all(math.isfinite(v) for v in srows):
        raise ValueError(f"{name}: srow_x/y/z (sform) {tuple(float(v) for v in srows)} is not finite")
    data_bytes = math.prod(dims[1:ndim + 1]) * (bitpix // 8)
    _check_layout(path, head, endian, hdr_size, magic, vox_offset, data_bytes, max_scan_bytes)
    return data_bytes


def _shown(value: float) -> str:
    """A header number as the reason quotes it: 352, -1000000, 1e+12 (never 300 digits)."""
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer() and abs(value) < 1e15):
        return str(int(value))
    return f"{value:g}"


def _check_layout(path: str, head: bytes, endian: str, hdr_size: int, magic: bytes, vox_offset: float,
                  data_bytes: int, max_scan_bytes: int) -> None:
    """Refuse a header whose `vox_offset` does not point at `data_bytes` voxel bytes the file holds."""
    name = os.path.basename(path)
    low = path.lower()
    version = b"1" if hdr_size == 348 else b"2"
    tail = b"\0" if version == b"1" else b"\0\r\n\x1a\n"  # the whole magic: "n+1x" is an Analyze header to ITK
    magic = bytes(magic)
    if low.endswith((".hdr", ".hdr.gz")):
        if magic != b"ni" + version + tail:
            raise ValueError(f"{name}: magic {magic.rstrip(bytes(1))!r} is not a NIfTI .hdr/.img pair's "
                             f"({('ni' + version.decode())!r})")
        data_path, first, ext_flag = _img_path(path, name), 0, 0
    elif magic == b"n+" + version + tail:
        data_path, first = path, hdr_size + _EXTENSION_BYTES
        ext_flag = head[hdr_size] if len(head) > hdr_size else 0
    elif magic == b"ni" + version + tail:
        raise ValueError(f"{name}: magic {magic.rstrip(bytes(1))!r} says the voxels are in a separate .img file, "
                         f"but a single-file NIfTI holds its own (magic 'n+{version.decode()}')")
    else:
        raise ValueError(f"{name}: magic {magic.rstrip(bytes(1))!r} is not NIfTI's ('n+{version.decode()}')")
    if not math.isfinite(vox_offset):
        raise ValueError(f"{name}: vox_offset {vox_offset} is not a byte offset")
    offset = int(vox_offset)  # what niftilib does with a fractional offset
    shown = _shown(vox_offset)
    if offset < first:
        if offset < 0:
            where = "is negative"
        elif offset < hdr_size:
            where = f"is inside the {hdr_size}-byte header"
        else:
            where = f"is inside the {_EXTENSION_BYTES} extension bytes after the {hdr_size}-byte header"
        raise ValueError(f"{name}: vox_offset {shown} {where} (at least {first} for a .nii)" if first else
                         f"{name}: vox_offset {shown} is negative (the voxels' byte offset in "
                         f"{os.path.basename(data_path)})")
    need = offset + data_bytes
    data_name = os.path.basename(data_path)
    in_file = "" if data_path == path else f" of {data_name}"
    try:
        if not data_path.lower().endswith(".gz"):
            size = os.path.getsize(data_path)
            if size < need:
                raise ValueError(f"{name}: vox_offset {shown} and {data_bytes} voxel bytes need {need} bytes, but "
                                 f"{data_name} holds {size}")
            if ext_flag:
                with open(data_path, "rb") as fh:
                    _check_extensions(fh, name, endian, first, offset)
            return
        with gzip.open(data_path, "rb") as fh:
            cap = data_bytes + max(max_scan_bytes, first)  # a gzip bomb is read no further than a scan may be
            reached = _read_to(fh, min(need, cap))
            if reached < min(need, cap):
                raise ValueError(f"{name}: vox_offset {shown} and {data_bytes} voxel bytes need {need} bytes, but "
                                 f"{data_name} holds {reached} once decompressed")
            if need > cap:
                raise LimitError(f"{name}: vox_offset {shown}{in_file} puts the voxels {human_bytes(offset)} into "
                                 f"the decompressed file, beyond the per-scan limit of {max_scan_bytes} bytes "
                                 f"({human_bytes(max_scan_bytes)}; --max-scan-bytes)")
            if ext_flag:  # the offset is inside the file now, so the walk reads no further than it
                _check_extensions(fh, name, endian, first, offset)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"cannot read {data_name}: {exc}") from None


def _img_path(path: str, name: str) -> str:
    """The .img (or .img.gz) beside a .hdr, as niftilib looks for it."""
    stem = path[:-7] if path.lower().endswith(".hdr.gz") else path[:-4]
    for ext in (".img", ".img.gz", ".IMG", ".IMG.GZ"):
        if os.path.isfile(stem + ext):
            return stem + ext
    raise ValueError(f"data file {os.path.basename(stem)}.img named by {name} is missing")


def _check_extensions(fh, name: str, endian: str, first: int, offset: int) -> None:
    """The flagged extensions (esize, ecode, data; esize a positive multiple of 16) must end at or
    before vox_offset: one that runs past it means the voxels start inside it."""
    pos = first
    fh.seek(first)
    while offset - pos >= 16:  # niftilib reads extensions while 16 bytes remain before the voxels
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError(f"{name}: extension at byte {pos} is cut off by the end of the file")
        esize = struct.unpack(endian + "i", raw[:4])[0]
        if esize < 16 or esize % 16:
            raise ValueError(f"{name}: extension at byte {pos} has esize {esize}, not a positive multiple of 16")
        if pos + esize > offset:
            raise ValueError(f"{name}: extension at byte {pos} (esize {esize}) runs to byte {pos + esize}, past "
                             f"vox_offset {offset} where the voxels start")
        pos += esize
        fh.seek(pos)


def _read_to(fh, n: int) -> int:
    """Read (and drop) up to `n` bytes; the number the file actually had."""
    got = fh.tell()
    while got < n:
        chunk = fh.read(min(_CHUNK, n - got))
        if not chunk:
            break
        got += len(chunk)
    return got
