"""One scan, one task: read, check, write, publish, record. Runs on a Dask worker.

The task owns its scan's folder and record and nothing else, so tasks never share a shard or
a file; the only shared state is the catalog, which the driver rebuilds from the records.
The record keeps what verification and repair need: the source as discovered (to read it
again), the settings, and the manifest of the published folder with its content digest.

Publishing (see `pipeline.volume_store.store`): on disk the scan is written into a staging folder and
renamed into scans/, then its record is written; in a bucket the task writes the new version under a
prefix of its own, scans/<id>@<8 hex>/ (each shard one PUT, its digest taken from the bytes written), commits
it with the record, written last and naming that prefix (conditional on the record being the one it replaces),
and only then deletes the previous version's objects. Either way, the lock's token is checked before
anything visible changes. A failure anywhere fails this scan only: bad input is a failed record; in a bucket
the objects this task wrote are removed, and a version committed before stays committed and readable when
the failure came while writing the new one (a refused or failed PUT), as it does when the task is killed.

Test hooks (`pipeline.runtime.hooks.stop_point`, GENESIS_STOP_AT): `convert:objects` after the first array of
a scan in a bucket is written (mid-scan: uncommitted), `convert:record` after a scan's record is written (in a
bucket: and the previous version's objects deleted).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
from contextlib import contextmanager
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
from pipeline.runtime.hooks import stop_point
from pipeline.volume_store.checks import check_and_cast, resample
from pipeline.volume_store.digests import check_tree, content_digest, folder_manifest, tree_manifest
from pipeline.volume_store.image_writer import write_image
from pipeline.volume_store.scan_ids import printable
from pipeline.volume_store.scan_ids import source_key as _source_key
from pipeline.volume_store.settings import SCHEMA_VERSION, ConvertSettings
from pipeline.volume_store.store import VolumeStore, new_version_rel, safe_scan_id

__all__ = ["convert_scan", "failed_record", "source_spec", "source_from_spec", "settings_from_dict", "is_current"]


def source_spec(source: ScanSource) -> dict:
    """The ScanSource as JSON (tuples as lists): enough to read the source again on repair."""
    return dataclasses.asdict(source)


def source_from_spec(spec: dict) -> ScanSource:
    def tuples(v):
        return tuple(tuples(x) for x in v) if isinstance(v, list) else v

    return ScanSource(**{f.name: tuples(spec.get(f.name)) for f in dataclasses.fields(ScanSource)
                         if f.name in spec})


def settings_from_dict(d: dict) -> ConvertSettings:
    names = {f.name for f in dataclasses.fields(ConvertSettings)}
    return ConvertSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def is_current(store: VolumeStore, record: dict | None, settings: ConvertSettings) -> bool:
    """A published scan made with `settings` whose folder still has every recorded file at its size.

    A stat per file: cheap enough for every rerun, and it catches deleted or truncated shards,
    which Zarr would read as zeros. Records of older versions (no manifest) are not current.
    """
    return bool(record and record.get("status") == "ok" and record.get("settings_hash") == settings.hash
                and record.get("files") and record.get("content_digest")
                and not check_tree(store.tree, store.scan_rel(record["scan_id"], record), record["files"],
                                   full=False))


def _base_record(source: ScanSource, settings: ConvertSettings, source_key: str | None,
                 discovered_id: str | None) -> dict:
    return {
        "scan_id": source.scan_id, "dataset": source.dataset, "subset": source.subset,
        "modality": settings.modality or source.modality, "source_path": source.source_path,
        "source_key": source_key or _source_key(source), "discovered_id": discovered_id,
        "settings_hash": settings.hash, "settings": settings.to_dict(), "source": source_spec(source),
        "converted_at": datetime.now(timezone.utc).isoformat(),
    }


def failed_record(source: ScanSource, settings: ConvertSettings, reason: str, key: str | None = None,
                  source_checksum: str | None = None, source_key: str | None = None,
                  discovered_id: str | None = None) -> dict:
    rec = _base_record(source, settings, source_key, discovered_id)
    rec.update(status="failed", error=" ".join(str(reason).split())[:500], source_checksum=source_checksum,
               record_key=key or source.scan_id)
    return rec


def convert_scan(source: ScanSource, store_root: str, settings: ConvertSettings, token: str,
                 key: str | None = None, *, source_key: str | None = None, discovered_id: str | None = None,
                 force: bool = False) -> dict:
    """Convert one scan (`source.scan_id` is its id in the store); never raises for bad input (the
    reason goes into a failed record). `force` reconverts even an unchanged source (repair).

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
    old = None
    progress: dict = {}  # in a bucket, "written": the prefix of the new version this task has begun writing
    try:
        if source.problem:
            raise ValueError(source.problem)
        with readable_names(source) as readable:
            fp = safe_fingerprint(source)
            sum_ = checksum(readable)
            old = store.read_record(key)
            if not force and old and old.get("source_checksum") == sum_ and is_current(store, old, settings):
                old.update(fingerprint=fp, source_path=source.source_path, source=source_spec(source),
                           source_key=source_key or _source_key(source),
                           discovered_id=discovered_id or old.get("discovered_id"))
                store.write_record(old)
                result.update(status="skipped")
                return result
            with zarr.config.set({"threading.max_workers": 1}):
                record = _convert(source, readable, store, settings, sum_, fp, token, source_key, discovered_id,
                                  started_writing=lambda rel: progress.update(written=rel))
        staged = record.pop("_staged", None)
        result.update(status="ok", bytes=record["source_bytes"], notes=record.get("notes") or [])
    except Exception as exc:  # bad input of any kind becomes one failed row
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not isinstance(exc, (ValueError, RuntimeError, OSError, KeyError)):
            reason = f"{type(exc).__name__}: {reason} [{traceback.format_exc(limit=1).splitlines()[-1]}]"
        if not isinstance(exc, LockLostError):  # (lost: the store is another writer's now, touch nothing of it)
            reason += _record_failure(store, source, settings, reason, key, sum_, source_key, discovered_id,
                                      progress.get("written"), old)
        elif progress.get("written") and not _committed(store, key or source.scan_id, progress["written"]):
            _delete_quietly(store, progress["written"])  # its own prefix, unless a record names it after all
        result.update(error=reason)
    finally:
        if staged and os.path.exists(staged):
            shutil.rmtree(staged, ignore_errors=True)
    result["seconds"] = time.perf_counter() - t0
    result["peak_rss_bytes"] = _status_kb("VmHWM") * 1024
    result["task_peak_bytes"] = max(0, result["peak_rss_bytes"] - rss_start)
    result["pid"] = os.getpid()
    return result


def _record_failure(store: VolumeStore, source: ScanSource, settings: ConvertSettings, reason: str, key: str,
                    sum_: str | None, source_key: str | None, discovered_id: str | None, written: str | None,
                    old: dict | None) -> str:
    """The failed record, or - in a bucket, failing while writing a new version of a scan with a committed one -
    the committed version kept (its record and objects untouched, as when the task is killed there); then the
    objects this task wrote removed. A store that refuses even that (a full or read-only bucket) leaves them to the
    next run, which reclaims every prefix no ok record names. Never raises; returns what to add to the reason
    ("" when all went well)."""
    if written is not None:
        _delete_quietly(store, written)
        if old is not None and old.get("status") == "ok":
            return (f"; the version converted at {old.get('converted_at') or '?'} stays committed (the next "
                    "`genesis convert` tries again)")
    said = ""
    try:
        store.write_record(failed_record(source, settings, reason, key=key, source_checksum=sum_,
                                         source_key=source_key, discovered_id=discovered_id))
    except Exception as exc:  # noqa: BLE001 - said in the task's result
        return f" (and its failed record could not be written: {_first_line(exc)})"
    if not store.is_local and old is not None and old.get("status") == "ok":  # uncommitted now: its objects go
        _delete_quietly(store, store.scan_rel(old["scan_id"], old))
    return said


def _delete_quietly(store: VolumeStore, rel: str) -> None:
    """Delete the objects under `rel` in a bucket; one that cannot be deleted is reclaimed by the next run."""
    try:
        store.tree.delete_prefix(rel)
    except Exception:  # noqa: BLE001 - reclaimed by the next run
        pass


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _utf8(path: str) -> bool:
    try:
        path.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def safe_fingerprint(source: ScanSource) -> str:
    """`fingerprint`, also for file names that are not UTF-8 (hashed as their exact bytes)."""
    try:
        return fingerprint(source)
    except UnicodeEncodeError:
        h = hashlib.sha256(repr((source.kind, [os.fsencode(f) for f in source.files],
                                 [(n, os.fsencode(p)) for n, p in source.labels])).encode())
        for f in list(source.files) + [p for _, p in source.labels]:
            try:
                st = os.stat(f)
                h.update(os.fsencode(f) + f":{st.st_size}:{st.st_mtime_ns}".encode())
            except OSError:
                h.update(os.fsencode(f) + b":missing")
        return h.hexdigest()


def _shadowed_nifti(path: str) -> bool:
    """ITK's NIfTI reader asked for `s.nii.gz` reads `s.nii` when both exist: the other file's voxels."""
    return path.lower().endswith(".nii.gz") and os.path.exists(path[:-3])


@contextmanager
def readable_names(source: ScanSource):
    """The source itself, or - when a file name is not valid UTF-8, which SimpleITK cannot take (it
    aborts the whole process), or a `.nii.gz` sits beside a `.nii` of the same stem, which ITK would read
    instead - a copy reading self-contained files through symlinks with plain names in a temporary
    folder. Names are fixed (`f0.nii.gz`, ...), so the checksum is stable."""
    paths = list(source.files) + [p for _, p in source.labels] + ([source.archive] if source.archive else [])
    bad = [p for p in paths if not _utf8(p)]
    shadowed = [p for p in paths if _shadowed_nifti(p)]
    if not bad and not shadowed:
        yield source
        return
    self_contained = (source.kind == "dicom" or (source.kind == "image" and all(
        p.lower().endswith((".nii", ".nii.gz", ".mha", ".nrrd")) for p in paths)))
    if shadowed and not self_contained:
        raise ValueError(f"{printable(shadowed[0])} sits beside {printable(shadowed[0][:-3])}, which ITK would read "
                         "in its place; rename one of them and convert again")
    if bad and not self_contained:
        raise ValueError(f"file name {printable(bad[0])} is not valid UTF-8 and {source.kind} sources name other "
                         "files inside them; rename it to UTF-8 and convert again")
    tmp = tempfile.mkdtemp(prefix="genesis-utf8-")
    try:
        def link(i: int, path: str) -> str:
            low = path.lower()
            suffix = ".nii.gz" if low.endswith(".nii.gz") else os.path.splitext(low)[1]
            target = os.path.join(tmp, f"f{i}{suffix}")
            os.symlink(os.path.abspath(path), target)
            return target

        files = tuple(link(i, f) for i, f in enumerate(source.files))
        labels = tuple((n, link(len(files) + i, p)) for i, (n, p) in enumerate(source.labels))
        yield dataclasses.replace(source, files=files, labels=labels)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(source: ScanSource, readable: ScanSource, store: VolumeStore, settings: ConvertSettings, sum_: str,
             fp: str, token: str, source_key: str | None, discovered_id: str | None, started_writing=None) -> dict:
    from pipeline.ingest.read import source_files

    volume = read_source(readable, settings.max_scan_bytes)
    if settings.modality:
        volume.modality = settings.modality
    elif volume.modality == "OT" and source.kind in ("image", "image-zip", "metaimage") and _looks_like_ct(volume):
        volume.modality = "CT"
    if settings.spacing:
        volume = resample(volume, settings.spacing, settings.max_scan_bytes)
    volume = check_and_cast(volume, settings.min_side)

    files = source_files(readable)
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
    description = source.dataset_description()
    if description is not None:  # nnU-Net/MSD: the channel names and label values, readable without the source
        genesis["dataset_json"] = description
    if store.is_local:
        stored, files = _write_staged(store, source, volume, settings, genesis, token)
        path = f"scans/{safe_scan_id(source.scan_id)}"
    else:
        stored, files, path = _write_version(store, source, volume, settings, genesis, token, started_writing)
    record = _base_record(source, settings, source_key, discovered_id)
    record.update(
        status="ok", error=None, modality=volume.modality, source_checksum=sum_, fingerprint=fp,
        path=path, dtype=genesis["dtype"], shape=genesis["shape"],
        spacing=genesis["spacing"], origin=genesis["origin"], source_direction=genesis["source_direction"],
        labels=genesis["labels"], value_min=genesis["value_range"][0], value_max=genesis["value_range"][1],
        source_bytes=source_bytes, stored_bytes=stored, record_key=source.scan_id,
        files=files, content_digest=content_digest(files),
        notes=[a["contour_summary"] for a in volume.label_attrs.values()
               if isinstance(a, dict) and a.get("contour_summary")],
    )
    if store.is_local:
        store.write_record(record)
    else:
        _commit_version(store, record, token)
    stop_point("convert:record")
    return record


def _commit_version(store: VolumeStore, record: dict, token: str) -> None:
    """In a bucket: commit the version `record["path"]` names by writing its record - only while the lease is
    still ours, and only over the record as it was read here (If-Match), so a writer whose lease was taken
    over between the check and the PUT cannot replace a newer commit - then delete the version it replaced."""
    sid = record["scan_id"]
    old, etag = store.read_record_versioned(record.get("record_key") or sid)
    if store.lock_token() != token:
        raise LockLostError("the store's lease is no longer held by this conversion; not committing")
    if not store.commit_record(record, etag):
        # a conditional PUT whose response was lost is retried by the client and then refused (412/409) although
        # it was written: the record naming this task's own prefix (unique to it) says the commit happened
        now = store.read_record(record.get("record_key") or sid)
        if not (now and now.get("path") == record["path"] and now.get("status") == "ok"):
            raise LockLostError(f"the record of scan {sid} was changed by another writer while this conversion "
                                "wrote it; not committing")
    if old is not None and old.get("status") == "ok":
        replaced = store.scan_rel(sid, old)
        if replaced != record["path"]:
            _delete_quietly(store, replaced)  # a reader still on it gets "open it again" (checked_store)


def _committed(store: VolumeStore, key: str, rel: str) -> bool:
    """Whether the record of `key` names the prefix `rel` (then it is committed and must stay)."""
    try:
        rec = store.read_record(key)
    except Exception:  # noqa: BLE001 - unreadable: keep the prefix (the next run's clear_staging decides)
        return True
    return bool(rec) and rec.get("path") == rel


class LockLostError(RuntimeError):
    """The store's lock (lease) is no longer this conversion's: it must change nothing more in the store."""


def _not_mine() -> LockLostError:
    return LockLostError("the store's lock is no longer held by this conversion; not publishing")


def _write_staged(store: VolumeStore, source: ScanSource, volume, settings: ConvertSettings, genesis: dict,
                  token: str) -> tuple[int, dict[str, str]]:
    """On disk: write into a private staging folder, take the manifest, rename it into scans/."""
    store.staging_dir.mkdir(exist_ok=True)
    staged = store.staging_dir / f"{safe_scan_id(source.scan_id)}.{uuid.uuid4().hex}"
    group = zarr.open_group(str(staged), mode="w")
    stored = write_image(group, volume, settings, genesis)
    storage_schemas.validate_attrs("volume_image", dict(group.attrs), str(staged))
    files = folder_manifest(staged)  # taken before publishing: what verify and reads hold the folder to
    if store.lock_token() != token:
        shutil.rmtree(staged, ignore_errors=True)
        raise _not_mine()
    store.publish(staged, source.scan_id)
    return stored, files


def _write_version(store: VolumeStore, source: ScanSource, volume, settings: ConvertSettings, genesis: dict,
                   token: str, started_writing=None) -> tuple[int, dict[str, str], str]:
    """In a bucket: write a new version of the scan under a fresh prefix of its own (`new_version_rel`), leaving
    the committed version, its record and its objects, as they are; the caller commits by writing the record.
    Returns (stored bytes, manifest, the prefix). The manifest's shard digests come from the bytes as written."""
    from pipeline.storage.shard_writer import TreeSink, Uploads

    if store.lock_token() != token:
        raise _not_mine()
    rel = new_version_rel(source.scan_id)
    if started_writing is not None:
        started_writing(rel)
    group = zarr.open_group(store=store.tree.zarr_store(rel, read_only=False), mode="w", zarr_format=3)
    sinks: list[TreeSink] = []
    with Uploads() as uploads:  # shards are PUT in the background while the next is compressed

        def sink(array_path: str) -> TreeSink:
            made = TreeSink(store.tree, f"{rel}/{array_path}", uploads)
            sinks.append(made)
            if len(sinks) == 2:  # the first array is written: a kill here leaves a half-written, uncommitted scan
                uploads.wait()
                stop_point("convert:objects")
            return made

        stored = write_image(group, volume, settings, genesis, sink=sink)
    storage_schemas.validate_attrs("volume_image", dict(group.attrs), f"{store.url}/{rel}")
    known = {f"{s.array_rel[len(rel) + 1:]}/{k}": v for s in sinks for k, v in s.written.items()}
    return stored, tree_manifest(store.tree, rel, known), rel


def _looks_like_ct(volume) -> bool:
    """NIfTI/NRRD carry no modality; air at about -1000 is the fingerprint of Hounsfield units."""
    v = volume.voxels
    return v.dtype.kind in "if" and float(v.min()) <= -900 and float(v.max()) >= 0
