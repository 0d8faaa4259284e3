"""Parts -> one exact array: the second phase of every patch-store build.

Extraction tasks cannot know their rows in advance (a scan yields as many cubes as pass its
acceptance test, a case as many candidates as it has), and Zarr has no locks, so tasks never
write the shared array. Each task encodes its cubes with the array's own codec (one inner chunk
per cube) into a part file; once all parts exist their offsets are known, and each shard of the
final array (`shard_rows` cubes) is written by exactly one task that only concatenates the
encoded chunks of the parts covering it and appends the shard index. Compression happens once,
in parallel, in the tasks; assembly is I/O. The array then holds exactly the cubes of the index,
in index order, with no empty rows for scans that gave nothing.

A store is built in a hidden folder and published by one rename; a kill can stop a build at any
step, so every state of that folder is either resumed or discarded here (`open_building`,
`building_complete`, `publish`): parts and results are written to a temporary name and renamed,
a result counts only when its parts are whole (`save_part`, then `save_result`), and a folder whose
arrays, index and attributes are all written is published without redoing anything. `pipeline.patches.site`
offers these to the one build protocol, `pipeline.runtime.build`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.runtime.hooks import stop_point
from pipeline.storage.shard_writer import blosc_codec, chunk_codecs, write_encoded_shard

__all__ = ["Part", "save_part", "save_result", "plan_shards", "create_array", "write_assembled_shard", "assemble",
           "CODEC", "open_building", "building_complete", "publish"]

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
    # Each file appears whole or not at all (a killed task, or a stray worker of a killed run
    # writing the same part, never leaves a torn one); the sizes go last and vouch for the chunks.
    tmp = f"{path}.bin.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as fh:
        for data in encoded:
            fh.write(data)
    os.replace(tmp, f"{path}.bin")
    tmp = f"{path}.len.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as fh:
        np.save(fh, np.array([len(d) for d in encoded], dtype=np.int64))
    os.replace(tmp, f"{path}.len.npy")
    return Part(str(path), len(items))


def save_result(building: str | os.PathLike, result: dict) -> dict:
    """Leave a task's `result` (a dict with its `slot`) in the build's `results/`, whole or not at all, after its
    parts: it is what vouches that the task is done (`open_building`). Returns it."""
    path = Path(building) / "results" / f"{result['slot']:06d}.json"
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def part_is_whole(path: str | os.PathLike, n: int) -> bool:
    """Whether the part at `path` holds `n` encoded items: its sizes file lists n sizes that add up to the chunks."""
    try:
        sizes = np.load(f"{path}.len.npy")
        return len(sizes) == n and os.path.getsize(f"{path}.bin") == int(sizes.sum())
    except (OSError, ValueError):
        return False


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
                       compressors=chunk_codecs(CODEC[0], CODEC[1], CODEC[2], typesize),  # Blosc + CRC32C per cube
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
        written = 0
        for a in args:
            written += write_assembled_shard(*a)
            stop_point("assemble")
        return written
    futures = [client.submit(write_assembled_shard, *a, pure=False) for a in args]
    written = futures[0].result() if futures else 0
    stop_point("assemble")  # one shard written, the others on their way
    return written + sum(f.result() for f in futures[1:])


def _is_group(path: Path) -> bool:
    try:
        return json.loads((path / "zarr.json").read_text(encoding="utf-8")).get("node_type") == "group"
    except (OSError, ValueError, AttributeError):
        return False


def _read_result(path: Path) -> dict | None:
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(r, dict) or not isinstance(r.get("slot"), int) or path.stem != f"{r['slot']:06d}":
        return None
    return r


def open_building(building: Path, parts_of: Callable[[dict], list[tuple[str, int]]]) -> dict[int, dict]:
    """The hidden folder a store is built in, with `results/` and `parts/`; returns the results of the
    tasks a killed run had already finished (by slot), so a rerun does only the rest.

    `parts_of(result)` names the parts a result stands for, as (name in parts/, items). A result
    counts only when they are all whole; otherwise it is dropped and its task runs again. A folder
    that lacks `results/`, `parts/` or a readable group `zarr.json` (killed while being made, or an
    older version's half-published one) is discarded and made anew, as are leftover temporary files.
    """
    results, parts = building / "results", building / "parts"
    if not (results.is_dir() and parts.is_dir() and _is_group(building)):
        shutil.rmtree(building, ignore_errors=True)
        zarr.open_group(str(building), mode="w")  # mode "w" empties the folder: before the subfolders
        results.mkdir()
        parts.mkdir()
        return {}
    for tmp in (*results.glob("*.tmp"), *parts.glob("*.tmp")):
        tmp.unlink(missing_ok=True)
    done = {}
    for p in sorted(results.glob("*.json")):
        r = _read_result(p)
        if r is None or not all(part_is_whole(parts / name, n) for name, n in parts_of(r)):
            p.unlink(missing_ok=True)
            continue
        done[r["slot"]] = r
    return done


def building_complete(building: Path, key: str) -> bool:
    """Whether a build got as far as its attributes (written last, after the arrays and the index):
    such a folder only needs `publish`."""
    try:
        meta = json.loads((building / "zarr.json").read_text(encoding="utf-8"))
        genesis = meta["attributes"]["genesis"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (isinstance(genesis, dict) and genesis.get("kind") == "patch-store" and genesis.get("key") == key
            and (building / "index.parquet").is_file())


def publish(building: Path, final: Path) -> None:
    """Drop the build's scaffolding and make `building` the store `final` in one rename.

    Every step can be repeated, so a run killed half-way through publishing is finished by the next.
    """
    for d in ("results", "parts"):
        shutil.rmtree(building / d, ignore_errors=True)
    for tmp in (*building.glob("*.partial"), *building.glob("*/*.partial")):  # zarr's half-written metadata
        tmp.unlink(missing_ok=True)
    try:
        os.rename(building, final)
    except OSError as exc:
        raise RuntimeError(f"cannot publish the patch store: {final} is in the way ({exc.strerror}) and is not "
                           f"a patch store; move it away and run again") from None
