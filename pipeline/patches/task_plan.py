"""What a task patch store will hold, decided on the driver before any voxel is read.

From the volume store's catalog, scan attributes and tables: the cases of the task (a scan, or
for multi-channel tasks the sequences of one subject), their patients and splits, and for
classification the candidates each case gets (all positives; negatives subsampled by a seeded ratio
in train and validation only: the test split scores every candidate, as the reference's AUC does).
Everything here is small metadata; extraction tasks get one case each.

Bad input stops here, before anything is built (one-line ValueError): a fold-based task whose data
lacks folds, has a fold beyond the task's or a patient in two folds (each naming the patient and the
folds file), a splits file naming unknown cases or putting a patient in two splits.
A fold-based plan gives every case cubes (each fold is some run's test fold); its `split` is the
view for `spec.split.test_fold` (`pipeline.tasks.splits.fold_assignment`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.patches.store import catalog_rows
from pipeline.tasks.spec import TaskSpec
from pipeline.tasks.splits import SPLITS, assign_splits, left_out_reason
from pipeline.volume_store.store import VolumeStore
from pipeline.volume_store.tables import read_table

__all__ = ["TaskPlan", "plan_task", "patient_of"]

_PATIENT_KEYS = ("patient_id", "PatientID", "case")
PLAN_VERSION = 2
"""Part of every task store's key: bump it when planning changes what a store holds (2: NCC's test split
keeps every candidate, fold stores hold every fold, patients without a fold are left out)."""


@dataclass
class TaskPlan:
    cases: list[dict] = field(default_factory=list)
    """One dict per case: case_id, patient_id, split, subset, scan_ids, label_scan, label, cubes (bool),
    candidates (classification: list of dicts)."""
    skipped: list[dict] = field(default_factory=list)
    """[{"scan_id", "reason"}] scans of the dataset the task cannot use."""
    source_digest: str = ""
    """Hash of everything the store is made from (scans' content, settings, the table rows used)."""
    candidates_without_scan: int = 0
    candidate_counts: dict = field(default_factory=dict)
    """Classification: {split: {"candidates", "positives", "negatives", "negatives_kept"}} over the candidates
    of the split's scans, before and after the negatives are subsampled (test: all kept)."""


def patient_of(scan_id: str, genesis: dict) -> str:
    """The patient a scan belongs to: the source's patient identifier, else the scan itself."""
    ids = (genesis.get("source") or {}).get("identifiers") or {}
    for key in _PATIENT_KEYS:
        if ids.get(key):
            return str(ids[key])
    return scan_id


def _scan_attrs(vstore: VolumeStore, scan_ids: list[str]) -> dict[str, dict]:
    out = {}
    for sid in scan_ids:
        try:
            out[sid] = vstore.scan_attrs(sid)["genesis"]
        except (KeyError, OSError, ValueError):
            continue
    return out


def _grid(genesis: dict) -> tuple:
    """A scan's grid (spacing, origin, direction) rounded to 1e-3, to compare the channels of one case."""
    return tuple(tuple(round(float(v), 3) for v in genesis.get(k) or ()) for k in ("spacing", "origin", "direction"))


def _digest(rows: pd.DataFrame, extra: object) -> str:
    h = hashlib.sha256()
    for row in catalog_rows(rows):  # content digests too: a repaired or reconverted scan gives a new key
        h.update(json.dumps(row).encode())
    h.update(json.dumps({"plan_version": PLAN_VERSION, **extra}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def plan_task(vstore: VolumeStore, spec: TaskSpec, seed: int) -> TaskPlan:
    catalog = vstore.catalog()
    ok = catalog[catalog["status"] == "ok"]
    if spec.kind == "classification":
        return _plan_classification(vstore, ok, spec, seed)
    return _plan_segmentation(vstore, ok, spec)


def _splits(vstore: VolumeStore, spec: TaskSpec, cases: pd.DataFrame, known: set[str]) -> pd.Series:
    """The split rule on the cases, its errors named with the store and the task (one line, nothing built)."""
    try:
        return assign_splits(cases, spec.split, known)
    except ValueError as exc:
        raise ValueError(f"{vstore.root}: task {spec.name}: {exc}") from None


def _left_out(plan: TaskPlan, cases: pd.DataFrame, spec: TaskSpec, scans_of) -> pd.DataFrame:
    """Drop the cases the split rule leaves out (no fold, not in a splits CSV), each reported skipped."""
    out = cases["split"].map(lambda v: not isinstance(v, str))
    for c in cases[out].itertuples():
        reason = left_out_reason(spec.split, c.case_id, c.patient_id)
        plan.skipped.extend({"scan_id": sid, "reason": reason} for sid in scans_of(c))
    return cases[~out]


def _candidates_table(vstore: VolumeStore, spec: TaskSpec) -> tuple[pd.DataFrame, str]:
    name = spec.sampling.table
    table = read_table(vstore.root, name)
    scan_col = "seriesuid" if "seriesuid" in table.columns else "case_id"
    return table.reset_index(drop=True), scan_col


def _plan_classification(vstore: VolumeStore, ok: pd.DataFrame, spec: TaskSpec, seed: int) -> TaskPlan:
    plan = TaskPlan()
    ratio = spec.sampling.negatives_per_positive
    if spec.split.kind == "folds" and ratio is not None:
        raise ValueError(f"task {spec.name}: a fold-based store keeps every candidate (each fold is a test fold once, "
                         f"and a test split scores every candidate); negatives_per_positive must be None "
                         f"(--negative-ratio all), got {ratio:g}")
    table, scan_col = _candidates_table(vstore, spec)
    if table.empty:
        raise ValueError(f"{vstore.root} has no '{spec.sampling.table}' table: convert the {spec.dataset} data "
                         f"with its candidates file ({spec.data_layout})")
    table = table.assign(source_id=np.arange(len(table)))
    scan_of, plan.skipped = _join_names(ok, set(table[scan_col]), f"{spec.sampling.table} {scan_col}", spec.dataset)
    plan.candidates_without_scan = int((~table[scan_col].isin(scan_of)).sum())
    table = table[table[scan_col].isin(scan_of)]
    rows = ok[ok["scan_id"].isin({scan_of[k] for k in set(table[scan_col])})]
    attrs = _scan_attrs(vstore, sorted(rows["scan_id"]))
    cases = pd.DataFrame([{"case_id": key, "scan_id": sid, "patient_id": patient_of(key, attrs[sid]),
                           "subset": attrs[sid].get("subset"), "folds_file": _folds_file(attrs[sid])}
                          for key, sid in sorted(scan_of.items()) if sid in attrs],
                         columns=["case_id", "scan_id", "patient_id", "subset", "folds_file"])
    if "patient_id" in table.columns:  # PE-CAD names the patient in its table
        table_patients = table.drop_duplicates(scan_col).set_index(scan_col)["patient_id"].astype(str)
        cases["patient_id"] = cases["case_id"].map(table_patients).fillna(cases["patient_id"])
    known = set(ok["scan_id"]) | set(ok.get("discovered_id", pd.Series(dtype=object)).dropna())
    cases["split"] = _splits(vstore, spec, cases, known)
    cases = _left_out(plan, cases, spec, lambda c: [c.scan_id])
    split_of_case = dict(zip(cases["case_id"], cases["split"]))
    table = table.assign(split=table[scan_col].map(split_of_case))
    table = table[table["split"].map(lambda v: isinstance(v, str))]
    keep = _subsample_negatives(table, ratio, seed)
    chosen = table[keep]
    plan.candidate_counts = _candidate_counts(table, keep)
    by_case = {case_id: group for case_id, group in chosen.groupby(scan_col, sort=False)}  # one pass, not one per case
    for c in cases.itertuples():
        mine = by_case.get(c.case_id)
        if mine is None:
            continue
        cands = [{"source_id": int(r["source_id"]), "xyz": [float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])],
                  "label": int(r["class"]), "direction": _direction(r)} for r in mine.to_dict("records")]
        plan.cases.append({"case_id": c.case_id, "patient_id": c.patient_id, "split": c.split,
                           "subset": c.subset, "scan_ids": [c.scan_id], "label_scan": None, "label": None,
                           "cubes": True, "candidates": cands})
    columns = ["source_id", scan_col, "coordX", "coordY", "coordZ", "class"]
    columns += [c for c in ("dirX", "dirY", "dirZ") if c in chosen.columns]  # a corrected direction is a new store
    used = chosen[columns].to_numpy().tolist()
    plan.source_digest = _digest(rows, {"table": spec.sampling.table, "rows": used})
    return plan


def _folds_file(genesis: dict) -> str | None:
    """The pe_folds.csv a PE-CAD scan took its fold from (beside its source), to name in a fold error."""
    path = (genesis.get("source") or {}).get("path")
    return os.path.join(os.path.dirname(path), "pe_folds.csv") if genesis.get("dataset") == "pe" and path else None


def _join_names(ok: pd.DataFrame, wanted: set, what: str, dataset: str) -> tuple[dict[str, str], list[dict]]:
    """{name a dataset table uses -> scan id} for the ok scans whose name the table has, and the scans left
    out. A table names a scan as discovery did (LUNA16's seriesuid, PE-CAD's case id): the catalog's
    `discovered_id`, which stays the same when the scan id got a suffix (two sources of one name);
    catalogs of older versions lack it, their scan ids are the names. Two ok scans of one name (different
    files of the same series name) cannot both take its rows: the one of the task's dataset, then the one
    whose id is the name, then the first id, does; the others are reported skipped."""
    names = ok["discovered_id"] if "discovered_id" in ok.columns else pd.Series(None, index=ok.index, dtype=object)
    names = names.where(names.notna(), ok["scan_id"])
    scan_of: dict[str, str] = {}
    skipped: list[dict] = []
    for name, sid, ds in sorted(zip(names, ok["scan_id"], ok["dataset"]),
                                key=lambda t: (t[0], t[2] != dataset, t[1] != t[0], t[1])):
        if name not in wanted:
            continue
        if name in scan_of:
            skipped.append({"scan_id": sid, "reason": f"has the same name {name!r} as scan {scan_of[name]}, "
                                                      f"which the {what} rows are joined to"})
        else:
            scan_of[name] = sid
    return scan_of, skipped


def _direction(r: dict) -> list[float] | None:
    vals = [r.get("dirX"), r.get("dirY"), r.get("dirZ")]
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
        return None
    return [float(v) for v in vals]


def _subsample_negatives(table: pd.DataFrame, ratio: float | None, seed: int) -> np.ndarray:
    """Keep every positive; in train and validation at most ceil(ratio x positives) negatives per split (at
    least ratio when a split has no positive), drawn with a seeded generator; the test split keeps every
    candidate (the reference's AUC is over all of them). ratio None keeps everything."""
    keep = np.ones(len(table), dtype=bool)
    if ratio is None:
        return keep
    labels = table["class"].to_numpy()
    splits = table["split"].to_numpy()
    for i, split in enumerate(SPLITS):
        if split == "test":
            continue
        in_split = splits == split
        neg = np.flatnonzero(in_split & (labels == 0))
        n_keep = int(math.ceil(ratio * max(int((in_split & (labels > 0)).sum()), 1)))
        if len(neg) > n_keep:
            rng = np.random.default_rng([seed, i, 0xC0FFEE])
            drop = np.setdiff1d(neg, rng.choice(neg, size=n_keep, replace=False))
            keep[drop] = False
    return keep


def _candidate_counts(table: pd.DataFrame, keep: np.ndarray) -> dict:
    labels = table["class"].to_numpy()
    splits = table["split"].to_numpy()
    out = {}
    for split in SPLITS:
        in_split = splits == split
        out[split] = {"candidates": int(in_split.sum()), "positives": int((in_split & (labels > 0)).sum()),
                      "negatives": int((in_split & (labels == 0)).sum()),
                      "negatives_kept": int((in_split & (labels == 0) & keep).sum())}
    return out


def _plan_segmentation(vstore: VolumeStore, ok: pd.DataFrame, spec: TaskSpec) -> TaskPlan:
    plan = TaskPlan()
    label = spec.sampling.label
    rows = ok[ok["dataset"] == spec.dataset]
    if rows.empty:
        raise ValueError(f"{vstore.root} has no scans of dataset '{spec.dataset}' for task {spec.name}: "
                         f"convert {spec.data_layout}")
    attrs = _scan_attrs(vstore, sorted(rows["scan_id"]))
    groups: dict[str, dict[str, str]] = {}
    info: dict[str, dict] = {}
    for sid, g in attrs.items():
        ids = (g.get("source") or {}).get("identifiers") or {}
        case = str(ids.get("case", sid)) if spec.channels else sid
        seq = str(ids.get("sequence", "")).lower() if spec.channels else ""
        groups.setdefault(case, {})[seq] = sid
        info.setdefault(case, {"patient_id": patient_of(sid, g), "subset": g.get("subset")})
    cases = []
    for case, members in sorted(groups.items()):
        if spec.channels:
            missing = [c for c in spec.channels if c not in members]
            if missing:
                for sid in members.values():
                    plan.skipped.append({"scan_id": sid, "reason": f"case {case} has no {'/'.join(missing)} "
                                         f"sequence (task {spec.name} reads {','.join(spec.channels)})"})
                continue
            scan_ids = [members[c] for c in spec.channels]
            grids = {sid: _grid(attrs[sid]) for sid in scan_ids}
            if len(set(grids.values())) > 1:  # nnU-Net's rule; else the channels' cubes would not align
                for sid in members.values():
                    plan.skipped.append({"scan_id": sid, "reason": f"case {case}: channels {', '.join(scan_ids)} "
                                         f"lie on different grids (spacing, origin or direction differ)"})
                continue
        else:
            scan_ids = [members[""]]
        label_scan = next((s for s in scan_ids if label in (attrs[s].get("labels") or [])),
                          next((s for s in members.values() if label in (attrs[s].get("labels") or [])), None))
        if label_scan is None:
            plan.skipped.append({"scan_id": scan_ids[0], "reason": f"no label map '{label}'"})
            continue
        cases.append({"case_id": case, "scan_ids": scan_ids, "label_scan": label_scan, "label": label, **info[case]})
    frame = pd.DataFrame(cases, columns=["case_id", "patient_id", "subset", "scan_ids", "label_scan", "label"])
    frame["split"] = _splits(vstore, spec, frame, set(groups) | set(attrs))
    frame = _left_out(plan, frame, spec, lambda c: list(c.scan_ids))
    folds = spec.split.kind == "folds"  # every fold is some run's test fold: every case needs its cubes
    for c in frame.to_dict("records"):
        c["cubes"] = folds or not (spec.sampling.whole_volume_test and c["split"] == "test")
        c["candidates"] = None
        plan.cases.append(c)
    plan.source_digest = _digest(rows, {"label": label, "channels": list(spec.channels)})
    return plan
