"""One line per pretraining epoch on the driver's console: what a person watching `genesis pretrain` (or the demo,
or `genesis reproduce`) needs to see that the run lives and learns, without Ray's own output.

    epoch  3/10  train 0.01234  val 0.01011  412 cubes/s  38 s  best 0.01011 (epoch 3)

Why read MLflow: rank 0 is the one worker that logs the epoch's metrics to the run (every rank reports to Ray
Train, rank 0 alone logs), and the driver can always read the run it created, wherever the workers are. Ray
Train V2's `UserCallback.after_report` runs in the train controller actor, whose output reaches the driver only
with `log_to_driver`, which is off unless `--verbose`; MLflow needs no channel of its own. A thread of the driver
polls the run while `trainer.fit()` blocks and, once the fit has returned, reads it one last time, so every
epoch's line is out before the run's report.

Elapsed time is the metric's own timestamp less the fit's start, so a late poll does not stretch it. Epochs
logged before this fit (a `--resume`) are not printed again; they still count for "best".
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from dataclasses import dataclass

from pipeline import degenerate

__all__ = ["EpochLine", "EpochLines", "epoch_lines", "duration"]

KEYS = ("train_loss", "val_loss", "best_val_loss", "cubes_per_s")
"""The metrics rank 0 logs every epoch (pipeline.training.worker) that a line shows; the step is the epoch."""


def duration(seconds: float) -> str:
    """38 s, 12 min 05 s, 3 h 02 min: wall time as a person reads it."""
    s = max(0, int(round(seconds)))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


@dataclass(frozen=True)
class EpochLine:
    """One finished epoch (1-based `epoch` of `epochs`)."""

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    cubes_per_s: float
    seconds: float
    best: float
    best_epoch: int | None
    flag: str | None = None
    """`pipeline.degenerate.restoration_flag` of the epoch's restoration picture (flat restorations), if any."""

    def __str__(self) -> str:
        width = len(str(self.epochs))
        best = f"best {self.best:.5f}" + (f" (epoch {self.best_epoch})" if self.best_epoch else "")
        speed = (f"{self.cubes_per_s:.0f} cubes/s" if self.cubes_per_s >= 100 else f"{self.cubes_per_s:.3g} cubes/s"
                 ) if math.isfinite(self.cubes_per_s) else "- cubes/s"
        return (f"epoch {self.epoch:>{width}}/{self.epochs}  train {self.train_loss:.5f}  val {self.val_loss:.5f}  "
                f"{speed}  {duration(self.seconds)}  {best}" + (f"  DEGENERATE: {self.flag}" if self.flag else ""))


class EpochLines:
    """Prints the epochs an MLflow run gains, once each, in order (`poll`); `seen` holds the epochs (0-based
    steps) already printed or logged before `start`."""

    def __init__(self, tracker, run_id: str, epochs: int, start: float | None = None, out=None):
        self.tracker, self.run_id, self.epochs = tracker, run_id, epochs
        self.start = time.time() if start is None else start
        self.out = out
        self.seen: set[int] = set()
        self.best_epoch: int | None = None

    def _history(self, key: str) -> dict[int, tuple[float, int]]:
        """step -> (value, timestamp ms), the first logged value of each step (a restarted worker group logs the
        epochs after its checkpoint again: the first is the line already printed)."""
        out: dict[int, tuple[float, int]] = {}
        for m in sorted(self.tracker.client.get_metric_history(self.run_id, key), key=lambda m: m.timestamp):
            out.setdefault(int(m.step), (float(m.value), int(m.timestamp)))
        return out

    def poll(self, show: bool = True) -> list[EpochLine]:
        """Read the run; print (when `show`) and return the lines of the epochs it gained since the last poll."""
        val = self._history("val_loss")
        new = sorted(step for step in val if step not in self.seen)
        if not new:
            return []
        other = {k: self._history(k) for k in KEYS if k != "val_loss"}
        spread = self._history("restoration_spread")  # epochs with a restoration picture only
        lines = []
        for step in new:
            if any(step not in other[k] for k in other):
                break  # rank 0 logs an epoch's metrics in one call: the rest is on its way
            value, stamp = val[step]
            best = other["best_val_loss"][step][0]
            if math.isclose(value, best, rel_tol=1e-12, abs_tol=0.0):  # the epoch that improved: the best so far
                self.best_epoch = step + 1
            self.seen.add(step)
            line = EpochLine(epoch=step + 1, epochs=self.epochs, train_loss=other["train_loss"][step][0],
                             val_loss=value, cubes_per_s=other["cubes_per_s"][step][0],
                             seconds=stamp / 1000 - self.start, best=best, best_epoch=self.best_epoch,
                             flag=degenerate.restoration_flag(spread[step][0]) if step in spread else None)
            lines.append(line)
            if show:
                print(line, file=self.out or sys.stdout, flush=True)
        return lines


@contextlib.contextmanager
def epoch_lines(tracker, run_id: str, epochs: int, every: float = 2.0, out=None):
    """While the block runs (the fit), a driver thread prints the run's new epochs every `every` s; the last
    ones are printed when the block ends. A poll that fails (the tracking store busy) is skipped, never raised:
    progress lines must not end a training."""
    lines = EpochLines(tracker, run_id, epochs, out=out)
    with contextlib.suppress(Exception):
        lines.poll(show=False)  # a resumed run's earlier epochs: counted for "best", not printed again
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(every):
            with contextlib.suppress(Exception):
                lines.poll()

    thread = threading.Thread(target=follow, name="genesis-epoch-lines", daemon=True)
    thread.start()
    try:
        yield lines
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(Exception):
            lines.poll()
