"""Which split a scan belongs to: LUNA16 subsets as in the reference, else a seeded scan-level draw."""

from __future__ import annotations

import hashlib
import re

__all__ = ["split_of", "scan_seed"]

_LUNA_SPLITS = {**{i: "train" for i in range(5)}, 5: "validation", 6: "validation", 7: "test", 8: "test", 9: "test"}


def scan_seed(scan_id: str) -> int:
    """A stable 64-bit number per scan, so a scan's draws do not depend on which worker runs it."""
    return int.from_bytes(hashlib.sha256(scan_id.encode()).digest()[:8], "little")


def split_of(scan_id: str, subset: str | None, seed: int, fractions: tuple[float, float, float]) -> str:
    """train / validation / test: subset0-4 / 5-6 / 7-9 for LUNA16; a dataset's own split tag when it has
    one (LiTS); otherwise a uniform draw from hash(seed, scan_id) against `fractions` (by scan, never by cube)."""
    if subset:
        m = re.fullmatch(r"subset(\d+)", subset)
        if m and int(m.group(1)) in _LUNA_SPLITS:
            return _LUNA_SPLITS[int(m.group(1))]
        if subset in ("train", "validation", "test"):
            return subset
    u = int.from_bytes(hashlib.sha256(f"{seed}:{scan_id}".encode()).digest()[:8], "little") / 2**64
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"
