"""The transfer grid's parent run as a person finds it in the MLflow UI: the table where they look first.

A parent run holds its results under `tables/` and its fine-tunings as child runs; opened in the UI, its Overview
tab showed nothing of them. After the table is built, `summarise_parent_run` writes it where the UI shows it:
- the run's description (the tag the UI renders as Markdown on the Overview tab) holds the table itself, then a
  line with the grid's counts;
- metrics `best/<task>/<init>`: per task and init the best row mean (%) over the label fractions, the number one
  compares across grids in the runs table and its charts; `fine_tunings/finished`, `/failed`, `/degenerate`;
- param `fine_tunings`: how many fine-tunings the grid has (the grid's own settings are its `grid.*` params);
- `results.md` at the artifact root, listed before the `tables/` folder's files.

A rerun of the grid reopens the same parent run: the description is replaced, the metrics get their new values
(their latest is what the UI shows), and the params, fixed by the grid's key, are only added where missing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.runtime.tracking import Tracker
from pipeline.transfer.grid import short_init

__all__ = ["ParentSummary", "summary_of", "summarise_parent_run", "metric_key", "DESCRIPTION_LIMIT",
           "RESULTS_FILE"]

DESCRIPTION_LIMIT = 8000
"""MLflow's longest tag value (its `MAX_TAG_VAL_LENGTH`): a longer table is cut at a line, saying so."""
RESULTS_FILE = "results.md"


@dataclass(frozen=True)
class ParentSummary:
    """What the parent run shows: metrics (latest value wins), params (added once), the description (Markdown)."""

    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    description: str = ""


def _key_part(text: str) -> str:
    """One part of a metric key: MLflow allows letters, digits, `_ - . :` and spaces (and `/` between parts); a
    part may not be `.` or `..` (a key is also a file path)."""
    part = re.sub(r"[^\w.\- :]", "_", text).strip()
    return part if part.strip(".") else "_"


def metric_key(task: str, init: str) -> str:
    """`best/<task>/<init>` with the init's short name (`short_init`: models:/genesis-pretrained@best ->
    genesis-pretrained_best, a weights file -> its stem), made a valid MLflow key."""
    return f"best/{_key_part(task)}/{_key_part(short_init(init))}"


def _best_rows(table: pd.DataFrame) -> dict[str, float]:
    """metric key -> best finite row mean (%) of each (task, init); two inits with one short name are told apart
    by a suffix (`-2`) in the order of the table."""
    out: dict[str, float] = {}
    owner: dict[str, str] = {}
    for (task, init), rows in table.groupby(["task", "init"], sort=False):
        means = rows["mean"].astype(float)
        means = means[means.map(math.isfinite)]
        key, k = metric_key(task, init), 1
        while key in owner and owner[key] != f"{task}\0{init}":
            k += 1
            key = f"{metric_key(task, init)}-{k}"
        owner[key] = f"{task}\0{init}"
        if len(means):
            out[key] = float(means.max())
    return out


def _counts(table: pd.DataFrame) -> dict[str, int]:
    finished = int(table["n"].sum()) if len(table) else 0
    failed = int(table["failed"].sum()) if len(table) else 0
    degenerate = int(table["n_degenerate"].fillna(0).sum()) if "n_degenerate" in table.columns and len(table) else 0
    return {"total": finished + failed, "finished": finished, "failed": failed, "degenerate": degenerate}


def _description(table: pd.DataFrame, markdown: str, counts: dict[str, int]) -> str:
    """The table first (the UI shows a description's first lines until "Show more" is clicked), then a line of
    counts and where the rest is; the table is cut at a line to fit `DESCRIPTION_LIMIT`, saying so."""
    degenerate = f", {counts['degenerate']} degenerate" if counts["degenerate"] else ""
    tail = (f"\n\n**Transfer grid: {counts['total']} fine-tunings, {counts['finished']} finished, {counts['failed']} "
            f"failed{degenerate}.** Metrics `best/<task>/<init>`: the best row mean (%) of each task and init. "
            f"Artifacts: `{RESULTS_FILE}` (this table), `tables/` (CSV, figures); each fine-tuning is a child run.\n")
    body = markdown.strip()
    if len(body) + len(tail) <= DESCRIPTION_LIMIT:
        return body + tail
    cut = f"\n\n… cut to fit MLflow's description; the whole table is the artifact `{RESULTS_FILE}`."
    kept = body[:DESCRIPTION_LIMIT - len(tail) - len(cut)]
    return (kept[:kept.rfind("\n")] if "\n" in kept else kept) + cut + tail


def summary_of(table: pd.DataFrame, markdown: str) -> ParentSummary:
    """The summary of a results table (`pipeline.transfer.table.results_table`) and its Markdown (what
    results.md holds)."""
    counts = _counts(table)
    metrics: dict[str, float] = {**_best_rows(table), "fine_tunings/finished": counts["finished"],
                                 "fine_tunings/failed": counts["failed"]}
    if "n_degenerate" in table.columns:
        metrics["fine_tunings/degenerate"] = counts["degenerate"]
    return ParentSummary(metrics=metrics, params={"fine_tunings": str(counts["total"])},
                         description=_description(table, markdown, counts))


def summarise_parent_run(tracking: Tracker | str, run_id: str, table: pd.DataFrame, markdown: str,
                         results_dir: str | Path | None = None) -> ParentSummary:
    """Write the summary into parent run `run_id`: description, metrics, params (those it lacks), and
    `results.md` at the artifact root: `results_dir`'s results.md when there is one (the file the user also has
    on disk), else `markdown`. Returns what was written."""
    tracker = Tracker.at(tracking)
    summary = summary_of(table, markdown)
    tracker.set_description(run_id, summary.description)
    tracker.log_metrics(run_id, summary.metrics)
    present = tracker.run(run_id).data.params
    tracker.log_params(run_id, {k: v for k, v in summary.params.items() if k not in present})
    written = Path(results_dir) / RESULTS_FILE if results_dir is not None else None
    if written is not None and written.is_file():
        tracker.log_artifact(run_id, written)
    else:
        tracker.log_text(run_id, markdown, RESULTS_FILE)
    return summary
