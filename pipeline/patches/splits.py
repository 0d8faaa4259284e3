"""Which split a scan belongs to (pretraining stores): LUNA16 subsets as in the reference, else a seeded
scan-level draw; and a stable per-scan seed. The split rule itself lives with the other split rules in
`pipeline.tasks.splits` (one definition for pretraining and task stores)."""

from __future__ import annotations

import hashlib

from pipeline.tasks.splits import split_of

__all__ = ["split_of", "scan_seed"]


def scan_seed(scan_id: str) -> int:
    """A stable 64-bit number per scan, so a scan's draws do not depend on which worker runs it."""
    return int.from_bytes(hashlib.sha256(scan_id.encode()).digest()[:8], "little")
