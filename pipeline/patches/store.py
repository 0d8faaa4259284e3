"""Patch stores on disk: a Zarr v3 group with `cubes` (N, C, D, H, W) and `index.parquet`.

    ROOT/pretrain-<key>/zarr.json      {"genesis": {"kind": "patch-store", "key": ..., "config": ...}}
    ROOT/pretrain-<key>/cubes/         float32 in [0, 1]; one inner chunk per cube, one shard per scan
    ROOT/pretrain-<key>/index.parquet  one row per cube (storage_schemas/patch_index.arrow.json)

The key is a hash of the volume store's catalog content and the full extraction config, so the
same inputs always name the same folder (reuse is a directory lookup) and any changed setting
names a new one. A store is built in `ROOT/.building-<name>` and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import zarr

import storage_schemas
from pipeline.storage.attrs import read_genesis_attrs

__all__ = ["PatchStore", "catalog_hash", "PatchStoreError"]


class PatchStoreError(ValueError):
    """A path that is not a usable patch store."""


def catalog_hash(catalog: pd.DataFrame) -> str:
    """Hash of what a volume store holds (ok scans, their source checksums and conversion settings)."""
    ok = catalog[catalog["status"] == "ok"].sort_values("scan_id")
    rows = [[r.scan_id, r.source_checksum, r.settings_hash, r.subset] for r in ok.itertuples()]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


class PatchStore:
    """A published patch store, opened for reading."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.attrs = read_genesis_attrs(self.path, "patch-store", "patch_store", PatchStoreError,
                                        hint="; build one with `genesis patches pretrain`")

    @property
    def key(self) -> str:
        return self.attrs["key"]

    @cached_property
    def cubes(self) -> zarr.Array:
        return zarr.open_array(str(self.path / "cubes"), mode="r")

    @cached_property
    def index(self) -> pd.DataFrame:
        path = self.path / "index.parquet"
        return storage_schemas.check_table("patch_index", pq.read_table(path), str(path)).to_pandas()

    def rows(self, split: str | None = None) -> np.ndarray:
        idx = self.index
        if split is not None:
            idx = idx[idx["split"] == split]
        return idx["row"].to_numpy()

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Cubes at `rows`, in the order given.

        Rows are read as contiguous runs (a scan's rows are one shard, one file read); Zarr's
        slice path is about 10x faster than its orthogonal (integer-array) selection here.
        """
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        out = np.empty((len(rows),) + self.cubes.shape[1:], dtype=self.cubes.dtype)
        cuts = np.flatnonzero(np.diff(srt) != 1) + 1
        pos = 0
        for run in np.split(srt, cuts):
            if len(run):
                out[order[pos:pos + len(run)]] = self.cubes[int(run[0]):int(run[-1]) + 1]
                pos += len(run)
        return out

    def __len__(self) -> int:
        return int(self.attrs["n_cubes"])
