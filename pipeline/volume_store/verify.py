"""`genesis stores verify STORE [--repair]`: every scan against its recorded manifest and the catalog.

Per scan: `ok` (every file present with its recorded size and XXH3, nothing extra, every shard
passing its CRC32C checks), `damaged` (a file missing, changed or unexpected, or an unreadable
record), `missing` (the catalog lists it, its folder is gone). With `repair`, under the store's
writer lock: a damaged or missing scan whose source still has the recorded checksum is
reconverted from it (`repaired`); otherwise its folder is removed and its row marked failed
(`failed`), so nothing reads damaged data; then the catalog is rebuilt from the records.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.volume_store.checked_store import _array_layout, shard_problem
from pipeline.volume_store.digests import check_folder
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


def _shards_problems(folder: Path, files: dict[str, str] | None) -> list[str]:
    """CRC32C checks of every shard (also for records without a manifest)."""
    problems = []
    metas = [rel for rel in (files or {}) if rel.endswith("zarr.json")] if files else [
        p.relative_to(folder).as_posix() for p in folder.rglob("zarr.json")]
    for rel in sorted(metas):
        try:
            meta = json.loads((folder / rel).read_bytes())
        except (OSError, ValueError) as exc:
            problems.append(f"{rel} unreadable ({exc})")
            continue
        if meta.get("node_type") != "array":
            continue
        layout = _array_layout(meta)
        array_dir = (folder / rel).parent
        for shard in sorted(array_dir.joinpath("c").rglob("*")) if array_dir.joinpath("c").is_dir() else []:
            if shard.is_file():
                problem = shard_problem(np.fromfile(shard, dtype=np.uint8), layout)
                if problem:
                    problems.append(f"{shard.relative_to(folder).as_posix()} {problem}")
    return problems


def check_scan(store: VolumeStore, record: dict) -> ScanCheck:
    sid = record["scan_id"]
    folder = store.scan_dir(sid)
    if not folder.is_dir():
        return ScanCheck("missing", sid, f"folder scans/{safe_scan_id(sid)} is missing")
    files = record.get("files")
    problems = check_folder(folder, files) if files else []
    if not problems:
        problems = _shards_problems(folder, files)
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
    store = VolumeStore(root)  # StoreError for a path that is not a store
    lock = None
    if repair:
        from pipeline.volume_store.store import lock_store

        lock = lock_store(store.root)
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
    known = {safe_scan_id(r["scan_id"]) for r in ok_records} | {safe_scan_id(k) for k, _ in damaged_records}
    scans = store.root / "scans"
    for d in sorted(p for p in scans.iterdir() if p.is_dir()) if scans.is_dir() else []:
        if d.name not in known:
            if repair:
                store.discard(d.name)
                print(f"removed   scans/{d.name}: a folder no ok record accounts for", file=out)
            else:
                problems.append(f"scans/{d.name} is a folder no ok record accounts for")
    if repair:
        store.write_catalog()
        problems = []  # the catalog is rebuilt from the records; stray folders are gone
    return checks, problems


_GROUP = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def _group_problems(store: VolumeStore, repair: bool, out) -> list[str]:
    """The store's own Zarr metadata below the root (the root's was checked on opening): `scans/zarr.json`
    makes `scans` a group, without it Zarr cannot list the store's scans. Repair writes it again (it holds
    no attributes)."""
    path = store.root / "scans" / "zarr.json"
    try:
        meta = json.loads(path.read_bytes())
        problem = None if isinstance(meta, dict) and meta.get("node_type") == "group" and \
            meta.get("zarr_format") == 3 else "is not a Zarr v3 group's metadata"
    except FileNotFoundError:
        problem = "is missing"
    except (OSError, ValueError) as exc:
        problem = f"is unreadable ({type(exc).__name__})"
    if problem is None:
        return []
    if repair:
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f".zarr.json.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(_GROUP, indent=2), encoding="utf-8")
        os.replace(tmp, path)
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
            res = convert_scan(dataclasses.replace(source, scan_id=sid), str(store.root), settings, lock.token,
                               rec.get("record_key") or sid, discovered_id=discovered, force=True,
                               source_key=source_key(dataclasses.replace(source, scan_id=discovered)))
            if res["status"] == "ok":
                return ScanCheck("repaired", sid, f"reconverted from {source.source_path} (was {why})")
            reason = f"reconversion failed: {res.get('error')}"
        elif reason is None:
            reason = f"its source {printable(source.source_path)} changed since it was converted"
    store.discard(sid)  # nothing may read damaged data: the row says why it is gone
    failed = dict(rec)
    failed.update(status="failed", files=None, content_digest=None,
                  error=" ".join(f"stored scan was {why}; {reason}; not repaired".split())[:500])
    store.write_record(failed)
    return ScanCheck("failed", sid, f"{reason} (was {why})")


def _mark_record_failed(store: VolumeStore, key: str, why: str) -> None:
    from datetime import datetime, timezone

    store.discard(key)
    store.write_record({"scan_id": key, "record_key": key, "status": "failed", "dataset": "unknown",
                        "source_path": "", "settings_hash": "",
                        "converted_at": datetime.now(timezone.utc).isoformat(),
                        "error": f"record was damaged ({why}); the next `genesis convert` of its source reconverts it"})
