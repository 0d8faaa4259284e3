"""Patch stores on disk or in a bucket: a Zarr v3 group with `cubes` (N, C, D, H, W) and `index.parquet`.

    ROOT/pretrain-<key>/zarr.json      {"genesis": {"kind": "patch-store", "key": ..., "config": ...}}
    ROOT/pretrain-<key>/cubes/         one inner chunk per cube, one shard per scan; pretraining stores hold
                                       their `cube_encoding` (int16 clipped HU, or float32 in [0, 1]):
                                       read them with `read_cubes`, which always gives float32 in [0, 1]
    ROOT/pretrain-<key>/index.parquet  one row per cube (storage_schemas/patch_index.arrow.json)

The key is a hash of the volume store's catalog content (each ok scan's source checksum, settings
and the content digest of what is stored) and the full extraction config, so the
same inputs always name the same folder (reuse is a lookup in the root) and any changed setting
names a new one. On disk a store is built in `ROOT/.building-<name>` and renamed into place when complete; in a
bucket (`s3://BUCKET/PREFIX`) its objects are written under `ROOT/<name>/` and its root `zarr.json` last, as the
commit object (`pipeline.patches.site`). `PatchStore` opens either (a path or a URL) through
`pipeline.storage.objects.Tree`, and reads cubes through `pipeline.patches.sharded_rows`: every CRC32C
checked, a missing shard refused, one ranged read per run of rows, the reads of a call issued concurrently.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

import storage_schemas
from pipeline.patches.sharded_rows import RowLayout, ShardedRows, read_pool
from pipeline.storage.attrs import read_genesis_attrs
from pipeline.storage.objects import Tree, open_tree
from pipeline.volume_store.checked_store import CheckedStore, _array_layout, shard_problem
from pipeline.volume_store.errors import StoreIntegrityError

__all__ = ["PatchStore", "catalog_hash", "catalog_rows", "PatchStoreError", "StoreIntegrityError",
           "expected_shards", "fraction_rows"]


class PatchStoreError(ValueError):
    """A path that is not a usable patch store."""


def expected_shards(name: str, meta: dict) -> list[str]:
    """The chunk keys (`cubes/c/0/0/0/0/0`, ...) of every shard an array's layout needs.

    Patch-store arrays are written whole (every row is a cube, no fill-value rows), so each shard
    of the grid must exist; a missing one is damage, not zeros."""
    shape = [int(n) for n in meta["shape"]]
    shard = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
    sep = ((meta.get("chunk_key_encoding") or {}).get("configuration") or {}).get("separator", "/")
    grid = [range(-(-n // c)) for n, c in zip(shape, shard)]
    return [f"{name}/c{sep}" + sep.join(map(str, idx)) for idx in itertools.product(*grid)]


def catalog_rows(catalog: pd.DataFrame) -> list[list]:
    """What a patch store's key covers of each ok scan: id, source checksum, settings, subset and the
    content digest of the stored scan (so a changed, damaged-and-repaired or reconverted volume gives a
    new key even from the same source)."""
    ok = catalog[catalog["status"] == "ok"].sort_values("scan_id")
    digests = ok["content_digest"] if "content_digest" in ok else pd.Series([None] * len(ok), index=ok.index)
    return [[r.scan_id, r.source_checksum, r.settings_hash, r.subset, None if pd.isna(d) else d]
            for r, d in zip(ok.itertuples(), digests)]


def fraction_rows(index: pd.DataFrame, fraction: float) -> np.ndarray:
    """Training rows of a label fraction (nested: a smaller fraction is inside a larger one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    train = index[index["split"] == "train"]
    n = int(math.ceil(fraction * len(train)))
    return train.loc[train["fraction_order"] < n, "row"].to_numpy()


def catalog_hash(catalog: pd.DataFrame) -> str:
    """Hash of what a volume store holds (`catalog_rows`)."""
    return hashlib.sha256(json.dumps(catalog_rows(catalog)).encode()).hexdigest()


class PatchStore:
    """A published patch store, opened for reading."""

    def __init__(self, path: str | os.PathLike | Tree):
        self.tree = open_tree(path)
        self.url = self.tree.url
        """Where the store is, as a string: its path on disk or its s3:// URL."""
        self.path = self.tree.local if self.tree.local is not None else self.url
        """A Path on disk (as before); the URL in a bucket."""
        self.attrs = read_genesis_attrs(self.tree, "patch-store", "patch_store", PatchStoreError,
                                        hint="; build one with `genesis patches pretrain`")

    @property
    def key(self) -> str:
        return self.attrs["key"]

    @cached_property
    def cubes(self) -> zarr.Array:
        """(N, C, D, H, W) as stored; reads check every CRC32C and refuse a missing shard (see `_open`)."""
        return self._open("cubes")

    @property
    def _hint(self) -> str:
        return (f"check with `genesis stores verify {self.url}` and rebuild the store with "
                f"`genesis patches {'task' if self.is_task else 'pretrain'}` (remove it first)")

    def _open(self, name: str) -> zarr.Array:
        """Array `name` as a Zarr array (its metadata; `read` does not go through it). On disk it is read through
        a CheckedStore: a shard file the layout needs but the disk lacks raises (Zarr alone reads it as zeros:
        constant cubes), a damaged chunk or index raises naming the store, the array and the shard, instead of
        Zarr's bare checksum error; in a bucket alike (CheckedStore wraps the bucket's Zarr store)."""
        meta = self._array_meta(name)
        store = CheckedStore(self.path if self.tree.local is not None else self.tree, where=str(self.path),
                             files=frozenset(expected_shards(name, meta)), hint=self._hint)
        try:
            return zarr.open_array(store=store, path=name, mode="r", zarr_format=3)
        except StoreIntegrityError:
            raise
        except Exception as exc:
            raise StoreIntegrityError(f"{self.path}: array {name}: zarr.json unreadable "
                                      f"({type(exc).__name__}: {exc})") from None

    def _array_meta(self, name: str) -> dict:
        """The array's zarr.json, checked against the store's own count of cubes."""
        try:
            meta = json.loads(self.tree.read(f"{name}/zarr.json"))
            rows = int(meta["shape"][0])
        except FileNotFoundError:
            raise StoreIntegrityError(f"{self.path}: array {name}: {name}/zarr.json is missing") from None
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise StoreIntegrityError(f"{self.path}: array {name}: {name}/zarr.json unreadable "
                                      f"({type(exc).__name__}: {exc})") from None
        if rows != len(self):
            raise StoreIntegrityError(f"{self.path}: array {name} has {rows} rows, the store's attributes say "
                                      f"{len(self)} cubes")
        return meta

    @property
    def purpose(self) -> str:
        return self.attrs["purpose"]

    @property
    def is_task(self) -> bool:
        return self.purpose != "pretrain"

    @cached_property
    def masks(self) -> zarr.Array:
        """Segmentation target (N, 1, D, H, W) uint8, aligned row by row with `cubes`."""
        if self.purpose != "segmentation":
            raise PatchStoreError(f"{self.path} is a {self.purpose} store and has no masks")
        return self._open("masks")

    def _table(self, rel: str) -> pa.Table:
        """A Parquet table of the store (FileNotFoundError when absent)."""
        if self.tree.local is not None:
            return pq.read_table(self.tree.local / rel)
        return pq.read_table(pa.BufferReader(self.tree.read(rel)))

    @cached_property
    def index(self) -> pd.DataFrame:
        schema = "task_patch_index" if self.is_task else "patch_index"
        table = self._table("index.parquet")
        return storage_schemas.check_table(schema, table, f"{self.url}/index.parquet").to_pandas()

    @cached_property
    def scans(self) -> pd.DataFrame:
        """Task stores: every case with its split and volume-store scans (whole-volume evaluation reads these)."""
        try:
            table = self._table("scans.parquet")
        except FileNotFoundError:
            raise PatchStoreError(f"{self.path} has no scans.parquet (only task stores list their cases)") from None
        return storage_schemas.check_table("task_scans", table, f"{self.url}/scans.parquet").to_pandas()

    @property
    def shard_rows(self) -> int:
        """Cubes per shard file (older pretraining stores: one shard per scan of `per_scan` rows)."""
        return int(self.attrs.get("shard_rows") or self.attrs["config"]["per_scan"])

    def task_spec(self):
        """The whole TaskSpec a task store was built with (its recorded task file, `task_file`), checked against
        its digest; None for a pretraining store or a task store built before stores recorded their task file."""
        from pipeline.tasks.task_file import task_from_text

        text = self.attrs.get("task_file")
        if not self.is_task or not text:
            return None
        digest = hashlib.sha256(text.encode()).hexdigest()
        if self.attrs.get("task_file_sha256") not in (None, digest):
            raise StoreIntegrityError(f"{self.path}: its task file does not match its task_file_sha256 "
                                      f"({digest[:12]} != {str(self.attrs['task_file_sha256'])[:12]})")
        return task_from_text(text, f"{self.path} (its recorded task file)")

    @property
    def split_rule(self) -> dict:
        """The task's split rule as the store was built with it (`config.task.split`); {} for pretraining."""
        return ((self.attrs.get("config") or {}).get("task") or {}).get("split") or {}

    @cached_property
    def folds(self) -> tuple[int, ...]:
        """The cross-validation folds a fold-based task store holds (its cases' `foldK` subsets); () for
        every other store. A fold-based store holds every fold; `for_fold(k)` is run k's view."""
        if self.split_rule.get("kind") != "folds":
            return ()
        from pipeline.tasks.splits import fold_of

        return tuple(sorted({k for k in map(fold_of, self.scans["subset"]) if k is not None}))

    def for_fold(self, k: int) -> PatchStore:
        """This store as cross-validation run `k` sees it: fold k test, the other folds train less a seeded
        validation draw, the fraction order over that run's training rows: `index`, `scans`, `rows(split)`,
        `fraction_rows(f)` and the counts are fold k's, exactly as a build for test fold k writes them
        (`pipeline.tasks.splits.fold_view`). Cubes and masks are shared."""
        folds = self.folds
        if not folds:
            raise ValueError(f"{self.path} is not a fold-based task store (split rule "
                             f"{self.split_rule.get('kind', self.purpose)!r}): it has no folds to view")
        if not isinstance(k, (int, np.integer)) or int(k) not in folds:
            raise ValueError(f"{self.path} has folds {', '.join(map(str, folds))}; fold {k!r} is not one of them")
        from pipeline.tasks.splits import fold_view

        rule = self.split_rule
        index, scans = fold_view(self.index, self.scans, int(k),
                                 validation_fraction=float(rule.get("validation_fraction", 0.05)),
                                 seed=int(rule.get("seed", 0)), store_seed=int(self.attrs["config"].get("seed", 0)))
        view = copy.copy(self)
        attrs = copy.deepcopy(self.attrs)
        attrs["counts"] = {s: int((index["split"] == s).sum()) for s in ("train", "validation", "test")}
        attrs["label_counts"] = {s: {str(v): int(((index["split"] == s) & (index["label"] == v)).sum()) for v in (0, 1)}
                                 for s in ("train", "validation", "test")}
        attrs["fold"] = int(k)
        view.attrs = attrs
        view.__dict__.update(index=index, scans=scans)
        return view

    @property
    def fold(self) -> int | None:
        """The test fold of a `for_fold` view; None for the store as built."""
        return self.attrs.get("fold")

    def fraction_rows(self, fraction: float) -> np.ndarray:
        """Training rows of a label fraction; nested (10% inside 25% inside 50%) and label-stratified."""
        return fraction_rows(self.index, fraction)

    def rows(self, split: str | None = None) -> np.ndarray:
        idx = self.index
        if split is not None:
            idx = idx[idx["split"] == split]
        return idx["row"].to_numpy()

    def _rows(self, array: str) -> ShardedRows | None:
        """The reader of `array`'s rows (None for a layout `sharded_rows` does not read: Zarr reads it)."""
        key = f"_rows_{array}"
        if key not in self.__dict__:
            if array == "masks" and self.purpose != "segmentation":
                raise PatchStoreError(f"{self.path} is a {self.purpose} store and has no masks")
            layout = RowLayout.of(array, self._array_meta(array))
            self.__dict__[key] = layout and ShardedRows(self.tree, layout, where=str(self.path), hint=self._hint)
        return self.__dict__[key]

    @property
    def requests(self) -> int:
        """Ranged reads issued so far by this object's row readers (in a bucket: GET requests)."""
        return sum(r.requests for k, r in self.__dict__.items() if k.startswith("_rows_") and r is not None)

    def read(self, rows: np.ndarray, array: str = "cubes") -> np.ndarray:
        """Cubes (or masks) at `rows` (any order, repeats allowed), in the order given.

        Rows are read as contiguous runs, one ranged read each, the runs of a call concurrently
        (`pipeline.patches.sharded_rows`); every CRC32C is checked and a missing shard raises. Arrays of
        another layout go through Zarr's slice path (about 10x faster than its integer-array selection).
        """
        rows = np.asarray(rows, dtype=np.int64)
        reader = self._rows(array)
        if reader is not None:
            return reader.read(rows)
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

    def verify(self) -> list[tuple[str, str, str]]:
        """(ok | damaged, part, detail) for the index and each array: the index has one row per cube, and
        every shard the array's layout needs is on disk and passes its CRC32C checks (index and every
        inner chunk). Reads each shard once (several at a time); `genesis stores verify` prints the result."""
        results = []
        try:
            rows = len(self.index)
            detail = "" if rows == len(self) else f"{rows} rows, the store's attributes say {len(self)} cubes"
        except Exception as exc:  # any unreadable or mismatching index is damage, named
            detail = f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        results.append(("damaged" if detail else "ok", "index.parquet", detail or f"{len(self)} rows"))
        for name in ("cubes", "masks") if self.purpose == "segmentation" else ("cubes",):
            try:
                meta = self._array_meta(name)
            except StoreIntegrityError as exc:
                results.append(("damaged", name, str(exc).removeprefix(f"{self.path}: ")))
                continue
            layout = _array_layout(meta)
            keys = expected_shards(name, meta)
            # shards read and checked on the reader threads, a few at a time (memory: one shard per thread)
            problems = [p for p in read_pool().map(lambda key: self._shard_problem(name, key, layout), keys) if p]
            more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
            results.append(("damaged", name, "; ".join(problems[:3]) + more) if problems else
                           ("ok", name, f"{len(keys)} shards, every chunk passes its CRC32C"))
        return results

    def _shard_problem(self, name: str, key: str, layout) -> str | None:
        """What is wrong with shard object `key` of array `name` (read whole), None when it passes."""
        shard = key[len(name) + 1:]
        try:
            data = np.frombuffer(self.tree.read(key), dtype=np.uint8)
        except FileNotFoundError:
            return f"shard {shard} is missing"
        except OSError as exc:
            return f"shard {shard} is unreadable ({exc.strerror or exc})"
        except Exception as exc:  # noqa: BLE001 - a bucket's errors (a 5xx, a denied GET) are not OSErrors
            return f"shard {shard} is unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})"
        problem = shard_problem(data, layout)
        return f"shard {shard} {problem}" if problem else None

    def __len__(self) -> int:
        return int(self.attrs["n_cubes"])
