"""Parts -> one exact array: the second phase of every patch-store build.

Extraction tasks cannot know their rows in advance (a scan yields as many cubes as pass its
acceptance test, a case as many candidates as it has), and Zarr has no locks, so tasks never
write the shared array. Each task encodes its cubes with the array's own codec (one inner chunk
per cube) into a part file; once all parts exist their offsets are known, and each shard of the
final array (`shard_rows` cubes) is written by exactly one task that only concatenates the
encoded chunks of the parts covering it and appends the shard index. Compression happens once,
in parallel, in the tasks; assembly is I/O. The array then holds exactly the cubes of the index,
in index order, with no empty rows for scans that gave nothing.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.storage.shard_writer import blosc_codec, write_encoded_shard

__all__ = ["Part", "save_part", "plan_shards", "create_array", "write_assembled_shard", "assemble", "CODEC",
           "open_building"]

CODEC = ("zstd", 1, "shuffle")


@dataclass(frozen=True)
class Part:
    path: str
    """Base path of a part: `<path>.bin` (encoded chunks back to back) and `<path>.len.npy` (their sizes)."""
    n: int


def save_part(path: str | os.PathLike, items: np.ndarray) -> Part:
    """Encode each item (one future inner chunk of shape (1, *item_shape)) and write the part."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    codec = blosc_codec(*CODEC)
    items = items.astype(items.dtype.newbyteorder("<"), copy=False)
    encoded = [codec.encode(np.ascontiguousarray(items[i:i + 1])) for i in range(len(items))]
    with open(f"{path}.bin", "wb") as fh:
        for data in encoded:
            fh.write(data)
    np.save(f"{path}.len.npy", np.array([len(d) for d in encoded], dtype=np.int64))
    return Part(str(path), len(items))


def plan_shards(parts: list[Part], shard_rows: int) -> list[list[tuple[str, int, int, int]]]:
    """Per output shard: (part path, first row in part, count, first row in shard) pieces, in order."""
    total = sum(p.n for p in parts)
    n_shards = -(-total // shard_rows)
    plan: list[list[tuple[str, int, int, int]]] = [[] for _ in range(n_shards)]
    offset = 0
    for part in parts:
        done = 0
        while done < part.n:
            row = offset + done
            shard, local = divmod(row, shard_rows)
            take = min(part.n - done, shard_rows - local)
            plan[shard].append((part.path, done, take, local))
            done += take
        offset += part.n
    return plan


def create_array(group_path: str | os.PathLike, name: str, n: int, item_shape: tuple[int, ...], dtype: str,
                 shard_rows: int, dimension_names: tuple[str, ...]) -> None:
    group = zarr.open_group(str(group_path), mode="a")
    typesize = np.dtype(dtype).itemsize
    group.create_array(name, shape=(n,) + tuple(item_shape), dtype=dtype, chunks=(1,) + tuple(item_shape),
                       shards=(shard_rows,) + tuple(item_shape), fill_value=0, overwrite=True,
                       compressors=[BloscCodec(cname=CODEC[0], clevel=CODEC[1], shuffle=CODEC[2], typesize=typesize)],
                       dimension_names=dimension_names)


def write_assembled_shard(array_dir: str, shard: int, pieces: list[tuple[str, int, int, int]], item_ndim: int,
                          shard_rows: int) -> int:
    """Write shard `shard` of the array at `array_dir` from the encoded chunks of its pieces."""
    tail = (0,) * item_ndim
    encoded: dict[tuple[int, ...], bytes] = {}
    for path, first, count, local in pieces:
        sizes = np.load(f"{path}.len.npy")
        starts = np.concatenate([[0], np.cumsum(sizes)])
        with open(f"{path}.bin", "rb") as fh:
            fh.seek(int(starts[first]))
            blob = fh.read(int(starts[first + count] - starts[first]))
        base = int(starts[first])
        for k in range(count):
            a, b = int(starts[first + k]) - base, int(starts[first + k + 1]) - base
            encoded[(local + k,) + tail] = blob[a:b]
    return write_encoded_shard(array_dir, (shard,) + tail, encoded, (shard_rows,) + (1,) * item_ndim)


def assemble(group_path: str | os.PathLike, name: str, parts: list[Part], item_shape: tuple[int, ...], dtype: str,
             shard_rows: int, dimension_names: tuple[str, ...], client=None) -> int:
    """Create `name` in the group with exactly sum(n) rows and fill it from `parts` (on `client` if given)."""
    parts = [p for p in parts if p.n]
    total = sum(p.n for p in parts)
    create_array(group_path, name, total, item_shape, dtype, shard_rows, dimension_names)
    array_dir = str(Path(group_path) / name)
    plan = plan_shards(parts, shard_rows)
    args = [(array_dir, s, pieces, len(item_shape), shard_rows) for s, pieces in enumerate(plan)]
    if client is None:
        return sum(write_assembled_shard(*a) for a in args)
    futures = [client.submit(write_assembled_shard, *a, pure=False) for a in args]
    return sum(f.result() for f in futures)


def open_building(building: Path) -> dict[int, dict]:
    """The hidden folder a store is built in, with `results/` and `parts/`; returns the results of
    the tasks a killed run had already finished (by slot), so a rerun does only the rest."""
    if not (building / "results").is_dir():
        shutil.rmtree(building, ignore_errors=True)
        zarr.open_group(str(building), mode="w")  # mode "w" empties the folder: before the subfolders
        (building / "results").mkdir()
        (building / "parts").mkdir()
    done = {}
    for p in (building / "results").glob("*.json"):
        r = json.loads(p.read_text())
        done[r["slot"]] = r
    return done
