"""LUNA16 tables (annotations.csv, candidates.csv) kept with the volume store as Parquet.

The nodule tasks need them later and they are small, so they travel inside the store; rows
from several runs are merged (a second subset converted later adds its rows).
"""

from __future__ import annotations

import io
import os
import uuid
import zipfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

import storage_schemas
from pipeline.ingest.sources import TableSource

__all__ = ["store_tables", "read_table"]

_SCHEMAS = {"annotations.csv": "annotations", "candidates.csv": "candidates", "candidates_V2.csv": "candidates"}


def _read_csv(src: TableSource) -> pd.DataFrame:
    if src.archive:
        with zipfile.ZipFile(src.archive) as zf:
            return pd.read_csv(io.BytesIO(zf.read(src.path)))
    return pd.read_csv(src.path)


def store_tables(root: str | os.PathLike, sources: list[TableSource]) -> list[str]:
    """Validate and merge each table into `tables/<name>.parquet`; return problems as one-line reasons."""
    problems: list[str] = []
    frames: dict[str, list[pd.DataFrame]] = {}
    for src in sources:
        name = _SCHEMAS[src.name]
        where = f"{src.archive}!{src.path}" if src.archive else src.path
        try:
            df = _read_csv(src)
            schema = storage_schemas.arrow_schema(name)
            missing = [c for c in schema.names if c not in df.columns]
            if missing:
                raise ValueError(f"missing columns {missing} (has {list(df.columns)})")
            table = pa.Table.from_pandas(df[schema.names], preserve_index=False)
            storage_schemas.check_table(name, table, where)
            frames.setdefault(name, []).append(df[schema.names])
        except Exception as exc:
            problems.append(f"{where}: {exc}")
    out = Path(root) / "tables"
    for name, dfs in frames.items():
        out.mkdir(exist_ok=True)
        path = out / f"{name}.parquet"
        if path.exists():
            dfs = [pq.read_table(path).to_pandas()] + dfs
        merged = pd.concat(dfs, ignore_index=True).drop_duplicates().reset_index(drop=True)
        table = storage_schemas.check_table(name, pa.Table.from_pandas(merged, preserve_index=False), str(path))
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    return problems


def read_table(root: str | os.PathLike, name: str) -> pd.DataFrame:
    """`annotations` or `candidates` of a volume store (empty with the right columns if absent)."""
    path = Path(root) / "tables" / f"{name}.parquet"
    schema = storage_schemas.arrow_schema(name)
    if not path.exists():
        return schema.empty_table().to_pandas()
    return storage_schemas.check_table(name, pq.read_table(path), str(path)).to_pandas()
