"""A store's writer lock in a bucket: a lease object made by a conditional write, renewed, taken over when dead.

A bucket has no flock. The lock is an object (`STORE/.lock`) holding a `Holder` record - host, pid, start time,
token and an expiry - and every change to it is conditional:

- **taking it**: `PUT If-None-Match: *` creates it only if absent, so of two writers exactly one succeeds;
- **renewing it**: a daemon thread rewrites it every `ttl_s / 5` with `If-Match: <the tag it last wrote>`;
  a failed renewal means someone else took it over (we stopped renewing for longer than `ttl_s`: a paused
  VM, a lost network), and `check()` then raises instead of letting this writer publish;
- **taking over**: a lease whose holder is dead (its pid gone from this host, or not renewed by its expiry)
  is replaced with `If-Match: <the dead lease's tag>`, so two writers racing for a dead lease cannot both
  win; a live holder makes the second writer fail with `LeaseBusyError` (exit 3) naming it;
- **releasing it**: the object is deleted after reading that it is still ours.

`lock_tree` gives a `FileLock` (flock: released by the kernel at death, nothing to expire) for a store on disk
and an `ObjectLease` for one in a bucket; both have `token`, `holder()`, `release()` and raise a
`LockBusyError` naming the holder.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict

from pipeline.storage.leases import Holder, LeaseBusyError, Renewal
from pipeline.storage.locks import FileLock
from pipeline.storage.objects import LocalTree, Tree

__all__ = ["ObjectLease", "LeaseLostError", "lock_tree", "lease_holder", "LEASE_TTL_S"]

LEASE_TTL_S = 60.0
"""A killed writer in a bucket blocks the store for at most this long (on this host: not at all, its pid is
checked). Renewed every LEASE_TTL_S / 5."""


class LeaseLostError(RuntimeError):
    """This writer's lease was taken over (it stopped renewing past its expiry); it must not publish."""


class ObjectLease:
    """The exclusive lease `rel` (e.g. ".lock") of the store at `tree`, for `purpose`."""

    def __init__(self, tree: Tree, rel: str, purpose: str, ttl_s: float = LEASE_TTL_S):
        self.tree, self.rel, self.purpose, self.ttl_s = tree, rel, purpose, ttl_s
        self.holder_record: Holder | None = None
        self.token: str | None = None
        self.taken_over: tuple[Holder, str] | None = None
        """(the dead holder, why it was dead) when acquiring took over a dead lease."""
        self._etag: str | None = None
        self._lost = False
        self._renewal: Renewal | None = None
        self._guard = threading.Lock()
        """One renewal at a time: `check()` and the renewal thread share the entity tag they compare against."""

    @property
    def where(self) -> str:
        return f"{self.tree.url}/{self.rel}"

    def acquire(self) -> "ObjectLease":
        """Take the lease or raise LeaseBusyError naming the live holder."""
        for _ in range(10):
            mine = Holder.mine(self.purpose, self.ttl_s)
            etag = self.tree.create(self.rel, mine.to_json().encode())
            if etag is not None:
                return self._hold(mine, etag)
            found = self.tree.read_versioned(self.rel)
            if found is None:
                continue  # released between our create and our read: try again
            data, their_tag = found
            theirs = Holder.from_json(data.decode("utf-8", "replace"))
            why = "its lease object is unreadable" if theirs is None else theirs.why_dead()
            if why is None:
                raise LeaseBusyError(f"{self.tree.url} (lease {self.where})", theirs)
            etag = self.tree.replace(self.rel, mine.to_json().encode(), their_tag)
            if etag is not None:
                self.taken_over = (theirs, why) if theirs is not None else None
                return self._hold(mine, etag)
            time.sleep(0.05)  # someone else changed it first: look again
        raise LeaseBusyError(f"{self.tree.url} (lease {self.where})", None)

    def _hold(self, mine: Holder, etag: str) -> "ObjectLease":
        self.holder_record, self.token, self._etag, self._lost = mine, mine.token, etag, False
        self._renewal = Renewal(self._renew, self.ttl_s / 5)
        return self

    def _renew(self) -> None:
        with self._guard:
            if self.holder_record is None or self._lost:
                return
            renewed = self.holder_record.renewed(self.ttl_s)
            etag = self.tree.replace(self.rel, renewed.to_json().encode(), self._etag or "")
            if etag is None:
                found = self.tree.read_versioned(self.rel)
                theirs = Holder.from_json(found[0].decode("utf-8", "replace")) if found else None
                if theirs is not None and theirs.token == self.token:  # ours still (a tag the server rewrote)
                    etag = self.tree.replace(self.rel, renewed.to_json().encode(), found[1])
                if etag is None:
                    self._lost = True  # taken over: never write over the new holder
                    return
            self.holder_record, self._etag = renewed, etag

    @property
    def held(self) -> bool:
        return self.holder_record is not None and not self._lost

    def check(self) -> None:
        """Raise LeaseLostError when the lease is no longer ours (writers call this before committing)."""
        if self.holder_record is None:
            raise LeaseLostError(f"{self.where}: not held")
        if self._lost:
            raise LeaseLostError(f"{self.where}: taken over by another writer after this one stopped renewing; "
                                 "nothing more is published by this run")
        if self.holder_record.expires < time.time():
            self._renew()
            if self._lost:
                self.check()

    def holder(self) -> dict | None:
        """Who holds the lease now (as FileLock.holder), None when nobody does."""
        return lease_holder(self.tree, self.rel)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours."""
        if self._renewal is not None:
            self._renewal.stop()
            self._renewal = None
        with self._guard:
            if self.holder_record is not None and not self._lost:
                # first mark it expired, conditionally on our own version: a lease another writer took over in the
                # meantime has another tag and is left alone; only then delete what is certainly a dead lease
                ended = Holder(**{**asdict(self.holder_record), "expires": 0.0})
                if self.tree.replace(self.rel, ended.to_json().encode(), self._etag or "") is not None:
                    found = self.tree.read_versioned(self.rel)
                    theirs = Holder.from_json(found[0].decode("utf-8", "replace")) if found else None
                    if theirs is not None and theirs.token == self.token:
                        self.tree.delete(self.rel)
            self.holder_record = None

    def __enter__(self) -> "ObjectLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lease_holder(tree: Tree, rel: str) -> dict | None:
    """The live holder of the lease `rel` under `tree` as a dict (pid, host, purpose, since, token, expires), None
    when there is none or it is dead."""
    try:
        data = tree.read(rel)
    except FileNotFoundError:
        return None
    h = Holder.from_json(data.decode("utf-8", "replace"))
    if h is None or h.why_dead() is not None:
        return None
    return asdict(h)


def lock_tree(tree: Tree, rel: str, purpose: str, ttl_s: float = LEASE_TTL_S):
    """Take the writer lock `rel` of the store at `tree`: a FileLock on disk, an ObjectLease in a bucket.
    Raises LockBusyError (LeaseBusyError in a bucket) naming the holder."""
    if isinstance(tree, LocalTree):
        return FileLock(tree.root / rel, purpose).acquire()
    return ObjectLease(tree, rel, purpose, ttl_s).acquire()
