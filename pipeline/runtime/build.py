"""The one publish-once store build: content key -> lock -> reuse -> resume a partial build -> publish.

Every derived store (the pretraining patch store, each task's patch store) is named by a key that hashes
everything it is made from, so reuse is a lookup and a changed input names a new store. `build_once` runs the
protocol that makes such a store appear whole or not at all, whatever kills the run:

1. published already: reuse it (no lock, no cluster);
2. take the store's build lock (one builder at a time; it dies with its holder), and look again: a run that
   held the lock until just now may have published it;
3. a build folder that got as far as marking itself complete is only published;
4. otherwise the build folder is opened for resuming (the items a killed run finished are kept), the other
   items run as one Dask task each (with a progress bar), the store is assembled on the same cluster,
   completed (index, then the attributes that mark it complete) and published by one rename;
5. an error a rerun would meet again (bad data, `DETERMINISTIC_ERRORS`, or the store's own `discard_on`)
   discards the build folder: nothing in it is worth resuming. A kill or a lost worker leaves it to resume.

What differs between stores comes in as a `BuildSpec`: the `Site` (where and how the store is staged, locked
and published: today folders of a shared filesystem; an object store can provide the same six operations),
the planned `Item`s, the per-item Dask task and the assembly, completion and result callables. This module is
the bottom floor: it knows no store format and imports no other floor but `pipeline.cluster` (lazily).

Test hooks (`pipeline.runtime.hooks.stop_point`) name the steps `<stage>:started` (cluster up),
`<stage>:result` (after each finished item) and `<stage>:publish` (complete, not yet renamed).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from pipeline.runtime.errors import DETERMINISTIC_ERRORS
from pipeline.runtime.hooks import stop_point

__all__ = ["Item", "Site", "Built", "BuildSpec", "build_once", "discarded_when_deterministic"]

R = TypeVar("R")


@dataclass(frozen=True)
class Item:
    """One planned unit of work: a Dask task `task(*args, **kwargs)` that leaves its result under `slot` in the
    build folder and returns it (a dict with that `slot`)."""
    slot: int
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


class Site(Protocol):
    """Where a store is built and published, and how. Every operation can be repeated after a kill."""

    def published(self) -> bool:
        """Whether the store is already published (reuse it)."""

    def lock(self) -> AbstractContextManager:
        """The store's build lock, one builder at a time; entering raises (naming the holder) when it is busy."""

    def complete(self) -> bool:
        """Whether a build got as far as marking itself complete (it only needs `publish`)."""

    def resume(self) -> dict[int, dict]:
        """Open the build for (re)starting; returns the results, by slot, of the items a killed run finished."""

    def publish(self) -> None:
        """Make the complete build the published store, at once."""

    def discarding(self) -> AbstractContextManager:
        """A block whose deterministic errors discard the build (see `discarded_when_deterministic`)."""


@dataclass
class Built:
    """What phase 1 left for assembly and completion."""
    results: dict[int, dict]
    """Every item's result by slot, resumed and new."""
    resumed: frozenset[int]
    """Slots whose results a killed run had already left."""
    phases: dict[str, float]
    """Seconds of the build's phases: cluster (start), cases (the items), assemble, finish (complete + publish);
    the dict given as `BuildSpec.phases`, filled as they end."""

    def ordered(self) -> list[dict]:
        """The results in slot order."""
        return [self.results[s] for s in sorted(self.results)]


@dataclass
class BuildSpec(Generic[R]):
    """The pieces of one store's build that differ from another's."""
    site: Site
    items: Sequence[Item]
    """Every item the store is made of (those a killed run finished are skipped)."""
    task: Callable[..., dict]
    """The Dask task run once per item; it must be importable by the workers."""
    found: Callable[[bool], R]
    """The published store as a result; its argument: whether it was reused (False: just published here)."""
    assemble: Callable[[Any, Built], None]
    """Phase 2 on the same Dask client (`assemble(client, built)`), before the cluster closes."""
    complete: Callable[[Built], R]
    """Writes what marks the build complete (last: its attributes) and returns the result."""
    published: Callable[[R], R] = field(default=lambda result: result, repr=False)
    """Called with `complete`'s result once the store is published (e.g. to stamp the elapsed time)."""
    workers: int = 2
    scheduler: str | None = None
    desc: str = "items"
    unit: str = "item"
    progress: bool = True
    stage: str = "patches"
    """The prefix of the test stop points (`<stage>:started`, ...)."""
    phases: dict[str, float] = field(default_factory=dict)


def build_once(spec: BuildSpec[R]) -> R:
    """The store `spec` describes: reused when published, else built (or its partial build resumed) and
    published. Raises what the site's lock raises when another builder holds it."""
    site = spec.site
    if site.published():
        return spec.found(True)
    with site.lock():
        if site.published():  # published by a run that held the lock until just now
            return spec.found(True)
        if site.complete():  # a killed run had written everything but not yet published
            site.publish()
            return spec.found(False)
        with site.discarding():  # a kill or a lost worker leaves it to resume
            return _build(spec)


def _build(spec: BuildSpec[R]) -> R:
    """Phase 1 (the items, on Dask), phase 2 (`assemble`, on the same cluster), completion and the rename."""
    from distributed import as_completed
    from tqdm import tqdm

    from pipeline.cluster import dask_client

    site, phases = spec.site, spec.phases
    resumed = site.resume()
    built = Built(results=dict(resumed), resumed=frozenset(resumed), phases=phases)
    todo = [item for item in spec.items if item.slot not in resumed]
    tick = time.perf_counter()
    with dask_client(spec.workers, spec.scheduler) as client:
        phases["cluster"] = time.perf_counter() - tick
        stop_point(f"{spec.stage}:started")
        if todo:
            bar = tqdm(total=len(spec.items), initial=len(resumed), desc=spec.desc, unit=spec.unit, file=sys.stderr,
                       disable=not spec.progress)
            futures = [client.submit(spec.task, *item.args, **item.kwargs, pure=False) for item in todo]
            for fut in as_completed(futures):
                result = fut.result()
                built.results[result["slot"]] = result
                bar.update(1)
                stop_point(f"{spec.stage}:result")
            bar.close()
        phases["cases"] = time.perf_counter() - tick - phases["cluster"]
        tick = time.perf_counter()
        spec.assemble(client, built)
        phases["assemble"] = time.perf_counter() - tick
    tick = time.perf_counter()
    result = spec.complete(built)
    stop_point(f"{spec.stage}:publish")
    site.publish()
    phases["finish"] = time.perf_counter() - tick
    return spec.published(result)


@contextlib.contextmanager
def discarded_when_deterministic(discard: Callable[[], None],
                                 also: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Call `discard` when the block raises an error a rerun would meet again (`DETERMINISTIC_ERRORS` or one of
    `also`), then re-raise; any other failure (a lost worker, a full disk) and a kill leave the build to resume."""
    try:
        yield
    except (*also, *DETERMINISTIC_ERRORS):
        discard()
        raise
