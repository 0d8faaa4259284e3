"""The batch prefetcher: same items in the same order, errors where they happened, nothing left running."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pipeline.data.prefetch import prefetch
from pipeline.transforms.batched import corrupt_batch
from pipeline.transforms.config import GenesisConfig


def _slow_items(n: int, fail_at: int | None = None):
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"damaged batch {i}")
        time.sleep(0.005)
        yield torch.full((2, 3), float(i))


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "genesis-prefetch"]


def test_threaded_prefetch_yields_the_source_in_order():
    assert [int(t[0, 0]) for t in prefetch(_slow_items(20), depth=3, threaded=True)] == list(range(20))
    assert not _prefetch_threads()


def test_a_source_error_is_raised_at_its_item_in_the_consumer():
    seen = []
    with pytest.raises(ValueError, match="damaged batch 4"):
        for t in prefetch(_slow_items(10, fail_at=4), threaded=True):
            seen.append(int(t[0, 0]))
    assert seen == [0, 1, 2, 3]
    assert not _prefetch_threads()


def test_closing_early_stops_the_producer():
    it = prefetch(_slow_items(10_000), depth=2, threaded=True)
    assert int(next(it)[0, 0]) == 0
    it.close()
    assert not _prefetch_threads()


def test_cpu_default_is_in_line():
    """No thread on the CPU unless asked: the corruption and the step share the same cores there."""
    it = prefetch(_slow_items(3), device="cpu")
    next(it)
    assert not _prefetch_threads()
    it.close()


def test_prefetched_corruptions_equal_the_in_line_ones():
    """The producer draws from the generator in the same order as the plain loop: same pairs, bit for bit."""
    cubes = torch.rand(5, 4, 1, 16, 32, 32, generator=torch.Generator().manual_seed(1))

    def pairs(seed: int):
        gen = torch.Generator().manual_seed(seed)
        for batch in cubes:
            yield corrupt_batch(batch, gen, GenesisConfig())

    plain = list(pairs(7))
    ahead = list(prefetch(pairs(7), depth=2, threaded=True))
    assert len(plain) == len(ahead) == 5
    for (x0, y0), (x1, y1) in zip(plain, ahead):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(plain[0][0], plain[0][1])  # the corruption did something
