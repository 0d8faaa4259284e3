"""`genesis patches pretrain`: Models Genesis cubes from a volume store into a reusable patch store.

Cubes are drawn by one of two recipes (`PretrainPatchConfig.recipe`, "auto" = from the store's modality): "ct",
the reference's (`pipeline.patches.sampling`, clipped HU, cubes stored as int16 when exact), or "mr", ours for MR
and every other modality (`pipeline.patches.mr_sampling`, per-scan percentiles, cubes stored as float32 in
[0, 1]). A store that mixes modalities is refused unless `modality` picks one (`pipeline.patches.source`); a
store whose scans' tags give no validation scan gets a seeded validation share (`pipeline.patches.splits`), drawn
once every scan is sampled, among the scans that gave cubes (the index's `split` column is written then).

One Dask task per scan leaves its accepted cubes as an encoded part and a small result file (cubes
held as the store's `cube_encoding`: clipped int16 HU when that is exact, see `pipeline.patches.encoding`); a
rerun of an interrupted extraction keeps the finished scans and does only the rest. The parts
are then assembled into a cubes array that holds exactly the cubes of the index (scans that gave
fewer or none leave no empty rows), one writer per shard (`pipeline.patches.assemble`). The
store becomes visible when complete: by one rename on disk, by its commit object written last in a bucket
(`--out s3://BUCKET/PREFIX`; `pipeline.patches.site`).

The publish-once protocol is `pipeline.runtime.build.build_once` (the one every store build runs): one build
per store at a time: the builder holds `ROOT/.pretrain-<key>.lock` (a `FileLock` on disk, gone with the builder
however it dies, its workers with it, see `pipeline.cluster`; a renewed lease in a bucket). A run killed at any
step leaves a state the next run resumes: finished scans are kept, a build that got as far as its attributes is
only published (`pipeline.patches.assemble.open_building`). A build that fails on an error a rerun would meet
again (damaged data, no acceptable cube: `DETERMINISTIC_ERRORS`) removes its building folder instead: there is
nothing worth resuming.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

import storage_schemas
from pipeline.patches.assemble import Part, assemble, join, save_part, save_result
from pipeline.patches.config import STORE_FORMAT, PretrainPatchConfig, content_key
from pipeline.patches.encoding import UNIT_FLOAT32, choose_encoding, encode_cubes, storage_dtype
from pipeline.patches.mr_sampling import (foreground_threshold, mr_scan_region, normalise, pad, percentile_window,
                                          sample_mr_cubes)
from pipeline.patches.outcome import ExtractionResult, NoCubesError, found
from pipeline.patches.sampling import crop_sizes, sample_cubes, scan_region
from pipeline.patches.site import PatchStoreSite, parquet_bytes, patch_root, volume_url
from pipeline.patches.source import resolve_recipe, source_catalog
from pipeline.patches.splits import pretrain_splits, scan_seed, split_of
from pipeline.patches.store import catalog_hash
from pipeline.runtime.build import Built, BuildSpec, Item, build_once
from pipeline.volume_store.store import VolumeStore

__all__ = ["extract_pretrain", "extract_scan"]


def extract_scan(volume_root: str, scan_id: str, subset: str | None, slot: int, building: str,
                 config: PretrainPatchConfig, *, encoding: dict, split: str | None = None) -> dict:
    """Sample one scan's cubes, leave them (in the store's `encoding`) as a part and a result file; returns the
    result. `split`: the scan's split as the build decided it; None: by `split_of` (the build's `_complete`
    sets the final one, a drawn validation share included)."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    store = VolumeStore(volume_root)
    group = store.open_scan(scan_id)
    meta = dict(group.attrs)["genesis"]
    level0 = group["0"]
    mr = config.recipe == "mr"
    if mr:
        layout = mr_scan_region(level0.shape, config)  # padding and borders leave every scan room for a crop
        region, reason = layout.region, None
    else:
        region, reason = scan_region(level0.shape, config)
        reason = reason and f"{reason}; {_ct_shape_hint(level0.shape, config)}"
    result = {"scan_id": scan_id, "slot": slot, "rows": [], "reason": reason}
    if reason is None:
        rng = np.random.default_rng([config.seed, scan_seed(scan_id)])
        if mr:
            volume = level0[:]  # the percentiles and the foreground threshold are the whole scan's
            window, why = percentile_window(volume, config.percentiles)
            result["intensity_window"] = list(window) if window else None
            sample = None
            if window:
                unit = normalise(volume, window)
                threshold = foreground_threshold(unit, config)
                result["foreground_threshold"] = threshold
                if layout.padded:
                    result["padding"] = [list(p) for p in layout.padding]
                sample = sample_mr_cubes(pad(unit, layout.padding)[region], rng, config, threshold, layout)
            offset = layout.offset()
        else:
            why = None
            sample = sample_cubes(level0[region], rng, config)  # reads only the chunks crop windows can touch
            offset = np.array([r.start for r in region])
        if why:
            result["reason"] = why
        elif sample is None or len(sample.cubes) == 0:
            attempts = sample.attempts if sample else 0
            result["reason"] = (_mr_no_cube(attempts, result, level0.shape, config) if mr else
                f"no acceptable crop in {attempts} attempts (too dense: each had more than "
                f"max_dense_fraction={config.max_dense_fraction:g} of its voxels at or above {config.dense_hu:g} HU, "
                f"the reference's lung rule); raise --max-dense-fraction, or use --recipe mr for a scan that is not "
                f"chest CT")
        else:
            n = len(sample.cubes)
            save_part(join(building, "parts", f"{slot:06d}"), encode_cubes(sample.cubes, encoding)[:, None])
            spacing = np.asarray(meta["spacing"])
            origin = np.asarray(meta["origin"])
            direction = np.asarray(meta["direction"]).reshape(3, 3)  # ITK (x, y, z)
            split = split or split_of(scan_id, subset, config.seed, config.split_fractions)
            starts = sample.starts + offset  # a padded mr scan's starts can be < 0 (the crop reaches its padding)
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
    return save_result(building, result)


def _mr_no_cube(attempts: int, result: dict, shape: tuple[int, int, int], config: PretrainPatchConfig) -> str:
    """Why an mr scan gave no cube, naming the options that change it."""
    threshold = result["foreground_threshold"]
    rule = "the scan's Otsu threshold" if config.foreground_threshold is None else "foreground_threshold"
    reason = (f"no crop in {attempts} attempts has {config.min_foreground:g} of its voxels foreground (above "
              f"{threshold:.3g}, {rule}, after percentile normalisation)")
    if result.get("padding"):
        padded = "x".join(str(n + a + b) for n, (a, b) in zip(shape, result["padding"]))
        reason += f"; the {'x'.join(map(str, shape))} scan was padded with background to {padded}"
    options = f"lower --min-foreground (now {config.min_foreground:g})"
    return reason + "; " + options + (", or a smaller --size" if result.get("padding") else "")


def _ct_shape_hint(shape: tuple[int, int, int], config: PretrainPatchConfig) -> str:
    """Which option lets the reference's recipe take a scan that its borders or min_slices leave without a crop."""
    z, y, x = shape
    if z < config.min_slices:
        return f"lower --min-slices (now {config.min_slices}), or use --recipe mr for a small or non-CT volume"
    d, h, w = (int(v) for v in crop_sizes(config).min(axis=0))
    options = []
    if z - d - config.lookahead - 1 - config.border_z < config.border_z:
        options.append(f"--border-z (now {config.border_z})")
    if y - h - 1 - config.border_yx < config.border_yx or x - w - 1 - config.border_yx < config.border_yx:
        options.append(f"--border-yx (now {config.border_yx})")
    return f"{y}x{x} in-plane and {z} slices are too small for the borders and a {d}x{h}x{w} crop: lower " \
           f"{' or '.join(options + ['--size'])}, or use --recipe mr (borders scaled to the volume)"


def extract_pretrain(volume_root: str, config: PretrainPatchConfig = PretrainPatchConfig(),
                     out_root: str | None = None, workers: int = 2, scheduler: str | None = None,
                     progress: bool = True) -> ExtractionResult:
    """Build (or find) the pretraining patch store for `volume_root` and `config`.

    The scans and the recipe come first (`resolve_recipe`: one modality, "auto" -> ct for CT, mr otherwise),
    then whether the scans' tags leave a validation share to draw (`pretrain_splits`; the share itself is drawn
    after sampling, among the scans that gave cubes); the key covers the picked scans, the resolved recipe's
    fields and whether a validation share is drawn, so a CT store keeps the key it had before recipes existed."""
    t0 = time.perf_counter()
    vstore = VolumeStore(volume_root)
    catalog, config = resolve_recipe(vstore, source_catalog(vstore), config)
    source_hash = catalog_hash(catalog)
    ok = catalog[catalog["status"] == "ok"].sort_values("scan_id").reset_index(drop=True)
    # a scan without a subset reads back from the catalog as NaN when others have one
    subsets = [r.subset if isinstance(r.subset, str) else None for r in ok.itertuples()]
    splits = pretrain_splits(list(zip(ok["scan_id"], subsets)), config.seed, config.split_fractions,
                             where=str(vstore.root))
    key = content_key(source_hash, config, validation_drawn=bool(splits.drawn))
    site = PatchStoreSite(patch_root(volume_root, out_root), f"pretrain-{key}", key, _parts_of)
    if config.recipe == "mr":
        encoding = dict(UNIT_FLOAT32)  # percentile-normalised values: no exact integer form
    else:
        encoding = choose_encoding(config, ok["dtype"].fillna("float32").unique())  # unknown dtype: assume float
    items = [Item(slot, (volume_url(vstore), r.scan_id, subset, slot, site.scaffold, config),
                  {"encoding": encoding})
             for slot, (r, subset) in enumerate(zip(ok.itertuples(), subsets))]

    def assemble_cubes(client, built: Built) -> None:
        parts = [Part(site.part(f"{r['slot']:06d}"), len(r["rows"])) for r in built.ordered()]
        if any(p.n for p in parts):
            assemble(site.store, "cubes", parts, (1,) + tuple(config.cube_size), storage_dtype(encoding),
                     config.per_scan, ("cube", "c", "z", "y", "x"), client=client)

    def complete(built: Built) -> ExtractionResult:
        return _complete(site, built.ordered(), vstore, len(ok), config, source_hash, encoding,
                         list(zip(ok["scan_id"], subsets)))

    return build_once(BuildSpec(
        site=site, items=items, task=extract_scan, found=lambda reused: found(site.final, key, t0, reused),
        assemble=assemble_cubes, complete=complete,
        published=lambda r: dataclasses.replace(r, seconds=time.perf_counter() - t0),
        workers=workers, scheduler=scheduler, desc="patches", unit="scan", progress=progress))


def _parts_of(result: dict) -> list[tuple[str, int]]:
    """The part a scan's result stands for (none when the scan gave no cube)."""
    return [(f"{result['slot']:06d}", len(result["rows"]))] if result["rows"] else []


def _complete(site: PatchStoreSite, results: list[dict], vstore: VolumeStore, n_scans: int,
              config: PretrainPatchConfig, source_hash: str, encoding: dict,
              scans: list[tuple[str, str | None]]) -> ExtractionResult:
    """The splits (a drawn validation share only among the scans that gave cubes, so it never ends empty while
    another scan could serve), the index and, last, the attributes that mark the build complete; the result
    (its time is set once published)."""
    store, key = site.store, site.key
    splits = pretrain_splits(scans, config.seed, config.split_fractions, where=str(vstore.root),
                             eligible={r["scan_id"] for r in results if r["rows"]})
    rows = [row for r in results for row in r["rows"]]
    for i, row in enumerate(rows):
        row["row"] = i
        row["split"] = splits.splits[row["scan_id"]]
    skipped = [{"scan_id": r["scan_id"], "reason": r["reason"]} for r in results if r["reason"]]
    skipped.sort(key=lambda s: s["scan_id"])
    if not rows:
        by_reason: dict[str, list[str]] = {}
        for s in skipped:
            by_reason.setdefault(s["reason"], []).append(s["scan_id"])
        raise NoCubesError(f"no acceptable cubes in any of the {n_scans} scans of {vstore.root}: " + "; ".join(
            f"{', '.join(ids[:3])}{f' and {len(ids) - 3} more' if len(ids) > 3 else ''}: {reason}"
            for reason, ids in list(by_reason.items())[:3]))
    schema = storage_schemas.arrow_schema("patch_index")
    table = pa.Table.from_pylist(rows, schema=schema)
    table = storage_schemas.check_table("patch_index", table, f"{site.final}/index.parquet")
    store.write("index.parquet", parquet_bytes(table))
    counts = {s: int(sum(1 for r in rows if r["split"] == s)) for s in ("train", "validation", "test")}
    note = splits.note
    if note is None and not counts["validation"]:
        note = (f"{vstore.root}: no validation scan gave a cube (validation scans: "
                f"{', '.join(s for s, v in sorted(splits.splits.items()) if v == 'validation')}): pretraining will "
                f"validate on its training cubes")
    validation = {"rule": "seeded share of the training scans" if splits.drawn else "the scans' own tags",
                  "scans": sorted(s for s, v in splits.splits.items() if v == "validation"), "note": note}
    attrs = {"genesis": {
        "kind": "patch-store", "schema_version": 2, "store_format": STORE_FORMAT, "key": key, "purpose": "pretrain",
        "config": config.to_dict(), "cube_encoding": encoding,
        "volume_store": {"path": volume_url(vstore, resolve=True), "catalog_hash": source_hash},
        "cube_shape": list(config.cube_size), "n_cubes": len(rows), "counts": counts, "shard_rows": config.per_scan,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "skipped_scans": skipped, "value_range": [0.0, 1.0],
        "short_scans": [{"scan_id": r["scan_id"], "reason": r["short"]} for r in results if r.get("short")],
        "recipe": _recipe_attrs(config, results), "validation": validation,
    }}
    storage_schemas.validate_attrs("patch_store", attrs, str(site.final))
    site.commit(attrs)  # last: it marks the build complete
    return ExtractionResult(path=site.final, key=key, reused=False, n_cubes=len(rows), counts=counts,
                            skipped=skipped, notes=[note] if note else [],
                            padded=attrs["genesis"]["recipe"].get("padded_scans", []))


def _recipe_attrs(config: PretrainPatchConfig, results: list[dict]) -> dict:
    """What the store's attributes say about how its cubes were made (`preprocessing_of` reads it back); for the
    mr recipe also each scan's foreground threshold and the scans padded to the crop's size."""
    out = {"name": config.recipe, "modality": config.modality, "intensity": config.intensity(),
           "cube_size": list(config.cube_size)}
    if config.recipe == "mr":
        out["origin"] = "ours (pipeline.patches.mr_sampling), not the reference's"
        out["acceptance"] = {"min_foreground": config.min_foreground,
                             "foreground_threshold": ("otsu per scan" if config.foreground_threshold is None
                                                      else config.foreground_threshold)}
        out["borders"] = {"border_z": config.border_z, "border_yx": config.border_yx,
                          "border_fraction": config.border_fraction, "rule": "min(border, border_fraction x axis, "
                                                                            "(axis - crop) // 2)"}
        out["foreground_thresholds"] = {r["scan_id"]: r["foreground_threshold"] for r in results
                                        if r.get("foreground_threshold") is not None}
        out["padding"] = "axes shorter than the crop padded evenly with 0 (the normalised background)"
        out["padded_scans"] = [{"scan_id": r["scan_id"], "padding": r["padding"]} for r in results if r.get("padding")]
    else:
        out["origin"] = "the Models Genesis reference (infinite_generator_3D.py)"
        out["acceptance"] = {"dense_hu": config.dense_hu, "max_dense_fraction": config.max_dense_fraction,
                             "lookahead": config.lookahead}
        out["borders"] = {"border_z": config.border_z, "border_yx": config.border_yx,
                          "min_slices": config.min_slices}
    return out
