"""Where a patch store is built and published, and how (the `Site` of `pipeline.runtime.build`): a folder on local
disk, or a prefix in a bucket.

On disk (a rename publishes, as before)::

    ROOT/<name>/            the published store (its zarr.json is what says so)
    ROOT/.building-<name>/  the build in progress: the store's objects, results/ and parts/ of phase 1
                            (`pipeline.patches.assemble`); renamed to ROOT/<name> when complete
    ROOT/.<name>.lock       the build lock (a `FileLock`: gone with the builder however it dies)

In a bucket (no rename: a commit object written last publishes)::

    ROOT/<name>/zarr.json   the commit object: the store's root group metadata with its `genesis` attributes,
                            written last, after every shard, array metadata and table of the store
    ROOT/<name>/...         the store's other objects, written while it is built: without the commit object
                            the prefix is not a store (`PatchStore` refuses it) and the next build deletes it
    ROOT/.building-<name>/  results/ and parts/ of phase 1, kept across kills (a rerun keeps the finished
                            scans), deleted once the store is committed
    ROOT/.<name>.lock       the build lease (`pipeline.storage.object_lease`: a conditional write, renewed;
                            checked just before the commit, so a writer whose lease was taken over never commits)

A store counts as published when its commit object names it (kind and key) and no scaffolding is left; a
kill between the commit and the scaffolding's removal is finished by the next run (`complete` -> `publish`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.patches.assemble import building_complete, finished_results, join, open_building, publish
from pipeline.patches.outcome import NoCubesError
from pipeline.runtime.build import discarded_when_deterministic
from pipeline.storage.locks import FileLock
from pipeline.storage.object_lease import ObjectLease
from pipeline.storage.objects import LocalTree, Tree, is_remote, open_tree

__all__ = ["PatchStoreSite", "build_lock", "discard_on_deterministic_error", "patch_root", "committed", "volume_url",
           "parquet_bytes", "group_metadata"]


def patch_root(volume_root: str | os.PathLike, out_root: str | os.PathLike | None) -> Tree:
    """Where patch stores go: `out_root`, else `patch_stores` beside the volume store (a sibling prefix in its
    bucket)."""
    if out_root:
        return open_tree(out_root)
    text = os.fspath(volume_root)
    if is_remote(text):
        tree = open_tree(text)
        parent = tree.url.rpartition("/")[0] if tree.prefix else tree.url  # a bucket's root: the bucket itself
        return open_tree(parent + "/patch_stores")
    return LocalTree(Path(text).resolve().parent / "patch_stores")


def volume_url(vstore, resolve: bool = False) -> str:
    """The volume store's location as the Dask tasks and the store's attributes take it: its URL in a bucket, its
    path on disk (absolute with `resolve`)."""
    url = getattr(vstore, "url", None)
    if isinstance(url, str) and "://" in url:
        return url
    return str(vstore.root.resolve()) if resolve else str(vstore.root)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as one Parquet object (written whole by `Tree.write`)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def build_lock(root: Path, name: str) -> FileLock:
    """The lock of the one build of store `name` under `root` allowed at a time; `acquire()` raises
    LockBusyError (a RuntimeError) naming the run that holds it."""
    return FileLock(root / f".{name}.lock", f"building patch store {name}")


def discard_on_deterministic_error(building: Path) -> contextlib.AbstractContextManager:
    """Remove `building` when the build raises an error a rerun would meet again (no cube at all, or
    `DETERMINISTIC_ERRORS`); any other failure (a lost worker, a full disk) and a kill leave it for the next run
    to resume."""
    return discarded_when_deterministic(lambda: shutil.rmtree(building, ignore_errors=True), also=(NoCubesError,))


def committed(store: Tree, key: str | None = None) -> bool:
    """Whether `store` holds a committed patch store (its root zarr.json with genesis.kind, and `key` if given)."""
    try:
        genesis = json.loads(store.read("zarr.json").decode("utf-8"))["attributes"]["genesis"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(genesis, dict) and genesis.get("kind") == "patch-store" and key in (None, genesis.get("key"))


def group_metadata(attrs: dict) -> bytes:
    """A Zarr v3 group's `zarr.json` holding `attrs`: the commit object of a store in a bucket."""
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs, "consolidated_metadata": None},
                      indent=2).encode()


@dataclass
class PatchStoreSite:
    """Patch store `name` (content key `key`) under `root` (a path, an s3:// URL or a Tree); `parts_of(result)`
    names the parts a phase-1 result stands for, as (name in parts/, items) (see
    `pipeline.patches.assemble.finished_results`)."""
    root: Tree | str | os.PathLike
    name: str
    key: str
    parts_of: Callable[[dict], list[tuple[str, int]]]
    _lease: ObjectLease | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = open_tree(self.root)

    @property
    def remote(self) -> bool:
        return self.root.local is None

    @property
    def final(self) -> Path | str:
        """The published store: a Path on disk, its URL in a bucket."""
        return self.root.local / self.name if not self.remote else self.root.child(self.name).url

    @property
    def building(self) -> Path | str:
        """Where phase 1 leaves its results/ and parts/ (a Path on disk, a URL in a bucket)."""
        name = f".building-{self.name}"
        return self.root.local / name if not self.remote else self.root.child(name).url

    @property
    def scaffold(self) -> str:
        """`building` as a string for the Dask tasks."""
        return os.fspath(self.building)

    @property
    def store(self) -> Tree:
        """Where the store's own objects are written while it is built (on disk: the building folder, renamed
        when complete; in a bucket: the store's final prefix, committed by its root zarr.json)."""
        return self.root.child(f".building-{self.name}" if not self.remote else self.name)

    def part(self, name: str) -> str:
        """The location of part `name` (in parts/)."""
        return join(self.scaffold, "parts", name)

    def published(self) -> bool:
        if not self.remote:
            return (self.root.local / self.name / "zarr.json").exists()
        return committed(self.root.child(self.name), self.key) and not self.root.child(f".building-{self.name}").list()

    def lock(self) -> contextlib.AbstractContextManager:
        if not self.remote:
            self.root.local.mkdir(parents=True, exist_ok=True)
            return build_lock(self.root.local, self.name)
        self._lease = ObjectLease(self.root, f".{self.name}.lock", f"building patch store {self.name}")
        return self._lease

    def complete(self) -> bool:
        if not self.remote:
            return building_complete(self.building, self.key)
        return committed(self.store, self.key)

    def resume(self) -> dict[int, dict]:
        if not self.remote:
            return open_building(self.building, self.parts_of)
        self.store.delete_prefix("")  # a killed build's uncommitted objects: never read, rewritten from the parts
        return finished_results(self.root.child(f".building-{self.name}"), self.parts_of)

    def commit(self, attrs: dict) -> None:
        """Write the store's attributes, last: on disk into the building folder's zarr.json (the rename then
        publishes), in a bucket as the commit object, after checking this build still holds its lease."""
        if not self.remote:
            import zarr

            zarr.open_group(str(self.building), mode="r+").attrs.update(attrs)
            return
        if self._lease is not None:
            self._lease.check()
        self.store.write("zarr.json", group_metadata(attrs))

    def publish(self) -> None:
        if not self.remote:
            publish(self.building, self.final)
            return
        self.root.child(f".building-{self.name}").delete_prefix("")  # committed already: only the scaffolding

    def discarding(self) -> contextlib.AbstractContextManager:
        if not self.remote:
            return discard_on_deterministic_error(self.building)

        def discard() -> None:
            self.root.child(f".building-{self.name}").delete_prefix("")
            if not committed(self.store):
                self.store.delete_prefix("")
        return discarded_when_deterministic(discard, also=(NoCubesError,))
