"""`genesis convert`: every scan of the sources into the volume store, one Dask task per scan.

The driver discovers the scans, skips those already published with the same source and
settings (a stat-only check, so a rerun over a finished store costs almost nothing), hands
the rest to Dask (a local cluster of worker processes, or a running scheduler) and rebuilds
the catalog from the per-scan records at the end. It holds the store's writer lock throughout,
so a second conversion into the same store is refused instead of interleaving with it.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from pipeline.cluster import dask_client
from pipeline.ingest import ScanSource, discover, fingerprint
from pipeline.ingest.read import source_files
from pipeline.volume_store.convert_task import convert_scan, failed_record, record_key
from pipeline.volume_store.settings import ConvertSettings
from pipeline.volume_store.store import VolumeStore, init_store
from pipeline.volume_store.tables import store_tables

__all__ = ["ConversionSummary", "convert"]


@dataclass
class ConversionSummary:
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str, str]] = field(default_factory=list)  # (scan_id, source, reason)
    table_problems: list[str] = field(default_factory=list)
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
        lines += [f"  FAILED {sid}  {src}: {reason}" for sid, src, reason in self.failed]
        lines += [f"  TABLE  {p}" for p in self.table_problems]
        return "\n".join(lines)


def _size(source: ScanSource) -> int:
    try:
        return sum(os.path.getsize(f) for f in source_files(source))
    except OSError:
        return 0


def convert(sources: list[str], store_root: str, settings: ConvertSettings = ConvertSettings(),
            workers: int = 2, scheduler: str | None = None, progress: bool = True) -> ConversionSummary:
    """Convert `sources` into the volume store at `store_root`; see the module docstring."""
    t0 = time.perf_counter()
    found = discover(sources)
    init_store(store_root)
    store = VolumeStore(store_root)
    lock = store.lock()
    summary = ConversionSummary()
    try:
        store.clear_staging()
        todo: list[tuple[ScanSource, str]] = []
        seen: dict[str, str] = {}
        readable = {s.scan_id for s in found.scans if not s.problem}
        for src in sorted(found.scans, key=_size, reverse=True):
            if src.problem and src.scan_id in readable:  # never let an unreadable file's row replace a scan's
                todo.append((src, record_key(src, duplicate=True)))
                continue
            if src.scan_id in seen and not src.problem:
                key = record_key(src, duplicate=True)
                reason = f"duplicate scan_id {src.scan_id!r}: also from {seen[src.scan_id]}"
                store.write_record(failed_record(src, settings, reason, key=key))
                summary.failed.append((src.scan_id, src.source_path, reason))
                continue
            if not src.problem:
                seen[src.scan_id] = src.source_path
            old = store.read_record(src.scan_id)
            if (old and old.get("status") == "ok" and old.get("settings_hash") == settings.hash
                    and old.get("source_path") == src.source_path and old.get("fingerprint") == fingerprint(src)
                    and (store.scan_dir(src.scan_id) / "zarr.json").exists()):
                summary.skipped.append(src.scan_id)
                continue
            todo.append((src, src.scan_id))
        summary.source_bytes = sum(_size(s) for s, _ in todo)
        if todo:
            _run_tasks(todo, store, settings, lock.token, workers, scheduler, progress, summary)
        summary.table_problems = store_tables(store.root, found.tables)
        store.write_catalog()
    finally:
        store.unlock(lock)
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_tasks(todo, store, settings, token, workers, scheduler, progress, summary) -> None:
    from distributed import as_completed

    bar = tqdm(total=len(todo), desc="convert", unit="scan", file=sys.stderr, disable=not progress)
    with dask_client(workers, scheduler) as client:
        futures = {}
        for src, key in todo:
            fut = client.submit(convert_scan, src, str(store.root), settings, token, key, pure=False,
                                key=f"convert-{key}-{token[:8]}")
            futures[fut] = src
        for fut in as_completed(futures):
            src = futures[fut]
            try:
                res = fut.result()
            except Exception as exc:  # the worker died (e.g. out of memory): record, go on
                reason = f"worker failed: {type(exc).__name__}: {exc}"
                store.write_record(failed_record(src, settings, reason))
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
