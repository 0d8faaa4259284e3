"""Whether one of our numbers is computed as the published one: same metric, same unit, same protocol.

The published table (MedIA 2021, Table 4) holds one number per task and init, from the reference's Keras code
(MrGiovanni/ModelsGenesis, keras/downstream_tasks) on the full datasets, with the reference's splits, at full
labels, the fine-tuning recipe of its config.py, and ECC over its three folds. A row of our table stands beside
a published value only when it was computed the same way; otherwise the table says "not comparable (why)".

The checks, each a short reason when it fails:
- metric: the paper's metric of the task (`TaskSpec.metrics[0]`) names the published one (AUC, Keras mean_iou);
- unit: what the metric is computed over (a candidate, a cube, a whole volume) is the reference's;
- protocol, per run: the `paper` fine-tuning preset, no epoch cap, the whole network fine-tuned;
- protocol, per store (`store_differences`, recorded on each run when it is created): the reference's split rule
  (the registry's, not a `--splits` file), the task's cube size, and the reference's dataset, tested by size:
  the store holds at least 99% of the cases (patients for ECC) of the dataset the reference used
  (`REFERENCE_DATA`: a few unreadable scans do not make another dataset; a sample does);
- protocol, per row: a fold-based task's row pools every fold its store holds.
Label fractions below 1.0 have no published value at all (the table shows "-").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

__all__ = ["ReferenceData", "REFERENCE_DATA", "REFERENCE_UNITS", "METRIC_NAMES", "MIN_DATASET_SHARE",
           "metric_label", "our_unit", "store_cases", "store_differences", "run_differences", "row_differences"]

REFERENCE_COMMIT = "12f7feb67e509d5eb0b1a8f101592efbffa1c8f0"
"""The reference repository's commit the citations below were read at."""


@dataclass(frozen=True)
class ReferenceData:
    """The size of the dataset behind a published number."""

    cases: int
    counts: Literal["patients", "cases"]
    """What `cases` counts: distinct `patient_id` or distinct `case_id` of a task store's scans.parquet."""
    what: str
    source: str


REFERENCE_DATA: dict[str, ReferenceData] = {
    "ncc": ReferenceData(888, "cases", "LUNA16 scans (subsets 0-9)",
                         "keras/downstream_tasks/config.py:169-171 (ncc_config: subsets 0-4 / 5-6 / 7-9 of LUNA16)"),
    "ncs": ReferenceData(1018, "cases", "LIDC-IDRI scans",
                         "keras/downstream_tasks/data/ncs/data.txt (the reference's cubes, cut from LIDC-IDRI's "
                         "1,018 scans)"),
    "ecc": ReferenceData(117, "patients", "PE-CAD patients (3 folds of 39)",
                         "keras/downstream_tasks/data/ecc/{train,val,test}_cv-{1,2,3}.csv (117 patients)"),
    "lcs": ReferenceData(130, "cases", "LiTS 2017 volumes 0-129",
                         "keras/downstream_tasks/config.py:304-306 (lcs_config: volumes 0-99 / 100-114 / 115-129)"),
    "bms": ReferenceData(285, "cases", "BraTS 2018 cases (3 folds of 95)",
                         "keras/downstream_tasks/config.py:58-62 and data/bms/fold_{1,2,3}.csv (95 cases each)"),
}

REFERENCE_UNITS: dict[str, str] = {"ncc": "candidate", "ncs": "cube", "ecc": "candidate", "lcs": "volume",
                                   "bms": "volume"}
"""What the reference computes each published metric over: NCC's AUC over every candidate of the test subsets,
ECC's over candidates, NCS's Keras mean_iou over the test cubes (the NCS notebook), LCS's and BMS's over the
test volumes, pooled."""

METRIC_NAMES = {"auc": "AUC", "keras_mean_iou": "Keras mean_iou", "dice": "Dice"}
"""Our metric names (as logged, without `test_`) -> the names the published table uses."""

MIN_DATASET_SHARE = 0.99
"""A store is of the reference's dataset when it holds at least this share of its cases."""


def metric_label(metric: str) -> str:
    """auc -> AUC, keras_mean_iou -> Keras mean_iou (a name without a published counterpart is kept)."""
    return METRIC_NAMES.get(metric, metric)


def our_unit(spec) -> str:
    """What our paper metric of `spec` is computed over: one cube per candidate (classification), the test cubes,
    or whole test volumes (pooled)."""
    if spec.kind == "classification":
        return "candidate"
    return "volume" if spec.evaluation == "whole_volume" else "cube"


def store_cases(store, task: str) -> int | None:
    """The cases (patients for ECC, as the reference counts them) a task store holds, over every split and fold;
    None when it lists none (not a task store)."""
    try:
        scans = store.scans
    except Exception:  # noqa: BLE001 - a store without scans.parquet: no count
        return None
    ref = REFERENCE_DATA.get(task)
    column = "patient_id" if ref is not None and ref.counts == "patients" else "case_id"
    if column not in scans.columns:
        column = "case_id"
    return int(scans[column].nunique())


def _split_difference(stored: dict, reference: dict) -> str | None:
    """Why the store's split is not the reference's rule, or None. The seed of a seeded rule and the test fold are
    not part of the rule (every fold is run; a seeded draw has no reference value to match)."""
    import os

    if stored.get("kind") == "file" or stored.get("path"):
        return f"splits from the file {os.path.basename(str(stored.get('path') or '?'))}, not the reference's rule"
    ignore = {"seed", "test_fold"}
    a = {k: v for k, v in stored.items() if k not in ignore}
    b = {k: v for k, v in reference.items() if k not in ignore}
    if a == b:
        return None
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return f"split rule changed ({', '.join(changed)}), not the reference's"


def store_differences(store, task: str) -> list[str]:
    """How a task store differs from the data behind the published number (split rule, cube size, dataset size);
    [] when it does not. Read once per task on the driver and recorded on each of the task's runs."""
    from pipeline.tasks.registry import get_task

    spec = get_task(task)
    out = []
    stored = (store.attrs.get("config", {}).get("task", {}) or {}).get("split")
    if stored is None:
        out.append("split rule not recorded in the store")
    else:
        reason = _split_difference(stored, spec.to_dict()["split"])
        if reason:
            out.append(reason)
    shape = tuple(int(s) for s in store.attrs.get("cube_shape", ()) or ())
    if shape and shape != tuple(spec.cube_size):
        out.append(f"cubes {'x'.join(map(str, shape))}, the task's {'x'.join(map(str, spec.cube_size))}")
    ref = REFERENCE_DATA.get(task)
    if ref is not None:
        n = store_cases(store, task)
        if n is None or n < math.ceil(MIN_DATASET_SHARE * ref.cases):
            out.append(f"{'no' if n is None else n} {ref.counts}, the reference's dataset has {ref.cases} "
                       f"({ref.what})")
    return out


def run_differences(preset: str, freeze_encoder: bool, epochs_cap: str) -> list[str]:
    """How a fine-tuning's recipe differs from the reference's: not the paper preset, a capped epoch count (the
    reference trains to early stopping), a frozen encoder (the paper fine-tunes the whole network)."""
    out = []
    if preset != "paper":
        out.append(f"{preset or 'unknown'} preset, not paper")
    if epochs_cap not in ("", "None", "nan"):
        out.append(f"epochs capped at {epochs_cap}")
    if freeze_encoder:
        out.append("encoder frozen")
    return out


def row_differences(task: str, metric: str, runs, finished) -> list[str]:
    """Every reason (deduplicated, in order) why a table row's runs are not computed as the published value of
    `task`: metric and unit (from the registry), the runs' recipe and store, and the folds pooled. `runs`: the
    row's cells (pipeline.transfer.table's frame), finished or not; `finished`: a boolean per run (it gave a
    value); `metric`: our paper metric (as logged, without `test_`)."""
    import pandas as pd

    from pipeline.tasks.registry import get_task

    spec = get_task(task)
    reasons: list[str] = []
    published = spec.published.metric if spec.published else ""
    if metric_label(metric).lower() != published.lower():
        reasons.append(f"metric {metric_label(metric)}, published {published or 'none'}")
    ref_unit = REFERENCE_UNITS.get(task)
    if ref_unit is None:
        reasons.append("no reference protocol for this task")
    elif our_unit(spec) != ref_unit:
        reasons.append(f"scored per {our_unit(spec)}, the reference per {ref_unit}")
    if runs.empty:
        return reasons
    for r in runs.itertuples():
        reasons += run_differences(str(r.preset), bool(r.freeze_encoder), str(r.epochs))
        store = str(r.store_protocol)
        if store == "unknown":
            reasons.append("no protocol record on the run")
        elif store:
            reasons += store.split("; ")
    folds = {int(k) for f in runs["store_folds"] for k in str(f).split(",") if k.strip().isdigit()}
    if folds:
        done = {int(f) for f, ok in zip(runs["fold"], finished) if ok and not pd.isna(f)}
        if done != folds:
            reasons.append(f"folds {','.join(map(str, sorted(done))) or 'none'} of "
                           f"{','.join(map(str, sorted(folds)))}")
    return list(dict.fromkeys(reasons))
