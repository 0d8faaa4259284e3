"""Write a whole array's shards in one pass, straight to files or objects, in the Zarr v3 sharding format.

Zarr's generic write path costs about 0.7 ms of Python per inner chunk, more than compressing
it; a scan of 300x512x512 has thousands of inner chunks per level. Conversion always writes
whole arrays into a private staging folder, so the shards can be assembled directly:
inner chunks (padded to full size with the fill value, as Zarr does) encoded by the array's
own Blosc settings, concatenated, followed by the index of (offset, length) pairs and its
CRC32C, exactly as `sharding_indexed` with `index_location = end` specifies. Zarr reads the
result like any other shard (the tests compare every voxel through Zarr).

Integrity: arrays created with `chunk_codecs` (Blosc then `crc32c`) get each inner chunk's
CRC32C appended after its Blosc bytes, as Zarr's crc32c codec does, so every byte of a shard
is covered by a checksum that reading verifies (index and chunks alike). Whether an array wants
them is read from its own `zarr.json`, so arrays created without the codec stay readable too.

Where the shards go: `array_dir` is a folder on disk (a plain path: each shard is written straight into its
file - the conversion's staging folder is private, so no temporary file and rename are needed) or a
`ShardSink`: `TreeSink(tree, "scans/ID/0")` writes each shard as one whole object through a `Tree`
(`pipeline.storage.objects`), i.e. one PUT into a bucket. A sink remembers the size and XXH3 digest of
everything it wrote (`written`), so a scan's manifest needs no second read of its shards.
"""

from __future__ import annotations

import itertools
import json
import os

import google_crc32c
import numpy as np
import xxhash
from numcodecs import Blosc
from zarr.codecs import BloscCodec, Crc32cCodec

__all__ = ["blosc_codec", "chunk_codecs", "chunk_crc", "write_shard", "write_shards", "write_encoded_shard",
           "ShardSink", "DirSink", "TreeSink", "Uploads", "as_sink"]

_EMPTY = np.uint64(2**64 - 1)
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def blosc_codec(cname: str, clevel: int, shuffle: str) -> Blosc:
    return Blosc(cname=cname, clevel=clevel, shuffle=_SHUFFLE[shuffle], blocksize=0)


def chunk_codecs(cname: str, clevel: int, shuffle: str, typesize: int) -> list:
    """The `compressors` of an array this module writes: Blosc, then a CRC32C of every inner chunk."""
    return [BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=typesize), Crc32cCodec()]


class ShardSink:
    """Where one array's shards go: `put(rel, parts)` writes the object `rel` (e.g. "c/0/0/0") from byte parts,
    `read(rel)` reads one back (the array's zarr.json). `written` maps every object put to `<size>:<xxh3-64>`."""

    where: str = ""

    def __init__(self) -> None:
        self.written: dict[str, str] = {}

    def put(self, rel: str, parts: list[bytes]) -> int:
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def _digest(self, rel: str, parts: list[bytes]) -> int:
        h = xxhash.xxh3_64()
        size = 0
        for p in parts:
            h.update(p)
            size += len(p)
        self.written[rel] = f"{size}:{h.hexdigest()}"
        return size


class DirSink(ShardSink):
    """An array folder on disk; each shard written straight into its file (no temporary file: the folder is
    private to its writer until published)."""

    def __init__(self, array_dir: str | os.PathLike, digest: bool = False) -> None:
        super().__init__()
        self.array_dir, self.digest = os.fspath(array_dir), digest
        self.where = self.array_dir

    def put(self, rel: str, parts: list[bytes]) -> int:
        path = os.path.join(self.array_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            for p in parts:
                fh.write(p)
        return self._digest(rel, parts) if self.digest else sum(len(p) for p in parts)

    def read(self, rel: str) -> bytes:
        with open(os.path.join(self.array_dir, *rel.split("/")), "rb") as fh:
            return fh.read()


class Uploads:
    """Whole-object writes run in background threads while the next shard is being compressed (a PUT into a
    bucket is network time, not CPU), at most `max_bytes` of them pending at once (a put waits for the oldest
    beyond that), so memory stays bounded. `wait()` returns when every write has finished and raises the first
    failure; leaving the `with` block waits for every write even after an error, so nothing is still being
    written when the caller cleans up."""

    def __init__(self, threads: int = 4, max_bytes: int = 256 << 20) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="genesis-upload")
        self._pending: list = []  # (future, bytes)
        self._max = max_bytes

    def submit(self, write, rel: str, data: bytes) -> None:
        while self._pending and sum(n for _, n in self._pending) + len(data) > self._max:
            self._pending.pop(0)[0].result()  # the oldest first; raises its failure
        self._pending.append((self._pool.submit(write, rel, data), len(data)))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = []
        for fut, _ in pending:
            try:
                fut.result()
            except Exception as exc:  # noqa: BLE001 - every write is waited for; the first failure is raised
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Uploads":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                self.wait()
            else:
                for fut, _ in self._pending:
                    fut.exception()  # wait, ignoring: the error in flight is the one that counts
                self._pending = []
        finally:
            self._pool.shutdown(wait=True)


class TreeSink(ShardSink):
    """An array under a `Tree` (a folder or a bucket prefix): each shard one whole-object write, in the background
    when `uploads` is given (its `wait()` says when they are all written)."""

    def __init__(self, tree, array_rel: str, uploads: Uploads | None = None) -> None:
        super().__init__()
        self.tree, self.array_rel, self.uploads = tree, array_rel.strip("/"), uploads
        self.where = f"{tree.url}/{self.array_rel}"

    def _rel(self, rel: str) -> str:
        return f"{self.array_rel}/{rel}" if self.array_rel else rel

    def put(self, rel: str, parts: list[bytes]) -> int:
        data = b"".join(parts)
        if self.uploads is not None:
            self.uploads.submit(self.tree.write, self._rel(rel), data)
        else:
            self.tree.write(self._rel(rel), data)
        return self._digest(rel, [data])

    def read(self, rel: str) -> bytes:
        return self.tree.read(self._rel(rel))


def as_sink(target: "str | os.PathLike | ShardSink") -> ShardSink:
    """A path is a folder on disk (`DirSink`); a sink is itself."""
    return target if isinstance(target, ShardSink) else DirSink(target)


def chunk_crc(array_dir: "str | os.PathLike | ShardSink") -> bool:
    """Whether the array at `array_dir` (a folder or a sink) declares crc32c as the last codec of its inner
    chunks."""
    sink = as_sink(array_dir)
    meta = json.loads(sink.read("zarr.json"))
    array_dir = sink.where
    codecs = meta.get("codecs") or []
    if not codecs or codecs[0].get("name") != "sharding_indexed":
        raise ValueError(f"{array_dir}: not a sharded array; the shard writer writes sharding_indexed arrays only")
    inner = [c.get("name") for c in codecs[0]["configuration"].get("codecs", [])]
    if "crc32c" in inner[:-1]:
        raise ValueError(f"{array_dir}: crc32c must be the last inner codec (got {inner})")
    return bool(inner) and inner[-1] == "crc32c"


def _crc(data: bytes) -> bytes:
    return np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


def write_shard(array_dir: "str | ShardSink", shard_index: tuple[int, ...], shard: np.ndarray, chunks: tuple[int, ...],
                shard_shape: tuple[int, ...], codec: Blosc, array_shape: tuple[int, ...],
                valid_rows: int | None = None, fill_value=0, checksum: bool | None = None) -> int:
    """Write one shard object. `shard` holds the shard's data from the shard's origin (it may be cut
    short at the array's edge); inner chunks past the edge or, along axis 0, at or beyond
    `valid_rows` are left empty (Zarr reads them as the fill value). `checksum`: append each
    chunk's CRC32C (None: as the array's zarr.json declares)."""
    shard = shard.astype(shard.dtype.newbyteorder("<"), copy=False)
    per_shard = tuple(s // c for s, c in zip(shard_shape, chunks))
    origin = [i * s for i, s in zip(shard_index, shard_shape)]
    encoded: dict[tuple[int, ...], bytes] = {}
    for local in itertools.product(*(range(p) for p in per_shard)):
        start = [li * c for li, c in zip(local, chunks)]
        if any(o + s >= n for o, s, n in zip(origin, start, array_shape)) or any(
                s >= n for s, n in zip(start, shard.shape)):
            continue
        if valid_rows is not None and start[0] >= valid_rows:
            continue
        block = shard[tuple(slice(s, s + c) for s, c in zip(start, chunks))]
        if block.shape != tuple(chunks):
            full = np.full(chunks, fill_value, dtype=block.dtype)
            full[tuple(slice(0, n) for n in block.shape)] = block
            block = full
        encoded[local] = codec.encode(np.ascontiguousarray(block))
    return write_encoded_shard(array_dir, shard_index, encoded, per_shard, checksum=checksum)


def write_encoded_shard(array_dir: "str | ShardSink", shard_index: tuple[int, ...],
                        encoded: dict[tuple[int, ...], bytes],
                        per_shard: tuple[int, ...], checksum: bool | None = None) -> int:
    """Write one shard file from inner chunks already encoded by the array's compressor (Blosc),
    keyed by their position inside the shard; absent chunks are empty. With `checksum` (None: as
    the array's zarr.json declares) each chunk gets its CRC32C appended, the crc32c codec's
    encoding. Returns the bytes written."""
    sink = as_sink(array_dir)
    if checksum is None:
        checksum = chunk_crc(sink)
    index = np.full(tuple(per_shard) + (2,), _EMPTY, dtype="<u8")
    offset = 0
    parts: list[bytes] = []
    for local, data in encoded.items():
        n = len(data) + (4 if checksum else 0)
        index[local] = (offset, n)
        parts.append(data)
        if checksum:
            parts.append(_crc(data))
        offset += n
    index_bytes = index.tobytes()
    parts.append(index_bytes)
    parts.append(_crc(index_bytes))
    return sink.put("/".join(("c", *map(str, shard_index))), parts)


def write_shards(array_dir: "str | ShardSink", data: np.ndarray, chunks: tuple[int, ...], shards: tuple[int, ...],
                 cname: str, clevel: int, shuffle: str, fill_value=0, checksum: bool | None = None) -> int:
    """Encode all of `data` into the shard files of the (already created) array at `array_dir`."""
    codec = blosc_codec(cname, clevel, shuffle)
    array_dir = as_sink(array_dir)
    if checksum is None:
        checksum = chunk_crc(array_dir)
    grid = tuple(-(-n // s) for n, s in zip(data.shape, shards))
    total = 0
    for shard_idx in itertools.product(*(range(g) for g in grid)):
        region = tuple(slice(i * s, (i + 1) * s) for i, s in zip(shard_idx, shards))
        total += write_shard(array_dir, shard_idx, data[region], chunks, shards, codec, data.shape,
                             fill_value=fill_value, checksum=checksum)
    return total
