"""One scan, one task: read, check, write to staging, publish, record. Runs on a Dask worker.

The task owns its scan's folder and record and nothing else, so tasks never share a shard or
a file; the only shared state is the catalog, which the driver rebuilds from the records.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import traceback
import uuid
from datetime import datetime, timezone

import numcodecs
import zarr

import storage_schemas

from pipeline.ingest import ScanSource, checksum, fingerprint, read_source
from pipeline.peak_memory import reset_peak_rss as _reset_peak_rss
from pipeline.peak_memory import status_kb as _status_kb
from pipeline.volume_store.checks import check_and_cast, resample
from pipeline.volume_store.image_writer import write_image
from pipeline.volume_store.settings import SCHEMA_VERSION, ConvertSettings
from pipeline.volume_store.store import VolumeStore, safe_scan_id

__all__ = ["convert_scan", "failed_record", "record_key"]


def record_key(source: ScanSource, duplicate: bool = False) -> str:
    """Records are keyed by scan id; a duplicate id from another source gets its own failed record."""
    if not duplicate:
        return source.scan_id
    return f"{source.scan_id}~dup~{hashlib.sha1(source.source_path.encode()).hexdigest()[:8]}"


def _base_record(source: ScanSource, settings: ConvertSettings) -> dict:
    return {
        "scan_id": source.scan_id, "dataset": source.dataset, "subset": source.subset,
        "modality": settings.modality or source.modality, "source_path": source.source_path,
        "settings_hash": settings.hash, "converted_at": datetime.now(timezone.utc).isoformat(),
    }


def failed_record(source: ScanSource, settings: ConvertSettings, reason: str, key: str | None = None,
                  source_checksum: str | None = None) -> dict:
    rec = _base_record(source, settings)
    rec.update(status="failed", error=" ".join(str(reason).split())[:500], source_checksum=source_checksum,
               record_key=key or source.scan_id)
    return rec


def convert_scan(source: ScanSource, store_root: str, settings: ConvertSettings, token: str,
                 key: str | None = None) -> dict:
    """Convert one scan; never raises for bad input (the reason goes into a failed record).

    The result carries the task's own peak memory (high-water mark above the RSS it started
    with), which is what the benchmark compares with the scan size.
    """
    numcodecs.blosc.set_nthreads(1)  # one task = one core; parallelism comes from the workers
    rss_start = _reset_peak_rss()
    t0 = time.perf_counter()
    store = VolumeStore(store_root)
    key = key or source.scan_id
    result = {"scan_id": source.scan_id, "source_path": source.source_path, "status": "failed", "error": None}
    staged = None
    sum_ = None
    try:
        if source.problem:
            raise ValueError(source.problem)
        fp = fingerprint(source)
        sum_ = checksum(source)
        old = store.read_record(key)
        if (old and old.get("status") == "ok" and old.get("source_checksum") == sum_
                and old.get("settings_hash") == settings.hash and (store.scan_dir(source.scan_id) / "zarr.json").exists()):
            old["fingerprint"] = fp
            store.write_record(old)
            result.update(status="skipped")
            return result
        with zarr.config.set({"threading.max_workers": 1}):
            record = _convert(source, store, settings, sum_, fp, token)
        staged = record.pop("_staged", None)
        result.update(status="ok", bytes=record["source_bytes"])
    except Exception as exc:  # bad input of any kind becomes one failed row
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, (ValueError, RuntimeError, OSError, KeyError)):
            reason = f"{type(exc).__name__}: {reason} [{traceback.format_exc(limit=1).splitlines()[-1]}]"
        store.write_record(failed_record(source, settings, reason, key=key, source_checksum=sum_))
        result.update(error=reason)
    finally:
        if staged and os.path.exists(staged):
            shutil.rmtree(staged, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_bytes"] = _status_kb("VmHWM") * 1024
    result["task_peak_bytes"] = max(0, result["peak_rss_bytes"] - rss_start)
    result["pid"] = os.getpid()
    return result


def _convert(source: ScanSource, store: VolumeStore, settings: ConvertSettings, sum_: str, fp: str,
             token: str) -> dict:
    from pipeline.ingest.read import source_files

    volume = read_source(source)
    if settings.modality:
        volume.modality = settings.modality
    elif volume.modality == "OT" and source.kind in ("image", "image-zip", "metaimage") and _looks_like_ct(volume):
        volume.modality = "CT"
    if settings.spacing:
        volume = resample(volume, settings.spacing)
    volume = check_and_cast(volume, settings.min_side)

    files = source_files(source)
    source_bytes = sum(os.path.getsize(f) for f in files if os.path.exists(f))
    genesis = {
        "schema_version": SCHEMA_VERSION, "scan_id": source.scan_id, "dataset": source.dataset,
        "subset": source.subset, "modality": volume.modality, "orientation": "LPS",
        "source_direction": list(volume.source_direction), "direction": list(volume.direction),
        "source": {"path": source.source_path, "checksum": sum_, "files": [os.path.basename(f) for f in files],
                   "identifiers": dict(volume.identifiers), "kind": source.kind},
        "settings_hash": settings.hash, "settings": settings.to_dict(),
        "shape": list(volume.shape), "spacing": list(volume.spacing), "origin": list(volume.origin),
        "dtype": str(volume.voxels.dtype), "labels": sorted(volume.labels),
        "value_range": [float(volume.voxels.min()), float(volume.voxels.max())],
    }
    store.staging_dir.mkdir(exist_ok=True)
    staged = store.staging_dir / f"{safe_scan_id(source.scan_id)}.{uuid.uuid4().hex}"
    group = zarr.open_group(str(staged), mode="w")
    stored = write_image(group, volume, settings, genesis)
    storage_schemas.validate_attrs("volume_image", dict(group.attrs), str(staged))
    if store.lock_token() != token:
        raise RuntimeError("the store's lock is no longer held by this conversion; not publishing")
    store.publish(staged, source.scan_id)
    record = _base_record(source, settings)
    record.update(
        status="ok", error=None, modality=volume.modality, source_checksum=sum_, fingerprint=fp,
        path=f"scans/{safe_scan_id(source.scan_id)}", dtype=genesis["dtype"], shape=genesis["shape"],
        spacing=genesis["spacing"], origin=genesis["origin"], source_direction=genesis["source_direction"],
        labels=genesis["labels"], value_min=genesis["value_range"][0], value_max=genesis["value_range"][1],
        source_bytes=source_bytes, stored_bytes=stored, record_key=source.scan_id,
    )
    store.write_record(record)
    return record


def _looks_like_ct(volume) -> bool:
    """NIfTI/NRRD carry no modality; air at about -1000 is the fingerprint of Hounsfield units."""
    v = volume.voxels
    return v.dtype.kind in "if" and float(v.min()) <= -900 and float(v.max()) >= 0
