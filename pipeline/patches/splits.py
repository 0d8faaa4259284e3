"""Which split a scan belongs to (pretraining stores): LUNA16 subsets as in the reference, else a seeded
scan-level draw; a seeded validation share when the scans' own tags leave none; and a stable per-scan seed.
The split rule itself lives with the other split rules in `pipeline.tasks.splits` (one definition for
pretraining and task stores)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.tasks.splits import split_of

__all__ = ["split_of", "scan_seed", "PretrainSplits", "pretrain_splits"]

_SHARE_SALT = 0x7A1D5


def scan_seed(scan_id: str) -> int:
    """A stable 64-bit number per scan, so a scan's draws do not depend on which worker runs it."""
    return int.from_bytes(hashlib.sha256(scan_id.encode()).digest()[:8], "little")


@dataclass(frozen=True)
class PretrainSplits:
    splits: dict[str, str]
    """scan id -> train | validation | test."""
    drawn: tuple[str, ...] = ()
    """Training scans moved to validation by the seeded share (empty when the tags gave validation scans)."""
    note: str | None = None
    """Why pretraining will validate on training cubes (None when it will not)."""


def pretrain_splits(scans: list[tuple[str, str | None]], seed: int, fractions: tuple[float, float, float],
                    where: str = "the store", eligible: set[str] | None = None) -> PretrainSplits:
    """Splits of (scan id, subset) pairs by `split_of`; when none is validation (every scan in one LUNA16
    subset, an nnU-Net dataset tagged train/test), a seeded share of the training scans becomes validation:
    round(fractions[1] x n) of them, at least one, leaving at least one to train; which ones depends only on
    the sorted ids and `seed`.

    `eligible`: the scans the share may be drawn from (the build passes those that gave cubes, so the share
    never lands on a scan without cubes); None: every training scan. With fewer than two eligible training
    scans nothing can be drawn: the note says so (the build reports it, the store's attributes and the
    pretraining run carry it) and pretraining validates on its training cubes, openly."""
    splits = {scan: split_of(scan, subset, seed, fractions) for scan, subset in scans}
    if "validation" in splits.values():
        return PretrainSplits(splits)
    train = sorted(s for s, split in splits.items() if split == "train" and (eligible is None or s in eligible))
    if len(train) < 2:
        among = "" if eligible is None else " among the scans that gave cubes"
        note = (f"{where} has {len(train)} training scan{'s' if len(train) != 1 else ''} and no validation "
                f"scan{among}: pretraining will validate on its training cubes; convert more scans for a real "
                f"validation split")
        return PretrainSplits(splits, note=note)
    n_val = min(max(1, int(np.floor(fractions[1] * len(train) + 0.5))), len(train) - 1)
    order = np.random.default_rng([seed, _SHARE_SALT]).permutation(len(train))
    drawn = tuple(sorted(train[i] for i in order[:n_val]))
    for scan in drawn:
        splits[scan] = "validation"
    return PretrainSplits(splits, drawn=drawn)
