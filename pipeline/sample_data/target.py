"""Where a sample is written: reuse a finished one made with the same arguments, refuse to clobber others.

Every sample writer builds in a hidden sibling and renames it into place, then records its
arguments in a manifest; asked again, it reuses the sample when the arguments match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, TypeVar

__all__ = ["existing_sample", "write_manifest", "read_manifest_body", "MANIFEST_NAME"]

MANIFEST_NAME = "sample_data.json"


def write_manifest(out_dir: Path, body: dict) -> None:
    """`sample_data.json`: sorted keys and no timestamps, so the same sample gives the same bytes."""
    (Path(out_dir) / MANIFEST_NAME).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_manifest_body(out_dir, kind: str, version: int) -> dict | None:
    """The manifest of a finished sample of this kind and version in `out_dir`, or None."""
    try:
        body = json.loads((Path(out_dir) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("kind") != kind or body.get("version") != version:
        return None
    return body

S = TypeVar("S")


def existing_sample(out_dir: Path, request: dict, overwrite: bool, read: Callable[[Path], S | None], what: str,
                    retry: Callable[[S], bool] | None = None) -> S | None:
    """The finished sample in `out_dir` to reuse, or None to build one.

    Raises FileExistsError when `out_dir` holds something that is not a `what` sample, or one made with
    other arguments and `overwrite` is False. `retry(existing)` True rebuilds a sample that skipped a
    part (e.g. real data that could not be fetched then).
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return None
    if not out_dir.is_dir():
        raise FileExistsError(f"out_dir={str(out_dir)!r} exists and is not a folder")
    existing = read(out_dir)
    if existing is None:
        raise FileExistsError(f"out_dir={str(out_dir)!r} is not empty and holds no {what} sample; "
                              "choose a new or empty folder")
    if existing.request == request:
        return None if retry is not None and retry(existing) else existing
    if not overwrite:
        raise FileExistsError(f"out_dir={str(out_dir)!r} holds a {what} sample made with {existing.request}, "
                              f"not {request}; remove that folder (`make clean-demo` for the demo's) "
                              "or choose another one")
    return None
