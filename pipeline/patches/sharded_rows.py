"""Rows of a patch-store array read straight from its shards: one ranged read per contiguous run of rows (in a
bucket, runs of one shard less than `MAX_GAP` apart share one), the reads of a call issued concurrently, every
CRC32C checked, a missing shard refused.

A patch-store array holds one inner chunk per cube (Blosc, then the chunk's CRC32C) and `shard_rows` cubes per
shard, with the shard index (and its CRC32C) at the shard's end: Zarr v3's `sharding_indexed` layout, written by
`pipeline.patches.assemble`. Zarr reads a slice of such a shard with one request per inner chunk, one after the
other, and fetches the shard's index again on every call: on disk that is cheap, in a bucket each is a round
trip. Here the shards' sizes come from one listing and each shard's index is read once per store object (one
ranged GET; 16 bytes per cube) and kept; a run of rows in one shard is then one ranged GET of the chunks it spans
(nearby runs of a shard one GET together), split, checked and decoded into the output in place (Blosc releases
the GIL), and the reads of one call go to a shared thread pool so their requests overlap. Memory: the output,
one read's compressed bytes per thread, and the indices.

Integrity is the same as through `pipeline.volume_store.checked_store.CheckedStore`: a shard the layout needs but
the tree lacks raises (Zarr would read it as zeros), and so does any chunk or index whose CRC32C fails, naming
the store, the array and the shard. Arrays of another layout (none are written today) are left to Zarr
(`RowLayout.of` returns None).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import google_crc32c
import numpy as np

from pipeline.storage.objects import Tree
from pipeline.volume_store.errors import StoreIntegrityError

__all__ = ["RowLayout", "ShardedRows", "read_pool", "runs"]

_EMPTY = 2**64 - 1
READ_THREADS = 16
"""Reads in flight per process: enough to hide a bucket's round trips behind each other for a buffer of cubes."""
MAX_GAP = 4 << 20
"""In a bucket, runs of one shard whose bytes are at most this far apart are read with one request: a round trip
costs as much as a few megabytes of transfer (S3: 20-50 ms to the first byte, 50-100 MB/s per connection; the
local moto server: 9 ms per request, 2 ms per MB)."""
LOCAL_GAP = 64 << 10
"""On disk a read costs microseconds: only runs this close share one."""

_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_guard = threading.Lock()


POOL_PREFIX = "genesis-rows"


def read_pool() -> ThreadPoolExecutor:
    """The process's pool of reader threads (made anew in a forked child, whose parent's threads are gone)."""
    global _pool
    with _pool_guard:
        if _pool is None or _pool[0] != os.getpid():
            _pool = (os.getpid(), ThreadPoolExecutor(READ_THREADS, thread_name_prefix=POOL_PREFIX))
        return _pool[1]


@dataclass(frozen=True)
class RowLayout:
    """What reading rows of one array needs from its zarr.json."""
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    shard_rows: int
    chunk_crc: bool
    """Each inner chunk ends in its CRC32C (arrays written by `assemble`)."""
    sep: str

    @classmethod
    def of(cls, name: str, meta: dict) -> RowLayout | None:
        """The layout of array `name`, None when its metadata is not the one-cube-per-chunk, Blosc, index-at-the-end
        layout patch stores are written in."""
        try:
            shape = tuple(int(n) for n in meta["shape"])
            grid = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
            (shard,) = meta["codecs"]
            conf = shard["configuration"]
            inner = conf["codecs"]
            names = [c["name"] for c in inner]
            index = [c["name"] for c in conf.get("index_codecs", [])]
            endian = (inner[0].get("configuration") or {}).get("endian", "little")
            enc = meta.get("chunk_key_encoding") or {}
            ok = (shard["name"] == "sharding_indexed" and conf.get("index_location", "end") == "end"
                  and list(conf["chunk_shape"]) == [1, *shape[1:]] and grid[1:] == list(shape[1:])
                  and names[:2] == ["bytes", "blosc"] and names[2:] in ([], ["crc32c"]) and endian == "little"
                  and index == ["bytes", "crc32c"] and enc.get("name", "default") == "default")
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        except (KeyError, TypeError, ValueError):
            return None
        if not ok:
            return None
        sep = (enc.get("configuration") or {}).get("separator", "/")
        return cls(name, shape, dtype, grid[0], names[2:] == ["crc32c"], sep)

    def shard_key(self, shard: int) -> str:
        """`cubes/c/3/0/0/0/0`: the object of shard `shard`."""
        return f"{self.name}/c{self.sep}" + self.sep.join(map(str, (shard,) + (0,) * (len(self.shape) - 1)))


def _crc_ok(data: memoryview | bytes) -> bool:
    return len(data) >= 4 and int.from_bytes(data[-4:], "little") == google_crc32c.value(bytes(data[:-4]))


def runs(rows: np.ndarray, shard_rows: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """(order, runs): `rows[order]` sorted, and each (shard, first slot, end slot, position in the sorted rows) of
    the consecutive rows in one shard."""
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    cuts = np.flatnonzero((np.diff(srt) != 1) | (np.diff(srt // shard_rows) != 0)) + 1
    out, pos = [], 0
    for run in np.split(srt, cuts):
        if len(run):
            shard = int(run[0]) // shard_rows
            first = int(run[0]) - shard * shard_rows
            out.append((shard, first, first + len(run), pos))
            pos += len(run)
    return order, out


class ShardedRows:
    """Reads rows of one array of the store at `tree`; `where` and `hint` start and end its errors."""

    def __init__(self, tree: Tree, layout: RowLayout, where: str, hint: str):
        self.tree, self.layout, self.where, self.hint = tree, layout, where, hint
        self.max_gap = LOCAL_GAP if tree.local is not None else MAX_GAP
        self._indices: dict[int, tuple[np.ndarray, int]] = {}
        self._sizes: dict[str, int] | None = None
        self._lock = threading.Lock()
        self.requests = 0
        """Reads (ranged GETs in a bucket) issued so far, the listing's request(s) aside."""

    def _fail(self, shard: int, problem: str) -> StoreIntegrityError:
        key = self.layout.shard_key(shard)[len(self.layout.name) + 1:]
        return StoreIntegrityError(f"{self.where}: array {self.layout.name}: shard {key} {problem}; {self.hint}")

    def index(self, shard: int) -> tuple[np.ndarray, int]:
        """((offset, length) per inner chunk, bytes before the index) of a shard, read once and kept."""
        found = self._indices.get(shard)
        if found is not None:
            return found
        key = self.layout.shard_key(shard)
        total = self._shard_sizes().get(key)
        if total is None:
            raise self._fail(shard, "is missing (it was written when this was published)")
        size = 16 * self.layout.shard_rows + 4
        if total < size:
            raise self._fail(shard, f"is truncated ({total} bytes, its index alone needs {size})")
        self._count()
        try:
            data = self.tree.read_range(key, total - size, total)
        except FileNotFoundError:
            raise self._fail(shard, "is missing (it was written when this was published)") from None
        if len(data) != size or not _crc_ok(data):
            raise self._fail(shard, "index fails its CRC32C checksum (damaged or truncated)")
        index = np.frombuffer(data[:-4], dtype="<u8").reshape(-1, 2)
        with self._lock:
            self._indices[shard] = (index, total - size)
        return index, total - size

    def _count(self) -> None:
        with self._lock:
            self.requests += 1

    def _shard_sizes(self) -> dict[str, int]:
        """Every shard object of the array with its size: one listing per store object (in a bucket one LIST
        request per 1000 shards, instead of a HEAD per shard); a published store's objects never change."""
        with self._lock:
            if self._sizes is None:
                self._sizes = {o.path: o.size for o in self.tree.list(f"{self.layout.name}/c")}
            return self._sizes

    def _span(self, shard: int, first: int, end: int) -> tuple[np.ndarray, int, int]:
        """(index rows, first byte, end byte) of chunks `first:end` of a shard, checked against the shard's size."""
        index, data_end = self.index(shard)
        span = index[first:end]
        if (span[:, 0] == _EMPTY).any():
            k = first + int(np.flatnonzero(span[:, 0] == _EMPTY)[0])
            raise self._fail(shard, f"has no inner chunk {k} (every row of a patch store is written)")
        lo, hi = int(span[:, 0].min()), int((span[:, 0] + span[:, 1]).max())
        if hi > data_end:
            raise self._fail(shard, f"inner chunk points past the data ({hi} > {data_end})")
        return span, lo, hi

    def _read_group(self, shard: int, group: list[tuple[int, int, int]], out: np.ndarray,
                    order: np.ndarray) -> None:
        """Runs (first slot, end slot, position in the sorted rows) of one shard, close enough to share one ranged
        read; each chunk checked and decoded into `out` at its place in the caller's order."""
        from numcodecs import Blosc

        spans = [(self._span(shard, a, b), a, p) for a, b, p in group]
        lo, hi = min(s[1] for s, _, _ in spans), max(s[2] for s, _, _ in spans)
        self._count()
        try:
            blob = memoryview(self.tree.read_range(self.layout.shard_key(shard), lo, hi))
        except FileNotFoundError:
            raise self._fail(shard, "is missing (it was written when this was published)") from None
        if len(blob) != hi - lo:
            raise self._fail(shard, f"is truncated (inner chunks need bytes {lo}..{hi})")
        codec = Blosc()
        for (span, _, _), first, pos in spans:
            for j, (off, length) in enumerate(span.tolist()):
                chunk = blob[off - lo:off - lo + length]
                if self.layout.chunk_crc:
                    if not _crc_ok(chunk):
                        raise self._fail(shard, f"inner chunk {first + j} fails its CRC32C checksum")
                    chunk = chunk[:-4]
                target = out[order[pos + j]]
                size = int.from_bytes(chunk[4:8], "little") if len(chunk) >= 16 else -1  # Blosc header: nbytes
                if size != target.nbytes:  # Blosc would fill a larger row only in part, leaving garbage
                    raise self._fail(shard, f"inner chunk {first + j} decodes to {size} bytes, the array's layout "
                                            f"needs {target.nbytes}")
                try:
                    codec.decode(chunk, out=target)
                except (RuntimeError, ValueError) as exc:
                    raise self._fail(shard, f"inner chunk {first + j} does not decode ({exc})") from None

    def _groups(self, shard: int, shard_runs: list[tuple[int, int, int]]) -> list[list[tuple[int, int, int]]]:
        """A shard's runs in groups whose bytes lie within `max_gap` of each other: one ranged read each."""
        index, _ = self.index(shard)
        groups: list[list[tuple[int, int, int]]] = []
        end = -1
        for run in shard_runs:  # ascending rows: ascending offsets (assembly writes a shard's chunks in order)
            start = int(index[run[0], 0])
            if groups and start != _EMPTY and 0 <= start - end <= self.max_gap:
                groups[-1].append(run)
            else:
                groups.append([run])
            last = index[run[1] - 1]
            end = int(last[0] + last[1]) if int(last[0]) != _EMPTY else -1
        return groups

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Rows at `rows` (any order, repeats allowed), in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        n = self.layout.shape[0]
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"{self.where}: array {self.layout.name}: rows must be in [0, {n})")
        order, spans = runs(rows, self.layout.shard_rows)
        out = np.empty((len(rows),) + self.layout.shape[1:], dtype=self.layout.dtype)
        by_shard: dict[int, list[tuple[int, int, int]]] = {}
        for shard, a, b, p in spans:
            by_shard.setdefault(shard, []).append((a, b, p))
        if len(by_shard) == 1 or threading.current_thread().name.startswith(POOL_PREFIX):
            # one shard, or called from a read thread itself (waiting on the pool from inside it could deadlock)
            for shard, shard_runs in by_shard.items():
                for group in self._groups(shard, shard_runs):
                    self._read_group(shard, group, out, order)
            return out
        pool = read_pool()
        for f in [pool.submit(self._shard_indices, s) for s in by_shard if s not in self._indices]:
            f.result()  # every shard's index (read once per store object), concurrently
        futures = [pool.submit(self._read_group, shard, group, out, order)
                   for shard, shard_runs in by_shard.items() for group in self._groups(shard, shard_runs)]
        for f in futures:
            f.result()
        return out

    def _shard_indices(self, shard: int) -> None:
        self.index(shard)
