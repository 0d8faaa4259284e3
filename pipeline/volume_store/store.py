"""The volume store on disk: layout, the writer's lock, per-scan records and the catalog.

Layout (a Zarr v3 group)::

    STORE/zarr.json            root attributes {"genesis": {"kind": "volume-store", ...}}
    STORE/scans/<scan_id>/     one OME-Zarr 0.5 image per scan (+ labels/<name>)
    STORE/catalog.parquet      one row per source scan, ok or failed
    STORE/tables/*.parquet     dataset tables kept with the store (LUNA16 annotations, candidates)
    STORE/.records/<key>.json  the catalog row of each scan, written by the task that made it, with the
                               scan's source (to reconvert it), settings and manifest: every file of its
                               folder with size and XXH3 (storage_schemas/scan_record.schema.json)
    STORE/.staging/            scans being written; renamed into scans/ when complete
    STORE/.lock                held (flock) by the one conversion allowed to write

A scan becomes visible only by the rename of its finished folder, so a killed run leaves
nothing half-written under scans/. The catalog is rebuilt from the records at the end of every
run, so a run killed before that loses no record either; a record that cannot be read becomes a
failed row (never a missing one, never a blocked catalog). Reads go through `CheckedStore`, so
a damaged or missing shard raises `StoreIntegrityError` naming the store, scan and array.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

import storage_schemas
from pipeline.storage.attrs import read_genesis_attrs
from pipeline.storage.locks import FileLock, LockBusyError
from pipeline.volume_store.checked_store import CheckedStore
from pipeline.volume_store.digests import file_digest
from pipeline.volume_store.errors import ScanNotFoundError, StoreError, StoreIntegrityError, StoreLockedError
from pipeline.volume_store.scan_ids import printable, safe_scan_id
from pipeline.volume_store.settings import SCHEMA_VERSION

__all__ = ["VolumeStore", "StoreLockedError", "StoreError", "StoreIntegrityError", "ScanNotFoundError",
           "init_store", "check_store_path", "lock_store", "safe_scan_id", "CATALOG", "LOCK_PURPOSE"]

CATALOG = "catalog.parquet"
LOCK_PURPOSE = "writing the volume store"
_CATALOG_ADDED = ("source_key", "content_digest", "discovered_id")  # columns older stores' catalogs lack


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _create_json(path: Path, content: dict) -> None:
    """Write `path` only if absent, atomically: a complete file appears or nothing changes."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(content, indent=2), encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def init_store(root: str | os.PathLike) -> None:
    """Create an empty volume store at `root` unless one is there: create-if-absent, never delete.

    Each file is created exclusively and the root `zarr.json` last, so a run killed half-way leaves
    something the next run completes, and two runs racing here never remove what the other made.
    """
    root = Path(root)
    if not check_store_path(root):
        return
    (root / "scans").mkdir(parents=True, exist_ok=True)
    attrs = {"genesis": {"kind": "volume-store", "schema_version": SCHEMA_VERSION, "created_at": _now(),
                         "pipeline_version": _version()}}
    storage_schemas.validate_attrs("volume_store", attrs, str(root))
    _create_json(root / "scans" / "zarr.json", {"attributes": {}, "zarr_format": 3, "node_type": "group"})
    _create_json(root / "zarr.json", {"attributes": attrs, "zarr_format": 3, "node_type": "group"})


def check_store_path(root: str | os.PathLike) -> bool:
    """True when `root` is free for a new store (absent, empty, or a store begun and not finished),
    False when it is a volume store already; StoreError when it is something else."""
    root = Path(root)
    if (root / "zarr.json").exists():
        VolumeStore(root)  # validates
        return False
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a volume store; choose another --store")
    if root.exists():
        extra = [p.name for p in root.iterdir() if p.name != ".lock" and not (
            p.name == "scans" and p.is_dir() and {q.name for q in p.iterdir()} <= {"zarr.json"})]
        if extra:
            raise StoreError(f"{root} exists, is not empty and is not a volume store; choose another --store")
    return True


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("genesis-pipeline")
    except Exception:
        return "unknown"


class VolumeStore:
    """A volume store opened for reading (and, with `lock()`, for one writer)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.attrs = read_genesis_attrs(self.root, "volume-store", "volume_store", StoreError,
                                        hint="; create one with `genesis convert`")

    # ---- paths
    @property
    def records_dir(self) -> Path:
        return self.root / ".records"

    @property
    def staging_dir(self) -> Path:
        return self.root / ".staging"

    def scan_dir(self, scan_id: str) -> Path:
        return self.root / "scans" / safe_scan_id(scan_id)

    def record_path(self, key: str) -> Path:
        return self.records_dir / f"{safe_scan_id(key)}.json"

    # ---- writer lock
    def lock(self) -> FileLock:
        """Take the store's writer lock or raise StoreLockedError saying who holds it.

        An flock held by this process and released by the kernel when it dies (see
        pipeline/storage/locks.py), so a killed run never leaves a stale lock behind.
        """
        return lock_store(self.root)

    def unlock(self, lock: FileLock) -> None:
        lock.release()

    def lock_token(self) -> str | None:
        """The token of the run now holding the lock (tasks check it before publishing)."""
        holder = FileLock(self.root / ".lock", LOCK_PURPOSE).holder()
        return holder.get("token") if holder else None

    def clear_staging(self) -> None:
        """Remove leftovers of killed runs; only called while holding the lock."""
        for d in (self.staging_dir, self.root / ".trash"):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)

    # ---- records
    def load_record(self, key: str) -> tuple[dict | None, str | None]:
        """(record, None), (None, None) when there is none, or (None, why it is unreadable)."""
        return _load_record(self.record_path(key))

    def read_record(self, key: str) -> dict | None:
        return self.load_record(key)[0]

    def write_record(self, record: dict) -> None:
        self.records_dir.mkdir(exist_ok=True)
        path = self.record_path(record.get("record_key") or record["scan_id"])
        tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True), encoding="ascii")  # non-ASCII as \\u escapes
        os.replace(tmp, path)

    def delete_record(self, key: str) -> None:
        self.record_path(key).unlink(missing_ok=True)

    def publish(self, staged: Path, scan_id: str) -> None:
        """Make a finished scan folder visible in one rename (replacing an older version)."""
        final = self.scan_dir(scan_id)
        if final.exists():
            self.discard(scan_id)
        os.rename(staged, final)

    def discard(self, scan_id: str) -> None:
        """Remove a scan's folder (renamed away first, so it vanishes at once)."""
        final = self.scan_dir(scan_id)
        if not final.exists():
            return
        trash = self.root / ".trash" / f"{final.name}.{uuid.uuid4().hex}"
        trash.parent.mkdir(exist_ok=True)
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def record_files(self) -> list[tuple[str, dict | None, str | None]]:
        """Every record file as (key, record or None, why unreadable or None), by key."""
        if not self.records_dir.exists():
            return []
        return [(p.stem, *_load_record(p)) for p in sorted(self.records_dir.glob("*.json"))]

    def records(self) -> list[dict]:
        """The readable records (unreadable ones appear in the catalog as failed rows)."""
        return [r for _, r, _ in self.record_files() if r is not None]

    # ---- catalog
    def catalog_rows(self) -> list[dict]:
        """One row per record file; an unreadable record becomes a failed row saying so."""
        rows = []
        for key, rec, problem in self.record_files():
            if rec is None:
                rec = {"scan_id": key, "status": "failed", "dataset": "unknown", "source_path": "",
                       "settings_hash": "", "error": f"record .records/{key}.json is damaged ({problem}); "
                                                     "the next `genesis convert` of its source reconverts it"}
            rows.append(rec)
        return rows

    def write_catalog(self) -> pa.Table:
        """Rebuild catalog.parquet from the records (atomically); no record can block it."""
        schema = storage_schemas.arrow_schema("catalog")
        rows = sorted(self.catalog_rows(), key=lambda r: (printable(str(r.get("scan_id"))),
                                                          printable(str(r.get("record_key") or ""))))
        try:
            table = _rows_table(rows, schema)
        except Exception:  # some record does not fit: find it, make it a failed row; never a blocked store
            table = pa.concat_tables([_one_row(rec, schema) for rec in rows]) if rows else schema.empty_table()
        table = storage_schemas.check_table("catalog", table, str(self.root / CATALOG))
        tmp = self.root / f".{CATALOG}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.root / CATALOG)
        return table

    def catalog(self) -> pd.DataFrame:
        path = self.root / CATALOG
        if not path.exists():
            return storage_schemas.arrow_schema("catalog").empty_table().to_pandas()
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowException) as exc:
            raise StoreIntegrityError(f"{path} is unreadable ({exc}); rebuild it with "
                                      f"`genesis stores verify {self.root} --repair`") from None
        for name in _CATALOG_ADDED:  # catalogs of older versions: the columns they could not have
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), pa.string()))
        table = storage_schemas.check_table("catalog", table, str(path))
        return table.to_pandas()

    # ---- reading scans
    def open_scan(self, scan_id: str) -> zarr.Group:
        """The scan's image group, read through a store that checks every checksum (see checked_store)."""
        d = self.scan_dir(scan_id)
        where = f"{self.root}: scan {scan_id}"
        rec, problem = self.load_record(scan_id)
        if not d.is_dir():
            if (rec and rec.get("status") == "ok") or problem or self._catalogued_ok(scan_id):
                raise StoreIntegrityError(f"{where}: its folder scans/{safe_scan_id(scan_id)} is missing; "
                                          f"repair with `genesis stores verify {self.root} --repair`")
            raise ScanNotFoundError(f"scan {scan_id!r} is not in {self.root} (see `genesis stores show {self.root}`)")
        files = rec.get("files") if rec and rec.get("status") == "ok" else None
        for rel, want in sorted((files or {}).items()):
            if rel.endswith("zarr.json"):
                try:
                    got = file_digest(d / rel)
                except OSError:
                    raise StoreIntegrityError(f"{where}: {rel} is missing; repair with "
                                              f"`genesis stores verify {self.root} --repair`") from None
                if got != want:
                    raise StoreIntegrityError(f"{where}: {rel} differs from what was published; repair with "
                                              f"`genesis stores verify {self.root} --repair`")
        if not (d / "zarr.json").is_file():
            raise StoreIntegrityError(f"{where}: scans/{d.name}/zarr.json is missing; repair with "
                                      f"`genesis stores verify {self.root} --repair`")
        store = CheckedStore(d, where=where, files=frozenset(files) if files else None)
        try:
            group = zarr.open_group(store=store, mode="r", zarr_format=3)
        except Exception as exc:
            raise StoreIntegrityError(f"{where}: scans/{d.name}/zarr.json is unreadable "
                                      f"({type(exc).__name__}: {exc})") from None
        storage_schemas.validate_attrs("volume_image", dict(group.attrs), str(d))
        return group

    def _catalogued_ok(self, scan_id: str) -> bool:
        try:
            cat = self.catalog()
        except StoreError:
            return False
        return bool(((cat["scan_id"] == scan_id) & (cat["status"] == "ok")).any())

    def scan_attrs(self, scan_id: str) -> dict:
        return dict(self.open_scan(scan_id).attrs)

    def read_scan(self, scan_id: str, level: int = 0) -> np.ndarray:
        return self.open_scan(scan_id)[str(level)][...]

    def scan_ids(self) -> list[str]:
        cat = self.catalog()
        return sorted(cat.loc[cat["status"] == "ok", "scan_id"].tolist())


def lock_store(root: str | os.PathLike) -> FileLock:
    """The writer lock of the store at `root` (which need not be a store yet), or StoreLockedError."""
    root = Path(root)
    try:
        return FileLock(root / ".lock", LOCK_PURPOSE).acquire()
    except LockBusyError as exc:
        raise StoreLockedError(f"{root} is being written by another conversion ({exc})") from None


def _load_record(path: Path) -> tuple[dict | None, str | None]:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"unreadable: {exc.strerror}"
    try:
        rec = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"not valid JSON: {str(exc)[:80]}"
    try:
        storage_schemas.validate_attrs("scan_record", rec, path.name)
    except storage_schemas.SchemaError as exc:
        return None, " ".join(str(exc).split())[:200]
    return rec, None


def _text(v):
    return printable(v) if isinstance(v, str) else v


def _cell(name: str, v):
    if name == "converted_at":
        return datetime.fromisoformat(v) if v else None
    if isinstance(v, list):
        return [_text(x) for x in v]
    return _text(v)


def _rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Records -> catalog rows; strings made valid UTF-8 (undecodable file names as \\xNN)."""
    cols = {f.name: [_cell(f.name, r.get(f.name)) for r in rows] for f in schema}
    return storage_schemas.check_table("catalog", pa.Table.from_pydict(cols, schema=schema), CATALOG)


def _one_row(rec: dict, schema: pa.Schema) -> pa.Table:
    try:
        return _rows_table([rec], schema)
    except Exception as exc:
        return _rows_table([{
            "scan_id": str(rec.get("scan_id") or rec.get("record_key") or "unknown"), "status": "failed",
            "dataset": str(rec.get("dataset") or "unknown"), "source_path": str(rec.get("source_path") or ""),
            "settings_hash": str(rec.get("settings_hash") or ""), "source_key": rec.get("source_key"),
            "discovered_id": rec.get("discovered_id") if isinstance(rec.get("discovered_id"), str) else None,
            "error": f"record does not fit the catalog ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                     "reconverted by the next `genesis convert` of its source"}], schema)
