"""What the benchmark scripts share: the PASS/MISS verdict and the folder they work in."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["verdict", "work_folder"]


def verdict(ok: bool, quick: bool) -> str:
    """PASS/MISS against a target; a quick run's tiny sizes say nothing about a target."""
    return "(quick: not judged)" if quick else ("PASS" if ok else "MISS")


@contextlib.contextmanager
def work_folder(keep: str | Path | None, prefix: str) -> Iterator[Path]:
    """`keep` (created, and kept afterwards, for a look at what the benchmark wrote), else a temporary folder
    named `prefix...` that is removed however the benchmark ends."""
    if keep:
        work = Path(keep)
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
