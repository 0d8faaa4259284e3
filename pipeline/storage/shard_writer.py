"""Write a whole array's shards in one pass, straight to files, in the Zarr v3 sharding format.

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
"""

from __future__ import annotations

import itertools
import os

import json

import google_crc32c
import numpy as np
from numcodecs import Blosc
from zarr.codecs import BloscCodec, Crc32cCodec

__all__ = ["blosc_codec", "chunk_codecs", "chunk_crc", "write_shard", "write_shards", "write_encoded_shard"]

_EMPTY = np.uint64(2**64 - 1)
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def blosc_codec(cname: str, clevel: int, shuffle: str) -> Blosc:
    return Blosc(cname=cname, clevel=clevel, shuffle=_SHUFFLE[shuffle], blocksize=0)


def chunk_codecs(cname: str, clevel: int, shuffle: str, typesize: int) -> list:
    """The `compressors` of an array this module writes: Blosc, then a CRC32C of every inner chunk."""
    return [BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=typesize), Crc32cCodec()]


def chunk_crc(array_dir: str) -> bool:
    """Whether the array at `array_dir` declares crc32c as the last codec of its inner chunks."""
    with open(os.path.join(array_dir, "zarr.json"), "rb") as fh:
        meta = json.loads(fh.read())
    codecs = meta.get("codecs") or []
    if not codecs or codecs[0].get("name") != "sharding_indexed":
        raise ValueError(f"{array_dir}: not a sharded array; the shard writer writes sharding_indexed arrays only")
    inner = [c.get("name") for c in codecs[0]["configuration"].get("codecs", [])]
    if "crc32c" in inner[:-1]:
        raise ValueError(f"{array_dir}: crc32c must be the last inner codec (got {inner})")
    return bool(inner) and inner[-1] == "crc32c"


def _crc(data: bytes) -> bytes:
    return np.uint32(google_crc32c.value(data)).astype("<u4").tobytes()


def write_shard(array_dir: str, shard_index: tuple[int, ...], shard: np.ndarray, chunks: tuple[int, ...],
                shard_shape: tuple[int, ...], codec: Blosc, array_shape: tuple[int, ...],
                valid_rows: int | None = None, fill_value=0, checksum: bool | None = None) -> int:
    """Write one shard file. `shard` holds the shard's data from the shard's origin (it may be cut
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


def write_encoded_shard(array_dir: str, shard_index: tuple[int, ...], encoded: dict[tuple[int, ...], bytes],
                        per_shard: tuple[int, ...], checksum: bool | None = None) -> int:
    """Write one shard file from inner chunks already encoded by the array's compressor (Blosc),
    keyed by their position inside the shard; absent chunks are empty. With `checksum` (None: as
    the array's zarr.json declares) each chunk gets its CRC32C appended, the crc32c codec's
    encoding. Returns the bytes written."""
    if checksum is None:
        checksum = chunk_crc(array_dir)
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
    path = os.path.join(array_dir, "c", *map(str, shard_index))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        for p in parts:
            fh.write(p)
    return offset + len(index_bytes) + 4


def write_shards(array_dir: str, data: np.ndarray, chunks: tuple[int, ...], shards: tuple[int, ...],
                 cname: str, clevel: int, shuffle: str, fill_value=0, checksum: bool | None = None) -> int:
    """Encode all of `data` into the shard files of the (already created) array at `array_dir`."""
    codec = blosc_codec(cname, clevel, shuffle)
    if checksum is None:
        checksum = chunk_crc(array_dir)
    grid = tuple(-(-n // s) for n, s in zip(data.shape, shards))
    total = 0
    for shard_idx in itertools.product(*(range(g) for g in grid)):
        region = tuple(slice(i * s, (i + 1) * s) for i, s in zip(shard_idx, shards))
        total += write_shard(array_dir, shard_idx, data[region], chunks, shards, codec, data.shape,
                             fill_value=fill_value, checksum=checksum)
    return total
