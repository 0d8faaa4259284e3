"""Where a patch store is built and published: folders of a shared filesystem (the `Site` of
`pipeline.runtime.build`).

    ROOT/<name>/            the published store (its zarr.json is what says so)
    ROOT/.building-<name>/  the build in progress: results/ and parts/ of phase 1 (`pipeline.patches.assemble`)
    ROOT/.<name>.lock       the build lock (a `FileLock`: gone with the builder however it dies)
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.patches.assemble import building_complete, open_building, publish
from pipeline.patches.outcome import NoCubesError
from pipeline.runtime.build import discarded_when_deterministic
from pipeline.storage.locks import FileLock

__all__ = ["PatchStoreSite", "build_lock", "discard_on_deterministic_error"]


def build_lock(root: Path, name: str) -> FileLock:
    """The lock of the one build of store `name` under `root` allowed at a time; `acquire()` raises
    LockBusyError (a RuntimeError) naming the run that holds it."""
    return FileLock(root / f".{name}.lock", f"building patch store {name}")


def discard_on_deterministic_error(building: Path) -> contextlib.AbstractContextManager:
    """Remove `building` when the build raises an error a rerun would meet again (no cube at all, or
    `DETERMINISTIC_ERRORS`); any other failure (a lost worker, a full disk) and a kill leave it for the next run
    to resume."""
    return discarded_when_deterministic(lambda: shutil.rmtree(building, ignore_errors=True), also=(NoCubesError,))


@dataclass(frozen=True)
class PatchStoreSite:
    """Patch store `name` (content key `key`) under `root`; `parts_of(result)` names the parts a phase-1 result
    stands for, as (name in parts/, items) (see `pipeline.patches.assemble.open_building`)."""
    root: Path
    name: str
    key: str
    parts_of: Callable[[dict], list[tuple[str, int]]]

    @property
    def final(self) -> Path:
        return self.root / self.name

    @property
    def building(self) -> Path:
        return self.root / f".building-{self.name}"

    def published(self) -> bool:
        return (self.final / "zarr.json").exists()

    def lock(self) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return build_lock(self.root, self.name)

    def complete(self) -> bool:
        return building_complete(self.building, self.key)

    def resume(self) -> dict[int, dict]:
        return open_building(self.building, self.parts_of)

    def publish(self) -> None:
        publish(self.building, self.final)

    def discarding(self) -> contextlib.AbstractContextManager:
        return discard_on_deterministic_error(self.building)
