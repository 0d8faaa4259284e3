"""`genesis convert`: every scan of the sources into the volume store, one Dask task per scan.

The driver takes the store's writer lock first (so a second conversion is refused instead of
interleaving, and two conversions racing on a new store never see each other's half-made
store), creates the store if absent, discovers the scans and gives each a unique, stable id
(scan_ids.py), skips those already published with the same source and settings whose files are
all still there (a stat-only check, so a rerun over a finished store costs almost nothing),
hands the rest to Dask (a local cluster of worker processes, or a running scheduler) and
rebuilds the catalog from the per-scan records at the end.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pipeline.cluster import dask_client
from pipeline.ingest import ScanSource, discover
from pipeline.ingest.read import source_files
from pipeline.volume_store.convert_task import convert_scan, failed_record, is_current, safe_fingerprint
from pipeline.volume_store.scan_ids import Assigned, Known, assign_scan_ids, printable
from pipeline.volume_store.scan_ids import source_key as _source_key
from pipeline.volume_store.settings import ConvertSettings
from pipeline.volume_store.store import VolumeStore, check_store_path, init_store, lock_store
from pipeline.volume_store.tables import store_tables

__all__ = ["ConversionSummary", "convert", "known_sources"]


@dataclass
class ConversionSummary:
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (scan_id, source, reason)
    table_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """Store problems found and dealt with (damaged records, scans with missing files reconverted)."""
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    task_peak_bytes: int = 0
    """Largest memory one task needed above its worker's RSS at the task's start."""
    source_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.table_problems

    def report(self) -> str:
        lines = [f"converted {len(self.converted)}, skipped {len(self.skipped)} (already done), "
                 f"failed {len(self.failed)} in {self.seconds:.1f} s"]
        lines += [f"  NOTE   {printable(n)}" for n in self.notes]
        lines += [f"  FAILED {printable(sid)}  {printable(src)}: {printable(reason)}" for sid, src, reason in self.failed]
        lines += [f"  TABLE  {printable(p)}" for p in self.table_problems]
        return "\n".join(lines)


def _size(source: ScanSource) -> int:
    try:
        return sum(os.path.getsize(f) for f in source_files(source))
    except (OSError, ValueError):
        return 0


def known_sources(store: VolumeStore) -> tuple[dict[str, Known], dict[str, dict], list[tuple[str, str]]]:
    """What the store holds: source_key -> Known, record key -> record, and the unreadable records."""
    known: dict[str, Known] = {}
    by_key: dict[str, dict] = {}
    damaged: list[tuple[str, str]] = []
    for key, rec, problem in store.record_files():
        if rec is None:
            damaged.append((key, problem or "unreadable"))
            continue
        by_key[key] = rec
        skey = rec.get("source_key") or _source_key(ScanSource(
            scan_id=rec.get("discovered_id") or rec["scan_id"], kind="", dataset="", files=(),
            source_path=rec["source_path"]))
        rec.setdefault("source_key", skey)
        entry = Known(scan_id=rec["scan_id"], source_key=skey, source_path=rec["source_path"],
                      ok=rec.get("status") == "ok")
        if skey not in known or (entry.ok and not known[skey].ok):
            known[skey] = entry
    return known, by_key, damaged


def convert(sources: list[str], store_root: str, settings: ConvertSettings = ConvertSettings(),
            workers: int = 2, scheduler: str | None = None, progress: bool = True) -> ConversionSummary:
    """Convert `sources` into the volume store at `store_root`; see the module docstring."""
    t0 = time.perf_counter()
    found = discover(sources)
    root = Path(store_root)
    check_store_path(root)  # refuse a path that is not a store before anything is written there
    lock = lock_store(root)
    summary = ConversionSummary()
    try:
        init_store(root)
        store = VolumeStore(root)
        store.clear_staging()
        known, records, damaged = known_sources(store)
        summary.notes += [f"record .records/{key}.json was damaged ({why}); its source is reconverted"
                          for key, why in damaged]
        ordered = sorted(found.scans, key=lambda s: (-_size(s), s.source_path, s.scan_id))
        todo: list[Assigned] = []
        for a in assign_scan_ids(ordered, known):
            for key, rec in list(records.items()):  # the source's records under other keys are stale now
                if rec.get("source_key") == a.source_key and key != _record_file_key(store, a.key):
                    store.delete_record(key)
                    del records[key]
            src = a.source
            if a.duplicate_of is not None:
                reason = f"duplicate scan_id {a.discovered_id!r}: also from {a.duplicate_of}"
                store.write_record(failed_record(src, settings, reason, key=a.key, source_key=a.source_key,
                                                 discovered_id=a.discovered_id))
                summary.failed.append((src.scan_id, src.source_path, reason))
                continue
            old = records.get(_record_file_key(store, a.key))
            if not src.problem and old and old.get("source_path") == src.source_path \
                    and old.get("fingerprint") == safe_fingerprint(src):
                if is_current(store, old, settings):
                    summary.skipped.append(src.scan_id)
                    continue
                if old.get("status") == "ok" and old.get("files") and old.get("settings_hash") == settings.hash:
                    summary.notes.append(f"scan {src.scan_id}: files missing or truncated in the store; reconverting")
            todo.append(a)
        summary.source_bytes = sum(_size(a.source) for a in todo)
        if todo:
            _run_tasks(todo, store, settings, lock.token, workers, scheduler, progress, summary)
        summary.table_problems = store_tables(store.root, found.tables)
        store.write_catalog()
    finally:
        lock.release()
    summary.seconds = time.perf_counter() - t0
    return summary


def _record_file_key(store: VolumeStore, key: str) -> str:
    return store.record_path(key).stem


def _run_tasks(todo: list[Assigned], store, settings, token, workers, scheduler, progress, summary) -> None:
    from distributed import as_completed

    bar = tqdm(total=len(todo), desc="convert", unit="scan", file=sys.stderr, disable=not progress)
    with dask_client(workers, scheduler) as client:
        futures = {}
        for a in todo:
            fut = client.submit(convert_scan, a.source, str(store.root), settings, token, a.key,
                                source_key=a.source_key, discovered_id=a.discovered_id, pure=False,
                                key=f"convert-{a.source_key}-{token[:8]}")
            futures[fut] = a
        for fut in as_completed(futures):
            a = futures[fut]
            src = a.source
            try:
                res = fut.result()
            except Exception as exc:  # the worker died (e.g. out of memory): record, go on
                reason = f"worker failed: {type(exc).__name__}: {exc}"
                store.write_record(failed_record(src, settings, reason, key=a.key, source_key=a.source_key,
                                                 discovered_id=a.discovered_id))
                res = {"status": "failed", "error": reason}
            if res["status"] == "ok":
                summary.converted.append(src.scan_id)
            elif res["status"] == "skipped":
                summary.skipped.append(src.scan_id)
            else:
                summary.failed.append((src.scan_id, src.source_path, res["error"]))
            summary.peak_rss_bytes = max(summary.peak_rss_bytes, res.get("peak_rss_bytes", 0))
            summary.task_peak_bytes = max(summary.task_peak_bytes, res.get("task_peak_bytes", 0))
            bar.set_postfix(failed=len(summary.failed), refresh=False)
            bar.update(1)
    bar.close()
