"""`genesis convert`: every scan of the sources into the volume store, one Dask task per scan.

The driver takes the store's writer lock first (so a second conversion is refused instead of
interleaving, and two conversions racing on a new store never see each other's half-made
store), creates the store if absent, discovers the scans and gives each a unique, stable id
(scan_ids.py; sources are known by their canonical absolute paths, so how a path is spelled or
where convert runs does not matter), skips those already published with the same source and
settings whose files are all still there at their recorded sizes, hands the rest to Dask (a
local cluster of worker processes, or a running scheduler) and rebuilds the catalog from the
per-scan records at the end.

The skip check is deliberately a stat per file, so a rerun over a finished store costs almost
nothing: it catches deleted and truncated files, not a flipped byte inside one. The content
check is `genesis stores verify STORE` (every file against its recorded XXH3, every shard's
CRC32C), and reads check the CRC32Cs of what they read.

The store may be a folder or `s3://BUCKET/PREFIX` (`pipeline.storage.objects`): its location is checked first
(`Tree.check`: a bad URL, refused or missing credentials, a dead endpoint or a missing bucket is a
StorageError - one line, exit 2 - before anything is read or written), the writer lock is a lease in a
bucket, and the run starts by reclaiming the objects of scans a killed writer left uncommitted.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from pipeline.cluster import dask_client
from pipeline.ingest import ScanSource, discover
from pipeline.ingest.read import source_files
from pipeline.storage.objects import open_tree
from pipeline.volume_store.convert_task import convert_scan, failed_record, is_current, safe_fingerprint
from pipeline.volume_store.scan_ids import (Assigned, Known, assign_scan_ids, canonical_source, printable,
                                            source_exists)
from pipeline.volume_store.scan_ids import source_key as _source_key
from pipeline.volume_store.settings import ConvertSettings
from pipeline.volume_store.store import VolumeStore, check_store_path, init_store, lock_store
from pipeline.volume_store.tables import check_table_sources, store_tables

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
    store: str = ""

    @property
    def ok(self) -> bool:
        return not self.failed and not self.table_problems

    def report(self) -> str:
        lines = [f"converted {len(self.converted)}, skipped {len(self.skipped)} (already done), "
                 f"failed {len(self.failed)} in {self.seconds:.1f} s"]
        if self.skipped:  # the rerun's check is a stat per file (fast); say where the content check is
            lines.append(f"  skipped scans: every stored file is there at its recorded size; "
                         f"`genesis stores verify {printable(self.store) or 'STORE'}` checks their content")
        lines += [f"  NOTE   {printable(n)}" for n in self.notes]
        lines += [f"  FAILED {printable(sid)}  {printable(src)}: {printable(reason)}" for sid, src, reason in self.failed]
        lines += [f"  TABLE  {printable(p)}" for p in self.table_problems]
        return "\n".join(lines)


def _size(source: ScanSource) -> int:
    try:
        return sum(os.path.getsize(f) for f in source_files(source))
    except (OSError, ValueError):
        return 0


def _recorded_source(rec: dict) -> ScanSource | None:
    """The record's source with canonical paths (older records hold them relative to the folder convert
    ran in: resolved against the current one, so they match when they name the same file)."""
    from pipeline.volume_store.convert_task import source_from_spec

    spec = rec.get("source")
    try:
        if spec:
            src = source_from_spec(spec)
        else:
            src = ScanSource(scan_id="", kind="", dataset="", files=(), source_path=rec["source_path"])
        src = dataclasses.replace(src, scan_id=rec.get("discovered_id") or rec["scan_id"])
        return canonical_source(src)
    except (TypeError, ValueError, KeyError):
        return None


def known_sources(store: VolumeStore) -> tuple[dict[str, Known], dict[str, dict], list[tuple[str, str]]]:
    """What the store holds: source_key -> Known, record key -> record, and the unreadable records.

    Each record's source key is recomputed from its canonical source path, so records of older
    versions (relative paths, keys of those paths) are recognised by the sources they name."""
    known: dict[str, Known] = {}
    by_key: dict[str, dict] = {}
    damaged: list[tuple[str, str]] = []
    for key, rec, problem in store.record_files():
        if rec is None:
            damaged.append((key, problem or "unreadable"))
            continue
        by_key[key] = rec
        src = _recorded_source(rec) if rec.get("source_path") else None
        skey = _source_key(src) if src is not None else (rec.get("source_key") or f"record:{key}")
        rec["source_key"] = skey  # in memory only: the task writes the record again
        entry = Known(scan_id=rec["scan_id"], source_key=skey, source_path=src.source_path if src else "",
                      ok=rec.get("status") == "ok", discovered_id=rec.get("discovered_id") or rec["scan_id"],
                      exists=bool(src) and source_exists(src.source_path, src.archive),
                      source=src if src is not None and src.kind else None)
        if skey not in known or (entry.ok and not known[skey].ok):
            known[skey] = entry
    return known, by_key, damaged


def convert(sources: list[str], store_root: str, settings: ConvertSettings = ConvertSettings(),
            workers: int = 2, scheduler: str | None = None, progress: bool = True) -> ConversionSummary:
    """Convert `sources` into the volume store at `store_root`; see the module docstring."""
    t0 = time.perf_counter()
    tree = open_tree(store_root)  # StorageError (exit 2) for an unknown scheme or an s3:// URL without a bucket
    tree.check()  # credentials, endpoint, bucket: refused in seconds, before anything is written
    found = discover(sources)
    check_table_sources(found.tables)  # a table no task could use (a zero-length vessel direction) is bad usage: nothing starts
    check_store_path(tree)  # refuse a path that is not a store before anything is written there
    lock = lock_store(tree)
    summary = ConversionSummary(store=str(store_root))
    try:
        init_store(tree)
        store = VolumeStore(tree)
        reclaimed = store.clear_staging()
        if reclaimed:
            summary.notes.append(f"removed the uncommitted objects of {len(reclaimed)} scan(s) a killed run left "
                                 f"half-written: {', '.join(reclaimed[:5])}{' ...' if len(reclaimed) > 5 else ''}")
        known, records, damaged = known_sources(store)
        summary.notes += [f"record .records/{key}.json was damaged ({why}); its source is reconverted"
                          for key, why in damaged]
        summary.notes += _fold_notes(found.scans)
        scans = [canonical_source(s) for s in found.scans]
        assigned = assign_scan_ids(scans, known)
        if len(assigned) < len(scans):
            summary.notes.append(f"{len(scans) - len(assigned)} source(s) found twice (the same path given "
                                 "twice); each converted once")
        ids = {a.key for a in assigned}
        todo: list[Assigned] = []
        for a in assigned:
            for key, rec in list(records.items()):  # the source's records under other keys are stale now
                if rec.get("source_key") == a.source_key and key != _record_file_key(store, a.key):
                    store.delete_record(key)  # uncommit first: no reader opens a scan being removed
                    if rec.get("status") == "ok" and rec.get("scan_id") not in ids:
                        store.discard(rec["scan_id"])  # its folder too: no record would account for it
                    del records[key]
            src = a.source
            if a.duplicate_of is not None:
                reason = (f"same name {a.discovered_id!r} and same content as {a.duplicate_of}: one scan, "
                          "stored once")
                store.write_record(failed_record(src, settings, reason, key=a.key, source_key=a.source_key,
                                                 discovered_id=a.discovered_id))  # uncommits, then:
                store.discard(src.scan_id)
                summary.failed.append((src.scan_id, src.source_path, reason))
                continue
            old = records.get(_record_file_key(store, a.key))
            if not src.problem and old and old.get("source_path") == src.source_path \
                    and old.get("source_key") == a.source_key and old.get("fingerprint") == safe_fingerprint(src):
                if is_current(store, old, settings):
                    summary.skipped.append(src.scan_id)
                    continue
                if old.get("status") == "ok" and old.get("files") and old.get("settings_hash") == settings.hash:
                    summary.notes.append(f"scan {src.scan_id}: files missing or truncated in the store; reconverting")
            todo.append(a)
        todo.sort(key=lambda a: -_size(a.source))  # the largest first: the last tasks are short ones
        summary.source_bytes = sum(_size(a.source) for a in todo)
        if todo:
            _run_tasks(todo, store, settings, lock.token, workers, scheduler, progress, summary)
        summary.table_problems = store_tables(store.tree, found.tables)
        if hasattr(lock, "check"):
            lock.check()  # a lease taken over while this run was away: leave the catalog to its new holder
        store.write_catalog()
    finally:
        lock.release()
    summary.seconds = time.perf_counter() - t0
    return summary


def _fold_notes(scans: list[ScanSource]) -> list[str]:
    """PE-CAD's rule, said at conversion: a patient that pe_folds.csv does not list has no fold, and the ECC
    task leaves its scans out of the cross-validation (storage_schemas/PE_CAD_LAYOUT.md). One line per folder."""
    missing: dict[str, dict[str, list[str]]] = {}
    for s in scans:
        patient = dict(s.identifiers).get("patient_id")
        if s.dataset == "pe" and not s.problem and s.subset is None and patient is not None:
            folder = os.path.dirname(s.source_path)
            missing.setdefault(folder, {}).setdefault(patient, []).append(s.scan_id)
    notes = []
    for folder, patients in sorted(missing.items()):
        folds = os.path.join(folder, "pe_folds.csv")
        shown = "; ".join(f"{p} ({', '.join(sorted(c))})" for p, c in sorted(patients.items())[:10])
        more = f" and {len(patients) - 10} more" if len(patients) > 10 else ""
        where = folds if os.path.isfile(folds) else f"{folds} (absent)"
        notes.append(f"{len(patients)} patient(s) have no fold in {where}: {shown}{more}; their scans convert, and "
                     "the ECC task leaves them out of the cross-validation")
    return notes


def _record_file_key(store: VolumeStore, key: str) -> str:
    return store.record_key(key)


def _record_dead_task(store: VolumeStore, src: ScanSource, settings: ConvertSettings, reason: str,
                      a: Assigned) -> str:
    """A task whose worker died: its failed record - except in a bucket over a committed version, which stays
    committed (the task wrote its new version under a prefix of its own, which the next run reclaims), as when
    the whole run is killed. Returns what to add to the reason."""
    try:
        if not store.is_local:
            old = store.read_record(a.key)
            if old is not None and old.get("status") == "ok":
                return (f"; the version converted at {old.get('converted_at') or '?'} stays committed (the next "
                        "`genesis convert` tries again)")
        store.write_record(failed_record(src, settings, reason, key=a.key, source_key=a.source_key,
                                         discovered_id=a.discovered_id))
    except Exception as exc2:  # noqa: BLE001 - a store refusing writes fails this scan, not the run
        return f" (and its failed record could not be written: {str(exc2).strip()[:200]})"
    return ""


def _run_tasks(todo: list[Assigned], store, settings, token, workers, scheduler, progress, summary) -> None:
    from distributed import as_completed

    bar = tqdm(total=len(todo), desc="convert", unit="scan", file=sys.stderr, disable=not progress)
    with dask_client(workers, scheduler) as client:
        futures = {}
        for a in todo:
            fut = client.submit(convert_scan, a.source, store.url, settings, token, a.key,
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
                reason += _record_dead_task(store, src, settings, reason, a)
                res = {"status": "failed", "error": reason}
            if res["status"] == "ok":
                summary.converted.append(src.scan_id)
                summary.notes += [f"scan {src.scan_id}: {n}" for n in res.get("notes") or []]
            elif res["status"] == "skipped":
                summary.skipped.append(src.scan_id)
            else:
                summary.failed.append((src.scan_id, src.source_path, res["error"]))
            summary.peak_rss_bytes = max(summary.peak_rss_bytes, res.get("peak_rss_bytes", 0))
            summary.task_peak_bytes = max(summary.task_peak_bytes, res.get("task_peak_bytes", 0))
            bar.set_postfix(failed=len(summary.failed), refresh=False)
            bar.update(1)
    bar.close()
