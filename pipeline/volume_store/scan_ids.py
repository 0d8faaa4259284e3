"""Scan ids: one folder name per source, unique, stable across reruns, whatever the file is called.

Discovery names a scan after its file stem (or DICOM SeriesInstanceUID); that name can be
anything the filesystem allows, including bytes that are not UTF-8 (Python hands them over as
lone surrogates), and several sources can share it (`p1/CT.nii.gz` and `p2/CT.nii.gz`,
`s.nii` beside `s.mhd`). Ids become folder and record names, so the rules are:

- a source is known by its canonical path (`canonical_source`: absolute, the folders' symlinks
  resolved, the file's own name kept, bytes kept exactly), so `src`, `$PWD/src/` and
  `../x/src` from another folder are one source; its identity (`source_key`) is a hash of
  those path bytes and the discovered name, recorded in the store with the id it was given;
- a source the store already knows keeps its id on every rerun (and a source whose recorded
  path is gone - a moved data folder - hands its id to the one source of the same name found
  now, whose checksum the task then compares);
- every other source gets its sanitised name when that name is unchanged by sanitising and
  no other source of the run or the store would get the same id (compared case-insensitively);
  otherwise `-<8 hex of its source_key>` is appended - to *every* source of a colliding group,
  so the result depends on the set of sources, never on the order they were found in;
- two readable sources of exactly the same name *and* the same content (name, size and CRC32
  of every file, `content_identity`; e.g. one LUNA16 series as a folder and as a zip) are one
  scan stored once: the other gets a suffixed id of its own and a failed row naming both paths;
- unreadable sources (`problem` set) take part like any other: every record key is its id, so
  the catalog has one row per id.

The discovered name stays in each record and the catalog (`discovered_id`): it is what dataset
tables join on (LUNA16's seriesuid), whatever suffix the id carries.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.ingest import ScanSource

__all__ = ["Assigned", "Known", "assign_scan_ids", "safe_scan_id", "source_key", "printable", "canonical_path",
           "canonical_source", "source_exists"]

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


def canonical_path(path: str) -> str:
    """`path` made absolute with the symlinks of its folders resolved; the last name is kept as it is
    (a symlinked file inside a source tree stays its own source). Works on any bytes (surrogates)."""
    if not path:
        return path
    full = os.path.abspath(path)
    head, tail = os.path.split(full)
    if not tail:
        return os.path.realpath(full)
    return os.path.join(os.path.realpath(head), tail)


def canonical_source(source: ScanSource) -> ScanSource:
    """The source with canonical paths everywhere (files, labels, archive, source_path), so that its
    identity and its record do not depend on how the path was spelled or where convert ran."""
    labels = tuple((name, canonical_path(p)) for name, p in source.labels)
    if source.archive:
        archive = canonical_path(source.archive)
        path = source.source_path
        if path == source.archive:
            path = archive
        elif path.startswith(source.archive + "!"):
            path = archive + path[len(source.archive):]
        else:
            path = canonical_path(path)
        return dataclasses.replace(source, archive=archive, source_path=path, labels=labels)
    return dataclasses.replace(source, files=tuple(canonical_path(f) for f in source.files), labels=labels,
                               source_path=canonical_path(source.source_path))


def _digest(source: ScanSource) -> str:
    return hashlib.sha256(_fsbytes(source.source_path) + b"\0" + _fsbytes(source.scan_id)).hexdigest()


def source_key(source: ScanSource) -> str:
    """The identity of a (canonical) source: hash of its exact path bytes and discovered name (16 hex)."""
    return _digest(source)[:16]


def source_exists(source_path: str, archive: str | None = None) -> bool:
    """Whether a recorded source is still there (for zip members: its archive)."""
    if archive:
        return os.path.exists(archive)
    if os.path.lexists(source_path):
        return True
    head = source_path
    while "!" in head:  # zip members: archive!member (older records without the archive field)
        head = head.rsplit("!", 1)[0]
        if os.path.exists(head):
            return True
    return False


@dataclass(frozen=True)
class Known:
    """What the store already holds for one source: its id, and whether that source still exists."""

    scan_id: str
    source_key: str
    source_path: str
    ok: bool
    discovered_id: str | None = None
    exists: bool = True
    source: ScanSource | None = None
    """The recorded source (canonical), to compare contents with; None for records that lack it."""


@dataclass(frozen=True)
class Assigned:
    source: ScanSource
    """The source with `scan_id` replaced by its id in the store."""
    key: str
    """Its record key (`.records/<key>.json`): always the scan id."""
    source_key: str
    discovered_id: str
    duplicate_of: str | None = None
    """Set for a source with the same name and content as another: '<that path> (scan <its id>)'."""


def _base(name: str) -> tuple[str, bool]:
    base = safe_scan_id(name)
    changed = base != name
    if len(base) > MAX_ID:
        base, changed = base[:MAX_ID].rstrip("._-") or "scan", True
    return base, changed


def _candidate(base: str, digest: str, level: int) -> str:
    """Level 0: the name; 1: + 8 hex of the source key; 2: + 16 hex; 3: + the whole sha256 (never collides)."""
    return base if level == 0 else f"{base}-{digest[:(8, 16, 64)[level - 1]]}"


def assign_scan_ids(sources: list[ScanSource], known: dict[str, Known],
                    content: Callable[[ScanSource, bool], object] | None = None) -> list[Assigned]:
    """Ids for (canonical) `sources`, given what the store holds (`known`: source_key -> Known); see the
    module docstring. `content(source, quick)` gives a comparable content identity or None (unknown), see
    `content_identity`; it is asked only about sources that share a name. A source listed twice (same
    path, same name) is assigned once. The result is sorted by source path and does not depend on the
    order of `sources`."""
    if content is None:
        from pipeline.volume_store.content_identity import content_identity as content
    unique: dict[str, ScanSource] = {}
    for s in sources:
        unique.setdefault(_digest(s), s)
    digests = sorted(unique, key=lambda d: (_fsbytes(unique[d].source_path), _fsbytes(unique[d].scan_id), d))
    srcs = [unique[d] for d in digests]
    keys = [d[:16] for d in digests]
    in_run = {k: i for i, k in enumerate(keys)}
    claimed: dict[str, str] = {}  # casefolded id -> who holds it (a source key)
    ids: dict[int, str] = {}

    # 1. ids the store already gave: sources of this run keep theirs; sources not in this run keep theirs
    #    reserved while they exist (or while nobody of this run takes over a vanished one)
    def claim(sid: str, owner: str) -> bool:
        if sid != safe_scan_id(sid) or sid.casefold() in claimed:
            return False
        claimed[sid.casefold()] = owner
        return True

    entries = sorted(known.values(), key=lambda k: (not k.ok, k.source_key not in in_run, _fsbytes(k.source_path),
                                                     k.source_key))
    for k in entries:
        if k.source_key in in_run:
            i = in_run[k.source_key]
            if i not in ids and claim(k.scan_id, k.source_key):
                ids[i] = k.scan_id
        elif k.exists:
            claim(k.scan_id, k.source_key)
    for k in entries:  # vanished sources: their id goes to the one new source of the same name, if any
        if k.source_key in in_run or k.exists or not k.ok or k.scan_id.casefold() in claimed:
            continue
        heirs = [i for i, s in enumerate(srcs) if i not in ids and keys[i] not in known and not s.problem
                 and s.scan_id == (k.discovered_id or k.scan_id)]
        if len(heirs) == 1 and claim(k.scan_id, keys[heirs[0]]):
            ids[heirs[0]] = k.scan_id
        else:
            claim(k.scan_id, k.source_key)

    # 2. same name and same content: stored once
    dup_of: dict[int, tuple[str, str | None, int | None]] = {}  # i -> (owner path, owner id, owner index)
    by_name: dict[str, list] = defaultdict(list)
    for i, s in enumerate(srcs):
        if not s.problem:
            by_name[s.scan_id].append(("run", i))
    for k in known.values():
        if k.ok and k.exists and k.source_key not in in_run and k.source is not None:
            by_name[k.discovered_id or k.scan_id].append(("store", k))
    def src_of(m) -> ScanSource:
        return srcs[m[1]] if m[0] == "run" else m[1].source

    def same_content(members: list) -> list[list]:
        """Groups of `members` with equal content: sizes first (a stat), CRCs only where those agree."""
        out = []
        for stage in (True, False):
            nxt = []
            for group in ([members] if stage else out):
                by: dict[object, list] = defaultdict(list)
                for m in group:
                    ident = content(src_of(m), stage)
                    if ident is not None:
                        by[ident].append(m)
                nxt += [g for g in by.values() if len(g) > 1 and any(m[0] == "run" for m in g)]
            out = nxt
        return out

    def settled(m) -> bool:  # stored before as a scan of its own, keeping its id: compared back then
        return m[0] == "store" or (m[1] in ids and known.get(keys[m[1]]) is not None and known[keys[m[1]]].ok)

    for name, members in by_name.items():
        if len(members) < 2 or all(settled(m) for m in members):  # reruns cost no reading
            continue
        for same in same_content(members):
            # the owner: whoever holds the plain name, a scan the store holds, one of this run with an id
            # already, else the one with the most labels, files before zip members, then the first path
            plain = _base(name)[0].casefold()

            def held(m) -> str | None:
                return m[1].scan_id if m[0] == "store" else ids.get(m[1])

            same.sort(key=lambda m: ((held(m) or "").casefold() != plain, m[0] != "store", held(m) is None,
                                     -len(src_of(m).labels), src_of(m).archive is not None,
                                     _fsbytes(src_of(m).source_path)))
            owner = same[0]
            for m in same[1:]:
                if m[0] == "run" and m[1] not in dup_of:
                    if owner[0] == "store":
                        dup_of[m[1]] = (owner[1].source_path, owner[1].scan_id, None)
                    else:
                        dup_of[m[1]] = (srcs[owner[1]].source_path, None, owner[1])
                    if ids.get(m[1]) is not None and ids[m[1]].casefold() == _base(name)[0].casefold():
                        claimed.pop(ids.pop(m[1]).casefold(), None)  # a duplicate never holds the plain name

    # 3. everyone else: the plain name unless it collides; colliding names all get the suffix
    todo = [i for i in range(len(srcs)) if i not in ids]
    bases = {i: _base(srcs[i].scan_id) for i in todo}
    level = {i: 1 if bases[i][1] or i in dup_of else 0 for i in todo}
    while True:
        cand = {i: _candidate(bases[i][0], digests[i], level[i]) for i in todo}
        groups = defaultdict(list)
        for i in todo:
            groups[cand[i].casefold()].append(i)
        bumped = False
        for cf, members in groups.items():
            if len(members) > 1 or cf in claimed:
                for i in members:
                    if level[i] < 3:
                        level[i] += 1
                        bumped = True
        if not bumped:
            break
    for i in todo:
        ids[i] = cand[i]
        claimed.setdefault(cand[i].casefold(), keys[i])

    out: list[Assigned] = []
    for i, src in enumerate(srcs):
        dup = None
        if i in dup_of:
            path, owner_id, owner_i = dup_of[i]
            dup = f"{path} (scan {owner_id if owner_id is not None else ids[owner_i]})"
        out.append(Assigned(dataclasses.replace(src, scan_id=ids[i]), ids[i], keys[i], src.scan_id, dup))
    return out
