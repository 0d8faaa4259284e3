"""Parts -> one exact array: the second phase of every patch-store build, on local disk or in a bucket.

Extraction tasks cannot know their rows in advance (a scan yields as many cubes as pass its
acceptance test, a case as many candidates as it has), and Zarr has no locks, so tasks never
write the shared array. Each task encodes its cubes with the array's own codec (one inner chunk
per cube) into a part; once all parts exist their offsets are known, and each shard of the
final array (`shard_rows` cubes) is written by exactly one task that only concatenates the
encoded chunks of the parts covering it (one ranged read per part) and appends the shard index,
as one whole object. Compression happens once, in parallel, in the tasks; assembly is I/O. The
array then holds exactly the cubes of the index, in index order, with no empty rows for scans that
gave nothing.

Every object goes through `pipeline.storage.objects.Tree`, whose `write` is atomic on both backends (a
temporary file and a rename on disk, one PUT in a bucket): parts and results appear whole or not at all,
the sizes of a part are written after its chunks and vouch for them (`save_part`), and a result is written
after its parts and vouches that its task is done (`save_result`); `finished_results` keeps exactly those
whose parts are whole, so a rerun does only the rest. How a finished build becomes visible (a rename on
disk, a commit object written last in a bucket) is `pipeline.patches.site`'s; the local folder protocol
(`open_building`, `building_complete`, `publish`) is here.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from pipeline.runtime.hooks import stop_point
from pipeline.storage.objects import LocalTree, Tree, is_remote, open_tree
from pipeline.storage.shard_writer import TreeSink, blosc_codec, chunk_codecs, write_encoded_shard

__all__ = ["Part", "save_part", "save_result", "plan_shards", "create_array", "write_assembled_shard", "assemble",
           "CODEC", "open_building", "building_complete", "publish", "finished_results", "join", "array_metadata"]

CODEC = ("zstd", 1, "shuffle")


def join(location: str | os.PathLike, *parts: str) -> str:
    """`location` (a local path or an s3:// URL) with `parts` appended, as a string a Dask task can take."""
    text = os.fspath(location)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *parts])
    return os.path.join(text, *parts)


def _locate(location: str | os.PathLike) -> tuple[Tree, str]:
    """(tree of the folder, object name) of a location such as `.../parts/000001`."""
    text = os.fspath(location)
    if is_remote(text):
        head, _, tail = text.rstrip("/").rpartition("/")
        return open_tree(head), tail
    p = Path(text)
    return LocalTree(p.parent), p.name


@dataclass(frozen=True)
class Part:
    path: str
    """Base location of a part (a path or a URL): `<path>.bin` (encoded chunks back to back) and `<path>.len.npy`
    (their sizes)."""
    n: int


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def save_part(path: str | os.PathLike, items: np.ndarray) -> Part:
    """Encode each item (one future inner chunk of shape (1, *item_shape)) and write the part."""
    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    codec = blosc_codec(*CODEC)
    items = items.astype(items.dtype.newbyteorder("<"), copy=False)
    encoded = [codec.encode(np.ascontiguousarray(items[i:i + 1])) for i in range(len(items))]
    # Each object appears whole or not at all (a killed task, or a stray worker of a killed run writing the same
    # part, never leaves a torn one); the sizes go last and vouch for the chunks.
    tree, stem = _locate(path)
    tree.write(f"{stem}.bin", b"".join(encoded))
    tree.write(f"{stem}.len.npy", _npy(np.array([len(d) for d in encoded], dtype=np.int64)))
    return Part(os.fspath(path), len(items))


def save_result(building: str | os.PathLike | Tree, result: dict) -> dict:
    """Leave a task's `result` (a dict with its `slot`) in the build's `results/`, whole or not at all, after its
    parts: it is what vouches that the task is done (`finished_results`). Returns it."""
    open_tree(building).write(f"results/{result['slot']:06d}.json", json.dumps(result).encode())
    return result


def _sizes(tree: Tree, stem: str) -> np.ndarray:
    return np.load(io.BytesIO(tree.read(f"{stem}.len.npy")))


def part_is_whole(path: str | os.PathLike, n: int) -> bool:
    """Whether the part at `path` holds `n` encoded items: its sizes list n sizes that add up to the chunks."""
    tree, stem = _locate(path)
    try:
        sizes = _sizes(tree, stem)
        info = tree.stat(f"{stem}.bin")
        return len(sizes) == n and info is not None and info.size == int(sizes.sum())
    except (OSError, ValueError):
        return False


def finished_results(building: Tree, parts_of: Callable[[dict], list[tuple[str, int]]]) -> dict[int, dict]:
    """The results under `building/results/` whose parts (`parts_of(result)`: (name in parts/, items)) are all
    whole, by slot; any other result object (torn, unreadable, or vouching for a torn part) is deleted, so its
    task runs again."""
    done = {}
    for info in building.list("results"):
        name = info.path.rsplit("/", 1)[-1]
        if not name.endswith(".json"):
            if name.endswith(".tmp"):
                building.delete(info.path)  # a killed writer's temporary file (on disk)
            continue
        r = _read_result(building, info.path)
        if r is None or not all(part_is_whole(join(building.url, "parts", p), n) for p, n in parts_of(r)):
            building.delete(info.path)
            continue
        done[r["slot"]] = r
    return done


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


def array_metadata(n: int, item_shape: tuple[int, ...], dtype: str, shard_rows: int,
                   dimension_names: tuple[str, ...]) -> bytes:
    """The `zarr.json` of a patch-store array: one inner chunk per cube (Blosc, then its CRC32C), `shard_rows`
    cubes per shard. Made by Zarr itself (in memory), so the store only has to write it where it belongs."""
    from zarr.storage import MemoryStore

    objects: dict = {}
    typesize = np.dtype(dtype).itemsize
    zarr.create_array(store=MemoryStore(store_dict=objects), name="a", shape=(n,) + tuple(item_shape), dtype=dtype,
                      chunks=(1,) + tuple(item_shape), shards=(shard_rows,) + tuple(item_shape), fill_value=0,
                      compressors=chunk_codecs(CODEC[0], CODEC[1], CODEC[2], typesize),  # Blosc + CRC32C per cube
                      dimension_names=dimension_names)
    return objects["a/zarr.json"].to_bytes()


def create_array(store: str | os.PathLike | Tree, name: str, n: int, item_shape: tuple[int, ...], dtype: str,
                 shard_rows: int, dimension_names: tuple[str, ...]) -> None:
    """Write array `name`'s metadata into the store (no group metadata: the store's root `zarr.json` is written
    by whoever commits the store)."""
    open_tree(store).write(f"{name}/zarr.json", array_metadata(n, item_shape, dtype, shard_rows, dimension_names))


def write_assembled_shard(store: str, name: str, shard: int, pieces: list[tuple[str, int, int, int]],
                          item_ndim: int, shard_rows: int) -> int:
    """Write shard `shard` of array `name` of the store at `store` (a path or URL) from the encoded chunks of its
    pieces, one ranged read per piece; returns the bytes written."""
    tail = (0,) * item_ndim
    encoded: dict[tuple[int, ...], bytes] = {}
    for path, first, count, local in pieces:
        tree, stem = _locate(path)
        starts = np.concatenate([[0], np.cumsum(_sizes(tree, stem))])
        base = int(starts[first])
        blob = tree.read_range(f"{stem}.bin", base, int(starts[first + count]))
        for k in range(count):
            encoded[(local + k,) + tail] = blob[int(starts[first + k]) - base:int(starts[first + k + 1]) - base]
    return write_encoded_shard(TreeSink(open_tree(store), name), (shard,) + tail, encoded,
                               (shard_rows,) + (1,) * item_ndim, checksum=True)


def assemble(store: str | os.PathLike | Tree, name: str, parts: list[Part], item_shape: tuple[int, ...],
             dtype: str, shard_rows: int, dimension_names: tuple[str, ...], client=None) -> int:
    """Create `name` in the store with exactly sum(n) rows and fill it from `parts` (on `client` if given)."""
    tree = open_tree(store)
    parts = [p for p in parts if p.n]
    total = sum(p.n for p in parts)
    create_array(tree, name, total, item_shape, dtype, shard_rows, dimension_names)
    plan = plan_shards(parts, shard_rows)
    args = [(tree.url, name, s, pieces, len(item_shape), shard_rows) for s, pieces in enumerate(plan)]
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


def _read_result(tree: Tree, rel: str) -> dict | None:
    try:
        r = json.loads(tree.read(rel).decode("utf-8"))
    except (OSError, ValueError):
        return None
    stem = rel.rsplit("/", 1)[-1].removesuffix(".json")
    if not isinstance(r, dict) or not isinstance(r.get("slot"), int) or stem != f"{r['slot']:06d}":
        return None
    return r


def open_building(building: Path, parts_of: Callable[[dict], list[tuple[str, int]]]) -> dict[int, dict]:
    """The hidden folder a store is built in on disk, with `results/` and `parts/`; returns the results of the
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
    return finished_results(LocalTree(building), parts_of)


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
    for tmp in (*building.glob("*.partial"), *building.glob("*/*.partial"), *building.glob(".*.tmp"),
                *building.glob("*/.*.tmp")):  # zarr's half-written metadata, a killed writer's temporary files
        tmp.unlink(missing_ok=True)
    try:
        os.rename(building, final)
    except OSError as exc:
        raise RuntimeError(f"cannot publish the patch store: {final} is in the way ({exc.strerror}) and is not "
                           f"a patch store; move it away and run again") from None
