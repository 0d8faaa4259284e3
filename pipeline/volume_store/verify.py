"""`genesis stores verify STORE [--repair]`: every scan against its recorded manifest and the catalog.

The store may be on disk or in a bucket; every object is read once, through the store's Tree.

Per scan: `ok` (every file present with its recorded size and XXH3, nothing extra, every shard
passing its CRC32C checks), `damaged` (a file missing, changed or unexpected, or an unreadable
record), `missing` (the catalog lists it, its folder is gone). With `repair`, under the store's
writer lock: a damaged or missing scan whose source still has the recorded checksum is
reconverted from it (`repaired`); otherwise its folder is removed and its row marked failed
(`failed`), so nothing reads damaged data; then the catalog is rebuilt from the records.

In a bucket a scan's folder is the version its record names (scans/<id>@<8 hex>/); a repair writes a new
version beside the damaged one and commits it with the record, so a repair killed half-way leaves the scan as
it was (damaged, and named so by the next verify), never without a record. Folders no ok record names are
stray (`VolumeStore.unaccounted_folders`): reported, and removed by --repair.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import numpy as np

from pipeline.storage.objects import open_tree
from pipeline.volume_store.checked_store import _array_layout, chunk_key_parts, shard_problem
from pipeline.volume_store.digests import check_tree
from pipeline.volume_store.errors import StoreError
from pipeline.volume_store.scan_ids import canonical_source, printable, source_key
from pipeline.volume_store.store import VolumeStore, safe_scan_id

__all__ = ["ScanCheck", "verify_store"]


@dataclass
class ScanCheck:
    status: str
    """ok | damaged | missing | repaired | failed"""
    scan_id: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.status:<8}  {printable(self.scan_id)}  {printable(self.detail)}".rstrip()


def _layouts(store: VolumeStore, rel: str, files: dict[str, str] | None) -> dict[str, tuple[bool, bool, int]]:
    """array path -> its shard layout, from the scan's zarr.json objects (the manifest's, else every one)."""
    tree = store.tree
    metas = [name for name in (files or {}) if name.endswith("zarr.json")] if files else [
        o.path[len(rel) + 1:] for o in tree.list(rel) if o.path.endswith("zarr.json")]
    out = {}
    for name in sorted(metas):
        try:
            meta = json.loads(tree.read(f"{rel}/{name}"))
        except (OSError, ValueError):
            continue  # named by the digest check (or below, for records without a manifest)
        if isinstance(meta, dict) and meta.get("node_type") == "array":
            out[name[:-len("zarr.json")].rstrip("/")] = _array_layout(meta)
    return out


def _shard_check(layouts: dict[str, tuple[bool, bool, int]]):
    """`on_bytes(name, data)` for `check_tree`: the CRC32C checks of a shard object, naming array and shard."""
    def on_bytes(name: str, data: bytes) -> str | None:
        parts = chunk_key_parts(name)
        if parts is None or parts[0] not in layouts:
            return None
        problem = shard_problem(np.frombuffer(data, dtype=np.uint8), layouts[parts[0]])
        return f"array {parts[0] or '.'}: shard {parts[1]} {problem}" if problem else None
    return on_bytes


def _shards_problems(store: VolumeStore, rel: str) -> list[str]:
    """CRC32C checks of every shard, for records without a manifest (older versions)."""
    layouts = _layouts(store, rel, None)
    check = _shard_check(layouts)
    problems = []
    for o in store.tree.list(rel):
        name = o.path[len(rel) + 1:]
        problem = check(name, store.tree.read(o.path)) if chunk_key_parts(name) else None
        if problem:
            problems.append(problem)
    return problems


def check_scan(store: VolumeStore, record: dict) -> ScanCheck:
    """A committed scan against its record: every object there with its recorded size and XXH3, nothing
    extra, every shard passing its CRC32C checks (one read of each object, on disk or in a bucket)."""
    sid = record["scan_id"]
    rel = store.scan_rel(sid, record)
    present = (store.root / rel).is_dir() if store.is_local else bool(store.tree.listdir(rel))
    if not present:
        return ScanCheck("missing", sid, f"folder {rel} is missing")
    files = record.get("files")
    if files:
        problems = check_tree(store.tree, rel, files, full=True, on_bytes=_shard_check(_layouts(store, rel, files)))
    else:
        problems = _shards_problems(store, rel)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        return ScanCheck("damaged", sid, "; ".join(problems[:3]) + more)
    return ScanCheck("ok", sid, "" if files else "no recorded manifest (converted by an older version): "
                                              "checksums only")


def verify_store(root: str | os.PathLike, repair: bool = False, progress: bool = True,
                 out=None) -> tuple[list[ScanCheck], list[str]]:
    """Check (and with `repair`, mend) the store, printing one line per scan to `out` (stdout);
    returns the per-scan results and the store-level problems left."""
    out = out if out is not None else sys.stdout
    open_tree(root).check()  # StorageError (exit 2): a bucket that cannot be reached
    store = VolumeStore(root)  # StoreError for a path that is not a store
    lock = None
    if repair:
        from pipeline.volume_store.store import lock_store

        lock = lock_store(store.tree)
    try:
        return _verify(store, repair, progress, out, lock)
    finally:
        if lock is not None:
            lock.release()


def _verify(store: VolumeStore, repair: bool, progress: bool, out, lock) -> tuple[list[ScanCheck], list[str]]:
    from tqdm import tqdm

    checks: list[ScanCheck] = []
    problems: list[str] = []
    files = store.record_files()
    damaged_records = [(k, why) for k, r, why in files if r is None]
    records = [r for _, r, _ in files if r is not None]
    try:
        cat = store.catalog()
        catalog_ok = set(cat.loc[cat["status"] == "ok", "scan_id"])
        catalog_rows = len(cat)
    except StoreError as exc:
        problems.append(str(exc))
        catalog_ok, catalog_rows = set(), -1
    problems += _group_problems(store, repair, out)
    ok_records = [r for r in records if r.get("status") == "ok"]
    if catalog_rows >= 0 and (catalog_rows != len(files) or catalog_ok != {r["scan_id"] for r in ok_records}):
        problems.append(f"catalog.parquet does not match the records ({catalog_rows} rows, {len(files)} records)")
    bar = tqdm(total=len(ok_records), desc="verify", unit="scan", file=sys.stderr, disable=not progress)
    for rec in sorted(ok_records, key=lambda r: r["scan_id"]):
        result = check_scan(store, rec)
        if repair and result.status != "ok":
            result = _repair(store, rec, result, lock)
        checks.append(result)
        print(result.line(), file=out, flush=True)
        bar.update(1)
    bar.close()
    for key, why in damaged_records:
        if repair:
            _mark_record_failed(store, key, why)
            result = ScanCheck("failed", key, f"record .records/{key}.json was damaged ({why}); marked failed: the "
                                              "next `genesis convert` of its source reconverts it")
        else:
            result = ScanCheck("damaged", key, f"record .records/{key}.json is unreadable ({why})")
        checks.append(result)
        print(result.line(), file=out, flush=True)
    if store.is_local:
        known = {safe_scan_id(r["scan_id"]) for r in ok_records} | {safe_scan_id(k) for k, _ in damaged_records}
        strays = [name for name in _scan_folders(store) if name not in known]
    else:  # read again: a repair above committed new versions and marked records failed
        strays = store.unaccounted_folders()
    for name in strays:
        if repair:
            if store.is_local:
                store.discard(name)
            else:
                store.tree.delete_prefix(f"scans/{name}")
            print(f"removed   scans/{name}: a folder no ok record accounts for", file=out)
        else:
            problems.append(f"scans/{name} is a folder no ok record accounts for")
    if repair:
        store.write_catalog()
        problems = []  # the catalog is rebuilt from the records; stray folders are gone
    return checks, problems


_GROUP = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def _scan_folders(store: VolumeStore) -> list[str]:
    """The names under scans/ that are scan folders (on disk: directories; in a bucket: prefixes)."""
    if store.is_local:
        scans = store.root / "scans"
        return sorted(p.name for p in scans.iterdir() if p.is_dir()) if scans.is_dir() else []
    return [n for n in store.tree.listdir("scans") if n != "zarr.json"]


def _group_problems(store: VolumeStore, repair: bool, out) -> list[str]:
    """The store's own Zarr metadata below the root (the root's was checked on opening): `scans/zarr.json`
    makes `scans` a group, without it Zarr cannot list the store's scans. Repair writes it again (it holds
    no attributes)."""
    try:
        meta = json.loads(store.tree.read("scans/zarr.json"))
        problem = None if isinstance(meta, dict) and meta.get("node_type") == "group" and \
            meta.get("zarr_format") == 3 else "is not a Zarr v3 group's metadata"
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError) as exc:
        problem = f"is unreadable ({type(exc).__name__})"
    if problem is None:
        return []
    if repair:
        store.tree.write("scans/zarr.json", json.dumps(_GROUP, indent=2).encode("utf-8"))
        print(f"repaired  scans/zarr.json: it {problem}; written again", file=out)
        return []
    return [f"scans/zarr.json {problem} (the group of the store's scans)"]


def _repair(store: VolumeStore, rec: dict, found: ScanCheck, lock) -> ScanCheck:
    from pipeline.ingest import checksum
    from pipeline.volume_store.convert_task import convert_scan, readable_names, settings_from_dict, source_from_spec

    sid = rec["scan_id"]
    why = f"{found.status}: {found.detail}"
    spec, settings_dict = rec.get("source"), rec.get("settings")
    reason = None
    if not spec or not settings_dict:
        reason = "its record (an older version's) does not say how to read the source again"
    else:
        source = canonical_source(source_from_spec(spec))  # older records: relative to the current folder
        gone = [p for p in ([source.archive] if source.archive else list(source.files)) if not os.path.exists(p)]
        same = False
        if gone:
            where = printable(rec.get("source_path") or gone[0])
            reason = (f"its source {where} is not there" + (
                " (recorded relative to the folder `genesis convert` ran in: run verify from that folder, or "
                "convert the source again)" if not os.path.isabs(rec.get("source_path") or "/") else ""))
        else:
            try:
                with readable_names(source) as readable:
                    same = checksum(readable) == rec.get("source_checksum")
            except Exception as exc:
                reason = f"source unreadable ({type(exc).__name__}: {exc})"
        if same:
            settings = settings_from_dict(settings_dict)
            discovered = rec.get("discovered_id") or sid
            res = convert_scan(dataclasses.replace(source, scan_id=sid), store.url, settings, lock.token,
                               rec.get("record_key") or sid, discovered_id=discovered, force=True,
                               source_key=source_key(dataclasses.replace(source, scan_id=discovered)))
            if res["status"] == "ok":
                return ScanCheck("repaired", sid, f"reconverted from {source.source_path} (was {why})")
            reason = f"reconversion failed: {res.get('error')}"
        elif reason is None:
            reason = f"its source {printable(source.source_path)} changed since it was converted"
    failed = dict(rec)
    failed.update(status="failed", files=None, content_digest=None,
                  error=" ".join(f"stored scan was {why}; {reason}; not repaired".split())[:500])
    store.write_record(failed)  # uncommitted first, then removed: nothing may read damaged data
    store.discard(sid)
    return ScanCheck("failed", sid, f"{reason} (was {why})")


def _mark_record_failed(store: VolumeStore, key: str, why: str) -> None:
    from datetime import datetime, timezone

    store.write_record({"scan_id": key, "record_key": key, "status": "failed", "dataset": "unknown",
                        "source_path": "", "settings_hash": "",
                        "converted_at": datetime.now(timezone.utc).isoformat(),
                        "error": f"record was damaged ({why}); the next `genesis convert` of its source reconverts it"})
    store.discard(key)
