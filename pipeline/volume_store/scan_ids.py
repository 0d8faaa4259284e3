"""Scan ids: one folder name per source, unique, stable across reruns, whatever the file is called.

Discovery names a scan after its file stem (or DICOM SeriesInstanceUID); that name can be
anything the filesystem allows, including bytes that are not UTF-8 (Python hands them over as
lone surrogates). Ids become folder and record names, so they are sanitised - and sanitising is
where two sources can meet (`my scan` and `my_scan`). The rules:

- a source's identity (`source_key`) is a hash of the exact bytes of its path and discovered
  name; the store records it, so a source keeps the id it was given on every rerun;
- a name that sanitising leaves alone is used as it is; a name it changed (or shortened), or
  one that meets another source's different name case-insensitively, gets `-<8 hex of the
  source_key>` appended, so two sources never share an id;
- two readable sources with *exactly* the same name are the same scan twice (a LUNA16 uid in
  `subset0/` and in `subset0.zip`): the first keeps the id, the other becomes a failed row
  saying where the id comes from - as it always did;
- an id already in the store stays with its source while that source still exists; a source
  whose recorded path is gone (a moved data folder) hands its id to the source of the same name;
- unreadable files (`problem` set) own no folder: their rows keep the readable name and get a
  record key of their own when the name is taken.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass

from pipeline.ingest import ScanSource

__all__ = ["Assigned", "Known", "assign_scan_ids", "safe_scan_id", "source_key", "printable"]

MAX_ID = 120
"""Longest id kept readable (folder and record names stay far under the 255-byte limit)."""


def printable(text: str) -> str:
    """`text` as valid UTF-8 for tables and terminals: undecodable file-name bytes as `\\xNN`."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def safe_scan_id(scan_id: str) -> str:
    """Scan ids become folder names: keep them to characters every filesystem accepts."""
    out = "".join(c if (c.isalnum() and c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF) or c in "._-" else "_"
                  for c in scan_id).strip(".")
    return out or "scan"


def _fsbytes(text: str) -> bytes:
    try:
        return os.fsencode(text)
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def source_key(source: ScanSource) -> str:
    """The identity of a source: hash of its exact path bytes and discovered name (16 hex)."""
    return hashlib.sha256(_fsbytes(source.source_path) + b"\0" + _fsbytes(source.scan_id)).hexdigest()[:16]


@dataclass(frozen=True)
class Known:
    """What the store already holds for one id: whose it is and whether that source still exists."""

    scan_id: str
    source_key: str
    source_path: str
    ok: bool


@dataclass(frozen=True)
class Assigned:
    source: ScanSource
    """The source with `scan_id` replaced by its id in the store."""
    key: str
    """Its record key (`.records/<key>.json`): the scan id, or a suffixed key for rows that own no folder."""
    source_key: str
    discovered_id: str
    duplicate_of: str | None = None
    """Set for a second readable source of exactly the same name: the path that owns the id."""


def _exists(path: str) -> bool:
    if os.path.exists(path):
        return True
    head = path
    while "!" in head:  # zip members: archive!member
        head = head.rsplit("!", 1)[0]
        if os.path.exists(head):
            return True
    return False


def _base(name: str) -> tuple[str, bool]:
    base = safe_scan_id(name)
    changed = base != name
    if len(base) > MAX_ID:
        base, changed = base[:MAX_ID].rstrip("._-") or "scan", True
    return base, changed


def assign_scan_ids(sources: list[ScanSource], known: dict[str, Known]) -> list[Assigned]:
    """Ids for `sources` (in priority order: earlier ones keep a contested plain name) given what the
    store holds (`known`: source_key -> Known, from its records); see the module docstring."""
    keys = [source_key(s) for s in sources]
    owners: dict[str, Known] = {}  # casefolded id -> the store's ok scan holding it
    for k in known.values():
        if k.ok:
            owners.setdefault(k.scan_id.casefold(), k)
    readable = [i for i, s in enumerate(sources) if not s.problem]
    present = {keys[i] for i in readable}
    claimed: dict[str, int] = {}  # casefolded id -> index of the source of this run holding it
    ids: dict[int, str] = {}
    dup: dict[int, str] = {}
    # 1. sources the store already knows keep their id
    for i in readable:
        k = known.get(keys[i])
        if k and k.scan_id == safe_scan_id(k.scan_id) and k.scan_id.casefold() not in claimed:
            ids[i] = k.scan_id
            claimed[k.scan_id.casefold()] = i
    # 2. the others, in the caller's order
    for i in readable:
        if i in ids:
            continue
        src, key = sources[i], keys[i]
        base, changed = _base(src.scan_id)
        candidate = f"{base}-{key[:8]}" if changed else base
        other = claimed.get(candidate.casefold())
        owner = owners.get(candidate.casefold())
        if owner is not None and (owner.source_key == key or owner.source_key in present
                                  or not _exists(owner.source_path)):
            owner = None  # ours, or its source is in this run (then `claimed` decides), or gone
        if other is not None or owner is not None:
            same_name = (sources[other].scan_id == src.scan_id) if other is not None else (
                owner.scan_id == src.scan_id)
            if same_name and not changed:
                dup[i] = sources[other].source_path if other is not None else owner.source_path
                ids[i] = candidate
                continue
            candidate = f"{base}-{key[:8]}"
            if candidate.casefold() in claimed:
                candidate = f"{base}-{key}"
        ids[i] = candidate
        claimed[candidate.casefold()] = i
    out: list[Assigned] = []
    used_keys = {v for i, v in ids.items() if i not in dup}
    used_keys_cf = {v.casefold() for v in used_keys}
    for i, src in enumerate(sources):
        key = keys[i]
        if i in ids and i not in dup:
            out.append(Assigned(dataclasses.replace(src, scan_id=ids[i]), ids[i], key, src.scan_id))
            continue
        base, changed = _base(src.scan_id)
        shown = ids.get(i) or (f"{base}-{key[:8]}" if changed else base)
        record = shown
        owner = owners.get(shown.casefold())
        if (shown.casefold() in used_keys_cf or i in dup
                or (owner is not None and owner.source_key != key)):
            record = f"{shown}~{key[:8]}"
        used_keys_cf.add(record.casefold())
        out.append(Assigned(dataclasses.replace(src, scan_id=shown), record, key, src.scan_id, dup.get(i)))
    return out
