"""`genesis patches pretrain`: Models Genesis cubes from a volume store into a reusable patch store.

One Dask task per scan leaves its accepted cubes as an encoded part and a small result file (cubes
held as the store's `cube_encoding`: clipped int16 HU when that is exact, see `pipeline.patches.encoding`); a
rerun of an interrupted extraction keeps the finished scans and does only the rest. The parts
are then assembled into a cubes array that holds exactly the cubes of the index (scans that gave
fewer or none leave no empty rows), one writer per shard (`pipeline.patches.assemble`). The
store becomes visible by one rename when complete.

One build per store at a time: the builder holds `ROOT/.pretrain-<key>.lock` (a `FileLock`, gone
with the builder however it dies; its workers die with it too, see `pipeline.cluster`). A run
killed at any step leaves a state the next run resumes: finished scans are kept, a build that got
as far as its attributes is only published (`pipeline.patches.assemble.open_building`). A build that fails on
an error a rerun would meet again (damaged data, no acceptable cube: `DETERMINISTIC_ERRORS`) removes its building
folder instead: there is nothing worth resuming.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from tqdm import tqdm

import storage_schemas
from pipeline.patches.assemble import (Part, assemble, building_complete, open_building, publish, save_part,
                                       stop_point)
from pipeline.patches.config import STORE_FORMAT, PretrainPatchConfig, content_key
from pipeline.patches.encoding import choose_encoding, encode_cubes, storage_dtype
from pipeline.patches.sampling import sample_cubes, scan_region
from pipeline.patches.splits import scan_seed, split_of
from pipeline.patches.store import PatchStore, catalog_hash
from pipeline.preflight import DETERMINISTIC_ERRORS
from pipeline.storage.locks import FileLock
from pipeline.volume_store.errors import StoreError
from pipeline.volume_store.store import CATALOG, VolumeStore

__all__ = ["extract_pretrain", "ExtractionResult", "extract_scan", "build_lock", "source_catalog",
           "NoCubesError", "discard_on_deterministic_error"]


class NoCubesError(RuntimeError):
    """No scan (case) gave a cube: every rerun with these settings fails the same way."""


@dataclass
class ExtractionResult:
    path: Path
    key: str
    reused: bool
    n_cubes: int = 0
    counts: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)  # [{"scan_id", "reason"}]
    seconds: float = 0.0
    failed: list = field(default_factory=list)  # [{"scan_id", "item", "reason"}]: candidates that gave no cube
    tasks: list = field(default_factory=list)  # per case/scan extracted by this run: n, seconds, task_peak_bytes,
    # pid, started (a worker's first task also pays its one-time set-up: imports, thread pools)
    whole_volume: int = 0  # task stores: test cases kept whole (in scans.parquet) for sliding-window evaluation
    phases: dict = field(default_factory=dict)  # seconds: plan, cluster start, cases, assemble, finish

    def report(self) -> str:
        verb = "reused existing" if self.reused else "built"
        lines = [f"{verb} patch store {self.path} (key {self.key}): {self.n_cubes} cubes "
                 + ", ".join(f"{k} {v}" for k, v in sorted(self.counts.items()))
                 + (f" (+ {self.whole_volume} whole test scans)" if self.whole_volume else "")
                 + f" in {self.seconds:.1f} s"]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} scans:")
            lines += [f"  {s['scan_id']}: {s['reason']}" for s in self.skipped]
        if self.failed:
            lines.append(f"failed {len(self.failed)} items:")
            lines += [f"  {f['scan_id']} {f['item']}: {f['reason']}" for f in self.failed]
        return "\n".join(lines)


def extract_scan(volume_root: str, scan_id: str, subset: str | None, slot: int, building: str,
                 config: PretrainPatchConfig, *, encoding: dict) -> dict:
    """Sample one scan's cubes, leave them (in the store's `encoding`) as a part and a result file; returns the result."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    store = VolumeStore(volume_root)
    group = store.open_scan(scan_id)
    meta = dict(group.attrs)["genesis"]
    level0 = group["0"]
    region, reason = scan_region(level0.shape, config)
    result = {"scan_id": scan_id, "slot": slot, "rows": [], "reason": reason}
    if reason is None:
        rng = np.random.default_rng([config.seed, scan_seed(scan_id)])
        sample = sample_cubes(level0[region], rng, config)  # reads only the chunks crop windows can touch
        if sample is None or len(sample.cubes) == 0:
            result["reason"] = f"no acceptable crop in {sample.attempts if sample else 0} attempts (too dense)"
        else:
            n = len(sample.cubes)
            save_part(Path(building) / "parts" / f"{slot:06d}", encode_cubes(sample.cubes, encoding)[:, None])
            spacing = np.asarray(meta["spacing"])
            origin = np.asarray(meta["origin"])
            direction = np.asarray(meta["direction"]).reshape(3, 3)  # ITK (x, y, z)
            split = split_of(scan_id, subset, config.seed, config.split_fractions)
            starts = sample.starts + np.array([r.start for r in region])
            centres_idx = starts + (sample.sizes - 1) / 2.0
            # world = origin + D @ (spacing * index) in (x, y, z); reversed into (z, y, x)
            centres_mm = (origin[::-1][None, :] + (direction @ (centres_idx[:, ::-1] * spacing[::-1]).T).T)[:, ::-1]
            result["n"] = n
            for j in range(n):
                result["rows"].append({
                    "scan_id": scan_id, "split": split, "subset": subset,
                    "z": int(starts[j, 0]), "y": int(starts[j, 1]), "x": int(starts[j, 2]),
                    "crop_d": int(sample.sizes[j, 0]), "crop_h": int(sample.sizes[j, 1]),
                    "crop_w": int(sample.sizes[j, 2]), "center_z_mm": float(centres_mm[j, 0]),
                    "center_y_mm": float(centres_mm[j, 1]), "center_x_mm": float(centres_mm[j, 2]),
                    "scale": float(sample.scales[j]), "dense_fraction": float(sample.fractions[j]), "label": None,
                })
            if n < config.per_scan:
                result["short"] = f"only {n} of {config.per_scan} cubes accepted in {sample.attempts} attempts"
    path = Path(building) / "results" / f"{slot:06d}.json"
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def build_lock(root: Path, name: str) -> FileLock:
    """The lock of the one build of store `name` under `root` allowed at a time; `acquire()` raises
    LockBusyError (a RuntimeError) naming the run that holds it."""
    return FileLock(root / f".{name}.lock", f"building patch store {name}")


def source_catalog(vstore: VolumeStore):
    """The volume store's catalog, refused (StoreError: exit 2) when it is missing or lists no converted scan: a
    build over it would only say that no scan gave a cube."""
    path = vstore.root / CATALOG
    if not path.is_file():
        raise StoreError(f"{vstore.root}: its {CATALOG} is missing; rebuild it from the scans' records with "
                         f"`genesis stores verify {vstore.root} --repair`")
    catalog = vstore.catalog()
    if not (catalog["status"] == "ok").any():
        raise StoreError(f"{vstore.root}: {CATALOG} lists no converted scan ({len(catalog)} rows, none ok; see "
                         f"`genesis stores show {vstore.root}`)")
    return catalog


@contextlib.contextmanager
def discard_on_deterministic_error(building: Path):
    """Remove `building` when the build raises an error a rerun would meet again; any other failure (a lost
    worker, a full disk) and a kill leave it for the next run to resume."""
    try:
        yield
    except (NoCubesError, *DETERMINISTIC_ERRORS):
        shutil.rmtree(building, ignore_errors=True)
        raise


def _found(final: Path, key: str, t0: float, reused: bool) -> ExtractionResult:
    ps = PatchStore(final)
    return ExtractionResult(path=final, key=key, reused=reused, n_cubes=len(ps), counts=ps.attrs["counts"],
                            skipped=ps.attrs["skipped_scans"], seconds=time.perf_counter() - t0)


def extract_pretrain(volume_root: str, config: PretrainPatchConfig = PretrainPatchConfig(),
                     out_root: str | None = None, workers: int = 2, scheduler: str | None = None,
                     progress: bool = True) -> ExtractionResult:
    """Build (or find) the pretraining patch store for `volume_root` and `config`."""
    t0 = time.perf_counter()
    vstore = VolumeStore(volume_root)
    catalog = source_catalog(vstore)
    source_hash = catalog_hash(catalog)
    key = content_key(source_hash, config)
    root = Path(out_root) if out_root else Path(volume_root).resolve().parent / "patch_stores"
    final = root / f"pretrain-{key}"
    if (final / "zarr.json").exists():
        return _found(final, key, t0, reused=True)
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root, final.name):
        if (final / "zarr.json").exists():  # published by a run that held the lock until just now
            return _found(final, key, t0, reused=True)
        building = root / f".building-{final.name}"
        if building_complete(building, key):  # a killed run had written everything but not yet renamed
            publish(building, final)
            return _found(final, key, t0, reused=False)
        with discard_on_deterministic_error(building):
            return _build(vstore, catalog, source_hash, config, key, building, final, workers, scheduler,
                          progress, t0)


def _parts_of(result: dict) -> list[tuple[str, int]]:
    """The part a scan's result stands for (none when the scan gave no cube)."""
    return [(f"{result['slot']:06d}", len(result["rows"]))] if result["rows"] else []


def _build(vstore, catalog, source_hash, config, key, building, final, workers, scheduler, progress,
           t0) -> ExtractionResult:
    ok = catalog[catalog["status"] == "ok"].sort_values("scan_id").reset_index(drop=True)
    cube = tuple(config.cube_size)
    done = open_building(building, _parts_of)
    encoding = choose_encoding(config, ok["dtype"].fillna("float32").unique())  # unknown dtype: assume float
    # a scan without a subset reads back from the catalog as NaN when others have one
    todo = [(slot, r.scan_id, r.subset if isinstance(r.subset, str) else None)
            for slot, r in enumerate(ok.itertuples()) if slot not in done]
    results = list(done.values())
    from distributed import as_completed

    from pipeline.cluster import dask_client

    with dask_client(workers, scheduler) as client:
        stop_point("patches:started")
        if todo:
            bar = tqdm(total=len(ok), initial=len(done), desc="patches", unit="scan", file=sys.stderr,
                       disable=not progress)
            futures = [client.submit(extract_scan, str(vstore.root), sid, subset, slot, str(building), config,
                                     encoding=encoding, pure=False) for slot, sid, subset in todo]
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update(1)
                stop_point("patches:result")
            bar.close()
        results.sort(key=lambda r: r["slot"])
        parts = [Part(str(building / "parts" / f"{r['slot']:06d}"), len(r["rows"])) for r in results]
        if any(p.n for p in parts):
            assemble(building, "cubes", parts, (1,) + cube, storage_dtype(encoding), config.per_scan,
                     ("cube", "c", "z", "y", "x"), client=client)
    rows = [row for r in results for row in r["rows"]]
    for i, row in enumerate(rows):
        row["row"] = i
    skipped = [{"scan_id": r["scan_id"], "reason": r["reason"]} for r in results if r["reason"]]
    skipped.sort(key=lambda s: s["scan_id"])
    if not rows:
        raise NoCubesError(f"no acceptable cubes in any of the {len(ok)} scans of {vstore.root}: "
                           + "; ".join(f"{s['scan_id']}: {s['reason']}" for s in skipped[:5]))
    schema = storage_schemas.arrow_schema("patch_index")
    table = pa.Table.from_pylist(rows, schema=schema)
    table = storage_schemas.check_table("patch_index", table, str(building / "index.parquet"))
    pq.write_table(table, building / "index.parquet")
    counts = {s: int(sum(1 for r in rows if r["split"] == s)) for s in ("train", "validation", "test")}
    attrs = {"genesis": {
        "kind": "patch-store", "schema_version": 2, "store_format": STORE_FORMAT, "key": key, "purpose": "pretrain",
        "config": config.to_dict(), "cube_encoding": encoding,
        "volume_store": {"path": str(vstore.root.resolve()), "catalog_hash": source_hash},
        "cube_shape": list(cube), "n_cubes": len(rows), "counts": counts, "shard_rows": config.per_scan,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "skipped_scans": skipped, "value_range": [0.0, 1.0],
        "short_scans": [{"scan_id": r["scan_id"], "reason": r["short"]} for r in results if r.get("short")],
    }}
    storage_schemas.validate_attrs("patch_store", attrs, str(building))
    zarr.open_group(str(building), mode="r+").attrs.update(attrs)  # last: it marks the build complete
    stop_point("patches:publish")
    publish(building, final)
    return ExtractionResult(path=final, key=key, reused=False, n_cubes=len(rows), counts=counts, skipped=skipped,
                            seconds=time.perf_counter() - t0)
