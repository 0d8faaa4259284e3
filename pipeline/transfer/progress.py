"""One line per fine-tuning of a transfer grid as it finishes or fails, instead of Ray Tune's status tables:

    [ 7/28 done, 2 running, 0 failed] ncs  scratch  100%  seed 0  fold -  keras_mean_iou 73.1  dice 61.0  12 s

Why read MLflow: a Tune trial runs a group of fine-tunings (`pipeline.transfer.trial`), and Tune sees only the
group's epochs and its end; a fine-tuning's test score is logged to its own MLflow run after its last epoch.
So the driver's Tune callback (`GridProgress`, public `ray.tune.Callback`) reads the grid's child runs: at most
every few seconds from the Tune loop (`on_step_end`), at once when a trial ends, and a last time when the grid
ends. A run counts as running once it has logged an epoch (a group creates its runs together, then trains them
one after another). A fine-tuning's time is from the end of the one before it in the same trial (tag
`genesis.trial`), or from its run's creation for the first: the first includes the trial's Ray Train start-up.

Counts: done (finished with a test score, those reused from an earlier attempt included), running, failed (a
finished run without a finite test score counts as failed, as in the table); done + failed reach the total when
the grid ends.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field

from ray.tune import Callback

from pipeline.training.progress import duration
from pipeline.transfer.grid import short_init

__all__ = ["GridCounts", "GridProgress", "cell_line", "TRIAL_TAG"]

TRIAL_TAG = "genesis.trial"
"""Child-run tag: the Ray Train run (trial) that runs the fine-tuning, so its time excludes its predecessors'."""


@dataclass
class GridCounts:
    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    widths: dict = field(default_factory=dict)
    """Column widths (task, init) so the lines of one grid align."""

    def prefix(self) -> str:
        w = len(str(self.total))
        return f"[{self.done:>{w}}/{self.total} done, {self.running} running, {self.failed} failed]"


def cell_line(counts: GridCounts, *, task: str, init: str, label_fraction: float, seed: int, fold, outcome: str,
              seconds: float | None = None, note: str | None = None) -> str:
    """The progress line of one fine-tuning: the counts, what it is (task, init, label fraction, seed, test fold:
    "-" for a task without folds), its outcome (its score, or FAILED and why), its time and, last, a `note`
    (DEGENERATE and why, `pipeline.degenerate`)."""
    tw, iw = counts.widths.get("task", 0), counts.widths.get("init", 0)
    fold_text = "-" if fold in (None, "") else str(fold)
    parts = [counts.prefix(), f"{task:<{tw}}", f"{short_init(init):<{iw}}", f"{label_fraction * 100:>4g}%",
             f"seed {seed}", f"fold {fold_text}", outcome]
    if seconds is not None:
        parts.append(duration(seconds))
    if note:
        parts.append(note)
    return "  ".join(parts)


def _score(task: str, metrics: dict) -> tuple[str, bool]:
    """("keras_mean_iou 73.1  dice 61.0", True), in %, or a reason and False when the run has no test score."""
    from pipeline.tasks import get_task

    try:
        name = get_task(task).metrics[0]
    except (KeyError, ValueError, IndexError):
        name = next((k[len("test_"):] for k in metrics if k.startswith("test_")), "")
    value = metrics.get(f"test_{name}", math.nan)
    if not math.isfinite(value):
        return f"FAILED: finished without a test {name or 'metric'}", False
    text = f"{name} {value * 100:.1f}"
    if math.isfinite(metrics.get("test_dice", math.nan)):
        text += f"  dice {metrics['test_dice'] * 100:.1f}"
    return text, True


def _flag(task: str, metrics: dict) -> str | None:
    """"DEGENERATE: why" for a fine-tuning that learnt nothing (`pipeline.degenerate.finetune_flag`), else None."""
    from pipeline import degenerate
    from pipeline.tasks import get_task

    try:
        flag = degenerate.finetune_flag(get_task(task).kind, metrics)
    except (KeyError, ValueError):
        return None
    return f"DEGENERATE: {flag}" if flag else None


class GridProgress(Callback):
    """Ray Tune callback on the driver: prints `cell_line` for each fine-tuning of `keys` (the cells sent to Tune)
    whose run, created after `start`, ends."""

    def __init__(self, tracking_uri: str, parent_run_id: str, keys: set[str], counts: GridCounts,
                 every: float = 3.0, out=None):
        self.tracking_uri, self.parent, self.keys, self.counts = tracking_uri, parent_run_id, set(keys), counts
        self.every, self.out = every, out
        self.start_ms = int(time.time() * 1000) - 1000
        self.reported: set[str] = set()
        self._last = 0.0
        self._tracker = self._experiment = None

    def __getstate__(self) -> dict:  # Tune may pickle its callbacks: the tracking client stays behind
        return {**self.__dict__, "_tracker": None}

    def _runs(self) -> list:
        from pipeline.runtime.tracking import Tracker

        if self._tracker is None:
            self._tracker = Tracker.at(self.tracking_uri)
            self._experiment = self._tracker.run(self.parent).info.experiment_id
        runs = self._tracker.search_runs([self._experiment], f"tags.mlflow.parentRunId = '{self.parent}'")
        return [r for r in runs if (r.info.start_time or 0) >= self.start_ms
                and r.data.tags.get("genesis.cell") in self.keys]

    def poll(self) -> list[str]:
        """Print (and return) the lines of the fine-tunings that ended since the last poll."""
        self._last = time.monotonic()
        runs = self._runs()
        ended = sorted((r for r in runs if r.info.status != "RUNNING" and r.info.run_id not in self.reported),
                       key=lambda r: r.info.end_time or 0)
        self.counts.running = sum(r.info.status == "RUNNING" and bool(r.data.metrics) for r in runs)
        lines = []
        for run in ended:
            tags, metrics = run.data.tags, run.data.metrics
            if run.info.status == "FINISHED":
                outcome, ok = _score(tags.get("task", ""), metrics)
            else:
                why = " ".join((tags.get("error") or run.info.status).split())
                outcome, ok = f"FAILED: {why[:160]}", False
            self.counts.done += ok
            self.counts.failed += not ok
            self.reported.add(run.info.run_id)
            end = run.info.end_time or run.info.start_time or 0
            before = [r.info.end_time for r in runs if r.info.status != "RUNNING" and r.info.end_time
                      and r.info.end_time < end and r.data.tags.get(TRIAL_TAG) == tags.get(TRIAL_TAG)]
            begin = max([run.info.start_time or end, *before])
            fold = tags.get("fold")
            line = cell_line(self.counts, task=tags.get("task", "?"), init=tags.get("init", "?"),
                             label_fraction=float(tags.get("label_fraction", "nan")), seed=tags.get("seed", "?"),
                             fold=fold, outcome=outcome, seconds=(end - begin) / 1000,
                             note=_flag(tags.get("task", ""), metrics) if ok else None)
            lines.append(line)
            print(line, file=self.out or sys.stdout, flush=True)
        return lines

    def _quiet_poll(self) -> None:
        with contextlib.suppress(Exception):  # the tracking store busy: next time; progress never ends a grid
            self.poll()

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        if time.monotonic() - self._last >= self.every:
            self._quiet_poll()

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._quiet_poll()

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._quiet_poll()

    def on_experiment_end(self, trials: list, **info) -> None:
        self._quiet_poll()
