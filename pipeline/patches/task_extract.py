"""`genesis patches task TASK`: a task patch store (cubes, masks, labels, patient splits) from a volume store.

Layout (a Zarr v3 group, published when complete: by one rename on disk, by its commit object written last in a
bucket, see `pipeline.patches.site`)::

    ROOT/task-<task>-<key>/zarr.json      {"genesis": {"kind": "patch-store", "purpose": ..., "task": ..., ...}}
    ROOT/task-<task>-<key>/cubes          float32 (N, C, D, H, W) in [0, 1], exactly the rows of the index
    ROOT/task-<task>-<key>/masks          uint8 (N, 1, D, H, W), segmentation only, aligned with cubes
    ROOT/task-<task>-<key>/index.parquet  storage_schemas/task_patch_index.arrow.json
    ROOT/task-<task>-<key>/scans.parquet  storage_schemas/task_scans.arrow.json (whole-volume evaluation)

The key hashes the scans' content digests and settings, the table rows used, the TaskSpec's data
fields and the seed: the same inputs name the same folder, anything changed names a new one. The store keeps its
whole task too: the canonical task file (`task_file`, `pipeline.tasks.task_file.task_file_text`) and its sha256 in
its attributes, so a fine-tuning finds a user's task by name once its store exists. Only the data fields are in the
key: a task file that changes a training field (lr, patience, batch size) reuses the store, and the store's
recorded task file keeps the fields it was built with (fine-tune with the file's path to use the new ones).

Where cubes come from:
- classification: one cube per candidate, centred on the candidate's nearest voxel (index size // 2).
  A candidate with a vessel direction (PE-CAD's dirX, dirY, dirZ) gets a vessel-oriented cube, the
  paper's VOIR for ECC: resampled trilinearly in `pipeline.tasks.geometry.vessel_frame` (cube z along
  the vessel), one step per cube axis equal to the spacing of the scan axis it stands for (z, y, x),
  so a vessel along the scan's z axis gives exactly the axis-aligned crop, and every cube covers the
  same extent in mm as an axis-aligned one. The row's direction_x/y/z is the cube's z axis in world
  (x, y, z), its z/y/x and crop_* those of the axis-aligned crop with the same centre voxel, and its
  center_*_mm the world position of that centre voxel. Without a direction: the axis-aligned crop.
- segmentation: cubes cut from the task's grid (`pipeline.tasks.sampling.to_task_grid`: LCS halved
  in-plane, as the reference's 256 x 256 data); rows' z/y/x are voxels of that grid and their mm
  positions use its geometry (`pipeline.tasks.geometry.resized_geometry`).

Phase 1 is one Dask task per case writing an encoded part and a result file (a rerun keeps finished
cases); phase 2 assembles the parts into exact arrays, one writer per shard. The build holds
`ROOT/.task-<task>-<key>.lock` and survives a kill at any step the way the pretraining build does: both run
the one publish-once protocol, `pipeline.runtime.build.build_once`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from datetime import datetime, timezone

import numcodecs
import numpy as np
import pyarrow as pa
import torch
import zarr

import storage_schemas
from pipeline.ingest.read import describe_values, unknown_label_values
from pipeline.patches.assemble import Part, assemble, join, save_part, save_result
from pipeline.patches.outcome import ExtractionResult, NoCubesError, found
from pipeline.patches.site import PatchStoreSite, parquet_bytes, patch_root, volume_url
from pipeline.patches.source import source_catalog
from pipeline.patches.splits import scan_seed
from pipeline.patches.task_plan import TaskPlan, plan_task
from pipeline.peak_memory import reset_peak_rss, status_kb
from pipeline.runtime.build import Built, BuildSpec, Item, build_once
from pipeline.tasks import sampling as S
from pipeline.tasks.geometry import (cube_steps, direction_problem, index_to_world, outside_volume, resized_geometry,
                                     vessel_frame, world_to_index)
from pipeline.tasks.spec import TaskSpec
from pipeline.tasks.task_file import task_record
from pipeline.volume_store.store import VolumeStore

__all__ = ["extract_task", "extract_case", "task_key", "SHARD_ROWS"]

SHARD_ROWS = 16
EXTRACTOR_VERSION = 4
"""Part of the key: bump it when the sampling code changes what a store holds, so an old store is not reused.
4: vessel-oriented ECC cubes; segmentation cubes on the task grid (inplane_scale)."""


def task_key(plan: TaskPlan, spec: TaskSpec, seed: int) -> str:
    material = json.dumps({"purpose": "task", "spec": spec.data_dict(), "seed": seed,
                           "extractor": EXTRACTOR_VERSION}, sort_keys=True)
    return hashlib.sha256(f"{plan.source_digest}\n{material}".encode()).hexdigest()[:16]


# ---- phase 1: one case -------------------------------------------------------------------------

def _row(case: dict, scan_id: str, attrs: dict, start, crop_size, label: int, source_id: int,
         jitter=(0, 0, 0), fg: float = 0.0, direction=None, centre_zyx=None) -> dict:
    if centre_zyx is None:
        centre_zyx = np.asarray(start) + (np.asarray(crop_size) - 1) / 2.0
    centre_xyz = index_to_world(centre_zyx, attrs)[0]
    d = direction or [None, None, None]
    return {"case_id": case["case_id"], "scan_id": scan_id, "patient_id": case["patient_id"],
            "split": case["split"], "subset": case["subset"],
            "z": int(start[0]), "y": int(start[1]), "x": int(start[2]),
            "crop_d": int(crop_size[0]), "crop_h": int(crop_size[1]), "crop_w": int(crop_size[2]),
            "center_z_mm": float(centre_xyz[2]), "center_y_mm": float(centre_xyz[1]),
            "center_x_mm": float(centre_xyz[0]), "label": int(label), "source_id": int(source_id),
            "jitter_z": int(jitter[0]), "jitter_y": int(jitter[1]), "jitter_x": int(jitter[2]),
            "foreground_fraction": float(fg), "direction_x": d[0], "direction_y": d[1], "direction_z": d[2]}


def _candidate_cube(level0, attrs: dict, centre: np.ndarray, direction, crop_size, bounds):
    """(cube (1, D, H, W) in [0, 1], start, centre voxel or None, cube z axis in world or None) of one candidate:
    vessel-oriented when it has a direction, else the axis-aligned crop (see the module docstring)."""
    start = S.centred_start(centre, crop_size)
    if direction is None:
        return S.scale(S.crop(level0, start, crop_size, fill=bounds[0]), bounds)[None], start, None, None
    frame = vessel_frame(direction, attrs)
    steps = cube_steps(frame, np.asarray(attrs["spacing"], dtype=float), attrs)
    voxel = np.floor(np.asarray(centre, dtype=float) + 0.5)
    cube = S.scale(S.oriented_crop(level0, voxel, steps, crop_size, fill=bounds[0]), bounds)
    return cube[None], start, voxel, [float(v) for v in frame[0]]


def _classification_cubes(store: VolumeStore, case: dict, spec: TaskSpec):
    """One cube per candidate, read straight from the stored chunks around it."""
    sid = case["scan_ids"][0]
    group = store.open_scan(sid)
    attrs = dict(group.attrs)["genesis"]
    level0 = group["0"]
    crop_size = tuple(spec.sampling.crop_size or spec.cube_size)
    bounds = S.intensity_bounds(None if spec.intensity.kind == "window" else level0[...], spec.intensity)
    shape = np.asarray(level0.shape)
    cubes, rows, failed = [], [], []
    for cand in case["candidates"]:
        centre = world_to_index(cand["xyz"], attrs)[0]
        outside = outside_volume(cand["xyz"], centre, shape)
        if outside:
            failed.append({"scan_id": sid, "item": f"candidate {cand['source_id']}", "reason": outside})
            continue
        cube, start, voxel, axis = _candidate_cube(level0, attrs, centre, cand.get("direction"), crop_size, bounds)
        cubes.append(S.resize(cube, spec.cube_size, label=False))
        rows.append(_row(case, sid, attrs, start, crop_size, cand["label"], cand["source_id"],
                         direction=axis, centre_zyx=voxel))
    return cubes, [], rows, failed


def _read_case(store: VolumeStore, case: dict, spec: TaskSpec):
    """Channels on the task's grid (C, Z, Y, X) with their intensity bounds, the label map, its binary
    target, and the geometry attrs of that grid. Voxels stay in their stored dtype (int16 for CT) and are
    scaled crop by crop: a float copy of a whole case would cost several times the scan. A task resized
    in-plane (`to_task_grid`) gets float32 channels of the smaller grid instead."""
    channels, shapes, grids = [], [], []
    for sid in case["scan_ids"]:
        group = store.open_scan(sid)
        vol = group["0"][...]
        shapes.append(vol.shape)
        channels.append(vol)
        genesis = dict(group.attrs).get("genesis") or {}
        grids.append(tuple(tuple(np.round(np.asarray(genesis.get(k) or (), dtype=float), 3).tolist())
                           for k in ("spacing", "origin", "direction")))
    if len(set(shapes)) > 1:
        raise ValueError(f"case {case['case_id']}: channels {case['scan_ids']} have different shapes {shapes}")
    if len(set(grids)) > 1:  # nnU-Net's rule: every channel of a case on one grid; else cubes would not align
        raise ValueError(f"case {case['case_id']}: channels {case['scan_ids']} lie on different grids (spacing, "
                         f"origin, direction {grids})")
    group = store.open_scan(case["label_scan"])
    attrs = dict(group.attrs)["genesis"]
    label = group["labels"][case["label"]]["0"][...]
    if label.shape != shapes[0]:
        raise ValueError(f"case {case['case_id']}: label '{case['label']}' has shape {label.shape}, "
                         f"image {shapes[0]}")
    _check_task_labels(label, case, spec)
    image = channels[0][None] if len(channels) == 1 else np.stack(channels)  # one channel: a view, no copy
    image, label, _ = S.to_task_grid(image, label, attrs["spacing"], spec)
    if image.shape[1:] != shapes[0]:
        attrs = resized_geometry(attrs, shapes[0], image.shape[1:])
    channels = list(image)
    bounds = [S.intensity_bounds(ch, spec.intensity) for ch in channels]
    return channels, bounds, label, S.target_mask(label, spec.sampling.target_values), attrs


def _check_task_labels(label: np.ndarray, case: dict, spec: TaskSpec) -> None:
    """A task file's `labels` name every value its label maps may hold: a case whose map holds another is refused
    (a skipped case naming the values), never sampled with those voxels silently counted as background or
    target. Empty `labels` (the built-in tasks) check nothing here: their datasets' values are checked when
    converted."""
    if not spec.labels:
        return
    allowed = tuple(sorted({v for value in spec.labels.values()
                            for v in (value if isinstance(value, tuple) else (value,))}))
    extra = unknown_label_values(label, allowed)
    if extra:
        raise ValueError(f"case {case['case_id']}: label map '{case['label']}' of scan {case['label_scan']} holds "
                         f"value{'s' if len(extra) > 1 else ''} {describe_values(extra)} that task {spec.name}'s "
                         f"labels do not name ({', '.join(f'{v} {k}' for k, v in spec.labels.items())})")


def _no_target_warning(case: dict, spec: TaskSpec) -> str:
    target = "values > 0" if spec.sampling.target_values is None else \
        f"values {', '.join(map(str, spec.sampling.target_values))}"
    return (f"case {case['case_id']}: label map '{case['label']}' of scan {case['label_scan']} has no foreground "
            f"({target}) on the task's grid: its cubes are all background")


def _segmentation_cubes(store: VolumeStore, case: dict, spec: TaskSpec, rng: np.random.Generator):
    channels, bounds, label, mask, attrs = _read_case(store, case, spec)
    warning = None if mask.any() else _no_target_warning(case, spec)
    s = spec.sampling
    crop_size = tuple(s.crop_size or spec.cube_size)
    draws: list[tuple[np.ndarray, int, tuple[int, int, int]]] = []  # (start, source_id, jitter)
    if s.kind == "objects":
        for obj, centre in sorted(S.object_centres(label).items()):
            for _ in range(s.per_object):
                jitter = tuple(int(rng.integers(-j, j + 1)) for j in s.jitter)
                draws.append((S.centred_start(centre + np.asarray(jitter), crop_size), obj, jitter))
        n_neg, pos, neg = s.negatives_per_scan, 0.0, 1.0
    else:
        n_neg, pos, neg = s.per_scan, s.pos, s.neg
    del label
    if n_neg:
        body = np.zeros(mask.shape, dtype=bool)
        for ch, (lo, _) in zip(channels, bounds):
            body |= ch > lo  # inside the body: above the value that scales to 0
        centres, _ = S.pos_neg_centres(mask, body, n_neg, pos, neg, crop_size, rng)
        del body
        draws += [(S.centred_start(c, crop_size), -1, (0, 0, 0)) for c in centres]
    cubes, masks, rows = [], [], []
    for start, source_id, jitter in draws:
        cube = np.stack([S.scale(S.crop(ch, start, crop_size, fill=lo), (lo, hi))
                         for ch, (lo, hi) in zip(channels, bounds)])
        m = S.crop(mask.view(np.uint8), start, crop_size, fill=0)[None]
        cube, m = S.resize(cube, spec.cube_size, label=False), S.resize(m, spec.cube_size, label=True)
        cubes.append(cube)
        masks.append(m)
        rows.append(_row(case, case["label_scan"], attrs, start, crop_size, int(m.any()), source_id, jitter,
                         float(m.mean())))
    return cubes, masks, rows, [], warning


def extract_case(volume_root: str, case: dict, spec: TaskSpec, seed: int, slot: int, building: str) -> dict:
    """Cubes (and masks) of one case into encoded parts; leaves and returns its result (never raises for bad data)."""
    numcodecs.blosc.set_nthreads(1)
    rss_start = reset_peak_rss()
    started = time.time()
    t0 = time.perf_counter()
    store = VolumeStore(volume_root)
    result = {"slot": slot, "case_id": case["case_id"], "rows": [], "failed": [], "reason": None, "n": 0}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one task = one core (resizing); parallelism comes from the workers
    try:
        with zarr.config.set({"threading.max_workers": 1}):
            if spec.kind == "classification":
                cubes, masks, rows, failed = _classification_cubes(store, case, spec)
            else:
                rng = np.random.default_rng([seed, scan_seed(case["case_id"])])
                cubes, masks, rows, failed, result["warning"] = _segmentation_cubes(store, case, spec, rng)
    except (KeyError, ValueError, OSError) as exc:
        cubes, masks, rows, failed = [], [], [], []
        result["reason"] = " ".join(str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc).split())[:300]
    finally:
        torch.set_num_threads(threads)
    if cubes:  # encoded here, in parallel: assembly only concatenates
        save_part(join(building, "parts", f"{slot:06d}.cubes"), np.stack(cubes).astype(np.float32))
    if masks:
        save_part(join(building, "parts", f"{slot:06d}.masks"), np.stack(masks).astype(np.uint8))
    result.update(rows=rows, failed=failed, n=len(rows), seconds=time.perf_counter() - t0,
                  task_peak_bytes=max(0, status_kb("VmHWM") * 1024 - rss_start), pid=os.getpid(), started=started)
    return save_result(building, result)


# ---- driver -------------------------------------------------------------------------------------

def extract_task(volume_root: str, spec: TaskSpec, *, seed: int = 0, out_root: str | None = None, workers: int = 2,
                 scheduler: str | None = None, progress: bool = True) -> ExtractionResult:
    """Build (or find) the task patch store of `spec` over `volume_root`."""
    t0 = time.perf_counter()
    vstore = VolumeStore(volume_root)
    source_catalog(vstore)  # a missing catalog, or one without a converted scan: said as such (exit 2)
    if spec.split.kind == "folds":
        # the store holds every fold and its key ignores the test fold, so its stored `split` column is always
        # fold 1's run (whichever --test-fold built it first); fine-tuning picks a fold with `for_fold(k)`. The
        # plan still refuses data lacking any of folds 1..n_folds (`check_folds`), so every test fold is there
        spec = spec.with_overrides(**{"split.test_fold": 1})
    plan = plan_task(vstore, spec, seed)
    _check_plan(plan, spec, vstore)
    _check_cube_fits(plan, spec, vstore)
    phases = {"plan": time.perf_counter() - t0}
    if not plan.cases:
        raise RuntimeError(f"task {spec.name}: no usable case in {volume_root}: "
                           + "; ".join(f"{s['scan_id']}: {s['reason']}" for s in plan.skipped[:5]))
    key = task_key(plan, spec, seed)
    arrays = ("cubes", "masks") if spec.kind == "segmentation" else ("cubes",)

    def parts_of(r: dict) -> list[tuple[str, int]]:  # what extract_case leaves for a case with cubes
        return [(f"{r['slot']:06d}.{a}", r["n"]) for a in arrays] if r.get("n") else []

    site = PatchStoreSite(patch_root(volume_root, out_root), f"task-{spec.name}-{key}", key, parts_of)
    items = [Item(slot, (volume_url(vstore), c, spec, seed, slot, site.scaffold))
             for slot, c in enumerate(plan.cases) if c["cubes"]]
    return build_once(BuildSpec(
        site=site, items=items, task=extract_case, found=lambda reused: found(site.final, key, t0, reused),
        assemble=lambda client, built: _assemble(client, built, site, plan, spec),
        complete=lambda built: _complete(built, site, vstore, plan, spec, seed),
        published=lambda r: dataclasses.replace(r, seconds=time.perf_counter() - t0),
        workers=workers, scheduler=scheduler, desc=f"{spec.name} cubes", unit="case", progress=progress,
        phases=phases))


def _check_plan(plan: TaskPlan, spec: TaskSpec, vstore: VolumeStore) -> None:
    """Refuse, before any work, what no cube can be made of: a candidate whose vessel direction is not
    finite or has zero length (`genesis convert` refuses such a table; a store written by an older
    version may still hold one), and an in-plane resize of a classification task (its cubes are read
    straight from the stored chunks, at the stored resolution)."""
    if spec.kind == "classification" and S.inplane_scale(spec) != 1.0:
        raise ValueError(f"task {spec.name}: inplane_scale={S.inplane_scale(spec)} applies to segmentation "
                         "tasks only (classification cubes are cut at the stored resolution)")
    for case in plan.cases:
        for cand in case.get("candidates") or ():
            d = cand.get("direction")
            problem = None if d is None else direction_problem(d)
            if problem:
                table = f"{vstore.root}/tables/{spec.sampling.table}.parquet"
                raise ValueError(f"{table}: row {cand['source_id']} (case {case['case_id']}): vessel direction "
                                 f"(dirX, dirY, dirZ) = ({', '.join(f'{float(v):g}' for v in d)}) {problem}; "
                                 "reconvert with a unit vector along the vessel, or all three empty when unknown")


def _task_grid_shape(shape, spec: TaskSpec) -> tuple[int, int, int]:
    """A stored volume's shape on the task's grid (`sampling.to_task_grid`: y and x resized to round(n s))."""
    z, y, x = (int(v) for v in shape)
    s = S.inplane_scale(spec) if spec.kind == "segmentation" else 1.0
    return (z, y, x) if s == 1.0 else (z, max(1, round(y * s)), max(1, round(x * s)))


def _check_cube_fits(plan: TaskPlan, spec: TaskSpec, vstore: VolumeStore) -> None:
    """Refuse, before any work, a cube (or crop) larger than every volume of the task along every axis: each of
    its cubes would hold a whole volume and padding (a task file's cube size is easily written for another
    dataset's volumes). A cube larger along some axes only is cut with padding there, as before. Volumes are read
    from the catalog's `shape` column, on the task's grid."""
    crop = tuple(int(v) for v in (spec.sampling.crop_size or spec.cube_size))
    scan_ids = {sid for case in plan.cases for sid in case["scan_ids"]}
    catalog = vstore.catalog()
    if not scan_ids or "shape" not in catalog:
        return
    rows = catalog[catalog["scan_id"].isin(scan_ids)]
    shapes = {r.scan_id: _task_grid_shape(r.shape, spec) for r in rows.itertuples() if r.shape is not None
              and len(r.shape) == 3}
    if not shapes or any(any(c <= v for c, v in zip(crop, shape)) for shape in shapes.values()):
        return  # some volume is at least as large as the cube along some axis: its cubes are not all padding
    largest, shape = max(shapes.items(), key=lambda kv: (int(np.prod(kv[1])), kv[0]))
    what = "crop_size" if spec.sampling.crop_size else "cube_size"
    scaled = spec.kind == "segmentation" and S.inplane_scale(spec) != 1.0
    grid = f" on the task's grid (inplane_scale {S.inplane_scale(spec):g})" if scaled else ""
    raise ValueError(f"task {spec.name}: {what} {'x'.join(map(str, crop))} (z, y, x) is larger than every volume of "
                     f"{vstore.root} ({len(shapes)} scans); the largest is {largest} with "
                     f"{'x'.join(map(str, shape))}{grid}: use a smaller {what} in the task file (or --size)")


def _assemble(client, built: Built, site: PatchStoreSite, plan: TaskPlan, spec: TaskSpec) -> None:
    """Phase 2: the cases' parts into the exact `cubes` (and `masks`) arrays, on the build's cluster."""
    ordered = built.ordered()
    if sum(r["n"] for r in ordered) == 0:
        raise NoCubesError(f"task {spec.name}: no cube from any of the {len(plan.cases)} cases: "
                           + "; ".join(f"{r['case_id']}: {r['reason']}" for r in ordered if r["reason"])[:500])
    arrays = [("cubes", spec.in_channels, "float32")]
    if spec.kind == "segmentation":
        arrays.append(("masks", 1, "uint8"))
    for array, channels, dtype in arrays:
        parts = [Part(site.part(f"{r['slot']:06d}.{array}"), r["n"]) for r in ordered]
        assemble(site.store, array, parts, (channels,) + tuple(spec.cube_size), dtype, SHARD_ROWS,
                 ("cube", "c", "z", "y", "x"), client=client)


def _complete(built: Built, site: PatchStoreSite, vstore: VolumeStore, plan: TaskPlan, spec: TaskSpec,
              seed: int) -> ExtractionResult:
    """The tables and, last, the attributes that mark the build complete; the result (its time is set once
    published; `built.phases` is its `phases`, which the build fills to the end)."""
    key, ordered = site.key, built.ordered()
    rows = [row for r in ordered for row in r["rows"]]
    for i, row in enumerate(rows):
        row["row"] = i
    _add_fraction_order(rows, seed)
    _write_tables(site, plan, rows, built.results)
    failed = [f for r in ordered for f in r["failed"]]
    skipped = plan.skipped + [{"scan_id": r["case_id"], "reason": r["reason"]} for r in ordered if r["reason"]]
    warnings = [r["warning"] for r in ordered if r.get("warning")]
    counts = {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "validation", "test")}
    record = task_record(spec, "")
    attrs = {"genesis": {
        "kind": "patch-store", "schema_version": 1, "key": key, "purpose": spec.kind, "task": spec.name,
        "config": {"task": spec.data_dict(), "seed": seed}, "channels": list(spec.channels) or ["image"],
        "task_file": record.text, "task_file_sha256": record.sha256,
        "volume_store": {"path": volume_url(vstore, resolve=True), "catalog_hash": plan.source_digest},
        "cube_shape": list(spec.cube_size), "n_cubes": len(rows), "counts": counts, "shard_rows": SHARD_ROWS,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "skipped_scans": skipped, "failed_items": failed, "warnings": warnings, "value_range": [0.0, 1.0],
        "candidates_without_scan": plan.candidates_without_scan,
        "candidate_counts": plan.candidate_counts,
        "label_counts": {s: {str(k): sum(1 for r in rows if r["split"] == s and r["label"] == k) for k in (0, 1)}
                         for s in ("train", "validation", "test")},
    }}
    storage_schemas.validate_attrs("patch_store", attrs, str(site.final))
    site.commit(attrs)  # last: it marks the build complete
    return ExtractionResult(path=site.final, key=key, reused=False, n_cubes=len(rows), counts=counts,
                            skipped=skipped, failed=failed, phases=built.phases, notes=warnings,
                            whole_volume=sum(1 for c in plan.cases if not c["cubes"]),
                            tasks=[{k: r.get(k) for k in ("case_id", "n", "seconds", "task_peak_bytes", "pid", "started")}
                                   for r in ordered if "seconds" in r and r["slot"] not in built.resumed])


def _add_fraction_order(rows: list[dict], seed: int) -> None:
    """The nested label-fraction order of the training rows; the one rule `PatchStore.for_fold` recomputes."""
    from pipeline.tasks.splits import train_fraction_order

    order = train_fraction_order([r["split"] for r in rows], [r["label"] for r in rows], seed)
    for r, k in zip(rows, order):
        r["fraction_order"] = k


def _write_tables(site: PatchStoreSite, plan: TaskPlan, rows: list[dict], results: dict) -> None:
    table = pa.Table.from_pylist(rows, schema=storage_schemas.arrow_schema("task_patch_index"))
    table = storage_schemas.check_table("task_patch_index", table, f"{site.final}/index.parquet")
    site.store.write("index.parquet", parquet_bytes(table))
    n_by_slot = {s: r["n"] for s, r in results.items()}
    scans = [{"case_id": c["case_id"], "patient_id": c["patient_id"], "split": c["split"], "subset": c["subset"],
              "scan_ids": list(c["scan_ids"]), "label_scan": c["label_scan"], "label": c["label"],
              "n_cubes": int(n_by_slot.get(slot, 0))} for slot, c in enumerate(plan.cases)]
    t = pa.Table.from_pylist(scans, schema=storage_schemas.arrow_schema("task_scans"))
    site.store.write("scans.parquet", parquet_bytes(storage_schemas.check_table("task_scans", t,
                                                                                f"{site.final}/scans.parquet")))
