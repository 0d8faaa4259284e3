"""Exclusive file locks that die with the process holding them.

A lock is `fcntl.flock` on a small file beside what it protects. The kernel drops an flock when
the last descriptor of its open file goes away, so a run killed with SIGKILL never leaves a stale
lock behind - provided no other process shares that descriptor. Two ways a descriptor leaks into
another process, and how each is closed here:

- exec (subprocesses, spawned workers): the descriptor is opened with O_CLOEXEC;
- fork (Dask's forked workers, multiprocessing's fork start method): an `os.register_at_fork`
  hook closes every held lock's descriptor in the child. It only closes, never unlocks: the
  child shares the parent's open file, and LOCK_UN there would release the parent's lock too.

The file is never deleted (a reader may be about to lock it; unlinking would let two processes
lock two different inodes under one name). Holding it is what counts; its text only says who
holds it, for error messages.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import uuid
import weakref
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["FileLock", "LockBusyError"]


class LockBusyError(RuntimeError):
    """The lock is held by a live process; the message names the lock file and the holder."""

    def __init__(self, path: Path, purpose: str, holder: dict | None):
        self.path = Path(path)
        self.purpose = purpose
        self.holder = holder
        if holder:
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')} "
                   f"({holder.get('purpose', '?')})")
        else:
            who = "a live process that has not written its name yet"
        super().__init__(f"{self.path} is locked by {who}; wait for it to finish (or stop that process) "
                         f"and run again")


_held: "weakref.WeakSet[FileLock]" = weakref.WeakSet()
_held_guard = threading.Lock()


def _close_in_child() -> None:
    """After fork, the child must not keep its parent's locks alive: close, never unlock."""
    for lock in list(_held):
        lock._forget()


os.register_at_fork(after_in_child=_close_in_child)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class FileLock:
    """An exclusive, non-blocking lock on `path` for one process.

    `purpose` is written into the file with the holder's pid, host and start time so that a
    second run can say who is in its way. `token` is new at each `acquire`; writers can record
    it and check, before publishing, that the lock is still theirs.
    """

    def __init__(self, path: str | os.PathLike, purpose: str):
        self.path = Path(path)
        self.purpose = purpose
        self.token: str | None = None
        self._fd: int | None = None
        self._pid: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None and self._pid == os.getpid()

    def acquire(self) -> "FileLock":
        """Take the lock or raise LockBusyError naming who holds it."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this FileLock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockBusyError(self.path, self.purpose, self.holder()) from None
        except BaseException:
            os.close(fd)
            raise
        self.token = uuid.uuid4().hex
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": self.purpose,
                "since": _now(), "token": self.token}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info, sort_keys=True) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        with _held_guard:
            self._fd, self._pid = fd, os.getpid()
            _held.add(self)
        return self

    def release(self) -> None:
        """Drop the lock (no-op when not held by this process, e.g. in a forked child)."""
        with _held_guard:
            _held.discard(self)
            fd, mine = self._fd, self._pid == os.getpid()
            self._fd, self._pid = None, None
        if fd is None or not mine:
            return
        try:
            os.ftruncate(fd, 0)
        finally:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def _forget(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking the parent's lock."""
        fd, self._fd, self._pid = self._fd, None, None
        _held.discard(self)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def holder(self) -> dict | None:
        """Who holds the lock now (pid, host, purpose, since, token), or None when nobody does.

        Probes with a shared lock, so asking never blocks and never steals the lock.
        """
        if self.held:
            return self._read()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._read() or {}
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _read(self) -> dict | None:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
            return json.loads(text) if text else None
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "FileLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"FileLock({str(self.path)!r}, {self.purpose!r}, held={self.held})"
