"""Training cubes out of a patch store: a seeded order of the whole split each epoch, batches of
different scans, each Ray Train rank reading its own share.

Each epoch the split's cubes are put in the order of `sampling.epoch_order` (every cube once,
global batches of `batch_size` from different scans) and each rank takes its slots of every global
batch (`sampling.rank_share`), so rank r's k-th batch is its part of the k-th global batch. Cubes
are read `buffer_size` at a time with `PatchStore.read_cubes` (which decodes the store's encoding),
the next block on a thread while this one is served, as views of the block: memory is about three
blocks (12 cubes of 32x64x64 float32 = 6 MiB each: served, read ahead, and the store's read copy)
plus the split's row and scan numbers, whatever the store's size. From a store in a bucket each call reads
`bucket_window` blocks as stored (16 blocks of int16 32x64x64 cubes: 48 MiB, twice: served and read ahead), so
that one request brings the window's cubes of a shard together; still flat in the store's size. The global order
depends only on (seed, epoch), not on the number of ranks: a run resumes exactly, even on another number of workers.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data.sampling import distinct_scans_per_batch, epoch_order, rank_share, scan_codes

__all__ = ["CubeStreamConfig", "PatchCubes", "ray_rank_and_world", "split_rows"]


@dataclass(frozen=True, kw_only=True)
class CubeStreamConfig:
    split: str = "train"
    """Which rows: train | validation | test | all."""
    shuffle: bool = True
    """False: the store's row order (previews, inspection)."""
    batch_size: int = 6
    """Global batch: cubes per optimiser step over all ranks; each global batch is drawn from different scans
    and split evenly across the ranks."""
    distinct_scans: bool = True
    """Batches of different scans (see `sampling`); False: a plain uniform permutation of the split."""
    buffer_size: int = 12
    """Cubes read from the store per call (rounded up to whole per-rank batches): the loader's memory."""
    bucket_window: int = 16
    """From a store in a bucket, this many buffers are read per store call (and the next call's ahead), held as
    stored and decoded buffer by buffer: a bucket's round trip costs milliseconds where a disk read costs
    microseconds, and the cubes of one window that share a shard come in one request
    (`pipeline.patches.sharded_rows`). 1: as on disk."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "validation", "test", "all"):
            raise ValueError(f"CubeStreamConfig.split must be train|validation|test|all, got {self.split!r}")
        if self.buffer_size < 1:
            raise ValueError(f"CubeStreamConfig.buffer_size must be >= 1, got {self.buffer_size}")
        if self.batch_size < 1:
            raise ValueError(f"CubeStreamConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.bucket_window < 1:
            raise ValueError(f"CubeStreamConfig.bucket_window must be >= 1, got {self.bucket_window}")


WINDOW_BYTES = 48 * 2**20
"""The most a bucket read window holds as stored (twice: served and read ahead), whatever the batch size."""


def ray_rank_and_world() -> tuple[int, int]:
    """(rank, world size) inside a Ray Train worker, (0, 1) elsewhere."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return int(ctx.get_world_rank()), int(ctx.get_world_size())
    except Exception:
        return 0, 1


@functools.cache
def _large_buffers_to_os() -> None:
    """glibc raises its mmap threshold to the size of the largest freed buffer (up to 32 MiB), after which
    each freed cube block stays in the heap of whichever thread freed it: +60 MB of RSS with the read-ahead
    thread. A fixed 1 MiB threshold (which also turns the adjustment off) gives blocks back at once. Other C
    libraries: nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def split_rows(store, split: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, scan codes) of a split (None: all), in row order; plain arrays, no copy of the index kept."""
    idx = store.index
    if split is not None:
        idx = idx[idx["split"] == split]
    idx = idx.sort_values("row")
    return idx["row"].to_numpy(dtype=np.int64), scan_codes(idx["scan_id"].to_numpy())


class PatchCubes(IterableDataset):
    """Yields cubes (1, D, H, W) float32 from a patch store; `batches()` yields this rank's batches directly
    (views of the read block, no collation copy); a DataLoader with batch_size = per-rank batch works too."""

    def __init__(self, path, config: CubeStreamConfig = CubeStreamConfig(), rank: int | None = None,
                 world_size: int | None = None):
        from pipeline.patches.store import PatchStore

        super().__init__()
        self.path = str(path)
        self.config = config
        if rank is None or world_size is None:
            rank, world_size = ray_rank_and_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if config.batch_size % world_size:
            raise ValueError(f"CubeStreamConfig.batch_size {config.batch_size} (the global batch) does not split "
                             f"evenly across {world_size} ranks")
        self.rank, self.world_size = rank, world_size
        self.per_rank_batch = config.batch_size // world_size
        self.epoch = 0
        store = PatchStore(self.path)
        self._rows, self._scans = split_rows(store, None if config.split == "all" else config.split)
        store.__dict__.pop("index", None)  # kept for its shard indices, not its table
        self._opened: tuple[int, object] | None = (os.getpid(), store)
        if len(self._rows) < world_size:
            raise ValueError(f"{self.path}: split {config.split!r} has {len(self._rows)} cubes, fewer than "
                             f"the {world_size} ranks that must share it")

    @property
    def store(self):
        """The store, opened once per process (a DataLoader worker opens its own): its shard indices, read on first
        use, then serve every epoch (from a bucket: no round trips per epoch but the cubes')."""
        from pipeline.patches.store import PatchStore

        if self._opened is None or self._opened[0] != os.getpid():
            self._opened = (os.getpid(), PatchStore(self.path))
        return self._opened[1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_opened"] = None  # reopened where it is unpickled (a spawned DataLoader worker)
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        """Cubes this rank serves per epoch."""
        return len(self._rows) // self.config.batch_size * self.per_rank_batch + \
            len(self._rows) % self.config.batch_size // self.world_size

    def global_order(self, epoch: int | None = None) -> np.ndarray:
        """Positions into the split for an epoch (all ranks): consecutive `batch_size` are a global batch."""
        if not self.config.shuffle:
            return np.arange(len(self._rows))
        key = (self.config.seed, self.epoch if epoch is None else epoch)
        return epoch_order(self._scans, self.config.batch_size, key, self.config.distinct_scans)

    def rank_rows(self) -> np.ndarray:
        """The store rows this rank serves this epoch, in order."""
        return self._rows[rank_share(self.global_order(), self.config.batch_size, self.rank, self.world_size)]

    def scans_per_batch(self, epoch: int | None = None) -> np.ndarray:
        """Distinct scans in each global batch of an epoch (the figure the benchmark reports)."""
        return distinct_scans_per_batch(self._scans[self.global_order(epoch)], self.config.batch_size)

    def _my_rows(self) -> np.ndarray:
        rows = self.rank_rows()
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            # DataLoader workers take whole batches in turn, which is the order a DataLoader collects them in
            b = self.per_rank_batch
            n = len(rows) // b
            parts = rows[:n * b].reshape(n, b)[info.id::info.num_workers].reshape(-1)
            rows = np.concatenate([parts, rows[n * b:]]) if n % info.num_workers == info.id else parts
        return rows

    def _blocks(self, rows: np.ndarray):
        """Consecutive runs of `rows` as cube blocks of `buffer_size` (rounded up to whole per-rank batches).

        Each store call reads one block (from a bucket: `bucket_window` blocks), its runs of rows concurrently
        (`PatchStore.read`); the next call runs on a thread while this one's blocks are used (decoding and the
        requests release the GIL, as does a training step waiting on the GPU)."""
        _large_buffers_to_os()
        store = self.store
        b = self.per_rank_batch
        block = -(-self.config.buffer_size // b) * b
        window = block
        if store.tree.local is None:  # from a bucket: up to `bucket_window` blocks, at most WINDOW_BYTES as stored
            cube = int(np.prod(store.cubes.shape[1:])) * store.cubes.dtype.itemsize
            window = block * max(1, min(self.config.bucket_window, WINDOW_BYTES // max(1, block * cube)))
        starts = range(0, len(rows), window)
        if window == block:
            read, decode = store.read_cubes, None
        else:  # a window is held as stored (int16 for CT: half of float32) and decoded block by block
            from pipeline.patches.encoding import decode_cubes

            read, decode = store.read, functools.partial(decode_cubes, encoding=store.cube_encoding)
        with ThreadPoolExecutor(1, thread_name_prefix="genesis-read") as pool:
            pending = [pool.submit(read, rows[i:i + window]) for i in starts[:1]]
            for i in starts:
                cubes = pending.pop().result()
                if i + window < len(rows):
                    pending.append(pool.submit(read, rows[i + window:i + 2 * window]))
                for j in range(0, len(cubes), block):
                    yield cubes[j:j + block] if decode is None else decode(cubes[j:j + block])
                del cubes

    def __iter__(self):
        for cubes in self._blocks(self._my_rows()):
            for cube in cubes:
                yield torch.from_numpy(cube)

    def batches(self):
        """This rank's complete batches (per-rank batch, 1, D, H, W) for the epoch set by `set_epoch`."""
        b = self.per_rank_batch
        rows = self.rank_rows()
        rows = rows[:len(rows) // b * b]
        for cubes in self._blocks(rows):
            t = torch.from_numpy(cubes)
            for j in range(0, len(t), b):
                yield t[j:j + b]
