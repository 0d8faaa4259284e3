"""What a `genesis` command shows when it ends: its exit status and, for an error, one line.

Shared by the command line (`pipeline.cli`) and by what runs several commands' stages in one process
(`genesis reproduce`, the demo), so that a stage run either way ends with the same status and the same line.

Exit status: 0 success; 1 some items failed (the rest done), or the work failed; 2 bad usage or input (a path that
cannot be written, an unreachable tracking server, an option out of range, a store too small); 3 the store is busy
(another conversion holds its lock).
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

from pipeline.cluster import set_verbose, verbose  # noqa: F401 - the --verbose switch, where Ray's code reads it
from pipeline.runtime.errors import UsageError, disk_full
from pipeline.storage.locks import LockBusyError
from pipeline.volume_store.errors import StoreLockedError

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_BUSY", "EXIT_INTERRUPTED", "classify", "ended",
           "tolerant_streams", "set_verbose", "verbose"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 3
EXIT_INTERRUPTED = 130

_USER_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, PermissionError)
"""A path the user gave that is missing, of the wrong kind or not theirs to write: bad input, not a failure."""


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _work_failure_types() -> tuple[type[BaseException], ...]:
    """Failures of the work (exit 1), as opposed to bad input: runtime errors, the filesystem, MLflow, Ray. MLflow
    and Ray are looked up only where already imported: an error of theirs means they were."""
    kinds: list[type[BaseException]] = [RuntimeError, OSError]
    for module, name in (("mlflow.exceptions", "MlflowException"), ("ray.exceptions", "RayError"),
                         ("ray.train", "TrainingFailedError")):
        mod = sys.modules.get(module)
        if mod is not None and isinstance(getattr(mod, name, None), type):
            kinds.append(getattr(mod, name))
    return tuple(kinds)


def classify(exc: BaseException) -> tuple[int, str]:
    """(exit status, the one line to print) for an exception that ended a command. A full disk (or a file-size
    limit), wherever it was met (MLflow, SQLite, a store), is exit 1 "failed: disk full: PATH (filesystem ...)"."""
    full = disk_full(exc)
    if full is not None:
        return EXIT_FAILED, f"failed: {full}"
    if isinstance(exc, (StoreLockedError, LockBusyError)):
        return EXIT_BUSY, _one_line(exc)
    if isinstance(exc, (UsageError, ValueError, *_USER_OS_ERRORS)) or \
            (isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOTDIR, errno.EISDIR, errno.EACCES)):
        return EXIT_USAGE, f"error: {_one_line(exc)}"
    if isinstance(exc, _work_failure_types()):
        return EXIT_FAILED, f"failed: {type(exc).__name__}: {_one_line(exc)}"
    return EXIT_FAILED, (f"unexpected error {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the "
                         f"traceback)")


def ended(command: str, exc: BaseException, debug: bool = False) -> int:
    """Say on stderr how `command` (`genesis convert`) ended with `exc`, in one line (with `debug` or
    GENESIS_DEBUG set, after the traceback); returns the command's exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    if debug or os.environ.get("GENESIS_DEBUG"):
        traceback.print_exception(exc)
    code, line = classify(exc)
    print(f"{command}: {line}", file=sys.stderr)
    return code


def tolerant_streams() -> None:
    """Tables print "±": stdout and stderr replace what their encoding cannot show instead of crashing on an
    ASCII-only terminal or log."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and (stream.encoding or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="replace")
