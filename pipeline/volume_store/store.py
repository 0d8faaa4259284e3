"""The volume store, on disk or in a bucket: layout, the writer's lock, per-scan records and the catalog.

Layout (a Zarr v3 group; STORE is a folder or an `s3://BUCKET/PREFIX`)::

    STORE/zarr.json            root attributes {"genesis": {"kind": "volume-store", ...}}
    STORE/scans/<scan_id>/     one OME-Zarr 0.5 image per scan (+ labels/<name>); in a bucket
                               scans/<scan_id>@<8 hex>/, one prefix per version, named by the record's `path`
    STORE/catalog.parquet      one row per source scan, ok or failed
    STORE/tables/*.parquet     dataset tables kept with the store (LUNA16 annotations, candidates)
    STORE/.records/<key>.json  the catalog row of each scan, written by the task that made it, with the
                               scan's source (to reconvert it), settings and manifest: every file of its
                               folder with size and XXH3 (storage_schemas/scan_record.schema.json)
    STORE/.staging/            on disk only: scans being written; renamed into scans/ when complete
    STORE/.lock                the one conversion allowed to write: an flock on disk, a lease in a bucket

Every read and write goes through a `Tree` (`pipeline.storage.objects`): a folder or a bucket prefix.
Publishing differs, because a bucket has no rename:

- **on disk** a scan is written into a private staging folder and made visible by one rename into
  scans/ (a killed run leaves nothing half-written there), then its record is written;
- **in a bucket** the record is the commit object. Each version of a scan is written under a prefix of its
  own, scans/<id>@<8 hex>/ (`new_version_rel`), which no other writer and no other version ever uses; the
  record, written last, names it in `path` (a conditional PUT on the etag of the record it replaces, so a
  writer whose lease was taken over cannot overwrite a newer commit), and only after that commit is the
  previous version's prefix deleted. Until then the committed version stays whole and readable: a writer
  killed, or refused a PUT, half-way leaves the old record and objects as they were. Readers only open a
  scan whose record says ok, at the prefix it names (`open_scan`; the catalog is built from the records),
  so objects of a writer killed half-way are never read, an open reader never sees two versions mixed (it
  reads its version, or - once a newer one is committed and the old deleted - gets an error saying so), and
  the next run (holding the lease) deletes every prefix under scans/ that no ok record names
  (`clear_staging`). Records without a `path` (none are written so) mean scans/<id>/.

Both: the catalog is rebuilt from the records at the end of every run, so a run killed before that loses no
record; a record that cannot be read becomes a failed row (never a missing one, never a blocked catalog).
Reads go through `CheckedStore`, so a damaged or missing shard raises `StoreIntegrityError` naming the store,
scan and array. The writer lock is `lock_tree` (flock on disk; a lease object renewed by the holder and taken
over when its holder is dead, in a bucket); a second writer gets StoreLockedError (exit 3) naming the holder.
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
from pipeline.storage.object_lease import lease_holder, lock_tree
from pipeline.storage.objects import LocalTree, Tree, open_tree
from pipeline.volume_store.checked_store import CheckedStore
from pipeline.volume_store.digests import bytes_digest
from pipeline.volume_store.errors import ScanNotFoundError, StoreError, StoreIntegrityError, StoreLockedError
from pipeline.volume_store.scan_ids import printable, safe_scan_id
from pipeline.volume_store.settings import SCHEMA_VERSION

__all__ = ["VolumeStore", "StoreLockedError", "StoreError", "StoreIntegrityError", "ScanNotFoundError",
           "init_store", "check_store_path", "lock_store", "safe_scan_id", "CATALOG", "LOCK_PURPOSE", "RECORDS",
           "VERSION_SEP", "new_version_rel", "version_of", "recorded_rel"]

CATALOG = "catalog.parquet"
RECORDS = ".records"
LOCK_PURPOSE = "writing the volume store"
_CATALOG_ADDED = ("source_key", "content_digest", "discovered_id")  # columns older stores' catalogs lack
_GROUP = {"attributes": {}, "zarr_format": 3, "node_type": "group"}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def init_store(root: "str | os.PathLike | Tree") -> None:
    """Create an empty volume store at `root` unless one is there: create-if-absent, never delete.

    Each object is created exclusively (`Tree.create`: a hard link on disk, If-None-Match in a bucket) and the
    root `zarr.json` last, so a run killed half-way leaves something the next run completes, and two runs
    racing here never remove what the other made.
    """
    tree = open_tree(root)
    if not check_store_path(tree):
        return
    if tree.local is not None:
        (tree.local / "scans").mkdir(parents=True, exist_ok=True)
    attrs = {"genesis": {"kind": "volume-store", "schema_version": SCHEMA_VERSION, "created_at": _now(),
                         "pipeline_version": _version()}}
    storage_schemas.validate_attrs("volume_store", attrs, tree.url)
    tree.create("scans/zarr.json", json.dumps(_GROUP, indent=2).encode("utf-8"))
    tree.create("zarr.json", json.dumps({"attributes": attrs, "zarr_format": 3, "node_type": "group"},
                                        indent=2).encode("utf-8"))


def check_store_path(root: "str | os.PathLike | Tree") -> bool:
    """True when `root` is free for a new store (absent, empty, or a store begun and not finished),
    False when it is a volume store already; StoreError when it is something else."""
    tree = open_tree(root)
    if tree.exists("zarr.json"):
        VolumeStore(tree)  # validates
        return False
    local = tree.local
    if local is not None and local.exists() and not local.is_dir():
        raise StoreError(f"{tree.url} is a file, not a volume store; choose another --store")
    extra = [name for name in tree.listdir("") if name != ".lock" and not (
        name == "scans" and set(tree.listdir("scans")) <= {"zarr.json"}
        and (local is None or (local / "scans").is_dir()))]
    if extra:
        raise StoreError(f"{tree.url} exists, is not empty and is not a volume store; choose another --store")
    return True


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("genesis-pipeline")
    except Exception:
        return "unknown"


class VolumeStore:
    """A volume store opened for reading (and, with `lock()`, for one writer), on disk or in a bucket.

    `root` is a path, an `s3://BUCKET/PREFIX` URL or a `Tree`. `self.tree` does every read and write;
    `self.url` names the store in messages; `self.root` is the folder (a Path) on disk and the URL (a str)
    in a bucket."""

    def __init__(self, root: "str | os.PathLike | Tree"):
        self.tree: Tree = open_tree(root)
        self.url: str = self.tree.url
        self.root: Path | str = self.tree.local if self.tree.local is not None else self.tree.url
        self.attrs = read_genesis_attrs(self.tree if not isinstance(root, (str, os.PathLike)) else root,
                                        "volume-store", "volume_store", StoreError,
                                        hint="; create one with `genesis convert`")

    @property
    def is_local(self) -> bool:
        return isinstance(self.tree, LocalTree)

    # ---- paths (relative: for the tree; absolute: for callers on disk)
    def scan_rel(self, scan_id: str, record: dict | None = None) -> str:
        """The scan's prefix inside the store: `scans/<safe id>` on disk; in a bucket the prefix its record
        names (`record`, or the one stored: one GET), `scans/<safe id>` for records of older versions."""
        default = f"scans/{safe_scan_id(scan_id)}"
        if self.is_local:
            return default
        if record is None:
            record = self.read_record(scan_id)
        return recorded_rel(scan_id, record) or default

    def record_rel(self, key: str) -> str:
        return f"{RECORDS}/{self.record_key(key)}.json"

    @staticmethod
    def record_key(key: str) -> str:
        """The name the record of `key` is stored under (without `.json`)."""
        return safe_scan_id(key)

    @property
    def records_dir(self) -> Path | str:
        return self.root / RECORDS if self.is_local else f"{self.url}/{RECORDS}"

    @property
    def staging_dir(self) -> Path:
        """On disk only: where scans are written before the rename that publishes them."""
        if not self.is_local:
            raise StoreError(f"{self.url}: a store in a bucket has no staging folder (scans are written in place "
                             "and committed by their record)")
        return self.root / ".staging"

    def scan_dir(self, scan_id: str, record: dict | None = None) -> Path | str:
        """The scan's folder (a Path) on disk; the URL of its committed version in a bucket."""
        rel = self.scan_rel(scan_id, record)
        return self.root / rel if self.is_local else f"{self.url}/{rel}"

    def record_path(self, key: str) -> Path | str:
        return self.root / self.record_rel(key) if self.is_local else f"{self.url}/{self.record_rel(key)}"

    # ---- writer lock
    def lock(self):
        """Take the store's writer lock or raise StoreLockedError saying who holds it.

        On disk an flock held by this process and released by the kernel when it dies (see
        pipeline/storage/locks.py), so a killed run never leaves a stale lock behind; in a bucket a lease
        (pipeline/storage/object_lease.py), taken over once its holder is dead.
        """
        return lock_store(self.tree)

    def unlock(self, lock) -> None:
        lock.release()

    def lock_token(self) -> str | None:
        """The token of the run now holding the lock (tasks check it before publishing)."""
        if self.is_local:
            holder = FileLock(self.root / ".lock", LOCK_PURPOSE).holder()
        else:
            holder = lease_holder(self.tree, ".lock")
        return holder.get("token") if holder else None

    def clear_staging(self) -> list[str]:
        """Remove leftovers of killed runs; only called while holding the lock. On disk: the staging and trash
        folders. In a bucket: every prefix under scans/ that no ok record names (a version a writer was killed,
        or refused, while writing; the old version of a writer killed between its commit and deleting it).
        Returns the scan folders removed from scans/."""
        if self.is_local:
            for d in (self.staging_dir, self.root / ".trash"):
                if d.exists():
                    shutil.rmtree(d, ignore_errors=True)
            return []
        removed = []
        for name in self.unaccounted_folders():
            if self.tree.delete_prefix(f"scans/{name}"):
                removed.append(name)
        return removed

    def unaccounted_folders(self) -> list[str]:
        """In a bucket: the names under scans/ (prefixes) that no ok record names. Every version of a scan whose
        record is unreadable is kept (verify --repair decides what it is)."""
        named, unreadable = {"zarr.json"}, set()
        for key, rec, problem in self.record_files():
            if rec is not None and rec.get("status") == "ok":
                named.add(self.scan_rel(rec["scan_id"], rec).split("/", 1)[1])
            elif rec is None:
                unreadable.add(key)
        return [n for n in self.tree.listdir("scans") if n not in named and version_of(n) not in unreadable]

    # ---- records
    def load_record(self, key: str) -> tuple[dict | None, str | None]:
        """(record, None), (None, None) when there is none, or (None, why it is unreadable)."""
        return _load_record(self.tree, self.record_rel(key))

    def read_record(self, key: str) -> dict | None:
        return self.load_record(key)[0]

    def write_record(self, record: dict) -> None:
        """Write (commit) a scan's record whole: atomically on disk, one PUT in a bucket."""
        rel = self.record_rel(record.get("record_key") or record["scan_id"])
        self.tree.write(rel, _record_bytes(record))

    def read_record_versioned(self, key: str) -> tuple[dict | None, str | None]:
        """(the record or None when absent or unreadable, the etag of the record file or None when absent):
        what `commit_record` replaces."""
        rel = self.record_rel(key)
        found = self.tree.read_versioned(rel)
        if found is None:
            return None, None
        return _parse_record(found[0], rel)[0], found[1]

    def commit_record(self, record: dict, etag: str | None) -> bool:
        """Write a scan's record only if its file is still the one read with `etag` (absent when None):
        If-Match / If-None-Match in a bucket. False, writing nothing, when another writer changed it since."""
        rel = self.record_rel(record.get("record_key") or record["scan_id"])
        data = _record_bytes(record)
        done = self.tree.create(rel, data) if etag is None else self.tree.replace(rel, data, etag)
        return done is not None

    def delete_record(self, key: str) -> None:
        self.tree.delete(self.record_rel(key))

    def publish(self, staged: Path, scan_id: str) -> None:
        """On disk: make a finished scan folder visible in one rename (replacing an older version)."""
        final = self.scan_dir(scan_id)
        if final.exists():
            self.discard(scan_id)
        os.rename(staged, final)

    def discard(self, scan_id: str) -> None:
        """Remove a scan's folder (on disk renamed away first, so it vanishes at once); in a bucket every version
        of it (call it once the record that named one is no longer ok)."""
        if not self.is_local:
            safe = safe_scan_id(scan_id)
            for name in self.tree.listdir("scans"):
                if version_of(name) == safe:
                    self.tree.delete_prefix(f"scans/{name}")
            return
        final = self.scan_dir(scan_id)
        if not final.exists():
            return
        trash = self.root / ".trash" / f"{final.name}.{uuid.uuid4().hex}"
        trash.parent.mkdir(exist_ok=True)
        os.rename(final, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def record_files(self) -> list[tuple[str, dict | None, str | None]]:
        """Every record file as (key, record or None, why unreadable or None), by key."""
        names = sorted(n for n in self.tree.listdir(RECORDS) if n.endswith(".json") and not n.startswith("."))
        return [(n[:-len(".json")], *_load_record(self.tree, f"{RECORDS}/{n}")) for n in names]

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
        """Rebuild catalog.parquet from the records (one atomic write); no record can block it."""
        schema = storage_schemas.arrow_schema("catalog")
        rows = sorted(self.catalog_rows(), key=lambda r: (printable(str(r.get("scan_id"))),
                                                          printable(str(r.get("record_key") or ""))))
        try:
            table = _rows_table(rows, schema)
        except Exception:  # some record does not fit: find it, make it a failed row; never a blocked store
            table = pa.concat_tables([_one_row(rec, schema) for rec in rows]) if rows else schema.empty_table()
        table = storage_schemas.check_table("catalog", table, f"{self.url}/{CATALOG}")
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.tree.write(CATALOG, sink.getvalue().to_pybytes())
        return table

    def catalog(self) -> pd.DataFrame:
        where = f"{self.url}/{CATALOG}"
        try:
            data = self.tree.read(CATALOG)
        except FileNotFoundError:
            return storage_schemas.arrow_schema("catalog").empty_table().to_pandas()
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (OSError, pa.ArrowException) as exc:
            raise StoreIntegrityError(f"{where} is unreadable ({exc}); rebuild it with "
                                      f"`genesis stores verify {self.url} --repair`") from None
        for name in _CATALOG_ADDED:  # catalogs of older versions: the columns they could not have
            if name not in table.column_names:
                table = table.append_column(name, pa.nulls(len(table), pa.string()))
        table = storage_schemas.check_table("catalog", table, where)
        return table.to_pandas()

    # ---- reading scans
    def _scan_present(self, rel: str, committed: bool) -> bool:
        if self.is_local:
            return (self.root / rel).is_dir()
        # a bucket: only a committed scan is there for readers (objects without an ok record are half-written)
        return committed and bool(self.tree.listdir(rel))

    def open_scan(self, scan_id: str) -> zarr.Group:
        """The scan's image group, read through a store that checks every checksum (see checked_store).

        In a bucket the group is the version the record names when it is opened; it is never rewritten, so the
        reader sees that version whole, or - when a newer one was committed and this one deleted since - an
        error saying to open the scan again."""
        where = f"{self.url}: scan {scan_id}"
        repair = f"repair with `genesis stores verify {self.url} --repair`"
        rec, problem = self.load_record(scan_id)
        committed = bool(rec and rec.get("status") == "ok")
        rel = self.scan_rel(scan_id, rec if committed else {})
        if not self._scan_present(rel, committed):
            if committed or problem or self._catalogued_ok(scan_id):
                raise StoreIntegrityError(f"{where}: its folder {rel} is missing; {repair}")
            raise ScanNotFoundError(f"scan {scan_id!r} is not in {self.url} (see `genesis stores show {self.url}`)")
        files = rec.get("files") if committed else None
        for name, want in sorted((files or {}).items()):
            if name.endswith("zarr.json"):
                try:
                    got = bytes_digest(self.tree.read(f"{rel}/{name}"))
                except (OSError, IsADirectoryError):
                    raise StoreIntegrityError(f"{where}: {name} is missing; {repair}") from None
                if got != want:
                    raise StoreIntegrityError(f"{where}: {name} differs from what was published; {repair}")
        if not self.tree.exists(f"{rel}/zarr.json"):
            raise StoreIntegrityError(f"{where}: {rel}/zarr.json is missing; {repair}")
        hint = {} if self.is_local else {"hint": (
            f"if the scan was converted again since it was opened, open it again; else {repair}")}
        store = CheckedStore(self.tree.zarr_store(rel), where=where, files=frozenset(files) if files else None,
                             **hint)
        try:
            group = zarr.open_group(store=store, mode="r", zarr_format=3)
        except Exception as exc:
            raise StoreIntegrityError(f"{where}: {rel}/zarr.json is unreadable "
                                      f"({type(exc).__name__}: {exc})") from None
        storage_schemas.validate_attrs("volume_image", dict(group.attrs), f"{self.url}/{rel}")
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


def lock_store(root: "str | os.PathLike | Tree"):
    """The writer lock of the store at `root` (which need not be a store yet), or StoreLockedError naming the
    holder: a FileLock on disk, an ObjectLease in a bucket (both: `token`, `release()`)."""
    tree = open_tree(root)
    try:
        return lock_tree(tree, ".lock", LOCK_PURPOSE)
    except LockBusyError as exc:
        raise StoreLockedError(f"{tree.url} is being written by another conversion ({exc})") from None


VERSION_SEP = "@"
"""Between a scan's id and its version in a bucket's folder names (never in a safe scan id)."""


def new_version_rel(scan_id: str) -> str:
    """A fresh prefix for a new version of the scan in a bucket: `scans/<safe id>@<8 hex>`."""
    return f"scans/{safe_scan_id(scan_id)}{VERSION_SEP}{uuid.uuid4().hex[:8]}"


def version_of(name: str) -> str:
    """The safe scan id a folder name under scans/ belongs to (`ID@1a2b3c4d` and `ID`: `ID`)."""
    return name.split(VERSION_SEP, 1)[0]


def recorded_rel(scan_id: str, record: dict | None) -> str | None:
    """The prefix `record` names for `scan_id`, if it is one of that scan's (never another scan's folder)."""
    path = (record or {}).get("path")
    if not isinstance(path, str) or not path.startswith("scans/"):
        return None
    name = path[len("scans/"):]
    return path if "/" not in name and version_of(name) == safe_scan_id(scan_id) else None


def _record_bytes(record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode("ascii")  # non-ASCII as \\u escapes


def _load_record(tree: Tree, rel: str) -> tuple[dict | None, str | None]:
    try:
        text = tree.read(rel)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"unreadable: {exc.strerror or exc}"
    return _parse_record(text, rel)


def _parse_record(text: bytes, rel: str) -> tuple[dict | None, str | None]:
    name = rel.rsplit("/", 1)[-1]
    try:
        rec = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"not valid JSON: {str(exc)[:80]}"
    try:
        storage_schemas.validate_attrs("scan_record", rec, name)
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
