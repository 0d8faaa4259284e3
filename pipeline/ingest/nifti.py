"""NIfTI checks that ITK does not make: ITK's NIfTI reader turns NaN/inf into 0 without a word.

A volume with NaN holes is damaged data; storing zeros in their place would hide that, so for
floating-point NIfTI files the raw voxels are scanned for non-finite values first. The header's
numbers are checked before any voxel is read: sizes (a .nii.gz of a few KB can declare
terabytes), spacing and origin (named with their field and value when zero, negative or not
finite).
"""

from __future__ import annotations

import gzip
import math
import os
import struct

import numpy as np

from pipeline.ingest.limits import check_ceiling

__all__ = ["nifti_nonfinite_count", "check_nifti_header"]

_FLOAT_TYPES = {16: "f4", 64: "f8"}


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
            head = fh.read(540)
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read {name}: {exc}") from None
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            pixdim = struct.unpack(endian + "8f", head[76:108])
            qform, sform = struct.unpack(endian + "2h", head[252:256])
            qoffset = struct.unpack(endian + "3f", head[268:280])
            srows = struct.unpack(endian + "12f", head[280:328])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
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
    return math.prod(dims[1:ndim + 1]) * (bitpix // 8)
