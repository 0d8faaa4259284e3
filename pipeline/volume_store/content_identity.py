"""Whether two sources of the same name hold the same scan, comparable across folders and zips.

A LUNA16 series may be given twice, as `subset0/<uid>.mhd` and inside `subset0.zip`; that is
one scan, stored once. The source checksums cannot tell (a zip's is computed from its members'
CRCs, a folder's from the bytes), so the identity compared here is the one both can give
cheaply: for every file of the scan (detached data files included, label maps not), its base
name, size and CRC32 - straight from the zip's directory for members (no decompression), by
reading the bytes for files on disk. The quick form (names and sizes, a stat) is compared first;
the CRCs are computed only for sources that agree on it, so differing sources cost nothing.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import zipfile
import zlib

from pipeline.ingest import ScanSource

__all__ = ["content_identity"]

_BLOCK = 1 << 22


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return crc


def _zip_members(zf: zipfile.ZipFile, files: tuple[str, ...]) -> list[zipfile.ZipInfo]:
    infos = []
    for name in files:
        infos.append(zf.getinfo(name))
        if name.lower().endswith(".mhd"):  # the data file travels beside its header
            for ext in (".raw", ".zraw"):
                try:
                    infos.append(zf.getinfo(name[:-4] + ext))
                except KeyError:
                    pass
    return infos


def content_identity(source: ScanSource, quick: bool = False) -> tuple | None:
    """Sorted (base name, size[, CRC32]) of the scan's files; None when they cannot be read (then the
    source is never taken for a copy of another)."""
    if source.problem:
        return None
    try:
        if source.archive:
            with zipfile.ZipFile(source.archive) as zf:
                rows = [(posixpath.basename(i.filename), i.file_size) + (() if quick else (i.CRC,))
                        for i in _zip_members(zf, source.files)]
        else:
            from pipeline.ingest.read import source_files

            files = source_files(dataclasses.replace(source, labels=()))
            rows = [(os.path.basename(f), os.path.getsize(f)) + (() if quick else (_crc32(f),)) for f in files]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return tuple(sorted(rows)) if rows else None
