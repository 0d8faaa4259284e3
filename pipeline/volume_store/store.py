"""The volume store on disk: layout, the writer's lock, per-scan records and the catalog.

Layout (a Zarr v3 group)::

    STORE/zarr.json            root attributes {"genesis": {"kind": "volume-store", ...}}
    STORE/scans/<scan_id>/     one OME-Zarr 0.5 image per scan (+ labels/<name>)
    STORE/catalog.parquet      one row per source scan, ok or failed
    STORE/tables/*.parquet     dataset tables kept with the store (LUNA16 annotations, candidates)
    STORE/.records/<id>.json   the catalog row of each scan, written by the task that made it
    STORE/.staging/            scans being written; renamed into scans/ when complete
    STORE/.lock                held (flock) by the one conversion allowed to write

A scan becomes visible only by the rename of its finished folder, so a killed run leaves
nothing half-written under scans/. The catalog is rebuilt from the records at the end of every
run, so a run killed before that loses no record either.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

import storage_schemas
from pipeline.storage.attrs import read_genesis_attrs
from pipeline.volume_store.settings import SCHEMA_VERSION

__all__ = ["VolumeStore", "StoreLockedError", "StoreError", "init_store", "CATALOG"]

CATALOG = "catalog.parquet"


class StoreError(ValueError):
    """A path that is not a usable volume store."""


class StoreLockedError(RuntimeError):
    """Another conversion is writing this store."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def safe_scan_id(scan_id: str) -> str:
    """Scan ids become folder names: keep them to characters every filesystem accepts."""
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in scan_id).strip(".")
    return out or "scan"


def init_store(root: str | os.PathLike) -> None:
    """Create an empty volume store at `root` (no-op when it already is one)."""
    root = Path(root)
    if (root / "zarr.json").exists():
        VolumeStore(root)  # validates
        return
    if root.exists() and any(p for p in root.iterdir() if p.name != ".lock"):
        raise StoreError(f"{root} exists, is not empty and is not a volume store; choose another --store")
    root.mkdir(parents=True, exist_ok=True)
    attrs = {"genesis": {"kind": "volume-store", "schema_version": SCHEMA_VERSION, "created_at": _now(),
                         "pipeline_version": _version()}}
    storage_schemas.validate_attrs("volume_store", attrs, str(root))
    group = zarr.open_group(str(root), mode="w", attributes=attrs)
    group.create_group("scans")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("genesis-pipeline")
    except Exception:
        return "unknown"


@dataclass
class Lock:
    fd: int
    token: str


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

    def record_path(self, scan_id: str) -> Path:
        return self.records_dir / f"{safe_scan_id(scan_id)}.json"

    # ---- writer lock
    def lock(self) -> Lock:
        """Take the store's writer lock or raise StoreLockedError saying who holds it.

        flock is released by the kernel when the holder dies, so a killed run never leaves a
        stale lock behind.
        """
        path = self.root / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            os.close(fd)
            raise StoreLockedError(f"{self.root} is being written by another conversion ({holder}); "
                                   f"wait for it to finish or use another --store") from None
        token = uuid.uuid4().hex
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {_now()} token {token}\n".encode(), 0)
        os.fsync(fd)
        return Lock(fd=fd, token=token)

    def unlock(self, lock: Lock) -> None:
        os.ftruncate(lock.fd, 0)
        fcntl.flock(lock.fd, fcntl.LOCK_UN)
        os.close(lock.fd)

    def lock_token(self) -> str | None:
        """The token of the run now holding the lock (tasks check it before publishing)."""
        try:
            text = (self.root / ".lock").read_text()
        except OSError:
            return None
        return text.rsplit("token", 1)[-1].strip() if "token" in text else None

    def clear_staging(self) -> None:
        """Remove leftovers of killed runs; only called while holding the lock."""
        for d in (self.staging_dir, self.root / ".trash"):
            if d.exists():
                shutil.rmtree(d, ignore_errors=True)

    # ---- records
    def read_record(self, scan_id: str) -> dict | None:
        try:
            return json.loads(self.record_path(scan_id).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def write_record(self, record: dict) -> None:
        self.records_dir.mkdir(exist_ok=True)
        path = self.record_path(record.get("record_key") or record["scan_id"])
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, path)

    def publish(self, staged: Path, scan_id: str) -> None:
        """Make a finished scan folder visible in one rename (replacing an older version)."""
        final = self.scan_dir(scan_id)
        if final.exists():
            trash = self.root / ".trash" / f"{final.name}.{uuid.uuid4().hex}"
            trash.parent.mkdir(exist_ok=True)
            os.rename(final, trash)
            os.rename(staged, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staged, final)

    def records(self) -> list[dict]:
        if not self.records_dir.exists():
            return []
        out = []
        for p in sorted(self.records_dir.glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
        return out

    # ---- catalog
    def write_catalog(self) -> pa.Table:
        """Rebuild catalog.parquet from the records (atomically)."""
        schema = storage_schemas.arrow_schema("catalog")
        rows = sorted(self.records(), key=lambda r: r["scan_id"])
        cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
        cols["converted_at"] = [datetime.fromisoformat(v) if v else None for v in cols["converted_at"]]
        table = pa.Table.from_pydict(cols, schema=schema)
        table = storage_schemas.check_table("catalog", table, str(self.root / CATALOG))
        tmp = self.root / f".{CATALOG}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.root / CATALOG)
        return table

    def catalog(self) -> pd.DataFrame:
        path = self.root / CATALOG
        if not path.exists():
            return pa.Table.from_pylist([], schema=storage_schemas.arrow_schema("catalog")).to_pandas()
        table = storage_schemas.check_table("catalog", pq.read_table(path), str(path))
        return table.to_pandas()

    # ---- reading scans
    def open_scan(self, scan_id: str) -> zarr.Group:
        d = self.scan_dir(scan_id)
        if not (d / "zarr.json").exists():
            raise KeyError(f"scan {scan_id!r} is not in {self.root} (see `genesis stores show {self.root}`)")
        group = zarr.open_group(str(d), mode="r")
        attrs = dict(group.attrs)
        storage_schemas.validate_attrs("volume_image", attrs, str(d))
        return group

    def scan_attrs(self, scan_id: str) -> dict:
        return dict(self.open_scan(scan_id).attrs)

    def read_scan(self, scan_id: str, level: int = 0) -> np.ndarray:
        return self.open_scan(scan_id)[str(level)][...]

    def scan_ids(self) -> list[str]:
        cat = self.catalog()
        return sorted(cat.loc[cat["status"] == "ok", "scan_id"].tolist())
