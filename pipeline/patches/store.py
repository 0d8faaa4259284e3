"""Patch stores on disk: a Zarr v3 group with `cubes` (N, C, D, H, W) and `index.parquet`.

    ROOT/pretrain-<key>/zarr.json      {"genesis": {"kind": "patch-store", "key": ..., "config": ...}}
    ROOT/pretrain-<key>/cubes/         one inner chunk per cube, one shard per scan; pretraining stores hold
                                       their `cube_encoding` (int16 clipped HU, or float32 in [0, 1]):
                                       read them with `read_cubes`, which always gives float32 in [0, 1]
    ROOT/pretrain-<key>/index.parquet  one row per cube (storage_schemas/patch_index.arrow.json)

The key is a hash of the volume store's catalog content (each ok scan's source checksum, settings
and the content digest of what is stored) and the full extraction config, so the
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

__all__ = ["PatchStore", "catalog_hash", "catalog_rows", "PatchStoreError"]


class PatchStoreError(ValueError):
    """A path that is not a usable patch store."""


def catalog_rows(catalog: pd.DataFrame) -> list[list]:
    """What a patch store's key covers of each ok scan: id, source checksum, settings, subset and the
    content digest of the stored scan (so a changed, damaged-and-repaired or reconverted volume gives a
    new key even from the same source)."""
    ok = catalog[catalog["status"] == "ok"].sort_values("scan_id")
    digests = ok["content_digest"] if "content_digest" in ok else pd.Series([None] * len(ok), index=ok.index)
    return [[r.scan_id, r.source_checksum, r.settings_hash, r.subset, None if pd.isna(d) else d]
            for r, d in zip(ok.itertuples(), digests)]


def catalog_hash(catalog: pd.DataFrame) -> str:
    """Hash of what a volume store holds (`catalog_rows`)."""
    return hashlib.sha256(json.dumps(catalog_rows(catalog)).encode()).hexdigest()


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

    @property
    def purpose(self) -> str:
        return self.attrs["purpose"]

    @property
    def is_task(self) -> bool:
        return self.purpose != "pretrain"

    @cached_property
    def masks(self) -> zarr.Array:
        """Segmentation target (N, 1, D, H, W) uint8, aligned row by row with `cubes`."""
        if not (self.path / "masks" / "zarr.json").exists():
            raise PatchStoreError(f"{self.path} is a {self.purpose} store and has no masks")
        return zarr.open_array(str(self.path / "masks"), mode="r")

    @cached_property
    def index(self) -> pd.DataFrame:
        path = self.path / "index.parquet"
        schema = "task_patch_index" if self.is_task else "patch_index"
        return storage_schemas.check_table(schema, pq.read_table(path), str(path)).to_pandas()

    @cached_property
    def scans(self) -> pd.DataFrame:
        """Task stores: every case with its split and volume-store scans (whole-volume evaluation reads these)."""
        path = self.path / "scans.parquet"
        if not path.exists():
            raise PatchStoreError(f"{self.path} has no scans.parquet (only task stores list their cases)")
        return storage_schemas.check_table("task_scans", pq.read_table(path), str(path)).to_pandas()

    @property
    def shard_rows(self) -> int:
        """Cubes per shard file (older pretraining stores: one shard per scan of `per_scan` rows)."""
        return int(self.attrs.get("shard_rows") or self.attrs["config"]["per_scan"])

    def fraction_rows(self, fraction: float) -> np.ndarray:
        """Training rows of a label fraction; nested (10% inside 25% inside 50%) and label-stratified."""
        from pipeline.patches.task_extract import fraction_rows

        return fraction_rows(self.index, fraction)

    def rows(self, split: str | None = None) -> np.ndarray:
        idx = self.index
        if split is not None:
            idx = idx[idx["split"] == split]
        return idx["row"].to_numpy()

    def read(self, rows: np.ndarray, array: str = "cubes") -> np.ndarray:
        """Cubes (or masks) at `rows`, in the order given.

        Rows are read as contiguous runs (a scan's rows are one shard, one file read); Zarr's
        slice path is about 10x faster than its orthogonal (integer-array) selection here.
        """
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        source = self.cubes if array == "cubes" else self.masks
        out = np.empty((len(rows),) + source.shape[1:], dtype=source.dtype)
        cuts = np.flatnonzero(np.diff(srt) != 1) + 1
        pos = 0
        for run in np.split(srt, cuts):
            if len(run):
                out[order[pos:pos + len(run)]] = source[int(run[0]):int(run[-1]) + 1]
                pos += len(run)
        return out

    @property
    def cube_encoding(self) -> dict:
        """How `cubes` holds the model's [0, 1] float32 values; stores without the attribute hold them as is."""
        return self.attrs.get("cube_encoding") or {"kind": "unit-float32"}

    def read_cubes(self, rows: np.ndarray) -> np.ndarray:
        """Pretraining cubes at `rows` (any order, repeats allowed) as float32 (N, 1, D, H, W) in [0, 1].

        The one way to read what the model sees: decodes whatever `cubes` holds (see `cube_encoding`).
        """
        from pipeline.patches.encoding import decode_cubes

        return decode_cubes(self.read(rows), self.cube_encoding)

    def __len__(self) -> int:
        return int(self.attrs["n_cubes"])
