"""The transfer grid's results as the paper shows them: one table (mean ± sd over seeds, in %, beside the
published numbers, with a t-test against training from scratch) and one label-efficiency figure.

A grid is one MLflow parent run with one child run per fine-tuning ("cell": task x init x label fraction x
seed). `cells_from_mlflow` reads the children into a flat frame, one row per cell; everything after that
is pure pandas / scipy / matplotlib on that frame, so it is tested without MLflow or Ray. Failed cells are
never dropped silently: they are counted per group and listed with their reason.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline.tasks import get_task, task_names

__all__ = ["CELL_COLUMNS", "TABLE_COLUMNS", "FAILURE_COLUMNS", "cells_from_mlflow", "results_table", "failures",
           "published_kind", "to_markdown", "table_figure", "label_efficiency_figure", "write_results",
           "log_results"]

FINISHED = "FINISHED"
CELL_COLUMNS = ["cell", "task", "init", "label_fraction", "seed", "status", "error", "run_id", "metric", "value",
                "start_time", "preset", "freeze_encoder"]
TABLE_COLUMNS = ["task", "init", "label_fraction", "metric", "mean", "sd", "n", "failed", "p_vs_baseline",
                 "published_mean", "published_sd"]
FAILURE_COLUMNS = ["task", "init", "label_fraction", "seed", "status", "error", "run_id"]
GROUP = ["task", "init", "label_fraction"]


# --------------------------------------------------------------------------- MLflow -> cells

def _child_runs(client, experiment_id: str, parent_run_id: str, page_size: int) -> list:
    """All child runs of the parent; MLflow caps one search page, so follow the page tokens."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                  max_results=page_size, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _cell_row(run) -> dict | None:
    """One child run as a cell row; None for a child that is not a grid cell (no cell or task tag)."""
    tags = run.data.tags
    if "genesis.cell" not in tags or "task" not in tags:
        return None
    metric = f"test_{get_task(tags['task']).metrics[0]}"
    return {
        "cell": tags["genesis.cell"], "task": tags["task"], "init": tags.get("init", ""),
        "label_fraction": float(tags.get("label_fraction", "nan")), "seed": int(tags.get("seed", -1)),
        "status": run.info.status, "error": tags.get("error", "") or "", "run_id": run.info.run_id,
        "metric": metric, "value": float(run.data.metrics.get(metric, math.nan)),
        "start_time": pd.Timestamp(run.info.start_time or 0, unit="ms", tz="UTC"),
        "preset": tags.get("preset", ""), "freeze_encoder": tags.get("freeze_encoder", "") == "True",
    }


def _one_per_cell(cells: pd.DataFrame) -> pd.DataFrame:
    """A rerun grid leaves several runs per cell: keep the newest FINISHED one, else the newest attempt."""
    order = cells.assign(_done=cells["status"].eq(FINISHED)).sort_values(["_done", "start_time", "run_id"])
    return order.drop_duplicates("cell", keep="last").drop(columns="_done")


def cells_from_mlflow(tracking_uri: str, parent_run_id: str, *, page_size: int = 1000) -> pd.DataFrame:
    """Every grid cell under the parent run, one row per `genesis.cell` (columns `CELL_COLUMNS`)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    rows = [r for r in map(_cell_row, _child_runs(client, experiment_id, parent_run_id, page_size)) if r]
    if not rows:
        return pd.DataFrame(columns=CELL_COLUMNS)
    cells = _one_per_cell(pd.DataFrame(rows, columns=CELL_COLUMNS))
    return cells.sort_values(["task", "init", "label_fraction", "seed"]).reset_index(drop=True)


# --------------------------------------------------------------------------- cells -> table

def _ok(cells: pd.DataFrame) -> pd.Series:
    """A cell counts when it finished and produced a finite test metric; anything else is a failure."""
    return cells["status"].eq(FINISHED) & np.isfinite(cells["value"].astype(float))


def published_kind(init: str) -> str | None:
    """Which published row an init reproduces: scratch, medicalnet, genesis (any Models Genesis model), or None."""
    name = init.lower()
    if name == "scratch":
        return "scratch"
    if "medicalnet" in name:
        return "medicalnet"
    if (name.startswith("official:") or name.startswith("models:/") or "genesis-pretrained" in name
            or "genesis_chest" in name):
        return "genesis"
    return None


def _published(task: str, init: str, label_fraction: float) -> tuple[float, float]:
    """The paper's (mean, sd) in %, at full labels only: the published table has no other fraction."""
    spec, kind = get_task(task), published_kind(init)
    if spec.published is None or kind is None or not math.isclose(label_fraction, 1.0):
        return math.nan, math.nan
    return getattr(spec.published, kind)


def _metric_name(task: str) -> str:
    spec = get_task(task)
    return spec.published.metric if spec.published else spec.metrics[0]


def _p_value(values: np.ndarray, baseline: np.ndarray) -> float:
    """Student's two-sample t-test (pooled variance, as the paper); undefined below two runs a side."""
    if len(values) < 2 or len(baseline) < 2:
        return math.nan
    return float(stats.ttest_ind(values, baseline, equal_var=True).pvalue)


def _task_rank(task: str) -> int:
    names = task_names()
    return names.index(task) if task in names else len(names)


def results_table(cells: pd.DataFrame, baseline: str = "scratch") -> pd.DataFrame:
    """Mean ± sample sd (%) per (task, init, label fraction) over finished seeds, failures counted,
    p-value against `baseline` at the same task and fraction, and the published numbers beside them."""
    if cells.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    frame = cells.assign(_ok=_ok(cells), _pct=cells["value"].astype(float) * 100.0)
    values = {key: g.loc[g["_ok"], "_pct"].to_numpy() for key, g in frame.groupby(GROUP, sort=False)}
    failed = frame.groupby(GROUP, sort=False)["_ok"].apply(lambda ok: int((~ok).sum()))
    rows = []
    for (task, init, fraction), v in values.items():
        base = values.get((task, baseline, fraction), np.array([]))
        pub_mean, pub_sd = _published(task, init, fraction)
        rows.append({
            "task": task, "init": init, "label_fraction": float(fraction), "metric": _metric_name(task),
            "mean": float(np.mean(v)) if len(v) else math.nan,
            "sd": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
            "n": len(v), "failed": int(failed[(task, init, fraction)]),
            "p_vs_baseline": math.nan if init == baseline else _p_value(v, base),
            "published_mean": pub_mean, "published_sd": pub_sd,
        })
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    order = table.assign(_t=table["task"].map(_task_rank), _b=table["init"].ne(baseline))
    return order.sort_values(["_t", "task", "_b", "init", "label_fraction"]).drop(columns=["_t", "_b"]) \
        .reset_index(drop=True)


def failures(cells: pd.DataFrame) -> pd.DataFrame:
    """Every cell that did not give a number: not FINISHED, or FINISHED without a finite test metric
    (so the list matches the table's `failed` counts)."""
    if cells.empty:
        return pd.DataFrame(columns=FAILURE_COLUMNS)
    bad = cells.loc[~_ok(cells)].copy()
    no_metric = bad["status"].eq(FINISHED) & bad["error"].fillna("").eq("")
    bad.loc[no_metric, "error"] = "finished without " + bad.loc[no_metric, "metric"].astype(str)
    bad["error"] = bad["error"].fillna("")
    return bad[FAILURE_COLUMNS].sort_values(["task", "init", "label_fraction", "seed"]).reset_index(drop=True)


# --------------------------------------------------------------------------- table -> Markdown / figures

def _num(x: float) -> str:
    return f"{x:.2f}"


def _labels(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _ours(row) -> str:
    if row["n"] == 0 or not math.isfinite(row["mean"]):
        return "-"
    if row["n"] == 1 or not math.isfinite(row["sd"]):
        return _num(row["mean"])
    return f"{_num(row['mean'])} ± {_num(row['sd'])}"


def _published_text(row) -> str:
    if not math.isfinite(row["published_mean"]):
        return "-"
    return f"{_num(row['published_mean'])} ± {_num(row['published_sd'])}"


def _p_text(p: float) -> str:
    return "-" if not math.isfinite(p) else f"{p:.3g}"


def _display(table: pd.DataFrame, baseline: str) -> tuple[list[str], list[list[str]]]:
    """Header and text rows shared by the Markdown table and its picture, so the two cannot disagree."""
    header = ["task", "init", "labels", "metric", "ours", "n", f"p vs {baseline}", "published", "failed"]
    rows = [[str(r["task"]), str(r["init"]), _labels(r["label_fraction"]), str(r["metric"]), _ours(r),
             str(int(r["n"])), _p_text(r["p_vs_baseline"]), _published_text(r), str(int(r["failed"]))]
            for _, r in table.iterrows()]
    return header, rows


def _md_cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def _md_failures(failed: pd.DataFrame) -> list[str]:
    lines = ["", "## Failed fine-tunings", ""]
    for _, f in failed.iterrows():
        reason = _md_cell(str(f["error"])) or "no reason recorded"
        lines.append(f"- {f['task']} / {f['init']} / {_labels(f['label_fraction'])} labels / seed {f['seed']}: "
                     f"{f['status']} (run `{f['run_id']}`): {reason}")
    return lines


def to_markdown(table: pd.DataFrame, failed: pd.DataFrame, baseline: str = "scratch") -> str:
    """A GitHub Markdown table (written here: `tabulate` is not a dependency), then the failures with reasons."""
    header, rows = _display(table, baseline)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    if len(failed):
        lines += _md_failures(failed)
    return "\n".join(lines) + "\n"


def _figure(width: float, height: float):
    """A figure on the Agg canvas without pyplot: no global figure registry to leak, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def table_figure(table: pd.DataFrame, baseline: str = "scratch"):
    """The results table drawn as a picture (for the MLflow UI, which shows PNGs inline)."""
    header, rows = _display(table, baseline)
    fig = _figure(11, 0.8 + 0.35 * (len(rows) + 1))
    ax = fig.add_subplot()
    ax.axis("off")
    if not rows:
        ax.text(0.5, 0.5, "no fine-tunings", ha="center", va="center")
        return fig
    drawn = ax.table(cellText=rows, colLabels=header, loc="center", cellLoc="center")
    drawn.auto_set_font_size(False)
    drawn.set_fontsize(8)
    drawn.auto_set_column_width(list(range(len(header))))
    return fig


def _efficiency_points(cells: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd (%) over finished seeds per (task, init, label fraction)."""
    ok = cells.loc[_ok(cells)].assign(pct=lambda c: c["value"].astype(float) * 100.0)
    return ok.groupby(GROUP)["pct"].agg(["mean", "std"]).reset_index()


def label_efficiency_figure(cells: pd.DataFrame):
    """Metric (%) against label fraction, one panel per task and one line per init: the paper's claim is
    that pretraining helps most where labels are few, which this makes visible."""
    points = _efficiency_points(cells) if not cells.empty else pd.DataFrame(columns=GROUP + ["mean", "std"])
    tasks = sorted(points["task"].unique(), key=lambda t: (_task_rank(t), t))
    fig = _figure(4.5 * max(len(tasks), 1), 4)
    if not tasks:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished fine-tunings", ha="center", va="center")
        return fig
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        _efficiency_panel(ax, task, points[points["task"] == task])
    fig.tight_layout()
    return fig


def _efficiency_panel(ax, task: str, points: pd.DataFrame) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    for init, g in points.groupby("init"):
        g = g.sort_values("label_fraction")
        ax.errorbar(g["label_fraction"], g["mean"], yerr=g["std"].fillna(0.0), marker="o", capsize=3, label=init)
    fractions = sorted(points["label_fraction"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(fractions))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([_labels(f) for f in fractions])
    ax.set_xlabel("labelled training data")
    ax.set_ylabel(f"{_metric_name(task)} (%)")
    ax.set_title(f"{task.upper()}: {_metric_name(task)}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------- files and MLflow artifacts

def write_results(table: pd.DataFrame, failed: pd.DataFrame, cells: pd.DataFrame, directory: str | Path,
                  baseline: str = "scratch") -> dict[str, Path]:
    """results.md, results.csv, cells.csv, results.png, label_efficiency.png into `directory`; returns
    {file name: path}."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.md", "results.csv", "cells.csv", "results.png",
                                           "label_efficiency.png")}
    paths["results.md"].write_text(to_markdown(table, failed, baseline), encoding="utf-8")
    table.to_csv(paths["results.csv"], index=False)
    cells.to_csv(paths["cells.csv"], index=False)
    table_figure(table, baseline).savefig(paths["results.png"], dpi=120, bbox_inches="tight")
    label_efficiency_figure(cells).savefig(paths["label_efficiency.png"], dpi=120, bbox_inches="tight")
    return paths


def log_results(tracking_uri: str, parent_run_id: str, directory: str | Path) -> None:
    """The directory's files as artifacts of the parent run under `results/` (by run id: no active run needed)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.log_artifacts(parent_run_id, str(directory), artifact_path="results")
