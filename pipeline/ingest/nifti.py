"""NIfTI checks that ITK does not make: ITK's NIfTI reader turns NaN/inf into 0 without a word.

A volume with NaN holes is damaged data; storing zeros in their place would hide that, so for
floating-point NIfTI files the raw voxels are scanned for non-finite values first.
"""

from __future__ import annotations

import gzip
import struct

import numpy as np

__all__ = ["nifti_nonfinite_count"]

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
