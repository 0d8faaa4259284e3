"""Scans inside zips: a member (with the data files its header names) copied into a private folder.

Everything is decided before extraction from what the archive declares: the header is read
from the first bytes of its member, its data members are looked up and their declared sizes
checked against the header and the per-scan ceiling (`headers.zip_data_members`). The copy
then counts the bytes that really come out, so the temporary space one scan uses is bounded
by the ceiling whatever the archive claims, and the caller's TemporaryDirectory releases it.
"""

from __future__ import annotations

import os
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import PurePosixPath

from pipeline.ingest.headers import HEADER_READ_BYTES, header_format, parse_header_bytes, zip_data_members
from pipeline.ingest.limits import check_ceiling, copy_member

__all__ = ["safe_member", "extract_scan_member", "extract_members", "read_zip_scan"]


def safe_member(name: str) -> bool:
    """A zip member may be extracted only if its path stays inside the target folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not re.match(r"^[A-Za-z]:", name)


def _member(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    if not safe_member(name):
        raise ValueError(f"unsafe path in archive: {name!r}")
    try:
        return zf.getinfo(name)
    except KeyError:
        raise ValueError(f"member {name!r} is missing from {os.path.basename(zf.filename or '')}") from None


def extract_scan_member(zf: zipfile.ZipFile, member: str, tmp: str, max_scan_bytes: int) -> str:
    """Copy an image member (and, for a detached header, its data members) into `tmp`; return the
    local path of the image to read. The layout below the header's folder is kept, so the copied
    header names its data exactly as in the archive."""
    info = _member(zf, member)
    check_ceiling(f"member {member!r}", info.file_size, max_scan_bytes)
    local = os.path.join(tmp, PurePosixPath(member).name)
    fmt = header_format(member)
    data = []
    if fmt is not None:
        with zf.open(info) as fh:
            head = fh.read(HEADER_READ_BYTES)
        header = parse_header_bytes(head, PurePosixPath(member).name, fmt, info.file_size <= HEADER_READ_BYTES,
                                    max_scan_bytes)
        data = zip_data_members(zf, member, header, max_scan_bytes)
    try:
        copy_member(zf, info, local, info.file_size)
        for data_info, parts in data:
            target = os.path.join(tmp, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            copy_member(zf, data_info, target, data_info.file_size)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"damaged archive member in {os.path.basename(zf.filename or '')}: {exc}") from None
    return local


def extract_members(zf: zipfile.ZipFile, members: list[str], tmp: str, max_scan_bytes: int) -> list[str]:
    """Copy plain members (DICOM slices) as tmp/000000.dcm, ...; their declared sizes together must stay
    under the ceiling, and no copy may produce more than its member declared."""
    infos = [_member(zf, name) for name in members]
    check_ceiling(f"series of {len(infos)} archive members", sum(i.file_size for i in infos), max_scan_bytes)
    paths = []
    try:
        for i, info in enumerate(infos):
            target = os.path.join(tmp, f"{i:06d}.dcm")
            copy_member(zf, info, target, info.file_size)
            paths.append(target)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"damaged archive member in {os.path.basename(zf.filename or '')}: {exc}") from None
    return paths


def read_zip_scan(source, max_scan_bytes: int, read: Callable[[str, int], "object"], prefix: str) -> "object":
    """`read(path, max_scan_bytes)` of a zipped scan's member, extracted (size-checked) into a private temporary
    folder; the image owns its voxels once read, so the temporary copies go with the folder."""
    try:
        zf = zipfile.ZipFile(source.archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(f"not a readable zip archive {os.path.basename(str(source.archive))}: {exc}") from None
    with zf, tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        return read(extract_scan_member(zf, source.files[0], tmp, max_scan_bytes), max_scan_bytes)
