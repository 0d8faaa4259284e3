"""Dataset tables kept with the volume store as Parquet: LUNA16's annotations.csv and
candidates.csv, PE-CAD's pe_candidates.csv and pe_folds.csv (storage_schemas/PE_CAD_LAYOUT.md),
and a case candidates CSV (case_id, x, y, z, label) of one's own dataset, stored as `candidates`.

The target tasks need them later and they are small, so they travel inside the store; rows
from several runs are merged (a second subset converted later adds its rows). A table that
breaks its contract (columns, types, or the rules in `_RULES`) is left out with a one-line
problem naming the file, and the scans still convert.

A table with a header and no rows is such a problem too (exit 1, named at conversion): the task
that needs it would otherwise find no table only when its store is built.

Two breaks are usage errors instead, raised by `check_table_sources` before a conversion starts
(exit 2, nothing converted): a PE candidate whose vessel direction is not finite or has zero
length (no typo in one row's length but a direction that cannot exist, and ECC's vessel-oriented
cubes have nothing to orient by), and a pe_folds.csv whose fold is not an integer >= 1 or that puts
a patient in two folds (discovery tags every scan with its patient's fold from that file, so a broken
one would tag scans wrongly). The user fixes the file and reruns.
"""

from __future__ import annotations

import csv
import io
import os
import zipfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import storage_schemas
from pipeline.ingest.sources import TableSource
from pipeline.storage.objects import Tree, open_tree

__all__ = ["store_tables", "read_table", "check_table_sources"]

_SCHEMAS = {"annotations.csv": "annotations", "candidates.csv": "candidates", "candidates_V2.csv": "candidates",
            "pe_candidates.csv": "pe_candidates", "pe_folds.csv": "pe_folds"}


def _read_csv(src: TableSource, name: str) -> pd.DataFrame:
    # identifiers stay text: a case_id "007" must not become the integer 7
    schema = storage_schemas.arrow_schema(name)
    dtype = {f.name: str for f in schema if f.type == pa.string()}
    if src.archive:
        with zipfile.ZipFile(src.archive) as zf:
            return pd.read_csv(io.BytesIO(zf.read(src.path)), dtype=dtype)
    return pd.read_csv(src.path, dtype=dtype)


def _text(src: TableSource) -> str:
    if src.archive:
        with zipfile.ZipFile(src.archive) as zf:
            return zf.read(src.path).decode("utf-8-sig")
    with open(src.path, encoding="utf-8-sig", newline="") as fh:
        return fh.read()


def _direction_problem(values: list[float]) -> str | None:
    """The rule of `pipeline.tasks.geometry.direction_problem` (which the task build applies again);
    restated here because the volume store sits below the tasks and never imports them."""
    d = np.asarray(values, dtype=float)
    if not np.all(np.isfinite(d)):
        return "is not finite"
    if float(np.linalg.norm(d)) < 1e-6:
        return "has zero length"
    return None


def _direction_refusal(src: TableSource) -> str | None:
    """The one line refusing `src` (a pe_candidates.csv) for a direction that is not finite or has zero
    length, else None. Read as text, so `nan` and `inf` are seen as written (pandas would read `nan` as
    empty, i.e. unknown); a row whose direction is empty, partial or not numbers is left to the table's
    rules in `store_tables` (a problem line, the scans still convert)."""
    where = f"{src.archive}!{src.path}" if src.archive else src.path
    try:
        reader = csv.DictReader(io.StringIO(_text(src)))
        rows = [(reader.line_num, row) for row in reader]  # the file's own line numbers (the header is 1)
    except (OSError, UnicodeDecodeError, csv.Error, zipfile.BadZipFile):
        return None  # unreadable: store_tables reports it with the file's other problems
    if not {"dirX", "dirY", "dirZ"} <= set(reader.fieldnames or ()):
        return None
    bad = []
    for line, row in rows:
        texts = [(row.get(k) or "").strip() for k in ("dirX", "dirY", "dirZ")]
        if not all(texts):
            continue
        try:
            values = [float(t) for t in texts]
        except ValueError:
            continue
        problem = _direction_problem(values)
        if problem:
            bad.append((line, row.get("case_id"), texts, problem))
    if not bad:
        return None
    line, case_id, texts, problem = bad[0]
    more = f" (and {len(bad) - 1} more rows)" if len(bad) > 1 else ""
    return (f"{where}: line {line} (case_id {case_id}): vessel direction (dirX, dirY, dirZ) = "
            f"({', '.join(texts)}) {problem}{more}; give a unit vector along the vessel, or leave all three "
            "empty when it is unknown (storage_schemas/PE_CAD_LAYOUT.md)")


MAX_FOLD = 1000
"""A fold number beyond any cross-validation (it would overflow the folds table's integers)."""


def _folds_refusal(src: TableSource) -> str | None:
    """The one line refusing `src` (a pe_folds.csv) for its first bad row: a fold that is not an integer >= 1
    (read as text: `-1`, `x`, `1.5` and an empty fold are all named as written), or a patient given two
    different folds; None when every row is good (or the file is unreadable or lacks the columns, which
    `store_tables` reports)."""
    where = f"{src.archive}!{src.path}" if src.archive else src.path
    try:
        reader = csv.DictReader(io.StringIO(_text(src)))
        rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error, zipfile.BadZipFile):
        return None
    if not {"patient_id", "fold"} <= {(c or "").strip() for c in reader.fieldnames or ()}:
        return None
    seen: dict[str, tuple[int, int]] = {}
    for line, row in rows:
        row = {(k or "").strip(): v for k, v in row.items()}
        patient, text = (row.get("patient_id") or "").strip(), (row.get("fold") or "").strip()
        if not patient and not text:
            continue  # a blank line
        fold = int(text) if text.isascii() and text.isdigit() else None  # no sign, no point, no exponent
        if fold is None or not 1 <= fold <= MAX_FOLD:
            return (f"{where}: line {line}: fold {text!r} of patient {patient or '(empty)'} is not an integer "
                    f"1..{MAX_FOLD}; "
                    "give each patient one fold 1..K, or leave the patient out (its scans are then left out of "
                    "the cross-validation, storage_schemas/PE_CAD_LAYOUT.md)")
        if patient in seen and seen[patient][1] != fold:
            first_line, first = seen[patient]
            return (f"{where}: patient {patient} is in fold {first} (line {first_line}) and in fold {fold} "
                    f"(line {line}); a patient belongs to one fold")
        seen.setdefault(patient, (line, fold))
    return None


def check_table_sources(sources: list[TableSource]) -> None:
    """Raise ValueError (one line: the file, the row, the value) for a table no conversion should start
    with: a PE candidate whose vessel direction is not finite or has zero length, a pe_folds.csv fold that is
    not an integer >= 1 or a patient in two folds. Call it before any work, so that nothing is converted;
    every other break of a table's rules stays a problem line of `store_tables`."""
    for src in sources:
        schema = _SCHEMAS.get(src.name)
        refusal = (_direction_refusal(src) if schema == "pe_candidates"
                   else _folds_refusal(src) if schema == "pe_folds" else None)
        if refusal:
            raise ValueError(refusal)


def _rows(mask: pd.Series) -> str:
    """The first offending data rows, numbered as CSV lines (header = line 1)."""
    lines = (mask[mask].index[:5] + 2).tolist()
    return f"line{'s' if len(lines) > 1 else ''} {', '.join(map(str, lines))}"


def _pe_candidates_rules(df: pd.DataFrame) -> None:
    """class is 0/1; a direction is all three components or none, and of unit length; a case
    belongs to one patient (the folds are by patient, so a case in two would leak)."""
    bad = ~df["class"].isin([0, 1])
    if bad.any():
        raise ValueError(f"class must be 0 or 1 ({_rows(bad)}: {df['class'][bad].tolist()[:5]})")
    dirs = df[["dirX", "dirY", "dirZ"]].astype(float)
    partial = dirs.isna().any(axis=1) & dirs.notna().any(axis=1)
    if partial.any():
        raise ValueError(f"dirX, dirY, dirZ must be all given or all empty ({_rows(partial)})")
    norm = (dirs ** 2).sum(axis=1, min_count=3) ** 0.5
    off = norm.notna() & ((norm - 1).abs() > 1e-2)
    if off.any():
        raise ValueError(f"(dirX, dirY, dirZ) must be a unit vector ({_rows(off)}: lengths "
                         f"{[round(v, 4) for v in norm[off].tolist()[:5]]})")
    patients = df.groupby("case_id")["patient_id"].nunique()
    if (patients > 1).any():
        raise ValueError(f"case_id with more than one patient_id: {patients[patients > 1].index.tolist()[:5]}")


def _pe_folds_rules(df: pd.DataFrame) -> None:
    """fold is 1..K; each patient is in one fold (a row repeated with the same fold is the same fact)."""
    bad = df["fold"] < 1
    if bad.any():
        raise ValueError(f"fold must be >= 1 ({_rows(bad)}: {df['fold'][bad].tolist()[:5]})")
    df = df.drop_duplicates()
    twice = df["patient_id"].duplicated(keep=False)
    if twice.any():
        raise ValueError(f"patient_id in more than one fold: {sorted(set(df['patient_id'][twice]))[:5]}")


_RULES = {"pe_candidates": _pe_candidates_rules, "pe_folds": _pe_folds_rules}


def _checked(name: str, df: pd.DataFrame, where: str) -> pd.DataFrame:
    """The schema's columns of `df`, checked against the schema and the table's rules."""
    schema = storage_schemas.arrow_schema(name)
    missing = [c for c in schema.names if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns {missing} (has {list(df.columns)})")
    df = df[schema.names]
    table = storage_schemas.check_table(name, pa.Table.from_pandas(df, preserve_index=False), where)
    if name in _RULES:
        _RULES[name](table.to_pandas())
    return df


def _case_candidates(src: TableSource) -> pd.DataFrame:
    """A case candidates CSV (case_id, x, y, z, label) as rows of the `candidates` table: seriesuid is the
    name of the case's (channel-0) scan, coordX/Y/Z the world mm as given (LPS, as LUNA16's), class the label.
    Case ids that no scan of the conversion has refuse the whole table (a typo or another dataset's file)."""
    df = pd.read_csv(src.path, dtype={"case_id": str}, encoding="utf-8-sig")
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("case_id", "x", "y", "z", "label") if c not in df.columns]
    if missing:
        raise ValueError(f"missing columns {missing} (has {list(df.columns)})")
    if df["case_id"].isna().any():
        raise ValueError(f"case_id is empty ({_rows(df['case_id'].isna())})")
    case_ids = df["case_id"].str.strip()
    scans = dict(src.case_scans or ())
    unknown = sorted(set(case_ids) - set(scans))
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
        known = f": {', '.join(sorted(scans)[:3])}, ..." if scans else ""
        raise ValueError(f"case_id {shown} {'is' if len(unknown) == 1 else 'are'} not among the cases converted "
                         f"with it ({len(scans)} known{known})")
    coords = df[["x", "y", "z"]].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(coords.to_numpy(dtype=float)).all(axis=1)
    if bad.any():
        raise ValueError(f"x, y, z must be finite numbers in mm ({_rows(pd.Series(bad, index=df.index))})")
    label = pd.to_numeric(df["label"], errors="coerce")
    bad = ~label.isin([0, 1])
    if bad.any():
        raise ValueError(f"label must be 0 or 1 ({_rows(bad)}: {df['label'][bad].tolist()[:5]})")
    return pd.DataFrame({"seriesuid": case_ids.map(scans), "coordX": coords["x"].astype(float),
                         "coordY": coords["y"].astype(float), "coordZ": coords["z"].astype(float),
                         "class": label.astype("int64")})


def store_tables(root: "str | os.PathLike | Tree", sources: list[TableSource]) -> list[str]:
    """Validate and merge each table into `tables/<name>.parquet`; return problems as one-line reasons.

    A case candidates CSV (`TableSource.case_scans` set) is stored as the `candidates` table, beside
    LUNA16's own rows if the store has them."""
    problems: list[str] = []
    frames: dict[str, list[pd.DataFrame]] = {}
    for src in sources:
        name = "candidates" if src.case_scans is not None else _SCHEMAS[src.name]
        where = f"{src.archive}!{src.path}" if src.archive else src.path
        try:
            raw = _case_candidates(src) if src.case_scans is not None else _read_csv(src, name)
            if raw.empty:  # found now, not when the task that reads it is built
                raise ValueError(f"has a header and no rows: no '{name}' table is stored (a {name} table needs at "
                                 f"least one row; give the file with its rows, or leave it out)")
            checked = _checked(name, raw, where)
            frames.setdefault(name, []).append(checked)
        except Exception as exc:
            problems.append(f"{where}: {' '.join(str(exc).split())}")
    tree = open_tree(root)
    for name, dfs in frames.items():
        rel = f"tables/{name}.parquet"
        where = f"{tree.url}/{rel}"
        try:
            old = tree.read(rel)
        except FileNotFoundError:
            old = None
        if old is not None:
            dfs = [pq.read_table(pa.BufferReader(old)).to_pandas()] + dfs
        merged = pd.concat(dfs, ignore_index=True).drop_duplicates().reset_index(drop=True)
        try:  # rows from several sources (or runs) may contradict each other
            merged = _checked(name, merged, where)
        except Exception as exc:
            problems.append(f"{where}: merged rows not stored: {' '.join(str(exc).split())}")
            continue
        table = storage_schemas.check_table(name, pa.Table.from_pandas(merged, preserve_index=False), where)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        tree.write(rel, sink.getvalue().to_pybytes())  # atomic: a temporary file and a rename, or one PUT
    return problems


def read_table(root: "str | os.PathLike | Tree", name: str) -> pd.DataFrame:
    """A table of a volume store (`annotations`, `candidates`, `pe_candidates`, `pe_folds`), empty
    with the right columns if absent. `root` is the store's folder, URL or Tree."""
    tree = open_tree(root)
    rel = f"tables/{name}.parquet"
    schema = storage_schemas.arrow_schema(name)
    try:
        data = tree.read(rel)
    except FileNotFoundError:
        return schema.empty_table().to_pandas()
    return storage_schemas.check_table(name, pq.read_table(pa.BufferReader(data)), f"{tree.url}/{rel}").to_pandas()
