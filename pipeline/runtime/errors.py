"""Errors that say what went wrong, and the rule for errors that no retry can mend.

`UsageError` is bad usage or input found before any work started (`genesis` prints one line, exit 2).
`DETERMINISTIC_ERRORS` are raised by bad data, bad configuration or a bug: a retry fails the same way, so a Ray
Train run ends at the first one (`pipeline.runtime.driver`) instead of after `--max-failures` restarts. Worker
deaths, lost nodes, OSError and RuntimeError (CUDA, NCCL, a flaky filesystem) are retried as Ray decides.
"""

from __future__ import annotations

__all__ = ["UsageError", "DETERMINISTIC_ERRORS", "is_deterministic", "deterministic_cause", "failure_reason",
           "one_line"]

DETERMINISTIC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, TypeError, LookupError, AttributeError, NameError, ImportError, ZeroDivisionError,
    NotImplementedError, AssertionError)
"""Raised by bad data, bad configuration or a bug: a retry fails the same way. Worker deaths (RayActorError),
lost nodes, OSError and RuntimeError (CUDA, NCCL, a flaky filesystem) are not here: those are retried."""


class UsageError(ValueError):
    """Bad usage or input, found before any work started: `genesis` prints its one line and exits 2."""


def is_deterministic(error: BaseException) -> bool:
    """Whether a retry would fail the same way (`DETERMINISTIC_ERRORS`)."""
    return isinstance(error, DETERMINISTIC_ERRORS)


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


def failure_reason(error: BaseException) -> str:
    """One line naming what ended a Ray Train run: the deterministic error and its rank (not retried), else the
    first worker's error, else the error itself."""
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
