"""Train / validation / test by patient, by the rule a task names (pure: tables in, splits out).

Every rule assigns whole patients, so no patient can be in two splits. Seeded rules permute the
sorted patient ids with the split's seed and cut at exact counts (largest remainder, at least
one patient per split once there are three), so a small sample still gets all three splits and
the same data and seed always give the same assignment.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from pipeline.patches.splits import split_of
from pipeline.tasks.spec import SplitRule

__all__ = ["SPLITS", "assign_splits", "seeded_patient_splits", "scan_index"]

SPLITS = ("train", "validation", "test")
_FOLD = re.compile(r"^fold(\d+)$")


def scan_index(scan_id: str) -> int | None:
    """The case number in an id such as `volume-17` (the last integer), None when there is none."""
    found = re.findall(r"\d+", scan_id)
    return int(found[-1]) if found else None


def _counts(n: int, fractions: tuple[float, float, float]) -> list[int]:
    raw = np.asarray(fractions) * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    if n >= 3:  # every split gets a patient: take from the largest
        for i in range(3):
            if counts[i] == 0:
                counts[int(np.argmax(counts))] -= 1
                counts[i] = 1
    return counts.tolist()


def seeded_patient_splits(patients: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """patient -> split: a seeded permutation of the sorted ids cut at exact counts."""
    ids = sorted(set(patients))
    order = np.random.default_rng([seed, 0x5B117]).permutation(len(ids))
    counts = _counts(len(ids), fractions)
    out: dict[str, str] = {}
    pos = 0
    for split, count in zip(SPLITS, counts):
        for i in order[pos:pos + count]:
            out[ids[i]] = split
        pos += count
    return out


def assign_splits(cases: pd.DataFrame, rule: SplitRule) -> pd.Series:
    """Split per row of `cases` (columns case_id, patient_id, subset); returns a Series indexed like it.

    A patient's split is decided once: by its first case (sorted by case id) for rules that read
    a per-scan tag, so a patient whose scans carry different tags still lands in one split.
    """
    if cases.empty:
        return pd.Series([], dtype=object)
    first = cases.sort_values("case_id").drop_duplicates("patient_id")
    per_patient: dict[str, str | None] = {}
    if rule.kind == "luna16_subsets":
        for r in first.itertuples():
            per_patient[r.patient_id] = (split_of(r.case_id, r.subset, rule.seed, rule.fractions)
                                         if isinstance(r.subset, str) and r.subset.startswith("subset") else None)
    elif rule.kind == "index_ranges":
        idx = {r.patient_id: scan_index(r.case_id) for r in first.itertuples()}
        covered = [any(i is not None and lo <= i <= hi for i in idx.values()) for lo, hi in rule.ranges]
        if all(covered):
            for pid, i in idx.items():
                per_patient[pid] = next((s for s, (lo, hi) in zip(SPLITS, rule.ranges)
                                         if i is not None and lo <= i <= hi), None)
    elif rule.kind == "folds":
        test = rule.test_fold
        validation = test % rule.n_folds + 1
        for r in first.itertuples():
            m = _FOLD.match(r.subset) if isinstance(r.subset, str) else None
            if m:
                k = int(m.group(1))
                per_patient[r.patient_id] = "test" if k == test else "validation" if k == validation else "train"
    rest = [p for p in first["patient_id"] if per_patient.get(p) is None]
    if rest:
        fractions = rule.fractions
        if rule.kind == "index_ranges":  # the fallback keeps the ranges' proportions
            sizes = np.array([hi - lo + 1 for lo, hi in rule.ranges], dtype=float)
            fractions = tuple(sizes / sizes.sum())
        per_patient.update(seeded_patient_splits(rest, fractions, rule.seed))
    return cases["patient_id"].map(per_patient)
