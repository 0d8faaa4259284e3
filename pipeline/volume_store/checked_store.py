"""Reading a scan so that damage raises an error naming the store, the scan and the array.

Every shard the converter writes carries CRC32C checksums: one after its index (as Zarr's
sharding codec always has) and one after every inner chunk (the `crc32c` codec in the array's
chunk codecs). Zarr verifies them itself, but its error names nothing, and a *missing* shard
it reads as the fill value without complaint. `CheckedStore` wraps the Zarr store a scan is
opened through - a `LocalStore` on disk or an `ObjectStore` in a bucket (`Tree.zarr_store`) -
checks each CRC32C as the bytes arrive and knows, from the scan's manifest, which shard objects
must exist - so a damaged or missing shard raises
`StoreIntegrityError("STORE: scan ID: array 0: shard c/0/0/0 ...")` instead of garbage or zeros,
on either backend.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from math import prod
from pathlib import Path

import google_crc32c
import numpy as np
from zarr.abc.store import OffsetByteRequest, RangeByteRequest, Store, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore, WrapperStore

from pipeline.volume_store.errors import StoreIntegrityError

__all__ = ["CheckedStore", "StoreIntegrityError", "chunk_key_parts", "shard_problem"]

_EMPTY = 2**64 - 1

def chunk_key_parts(key: str) -> tuple[str, str] | None:
    """("labels/seg/0", "c/0/0/0") for a chunk key, None for metadata keys."""
    if key.startswith("c/"):
        return "", key
    array, sep, rest = key.rpartition("/c/")
    return (array, "c/" + rest) if sep else None


def _crc_ok(data: np.ndarray) -> bool:
    """Whether the last 4 bytes of `data` (uint8) are the CRC32C of the rest (little-endian, as Zarr's codec)."""
    if len(data) < 4:
        return False
    return np.uint32(google_crc32c.value(data[:-4])).astype("<u4").tobytes() == data[-4:].tobytes()


def _array_layout(meta: dict) -> tuple[bool, bool, int]:
    """(inner chunks end in crc32c, index ends in crc32c, inner chunks per shard) of an array's metadata."""
    codecs = meta.get("codecs") or []
    if not codecs or codecs[0].get("name") != "sharding_indexed":
        return False, False, 0
    conf = codecs[0]["configuration"]
    inner = [c.get("name") for c in conf.get("codecs", [])]
    index = [c.get("name") for c in conf.get("index_codecs", [])]
    shard = meta["chunk_grid"]["configuration"]["chunk_shape"]
    n = prod(s // c for s, c in zip(shard, conf["chunk_shape"]))
    return bool(inner) and inner[-1] == "crc32c", bool(index) and index[-1] == "crc32c", n


def shard_problem(data: np.ndarray, layout: tuple[bool, bool, int]) -> str | None:
    """Why a whole shard file (uint8) fails its checksums (None when it passes); end-of-file index."""
    chunk_crc, index_crc, n = layout
    if not index_crc or not n:
        return None
    size = 16 * n + 4
    if len(data) < size:
        return f"is truncated ({len(data)} bytes, its index alone needs {size})"
    index_bytes = data[len(data) - size:]
    if not _crc_ok(index_bytes):
        return "index fails its CRC32C checksum"
    index = np.frombuffer(index_bytes[:-4], dtype="<u8").reshape(-1, 2)
    for k, (off, length) in enumerate(index.tolist()):
        if off == _EMPTY:
            continue
        if off + length > len(data) - size:
            return f"inner chunk {k} points past the data ({off}+{length} > {len(data) - size})"
        if chunk_crc and not _crc_ok(data[off:off + length]):
            return f"inner chunk {k} fails its CRC32C checksum"
    return None


WHOLE_SHARD_CACHE_BYTES = 256 * 2**20
"""Shards kept in memory per open scan or patch store when reading whole shards from a bucket: a level's shards
are requested together, and a chunk request for an evicted shard falls back to a range read (slower, not wrong)."""


def _cut(data: bytes, byte_range) -> bytes:
    """The bytes of a Zarr byte request out of a whole object."""
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start:byte_range.end]
    if isinstance(byte_range, SuffixByteRequest):
        return data[len(data) - byte_range.suffix:]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset:]
    raise TypeError(f"unknown byte request {byte_range!r}")


class CheckedStore(WrapperStore):
    """A read-only Zarr store (any: `LocalStore`, `ObjectStore`) over one scan or patch store that verifies what
    it hands to Zarr. `store` is the Zarr store to wrap, a `Tree` (its `zarr_store()`), or a local path."""

    def __init__(self, store: "Store | Path | str", *, read_only: bool = True, where: str = "",
                 files: frozenset[str] | None = None,
                 hint: str = "check and repair with `genesis stores verify`",
                 whole_shards: bool | None = None) -> None:
        from pipeline.storage.objects import Tree

        if isinstance(store, Tree):
            store = store.zarr_store("", read_only=read_only)
        elif isinstance(store, (str, os.PathLike)):
            store = LocalStore(store, read_only=read_only)
        super().__init__(store)
        self.where = where or str(getattr(store, "root", store))
        """Prefix of every error, e.g. "STORE: scan ID"."""
        self.files = files
        """Every chunk object that must exist (a scan's manifest at publish time, a patch store's shards);
        None: unknown (an older record without a manifest), a missing one then reads as the fill value."""
        self.hint = hint
        """What to do about it, the end of every error."""
        self._layouts: dict[str, tuple[bool, bool, int]] = {}
        self.whole_shards = not isinstance(store, LocalStore) if whole_shards is None else whole_shards
        """Fetch a shard whole when Zarr first asks for its index, and serve its inner chunks from memory (see
        `_shard_bytes`). Default: in a bucket yes, on disk no (a range read there is a cheap system call)."""
        self._shards: OrderedDict[str, bytes] = OrderedDict()

    @property
    def root(self):
        """The wrapped store's root (a Path for a LocalStore), for callers of the LocalStore subclass this was."""
        return getattr(self._store, "root", None)

    def _with_store(self, store) -> "CheckedStore":
        return type(self)(store, where=self.where, files=self.files, hint=self.hint, whole_shards=self.whole_shards)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CheckedStore) and self._store == other._store

    def __hash__(self) -> int:
        return hash(self.where)

    async def _layout(self, array: str) -> tuple[bool, bool, int]:
        if array not in self._layouts:
            key = f"{array}/zarr.json" if array else "zarr.json"
            try:
                buf = await self._store.get(key, default_buffer_prototype())
                if buf is None:
                    raise FileNotFoundError(key)
                self._layouts[array] = _array_layout(json.loads(buf.to_bytes()))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StoreIntegrityError(f"{self.where}: array {array or '.'}: zarr.json unreadable ({exc})") from None
        return self._layouts[array]

    def _fail(self, array: str, shard: str, problem: str) -> StoreIntegrityError:
        return StoreIntegrityError(f"{self.where}: array {array or '.'}: shard {shard} {problem}; {self.hint}")

    async def get(self, key, prototype=None, byte_range=None):
        prototype = prototype or default_buffer_prototype()
        if self.whole_shards and byte_range is not None and chunk_key_parts(key) is not None:
            data = await self._shard_bytes(key, prototype)
            if data is not None:
                return prototype.buffer.from_bytes(_cut(data, byte_range))
        buf = await self._store.get(key, prototype, byte_range)
        return await self._checked(key, buf, byte_range)

    async def get_partial_values(self, prototype, key_ranges: Iterable):
        key_ranges = list(key_ranges)
        if self.whole_shards:
            return [await self.get(key, prototype, rng) for key, rng in key_ranges]
        bufs = await self._store.get_partial_values(prototype, key_ranges)
        return [await self._checked(key, buf, rng) for (key, rng), buf in zip(key_ranges, bufs)]

    async def _shard_bytes(self, key: str, prototype) -> bytes | None:
        """The whole shard object `key`, checked (index and every inner chunk) once, then kept in a small LRU.

        Zarr reads a shard as its index (a suffix request) and then one range request per inner chunk: a full
        volume of 512x512x250 is about 500 requests per level. Against a bucket each request costs a round trip,
        which made extraction from s3 ten times slower than from disk; one GET per shard makes it one round
        trip per ~10 MB. None when the shard is absent (the caller then says whether it must exist)."""
        data = self._shards.get(key)
        if data is not None:
            self._shards.move_to_end(key)
            return data
        buf = await self._store.get(key, prototype)
        if buf is None:
            return None
        await self._checked(key, buf, None)  # raises naming the shard when any checksum fails
        data = buf.to_bytes()
        self._shards[key] = data
        held = sum(len(v) for v in self._shards.values())
        while len(self._shards) > 1 and held > WHOLE_SHARD_CACHE_BYTES:
            held -= len(self._shards.popitem(last=False)[1])
        return data

    async def _get_many(self, requests):
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def _checked(self, key, buf, byte_range):
        parts = chunk_key_parts(key)
        if buf is None:
            if parts and self.files is not None and key in self.files:
                raise self._fail(*parts, "is missing (it was written when this was published)")
            if self.files is not None and key in self.files:  # an array's metadata, read after the group
                raise StoreIntegrityError(f"{self.where}: {key} is missing (it was written when this was "
                                          f"published); {self.hint}")
            return None
        if parts is None:
            return buf
        layout = await self._layout(parts[0])
        data = buf.as_numpy_array().view(np.uint8)
        if byte_range is None:
            problem = shard_problem(np.ascontiguousarray(data), layout)
        elif isinstance(byte_range, SuffixByteRequest):
            ok = _crc_ok(data) if layout[1] else True
            problem = None if ok else "index fails its CRC32C checksum (damaged or truncated)"
        elif isinstance(byte_range, RangeByteRequest):
            want = byte_range.end - byte_range.start
            if len(data) != want:
                problem = f"is truncated (an inner chunk needs bytes {byte_range.start}..{byte_range.end})"
            elif layout[0] and not _crc_ok(data):
                problem = f"inner chunk at bytes {byte_range.start}..{byte_range.end} fails its CRC32C checksum"
            else:
                problem = None
        else:
            problem = None
        if problem:
            raise self._fail(*parts, problem)
        return buf
