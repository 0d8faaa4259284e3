"""Which cubes make up each training batch: every cube of a split once per epoch, each batch from
different scans.

The reference draws every batch of 6 uniformly from all training cubes of ~445 LUNA16 scans, so
a batch holds ~6 different scans (5.97 expected), and its batch-statistics normalisation sees
6 scans. A uniform permutation of a small store (the demo, a subset of LUNA16) gives far fewer
(6 train scans: 4.0 expected). So an epoch here is a seeded order of the whole split, cut into
global batches that each take one cube from each of the `batch` scans with the most cubes left
(ties broken at random; each scan's own cubes in a random order): every batch holds `batch`
different scans while that many have cubes left, and the scans empty at the same pace so the end
of the epoch stays mixed. On LUNA16 this is what the reference's batches look like; on a store
with fewer scans than the batch, every batch holds every scan.

The order depends only on the scans and the key (seed, epoch): not on the number of Ray workers,
which each take their fixed share of every global batch (`rank_share`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["epoch_order", "rank_share", "distinct_scans_per_batch", "scan_codes"]

_SALT = 0xBA7C


def scan_codes(scan_ids: Sequence) -> np.ndarray:
    """One small int per cube naming its scan (0..k-1)."""
    return np.unique(np.asarray(scan_ids), return_inverse=True)[1].astype(np.int64).reshape(-1)


def epoch_order(scans: np.ndarray, batch: int, key: Sequence[int], distinct: bool = True) -> np.ndarray:
    """A permutation of range(len(scans)) whose consecutive groups of `batch` are the batches.

    `scans`: the scan code of each cube; `key`: the seed material (e.g. (seed, epoch)).
    distinct=False: a plain uniform permutation.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    scans = np.asarray(scans, dtype=np.int64)
    rng = np.random.default_rng([*map(int, key), _SALT])
    n = len(scans)
    if not distinct or n == 0:
        return rng.permutation(n)
    # each scan's cubes in a random order, as one queue per scan inside `queue`
    shuffled = rng.permutation(n)
    queue = shuffled[np.argsort(scans[shuffled], kind="stable")]
    left = np.bincount(scans)
    head = np.concatenate([[0], np.cumsum(left)[:-1]])
    out = np.empty(n, dtype=np.int64)
    pos = 0
    while pos < n:
        need = min(batch, n - pos)
        while need:
            # the scans with the most cubes left, ties at random (jitter < 1 never reorders unequal counts)
            score = np.where(left > 0, left + rng.random(len(left)), -1.0)
            m = min(need, int(np.count_nonzero(left)))
            chosen = rng.permutation(np.argpartition(-score, m - 1)[:m])
            out[pos:pos + m] = queue[head[chosen]]
            head[chosen] += 1
            left[chosen] -= 1
            pos += m
            need -= m
    return out


def rank_share(order: np.ndarray, batch: int, rank: int, world_size: int) -> np.ndarray:
    """This rank's part of an epoch order: slots [rank*b, (rank+1)*b) of every global batch of `batch`
    (b = batch / world_size), then an equal part of the last incomplete batch. Every rank gets the same
    number of cubes (DDP needs the same number of steps)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch % world_size:
        raise ValueError(f"a global batch of {batch} cubes does not split evenly across {world_size} workers")
    b = batch // world_size
    full = len(order) // batch * batch
    mine = np.asarray(order[:full]).reshape(-1, world_size, b)[:, rank].reshape(-1)
    tail = order[full:]
    per = len(tail) // world_size
    return np.concatenate([mine, tail[rank * per:(rank + 1) * per]])


def distinct_scans_per_batch(scans_in_order: np.ndarray, batch: int) -> np.ndarray:
    """Distinct scans in each complete batch of `batch` consecutive cubes (given by their scan codes)."""
    scans_in_order = np.asarray(scans_in_order)
    full = len(scans_in_order) // batch * batch
    groups = np.sort(scans_in_order[:full].reshape(-1, batch), axis=1)
    return 1 + np.count_nonzero(np.diff(groups, axis=1), axis=1)
