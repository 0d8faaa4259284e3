"""Paths that a stage will write, checked before anything expensive starts.

- `output_dir`, `output_file`: a folder (file) that will be written: not a file (folder), not under a file, not on
  a read-only filesystem (a real write is tried: root's permissions, ACLs and network filesystems make `os.access`
  an unreliable witness).
- `shared_path`: inside a Ray job (`ray job submit`), the driver runs in a temporary folder of Ray's; a relative
  path there would land in it, on one node, and vanish with the job. Relative paths are resolved against
  GENESIS_SHARED_ROOT when it is set, else refused.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sys
import tempfile
from pathlib import Path

from pipeline.runtime.errors import UsageError

__all__ = ["SHARED_ROOT_ENV", "RAY_JOB_ENV", "in_ray_job", "shared_path", "output_dir", "output_file", "files_sha256",
           "store_location"]

SHARED_ROOT_ENV = "GENESIS_SHARED_ROOT"
RAY_JOB_ENV = ("RAY_JOB_SUBMISSION_ID", "RAY_JOB_ID", "RAY_JOB_CONFIG_JSON_ENV_VAR")
"""Set in the entrypoint of `ray job submit` (the last by Ray's job supervisor; the first two as the issue names)."""



def in_ray_job() -> bool:
    """Whether this process is the driver of a Ray job (its working folder is Ray's temporary one)."""
    if any(os.environ.get(name) for name in RAY_JOB_ENV):
        return True
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            return bool(ray.get_runtime_context().get_submission_id())
        except Exception:  # noqa: BLE001 - an older or partial runtime context: not a job we can tell
            return False
    return False


def shared_path(value: str | os.PathLike | None, option: str, default: str | None = None) -> str | None:
    """`value` (or `default` when it is None) as an absolute path; URIs (`s3://...`) are returned as they are.

    Inside a Ray job a relative path resolves against GENESIS_SHARED_ROOT when that is set, and is refused
    otherwise, naming the option: Ray runs the job's driver in a temporary folder of its own."""
    text = os.fspath(value) if value is not None else default
    if text is None:
        return None
    if "://" in text:
        return text
    path = Path(text).expanduser()
    if path.is_absolute():
        return str(path)
    if in_ray_job():
        root = os.environ.get(SHARED_ROOT_ENV)
        if root:
            if not Path(root).expanduser().is_absolute():
                raise UsageError(f"{SHARED_ROOT_ENV}={root!r} must be an absolute path on a filesystem every "
                                 f"node shares")
            return str(Path(root).expanduser() / path)
        said = f"{option} {text!r}" if value is not None else f"{option} (default {text!r})"
        raise UsageError(f"{said} is a relative path inside a Ray job, whose driver runs in a temporary folder of "
                         f"Ray's: give an absolute path on a filesystem every node shares, or set "
                         f"{SHARED_ROOT_ENV} to the folder relative paths mean")
    return str(path.resolve())


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _write_probe(folder: Path, option: str, shown: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".genesis-write-check-", dir=folder)
    except OSError as err:
        why = "read-only filesystem" if err.errno == errno.EROFS else (err.strerror or str(err)).lower()
        raise UsageError(f"{option} {shown}: cannot write in {folder} ({why})") from None
    os.close(fd)
    os.unlink(name)


def output_dir(value: str | os.PathLike | None, option: str, default: str | None = None) -> str | None:
    """A folder that will be written (created when missing): absolute (see `shared_path`), not a file, not under
    a file, writable. A bucket (s3://BUCKET/PREFIX) is checked as `pipeline.storage.objects.Tree.check` checks
    it: an unknown scheme, no bucket, missing or refused credentials, an endpoint that does not answer or a
    bucket that does not exist is one line (StorageError, exit 2), in seconds, before anything is written.
    file:// URIs are returned as given."""
    resolved = shared_path(value, option, default)
    if resolved is None or resolved.startswith("file://"):
        return resolved
    if "://" in resolved:
        from pipeline.storage.objects import StorageError, open_tree

        try:
            open_tree(resolved).check()
        except StorageError as err:
            raise StorageError(f"{option} {err}") from None
        return resolved.rstrip("/")
    shown = os.fspath(value) if value is not None else resolved
    path = Path(resolved)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {shown}: is a file, not a folder")
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise UsageError(f"{option} {shown}: {existing} is a file, so no folder can be made under it")
    _write_probe(existing, option, shown)
    return resolved


def store_location(value: str | os.PathLike) -> str:
    """A store's location as workers must be told it: a bucket URL unchanged (never through `Path`, which would
    fold s3:// into s3:/), a local path absolute."""
    text = os.fspath(value)
    return text if "://" in text else str(Path(text).resolve())


def output_file(value: str | os.PathLike, option: str) -> str:
    """A file that will be written: its folder as `output_dir` says, and not itself a folder."""
    resolved = shared_path(value, option)
    path = Path(resolved)
    if path.is_dir():
        raise UsageError(f"{option} {value}: is a folder, not a file")
    output_dir(str(path.parent), option)
    return resolved


def files_sha256(*paths: str | os.PathLike) -> str:
    """sha256 of the files' bytes, one after the other, read 1 MiB at a time (a scan of several GB is never held
    in memory): what provenance records (predictions.json, sample-data manifests) call a file's checksum."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
