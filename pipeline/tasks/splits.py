"""Train / validation / test by patient, by the rule a task names (pure: tables in, splits out).

Every rule assigns whole patients, so no patient can be in two splits (a splits file that tries is
refused). Seeded rules permute the sorted patient ids with the split's seed and cut at exact counts
(largest remainder, at least one patient per split once there are three), so a small sample still gets
all three splits and the same data and seed always give the same assignment.

The reference's protocols (MrGiovanni/ModelsGenesis, keras/downstream_tasks/config.py):
- ECC, `folds`: 3-fold cross-validation by patient; run k tests fold k and trains on the other two
  folds less a few validation patients (74 / 4 / 39, data/ecc/*_cv-k.csv). `fold_assignment` is the one
  function that makes a fold's splits, for the build and for `PatchStore.for_fold` alike.
- BMS, `reference_lists`: fold_1 + fold_2 shuffled by `random.Random(4)`, the first 1/8 validation,
  fold_3 test (config.py:58-62), on the lists shipped in `pipeline/tasks/data/bms/`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.tasks.spec import SplitRule, TaskSpec

__all__ = ["SPLITS", "assign_splits", "seeded_patient_splits", "scan_index", "split_of", "fold_of",
           "fold_assignment", "check_folds", "reference_list_splits", "read_splits_file", "with_splits_file",
           "left_out_reason", "train_fraction_order", "fold_view", "patient_folds"]

SPLITS = ("train", "validation", "test")
_FOLD = re.compile(r"^fold(\d+)$")
_LUNA_SPLITS = {**{i: "train" for i in range(5)}, 5: "validation", 6: "validation", 7: "test", 8: "test", 9: "test"}
_SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
_SHOWN = 10
"""Names an error lists before it says how many more there are."""


def scan_index(scan_id: str) -> int | None:
    """The case number in an id such as `volume-17` (the last integer), None when there is none."""
    found = re.findall(r"\d+", scan_id)
    return int(found[-1]) if found else None


def split_of(scan_id: str, subset: str | None, seed: int, fractions: tuple[float, float, float]) -> str:
    """train / validation / test: subset0-4 / 5-6 / 7-9 for LUNA16 (the reference, config.py:169-171); a
    dataset's own split tag when it has one; otherwise a uniform draw from hash(seed, scan_id) against
    `fractions` (by scan, never by cube)."""
    if subset:
        m = re.fullmatch(r"subset(\d+)", subset)
        if m and int(m.group(1)) in _LUNA_SPLITS:
            return _LUNA_SPLITS[int(m.group(1))]
        if subset in SPLITS:
            return subset
    u = int.from_bytes(hashlib.sha256(f"{seed}:{scan_id}".encode()).digest()[:8], "little") / 2**64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


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


def _names(items: Sequence[str]) -> str:
    items = list(items)
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


# ---- folds (ECC) ---------------------------------------------------------------------------------

def fold_of(subset) -> int | None:
    """K of a `foldK` subset tag (PE-CAD's pe_folds.csv), None for anything else."""
    m = _FOLD.match(subset) if isinstance(subset, str) else None
    return int(m.group(1)) if m else None


def fold_assignment(patient_folds: Mapping[str, int], test_fold: int, validation_fraction: float,
                    seed: int) -> dict[str, str]:
    """patient -> split for cross-validation run `test_fold`: its fold is test; of the other folds'
    patients (sorted, then permuted by a generator seeded with the split seed and the fold) the first
    round(validation_fraction x n) are validation, at least one while one is left to train; the rest train.

    The reference's 74 / 4 / 39: 78 training-fold patients x 0.05 = 3.9 -> 4 validation."""
    test = sorted(p for p, k in patient_folds.items() if k == test_fold)
    pool = sorted(p for p, k in patient_folds.items() if k != test_fold)
    n_val = min(max(1, int(math.floor(validation_fraction * len(pool) + 0.5))), max(len(pool) - 1, 0))
    order = np.random.default_rng([seed, 0xF01D5, test_fold]).permutation(len(pool))
    validation = {pool[i] for i in order[:n_val]}
    out = {p: "test" for p in test}
    out.update({p: "validation" if p in validation else "train" for p in pool})
    return out


def check_folds(found: set[int], rule: SplitRule) -> None:
    """The data's folds must be exactly 1..n_folds (so every run has its test fold); names what was found."""
    want = set(range(1, rule.n_folds + 1))
    if found != want:
        have = ", ".join(f"fold{k}" for k in sorted(found)) or "no fold at all"
        lacking = sorted(want - found)
        extra = sorted(found - want)
        what = (f"lacks {', '.join(f'fold{k}' for k in lacking)}" if lacking else "") + \
               ("; " if lacking and extra else "") + \
               (f"has folds beyond n_folds={rule.n_folds}: {', '.join(f'fold{k}' for k in extra)}" if extra else "")
        raise ValueError(f"split rule 'folds' needs folds 1..{rule.n_folds} (test fold {rule.test_fold}); the data has "
                         f"{have} ({what}); patients get their fold from pe_folds.csv")


def _folds_file(cases: pd.DataFrame, patient: str) -> str:
    """Where a patient's fold came from: the cases' `folds_file` column when the planner gives one."""
    if "folds_file" in cases.columns:
        files = sorted({str(f) for f in cases.loc[cases["patient_id"] == patient, "folds_file"] if f})
        if files:
            return " and ".join(files)
    return "pe_folds.csv"


def patient_folds(cases: pd.DataFrame, rule: SplitRule) -> dict[str, int]:
    """patient -> fold from the cases' `foldK` subset tags (patients without one are left out, as the README says).
    Refused with one line naming the patient and the folds file (`folds_file` column, if any): a patient whose
    cases carry different folds (two conversions of its scans with different pe_folds.csv files), and a fold
    outside 1..n_folds; `check_folds` then checks that every fold 1..n_folds is there."""
    out: dict[str, int] = {}
    seen: dict[str, tuple[str, int]] = {}
    for r in cases.sort_values("case_id").itertuples():
        k = fold_of(r.subset)
        if k is None:
            continue
        if r.patient_id in seen and seen[r.patient_id][1] != k:
            case, first = seen[r.patient_id]
            raise ValueError(f"patient {r.patient_id} is in fold {first} (case {case}) and in fold {k} (case "
                             f"{r.case_id}) ({_folds_file(cases, r.patient_id)}); a patient belongs to one fold: "
                             f"fix the folds file and convert again")
        if not 1 <= k <= rule.n_folds:
            raise ValueError(f"patient {r.patient_id} has fold {k} ({_folds_file(cases, r.patient_id)}); split rule "
                             f"'folds' takes folds 1..{rule.n_folds}: fix the folds file and convert again")
        seen.setdefault(r.patient_id, (r.case_id, k))
        out[r.patient_id] = k
    return out


# ---- the reference's lists (BMS) -----------------------------------------------------------------

@cache
def _list_file(name: str, fold: int) -> tuple[str, ...]:
    text = resources.files("pipeline.tasks").joinpath(f"data/{name}/fold_{fold}.csv").read_text(encoding="utf-8")
    # as config.py:75-83 reads it: csv.reader, first field of each row
    return tuple(row[0] for row in csv.reader(io.StringIO(text), lineterminator="\n"))


@cache
def reference_list_splits(name: str) -> dict[str, str]:
    """case -> split by the reference's own code (config.py:58-62) on its shipped lists, line by line:

        train_ids = fold_1 + fold_2
        random.Random(4).shuffle(train_ids)
        validation_ids = train_ids[:len(train_ids) // 8]
        train_ids = train_ids[len(train_ids) // 8:]
        test_ids = fold_3
    """
    if name != "bms":
        raise ValueError(f"unknown reference lists {name!r}; known: bms")
    train_ids = list(_list_file(name, 1)) + list(_list_file(name, 2))
    random.Random(4).shuffle(train_ids)  # an own generator, seeded as the reference seeds it
    validation_ids = train_ids[:len(train_ids) // 8]
    train_ids = train_ids[len(train_ids) // 8:]
    test_ids = list(_list_file(name, 3))
    out = {c: "test" for c in test_ids}
    out.update({c: "validation" for c in validation_ids})
    out.update({c: "train" for c in train_ids})
    return out


# ---- splits files --------------------------------------------------------------------------------

def _file_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"splits file {path}: cannot be read ({exc.strerror or exc})") from None


def _parse_csv(path: str, text: str) -> dict[str, str]:
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"splits file {path}: empty; expected a CSV with columns case_id,split")
    header = [c.strip().lower() for c in rows[0]]
    if "case_id" not in header or "split" not in header:
        raise ValueError(f"splits file {path}: the first line must name the columns case_id and split, got "
                         f"{','.join(rows[0])!r}")
    ci, si = header.index("case_id"), header.index("split")
    out: dict[str, str] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) <= max(ci, si) or not row[ci].strip():
            raise ValueError(f"splits file {path}: line {n} has no case_id or split: {','.join(row)!r}")
        case, split = row[ci].strip(), row[si].strip().lower()
        if split not in _SPLIT_NAMES:
            raise ValueError(f"splits file {path}: line {n}: split {row[si].strip()!r} of case {case!r} is not "
                             f"train, validation (or val) or test")
        split = _SPLIT_NAMES[split]
        if out.get(case, split) != split:
            raise ValueError(f"splits file {path}: case {case!r} is in {out[case]} and, on line {n}, in {split}")
        out[case] = split
    return out


def _parse_nnunet(path: str, text: str, fold: int) -> tuple[dict[str, str], bool]:
    """nnU-Net's splits_final.json: [{"train": [...], "val": [...]}, ...]; the fold's lists. Returns the
    assignment and True: cases of the data in neither list are test (nnU-Net keeps its test set apart)."""
    try:
        folds = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"splits file {path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(folds, list) or not folds or not all(
            isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in folds):
        raise ValueError(f"splits file {path}: expected nnU-Net's splits_final.json, a list of "
                         f'{{"train": [...], "val": [...]}} per fold')
    if not 0 <= fold < len(folds):
        raise ValueError(f"splits file {path}: has folds 0..{len(folds) - 1}, fold {fold} was asked for")
    out: dict[str, str] = {}
    for split, names in (("train", folds[fold]["train"]), ("validation", folds[fold]["val"])):
        for name in names:
            case = str(name)
            if out.get(case, split) != split:
                raise ValueError(f"splits file {path}: fold {fold}: case {case!r} is in both train and val")
            out[case] = split
    return out, True


def read_splits_file(path: str, json_fold: int = 0) -> tuple[dict[str, str], bool, str]:
    """(case -> split, unlisted cases are test, sha256 of the bytes) of a CSV `case_id,split` or an nnU-Net
    `splits_final.json` (a `.json` name); a malformed file is a one-line ValueError naming it."""
    data = _file_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"splits file {path}: not UTF-8 text") from None
    if str(path).lower().endswith(".json"):
        mapping, rest_test = _parse_nnunet(path, text, json_fold)
    else:
        mapping, rest_test = _parse_csv(path, text), False
    return mapping, rest_test, digest


def with_splits_file(spec: TaskSpec, path: str, fold: int | None = None) -> TaskSpec:
    """`spec` with its splits taken from a file: a CSV `case_id,split` (train, validation or val, test; cases
    of the data it does not list are left out and reported skipped) or nnU-Net's `splits_final.json` (fold
    0, or the K of `path#K` or `fold`; cases of the data in neither of its lists are test). The file's
    content hash becomes part of the store's key; the file is checked here and again when the store is
    planned (a changed file is refused)."""
    json_fold = 0
    name = str(path)
    m = re.fullmatch(r"(.*\.json)#(\d+)", name, flags=re.IGNORECASE)
    if m:
        name, json_fold = m.group(1), int(m.group(2))
    if fold is not None:
        json_fold = int(fold)
    _, _, digest = read_splits_file(name, json_fold)
    rule = SplitRule(kind="file", path=str(Path(name).resolve()), sha256=digest, json_fold=json_fold,
                     seed=spec.split.seed, fractions=spec.split.fractions)
    return dataclasses.replace(spec, split=rule)


def _file_assignment(rule: SplitRule, cases: pd.DataFrame, known: set[str] | None) -> dict[str, str | None]:
    mapping, rest_test, digest = read_splits_file(rule.path, rule.json_fold)
    if digest != rule.sha256:
        raise ValueError(f"splits file {rule.path} changed since the task spec was made (sha256 {rule.sha256[:12]}... "
                         f"-> {digest[:12]}...): pass it again")
    known = set(cases["case_id"]) if known is None else set(known) | set(cases["case_id"])
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ValueError(f"splits file {rule.path} names {len(unknown)} case(s) the data does not have: "
                         f"{_names(unknown)}")
    return {c: mapping.get(c, "test" if rest_test else None) for c in cases["case_id"]}


# ---- all rules -----------------------------------------------------------------------------------

def assign_splits(cases: pd.DataFrame, rule: SplitRule, known: set[str] | None = None) -> pd.Series:
    """Split per row of `cases` (columns case_id, patient_id, subset); returns a Series indexed like it.

    A patient's split is decided once: by its first case (sorted by case id) for rules that read a
    per-scan tag, so a patient whose scans carry different tags still lands in one split. None marks a
    case the rule leaves out: a patient without a fold (`folds`), a case a splits CSV does not list
    (`file`); `left_out_reason` says why. `known`: every case name of the data (a splits file naming
    others is refused). A fold rule whose data lacks folds, a splits file naming unknown cases or putting
    one patient in two splits, raise ValueError.
    """
    if cases.empty:
        return pd.Series([], dtype=object)
    if rule.kind == "file":
        per_case = _file_assignment(rule, cases, known)
        out = cases["case_id"].map(per_case)
        _check_one_split_per_patient(cases, out, rule)
        return out
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
        with_fold = patient_folds(cases, rule)
        check_folds(set(with_fold.values()), rule)
        assigned = fold_assignment(with_fold, rule.test_fold, rule.validation_fraction, rule.seed)
        return cases["patient_id"].map(lambda p: assigned.get(p))  # no fold: left out, never drawn
    elif rule.kind == "reference_lists":
        listed = reference_list_splits(rule.lists)
        for r in first.itertuples():
            per_patient[r.patient_id] = listed.get(r.case_id)
    rest = [p for p in first["patient_id"] if per_patient.get(p) is None]
    if rest:
        fractions = rule.fractions
        if rule.kind == "index_ranges":  # the fallback keeps the ranges' proportions
            sizes = np.array([hi - lo + 1 for lo, hi in rule.ranges], dtype=float)
            fractions = tuple(sizes / sizes.sum())
        per_patient.update(seeded_patient_splits(rest, fractions, rule.seed))
    return cases["patient_id"].map(per_patient)


def _check_one_split_per_patient(cases: pd.DataFrame, splits: pd.Series, rule: SplitRule) -> None:
    frame = pd.DataFrame({"patient": cases["patient_id"], "case": cases["case_id"], "split": splits}).dropna()
    many = frame.groupby("patient")["split"].nunique()
    bad = sorted(many[many > 1].index)
    if bad:
        p = bad[0]
        mine = frame[frame["patient"] == p].sort_values("case")
        listing = ", ".join(f"{c} in {s}" for c, s in zip(mine["case"], mine["split"]))
        more = f" ({len(bad) - 1} more patient(s) too)" if len(bad) > 1 else ""
        raise ValueError(f"splits file {rule.path} puts patient {p} in two splits: {listing}{more}; "
                         f"a patient's cases must share one split")


def left_out_reason(rule: SplitRule, case_id: str, patient_id: str) -> str:
    """Why `assign_splits` gave a case no split (for the store's skipped list)."""
    if rule.kind == "folds":
        return f"patient {patient_id} has no fold (pe_folds.csv): left out of the cross-validation"
    if rule.kind == "file":
        return f"case {case_id} is not in the splits file {rule.path}"
    return f"case {case_id} got no split under rule {rule.kind!r}"


# ---- fold views of a store -----------------------------------------------------------------------

def train_fraction_order(splits: Sequence[str], labels: Sequence[int], seed: int) -> list[int | None]:
    """Per row (in row order): its rank in the nested, label-stratified fraction order if it is a training
    row, else None. The store's rule (`pipeline/patches/task_extract.py`): `fraction_order` over the
    training rows' labels with `default_rng([seed, 0xF4AC])`, seed = the store's seed."""
    from pipeline.tasks.sampling import fraction_order

    train = [i for i, s in enumerate(splits) if s == "train"]
    rank = fraction_order(np.array([labels[i] for i in train]), np.random.default_rng([seed, 0xF4AC]))
    out: list[int | None] = [None] * len(splits)
    for i, k in zip(train, rank):
        out[i] = int(k)
    return out


def fold_view(index: pd.DataFrame, scans: pd.DataFrame, test_fold: int, *, validation_fraction: float, seed: int,
              store_seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A fold-based store's index and scans with `split` and `fraction_order` as a build for `test_fold` would
    write them: the patients' folds from the scans' `subset` tags, `fold_assignment`, then the fraction
    order over the training rows in row order."""
    first = scans.sort_values("case_id").drop_duplicates("patient_id")
    folds = {p: fold_of(s) for p, s in zip(first["patient_id"], first["subset"])}
    assigned = fold_assignment({p: k for p, k in folds.items() if k is not None}, test_fold, validation_fraction, seed)
    idx = index.sort_values("row").reset_index(drop=True)
    idx["split"] = idx["patient_id"].map(assigned)
    order = train_fraction_order(list(idx["split"]), list(idx["label"]), store_seed)
    # as Parquet's nullable int64 reads back: float64 (NaN) when a row is not training, else int64
    idx["fraction_order"] = (pd.Series([np.nan if k is None else float(k) for k in order], dtype="float64")
                             if None in order else pd.Series(order, dtype="int64"))
    out_scans = scans.copy()
    out_scans["split"] = out_scans["patient_id"].map(assigned)
    return idx, out_scans
