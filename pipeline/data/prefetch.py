"""Run a batch iterator ahead of the training step, in a background thread and (on a GPU) its own stream.

Why: on an H200 the corruption of a paper batch (6 cubes) takes ~13 ms of small kernels on the device,
while the full U-Net's step takes 30-44 ms; done in line it was 28-43% of the step
(benchmarks/results/gpu_check_h200.txt). Made one batch ahead on a side stream, it overlaps the step.

The producer is one thread consuming the source iterator in order, so the items (and every random draw
they make from their own generators) are exactly those of the plain iterator: prefetching changes timing,
never values. Tensors made on the side stream are handed over with an event the consumer's stream waits
on and `record_stream`, so the caching allocator does not reuse their memory while the step still reads it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import torch

__all__ = ["prefetch"]

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _tensors(item) -> list[torch.Tensor]:
    if isinstance(item, torch.Tensor):
        return [item]
    if isinstance(item, (tuple, list)):
        return [t for part in item for t in _tensors(part)]
    return []


def prefetch(items: Iterable, depth: int = 2, device: torch.device | str | None = None,
             threaded: bool | None = None) -> Iterator:
    """Yield `items` in order while a background thread makes up to `depth` of them ahead.

    `device`: a CUDA device runs the producer on its own stream (synchronised per item by an event).
    `threaded`: None = a thread on CUDA only; True = a thread on any device (tests use it on the CPU);
    False, or depth < 1, yields `items` as they come. An exception of the source is raised in the consumer
    at the item where it happened. Closing the returned generator early stops the producer after its
    current item.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    if depth < 1 or not (threaded or (threaded is None and cuda)):
        yield from items
        return

    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    side = torch.cuda.Stream(device=device) if cuda else None

    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None

    def produce() -> None:
        try:
            if cuda:  # the current device is per thread: the producer's must be the consumer's
                torch.cuda.set_device(index)
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for item in items:
                    done = None
                    if cuda:
                        done = torch.cuda.Event()
                        done.record(side)
                    while not stop.is_set():
                        try:
                            slots.put((item, done), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as exc:  # handed to the consumer, raised there
            slots.put((_Failure(exc), None))
            return
        slots.put((_DONE, None))

    worker = threading.Thread(target=produce, name="genesis-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, done = slots.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            if done is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(done)
                for t in _tensors(item):
                    if t.is_cuda:
                        t.record_stream(current)
            yield item
    finally:
        stop.set()
        deadline = time.monotonic() + 10.0  # a source blocked in its own read is left to die with the process
        while worker.is_alive() and time.monotonic() < deadline:  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
