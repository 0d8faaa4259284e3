"""Errors that say what went wrong, and the rule for errors that no retry can mend.

`UsageError` is bad usage or input found before any work started (`genesis` prints one line, exit 2).
`DETERMINISTIC_ERRORS` are raised by bad data, bad configuration or a bug: a retry fails the same way, so a Ray
Train run ends at the first one (`pipeline.runtime.driver`) instead of after `--max-failures` restarts. Worker
deaths, lost nodes, OSError and RuntimeError (CUDA, NCCL, a flaky filesystem) are retried as Ray decides.
"""

from __future__ import annotations

import errno
import os
import re
from contextlib import contextmanager

__all__ = ["UsageError", "DETERMINISTIC_ERRORS", "is_deterministic", "deterministic_cause", "failure_reason",
           "one_line", "disk_full", "DISK_FULL_ERRNOS", "full_disk_names"]

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""No space left, a quota used up, or a file-size limit (RLIMIT_FSIZE) reached: the next write fails the same way
until someone frees space, so a retry only repeats the work and the tracebacks."""

DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NameError, ImportError, ZeroDivisionError,
    NotImplementedError, AssertionError)
"""Raised by bad data, bad configuration or a bug: a retry fails the same way. Worker deaths (RayActorError),
lost nodes, OSError and RuntimeError (CUDA, NCCL, a flaky filesystem) are not here: those are retried."""


class UsageError(ValueError):
    """Bad usage or input, found before any work started: `genesis` prints its one line and exits 2."""


def is_deterministic(error: BaseException) -> bool:
    """Whether a retry would fail the same way: `DETERMINISTIC_ERRORS`, or a full disk (`disk_full`)."""
    return isinstance(error, DETERMINISTIC_ERRORS) or disk_full(error) is not None


def _chain(error: BaseException):
    """`error`, then what caused it (`cause`, `__cause__`, `__context__`, a Ray Train worker's failure), once each."""
    seen, todo = set(), [error]
    while todo and len(seen) < 50:
        err = todo.pop(0)
        if not isinstance(err, BaseException) or id(err) in seen:
            continue
        seen.add(id(err))
        yield err
        failures = getattr(err, "worker_failures", None)
        todo += [*(failures.values() if isinstance(failures, dict) else ()), getattr(err, "cause", None),
                 err.__cause__, err.__context__, getattr(err, "orig", None)]


def _filesystem(path: str) -> str:
    """The mount point holding `path` (the filesystem that is full)."""
    folder = os.path.abspath(path)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    while not os.path.ismount(folder):
        folder = os.path.dirname(folder)
    return folder


def disk_full(error: BaseException, path: str | None = None) -> str | None:
    """"disk full: PATH (filesystem MOUNT: No space left on device)" when `error`, or anything that caused it, is
    a write refused for lack of space (`DISK_FULL_ERRNOS`, or SQLite's "database or disk is full"); else None.
    `path`: the file to name when the error does not (SQLite's does not name its database)."""
    for err in _chain(error):
        rust = _RUST_OS_ERROR.search(str(err))  # safetensors' and other Rust libraries' I/O errors
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            where = err.filename or path
            reason = err.strerror or os.strerror(err.errno)
        elif rust and int(rust.group(1)) in DISK_FULL_ERRNOS:
            where, reason = path, f"{os.strerror(int(rust.group(1)))}, raised by {type(err).__name__}"
        elif "database or disk is full" in str(err) and type(err).__name__ in ("OperationalError", "DatabaseError"):
            where, reason = path, "SQLite: database or disk is full"
        else:
            continue
        if where is None:
            return f"disk full ({reason})"
        where = os.fsdecode(where)
        return f"disk full: {where} (filesystem {_filesystem(where)}: {reason})"
    return None


def _base(error: BaseException) -> BaseException:
    """The user's exception inside Ray Train's and Ray's wrappers (their public `cause`, or the exception that
    was being handled)."""
    for _ in range(5):
        inner = getattr(error, "cause", None) or error.__cause__
        if not isinstance(inner, BaseException) or inner is error:
            break
        error = inner
    return error


def deterministic_cause(error: BaseException) -> tuple[int | None, BaseException] | None:
    """(rank, exception) of the first worker whose error is deterministic, or None (also for non-worker errors).
    `worker_failures` is the public attribute of Ray Train's WorkerGroupError."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank in sorted(failures):
        base = _base(failures[rank])
        if is_deterministic(base):
            return rank, base
    base = _base(error)
    if base is not error and is_deterministic(base):
        return None, base
    return None


def one_line(error: BaseException) -> str:
    """`Type: first line of the message`."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextmanager
def full_disk_names(folder: str):
    """Inside: a full-disk error that names no file (safetensors says only "File too large (os error 27)") is
    raised again as an OSError naming `folder`, where the code inside writes (e.g. MLflow's staging folder)."""
    try:
        yield
    except Exception as exc:
        found = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS
                      and e.filename), None)
        rust = next((m for e in _chain(exc) if (m := _RUST_OS_ERROR.search(str(e)))
                     and int(m.group(1)) in DISK_FULL_ERRNOS), None)
        if found is not None or rust is None:
            raise
        code = int(rust.group(1))
        raise OSError(code, f"{os.strerror(code)}, raised by {type(exc).__name__}", folder) from exc


def failure_reason(error: BaseException) -> str:
    """One line naming what ended a Ray Train run: the deterministic error and its rank (not retried), else the
    first worker's error, else the error itself."""
    full = disk_full(error)
    if full is not None:
        return f"{full}; not retried"
    found = deterministic_cause(error)
    if found is not None:
        rank, base = found
        where = f" (worker rank {rank})" if rank is not None else ""
        return f"{one_line(base)}{where}; a deterministic error: not retried"
    failures = getattr(error, "worker_failures", None) or {}
    if failures:
        rank = sorted(failures)[0]
        return f"{one_line(_base(failures[rank]))} (worker rank {rank}; after the restarts --max-failures allows)"
    return one_line(error)
