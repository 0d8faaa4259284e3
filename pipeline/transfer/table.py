"""The transfer grid's results as the paper shows them: one table per task (mean ± sd over runs, in %, a t-test
against training from scratch, the published number beside ours where it is computed the same way) and one
label-efficiency figure.

A grid is one MLflow parent run with one child run per fine-tuning ("cell": task x init x label fraction x test
fold x seed). `cells_from_mlflow` reads the children into a flat frame, one row per cell (cells.csv keeps it:
per fold and seed); everything after that is pure pandas / scipy / matplotlib on that frame, so it is tested
without MLflow or Ray. A table row pools the folds and seeds of one (task, init, label fraction). Failed cells are
never dropped silently: they are counted per row and listed with their reason.

What each row reports: the paper's metric of the task (AUC over candidates for NCC and ECC, the reference's Keras
mean_iou over the test cubes for NCS and over the whole test volumes, pooled, for LCS and BMS) and, where the
test unit is a whole volume, what a clinician reads: foreground Dice per case, mean ± sd over cases (per test
cube for NCS: a Keras mean_iou of 50 is a model that finds nothing, a Dice says so at once). Whether
a published value is comparable is decided by `pipeline.transfer.protocol`.

A degenerate run (`pipeline.degenerate`: a segmentation that predicts background only, a classifier at chance)
is marked where its number is shown: a `†` beside the row's value in results.md and results.png with a footnote
saying what it means, the `degenerate` / `n_degenerate` columns of results.csv, the cell's `degenerate` column in
cells.csv, and the `genesis.degenerate` tag on its MLflow run (`log_results`).

The label-efficiency figure plots mean ± 1 sd over a row's runs on a fixed 0-100 % axis (a 1-point difference
of noise must not fill the panel), with the published value on the same axis only where the table declares it
comparable; its numbers are written beside it (label_efficiency.csv, `label_efficiency_data`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from pipeline import degenerate
from pipeline.tasks.registry import get_task, task_names
from pipeline.transfer import protocol

__all__ = ["CELL_COLUMNS", "TABLE_COLUMNS", "FAILURE_COLUMNS", "EFFICIENCY_COLUMNS", "cells_from_mlflow",
           "results_table", "failures", "published_kind", "to_markdown", "table_lines", "table_figure",
           "label_efficiency_data", "label_efficiency_figure", "write_results", "log_results", "tag_degenerate",
           "p_text", "N_LT_2", "DEGENERATE_MARK"]

FINISHED = "FINISHED"
N_LT_2 = "n<2"
"""What the p-value column says when a side has fewer than two finished values (no t-test)."""
DEGENERATE_MARK = "†"
"""Beside a row's value when at least one of its runs is degenerate (`pipeline.degenerate`)."""
CELL_COLUMNS = ["cell", "task", "init", "label_fraction", "fold", "seed", "status", "error", "run_id", "metric",
                "value", "dice", "dice_sd", "start_time", "preset", "freeze_encoder", "epochs", "store_folds",
                "store_protocol", "degenerate"]
TABLE_COLUMNS = ["task", "init", "label_fraction", "metric", "unit", "mean", "sd", "n", "folds", "failed",
                 "p_vs_baseline", "n_baseline", "dice_mean", "dice_sd", "published_metric", "published_mean",
                 "published_sd", "published_source", "published_unverified", "comparable", "not_comparable",
                 "n_degenerate", "degenerate"]
FAILURE_COLUMNS = ["task", "init", "label_fraction", "fold", "seed", "status", "error", "run_id"]
GROUP = ["task", "init", "label_fraction"]
_DEFAULTS = {"fold": pd.NA, "dice": math.nan, "dice_sd": math.nan, "preset": "", "freeze_encoder": False,
             "epochs": "", "store_folds": "", "store_protocol": "unknown", "degenerate": ""}
"""Columns a cells frame may lack (written by an older version): a cell without a protocol record is never
comparable."""


# --------------------------------------------------------------------------- MLflow -> cells

def _cell_row(run) -> dict | None:
    """One child run as a cell row; None for a child that is not a grid cell (no cell or task tag)."""
    tags = run.data.tags
    if "genesis.cell" not in tags or "task" not in tags:
        return None
    metrics = run.data.metrics
    spec = get_task(tags["task"])
    metric = f"test_{spec.metrics[0]}"
    fold = tags.get("fold", "")
    flag = tags.get(degenerate.TAG) or (degenerate.finetune_flag(spec.kind, metrics)
                                        if run.info.status == FINISHED else None)
    return {
        "cell": tags["genesis.cell"], "task": tags["task"], "init": tags.get("init", ""),
        "label_fraction": float(tags.get("label_fraction", "nan")),
        "fold": int(fold) if fold.strip().isdigit() else pd.NA, "seed": int(tags.get("seed", -1)),
        "status": run.info.status, "error": tags.get("error", "") or "", "run_id": run.info.run_id,
        "metric": metric, "value": float(metrics.get(metric, math.nan)),
        "dice": float(metrics.get("test_dice", math.nan)), "dice_sd": float(metrics.get("test_dice_sd", math.nan)),
        "start_time": pd.Timestamp(run.info.start_time or 0, unit="ms", tz="UTC"),
        "preset": tags.get("preset", ""), "freeze_encoder": tags.get("freeze_encoder", "") == "True",
        "epochs": tags.get("epochs_cap", ""), "store_folds": tags.get("store_folds", ""),
        "store_protocol": tags.get("store_protocol", "unknown"), "degenerate": flag or "",
    }


def _register_logged_tasks(tracker, parent_run_id: str, children) -> None:
    """A user's task is not in a fresh process's registry (`genesis transfer show`): read its task file from the
    runs that used it (the parent's `task/<name>.yaml`, else a child's) and register it, so the table names its
    metric and title; a user's task has no published values (the table shows "-")."""
    from pipeline.tasks.registry import register, task_names
    from pipeline.tasks.task_file import task_from_text

    known = set(task_names())
    runs_of: dict[str, list[str]] = {}
    for run in children:
        task = run.data.tags.get("task")
        if "genesis.cell" in run.data.tags and task and task not in known:
            runs_of.setdefault(task, []).append(run.info.run_id)
    for task, run_ids in runs_of.items():
        for run_id in [parent_run_id, *run_ids]:
            text = tracker.read_text(run_id, f"task/{task}.yaml")
            if text is not None:
                register(task_from_text(text, f"task/{task}.yaml of MLflow run {run_id}"), replace=True,
                         source=f"MLflow run {run_id}")
                break
        else:
            raise ValueError(f"task {task!r} of MLflow run {run_ids[0]} is not a built-in task and no run of the grid "
                             f"holds its task file (task/{task}.yaml)")


def _one_per_cell(cells: pd.DataFrame) -> pd.DataFrame:
    """A rerun grid leaves several runs per cell: keep the newest FINISHED one, else the newest attempt."""
    order = cells.assign(_done=cells["status"].eq(FINISHED)).sort_values(["_done", "start_time", "run_id"])
    return order.drop_duplicates("cell", keep="last").drop(columns="_done")


def cells_from_mlflow(tracking, parent_run_id: str, *, page_size: int = 1000) -> pd.DataFrame:
    """Every grid cell under the parent run, one row per `genesis.cell` (columns `CELL_COLUMNS`); `tracking`: a
    Tracker or a tracking URI."""
    from pipeline.runtime.tracking import Tracker

    tracker = Tracker.at(tracking)
    experiment_id = tracker.run(parent_run_id).info.experiment_id
    children = tracker.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'",
                                   max_results=page_size)  # every page: MLflow caps one
    _register_logged_tasks(tracker, parent_run_id, children)
    rows = [r for r in map(_cell_row, children) if r]
    if not rows:
        return pd.DataFrame(columns=CELL_COLUMNS)
    cells = _one_per_cell(pd.DataFrame(rows, columns=CELL_COLUMNS))
    cells["fold"] = cells["fold"].astype("Int64")
    return cells.sort_values(["task", "init", "label_fraction", "fold", "seed"]).reset_index(drop=True)


# --------------------------------------------------------------------------- cells -> table

def _complete(cells: pd.DataFrame) -> pd.DataFrame:
    """The cells with every column of `CELL_COLUMNS` (defaults for what an older frame lacks)."""
    missing = {k: v for k, v in _DEFAULTS.items() if k not in cells.columns}
    return cells.assign(**missing) if missing else cells


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


def _published(task: str, init: str, label_fraction: float) -> dict:
    """The paper's value for this row, in %, with its source and whether it is unverified; at full labels only:
    the published table has no other fraction."""
    spec, kind = get_task(task), published_kind(init)
    none = {"published_metric": "", "published_mean": math.nan, "published_sd": math.nan, "published_source": "",
            "published_unverified": False}
    pub = spec.published
    if pub is None or kind is None or not math.isclose(label_fraction, 1.0):
        return none
    mean, sd = getattr(pub, kind)
    return {"published_metric": pub.metric, "published_mean": float(mean), "published_sd": float(sd),
            "published_source": str((getattr(pub, "sources", None) or {}).get(kind, "")),
            "published_unverified": kind in tuple(getattr(pub, "unverified", ()) or ())}


def _metric_name(task: str) -> str:
    """The paper metric's name as the published table writes it (AUC, Keras mean_iou)."""
    return protocol.metric_label(get_task(task).metrics[0])


def _p_value(values: np.ndarray, baseline: np.ndarray) -> float:
    """Student's two-sample t-test (pooled variance, as the paper); undefined below two runs a side."""
    if len(values) < 2 or len(baseline) < 2:
        return math.nan
    return float(stats.ttest_ind(values, baseline, equal_var=True).pvalue)


def _pooled_sd(means: np.ndarray, sds: np.ndarray) -> float:
    """The sd over cases of several runs' per-case values together, from each run's mean and sd over its cases:
    the sd of the equal-weight mixture, sqrt(mean(sd_r^2) + mean((mean_r - mean)^2)) (runs of one row score the
    same number of cases: the same test split, or folds of near-equal size)."""
    keep = np.isfinite(means) & np.isfinite(sds)
    if not keep.any():
        return math.nan
    m, s = means[keep], sds[keep]
    return float(math.sqrt(np.mean(s ** 2) + np.mean((m - m.mean()) ** 2)))


def _flags(ok: pd.DataFrame) -> list[str]:
    """The degenerate flags of a row's finished runs, one per degenerate run."""
    return [str(f) for f in ok["degenerate"].fillna("") if str(f).strip() and str(f) != "nan"]


def _degenerate_text(flags: list[str], n: int) -> str:
    """"k of n runs: <what each flag says>" (distinct sentences, at most three), or "" when none is degenerate."""
    if not flags:
        return ""
    distinct = list(dict.fromkeys(flags))
    said = "; ".join(distinct[:3]) + ("; ..." if len(distinct) > 3 else "")
    return f"{len(flags)} of {n} run{'s' if n != 1 else ''}: {said}"


def _task_rank(task: str) -> int:
    names = task_names()
    return names.index(task) if task in names else len(names)


def _folds_text(folds: pd.Series) -> str:
    return ",".join(str(int(f)) for f in sorted(set(folds.dropna())))


def results_table(cells: pd.DataFrame, baseline: str = "scratch") -> pd.DataFrame:
    """Per (task, init, label fraction), pooled over folds and seeds: mean ± sample sd (%) of the paper's metric
    over finished runs, failures counted, Student's p against `baseline` at the same task and fraction, per-case
    Dice (whole-volume tasks), and the published value with its source and whether ours is comparable to it."""
    if cells.empty:
        return pd.DataFrame(columns=TABLE_COLUMNS)
    cells = _complete(cells)
    frame = cells.assign(_ok=_ok(cells), _pct=cells["value"].astype(float) * 100.0)
    groups = {key: g for key, g in frame.groupby(GROUP, sort=False)}
    values = {key: g.loc[g["_ok"], "_pct"].to_numpy() for key, g in groups.items()}
    rows = []
    for (task, init, fraction), g in groups.items():
        v, spec = values[(task, init, fraction)], get_task(task)
        base = values.get((task, baseline, fraction))
        ok = g.loc[g["_ok"]]
        segmentation = spec.kind == "segmentation"  # foreground Dice per case (LCS, BMS) or per cube (NCS)
        pub = _published(task, init, fraction)
        reasons = protocol.row_differences(task, spec.metrics[0], g, g["_ok"].to_numpy()) \
            if math.isfinite(pub["published_mean"]) else []
        rows.append({
            "task": task, "init": init, "label_fraction": float(fraction), "metric": _metric_name(task),
            "unit": protocol.our_unit(spec),
            "mean": float(np.mean(v)) if len(v) else math.nan,
            "sd": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
            "n": len(v), "folds": _folds_text(g["fold"]), "failed": int((~g["_ok"]).sum()),
            "p_vs_baseline": math.nan if init == baseline or base is None else _p_value(v, base),
            "n_baseline": math.nan if base is None else len(base),
            "dice_mean": float(ok["dice"].astype(float).mean() * 100) if segmentation and len(ok) else math.nan,
            "dice_sd": _pooled_sd(ok["dice"].to_numpy(float), ok["dice_sd"].to_numpy(float)) * 100
            if segmentation and len(ok) else math.nan,
            **pub,
            "comparable": "" if not math.isfinite(pub["published_mean"]) else ("no" if reasons else "yes"),
            "not_comparable": "; ".join(reasons),
            "n_degenerate": len(_flags(ok)), "degenerate": _degenerate_text(_flags(ok), len(v)),
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
    cells = _complete(cells)
    bad = cells.loc[~_ok(cells)].copy()
    no_metric = bad["status"].eq(FINISHED) & bad["error"].fillna("").eq("")
    bad.loc[no_metric, "error"] = "finished without " + bad.loc[no_metric, "metric"].astype(str)
    bad["error"] = bad["error"].fillna("")
    return bad[FAILURE_COLUMNS].sort_values(["task", "init", "label_fraction", "fold", "seed"]).reset_index(drop=True)


# --------------------------------------------------------------------------- table -> Markdown / figures

def _num(x: float) -> str:
    return f"{x:.2f}"


def _labels(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def _mean_sd(mean: float, sd: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "-"
    if n == 1 or not math.isfinite(sd):
        return _num(mean)
    return f"{_num(mean)} ± {_num(sd)}"


def _published_text(row) -> str:
    """The published value where ours is computed the same way; "not comparable (why)" where not; "-" where
    there is none (another init, or a label fraction the paper did not publish)."""
    if not math.isfinite(row["published_mean"]):
        return "-"
    if row["comparable"] != "yes":
        return f"not comparable ({row['not_comparable']})"
    text = f"{_num(row['published_mean'])} ± {_num(row['published_sd'])}"
    return text + " (unverified)" if row["published_unverified"] else text


def p_text(row, baseline: str = "scratch") -> str:
    """The p-value column: "-" for the baseline itself or a grid without it, "n<2" when either side has fewer
    than two finished values, else the p-value."""
    if row["init"] == baseline or not math.isfinite(float(row["n_baseline"])):
        return "-"
    if row["n"] < 2 or row["n_baseline"] < 2 or not math.isfinite(row["p_vs_baseline"]):
        return N_LT_2
    return f"{row['p_vs_baseline']:.3g}"


_UNIT_TEXT = {"candidate": "over candidates", "cube": "over test cubes", "volume": "over whole volumes, pooled"}


def _metric_header(metric: str, unit: str) -> str:
    return f"{metric} {_UNIT_TEXT.get(unit, 'over ' + unit)} (%)"


def _blocks(table: pd.DataFrame, baseline: str) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, text rows) per task: shared by the Markdown tables and their picture, so they cannot
    disagree. Each header names its metric."""
    blocks = []
    for task, rows in table.groupby("task", sort=False):
        spec, first = get_task(task), rows.iloc[0]
        whole_volume = spec.evaluation == "whole_volume"
        published = first["published_metric"] or (spec.published.metric if spec.published else first["metric"])
        header = ["init", "labels", _metric_header(first["metric"], first["unit"]), "n", "folds",
                  f"p vs {baseline}"]
        segmentation = spec.kind == "segmentation"
        if segmentation:  # a foreground Dice beside the Keras mean_iou, which is ~50 for a model that finds nothing
            header.append("Dice per case (%), mean ± sd over cases" if whole_volume else
                          "Dice per cube (%), mean ± sd over cubes")
        header += [f"published {published} (%)", "failed"]
        text = []
        for _, r in rows.iterrows():
            mark = f" {DEGENERATE_MARK}" if int(r.get("n_degenerate", 0) or 0) else ""
            line = [str(r["init"]), _labels(r["label_fraction"]), _mean_sd(r["mean"], r["sd"], r["n"]) + mark,
                    str(int(r["n"])), r["folds"] or "-", p_text(r, baseline)]
            if segmentation:
                line.append(_mean_sd(r["dice_mean"], r["dice_sd"], 2))
            line += [_published_text(r), str(int(r["failed"]))]
            text.append(line)
        title = f"{task.upper()}: {spec.title}"
        blocks.append((title, header, text))
    return blocks


def _sources(table: pd.DataFrame) -> list[str]:
    """One line per published value the table refers to: task, init, value, its source, unverified or not."""
    lines = []
    rows = table[np.isfinite(table["published_mean"].astype(float))]
    for _, r in rows.drop_duplicates(["task", "init"]).iterrows():
        source = r["published_source"] or "no source recorded"
        flag = "; unverified" if r["published_unverified"] or not r["published_source"] else ""
        lines.append(f"{r['task'].upper()} {published_kind(r['init'])} ({r['init']}): {_num(r['published_mean'])} "
                     f"± {_num(r['published_sd'])} {r['published_metric']} (%), {source}{flag}")
    return lines


DEGENERATE_RULES = (f"{DEGENERATE_MARK} degenerate: the model did not learn the task, whatever its number says. "
                    f"Segmentation: foreground Dice below {degenerate.DICE_FLOOR:g} on the test split (\"background "
                    f"only\" when it predicts under {100 * degenerate.BACKGROUND_SHARE:g}% of the target's voxels: "
                    f"Keras mean_iou then sits near 50), or a Keras mean_iou at or below "
                    f"{100 * degenerate.BACKGROUND_MEAN_IOU:g}, no better than predicting background everywhere. "
                    f"Classification: test AUC at or below "
                    f"{100 * degenerate.AUC_CHANCE:g} (chance: {100 * (1 - degenerate.AUC_CHANCE):g}-"
                    f"{100 * degenerate.AUC_CHANCE:g}; below chance: under {100 * (1 - degenerate.AUC_CHANCE):g}). "
                    f"Each such run carries the MLflow tag {degenerate.TAG}.")
"""The footnote of every table with a degenerate row (rules from `pipeline.degenerate`)."""


def _degenerate_notes(table: pd.DataFrame) -> list[str]:
    """One line per row with a degenerate run: which row, how many of its runs, and what their flags say."""
    if "n_degenerate" not in table.columns:
        return []
    rows = table[table["n_degenerate"].fillna(0).astype(int) > 0]
    return [f"{DEGENERATE_MARK} {r['task'].upper()} {r['init']}, {_labels(r['label_fraction'])} labels: "
            f"{r['degenerate']}" for _, r in rows.iterrows()]


def _md_cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").strip()


def _md_failures(failed: pd.DataFrame) -> list[str]:
    lines = ["", "## Failed fine-tunings", ""]
    for _, f in failed.iterrows():
        reason = _md_cell(str(f["error"])) or "no reason recorded"
        fold = "" if pd.isna(f.get("fold", pd.NA)) else f" / fold {int(f['fold'])}"
        lines.append(f"- {f['task']} / {f['init']} / {_labels(f['label_fraction'])} labels{fold} / seed {f['seed']}: "
                     f"{f['status']} (run `{f['run_id']}`): {reason}")
    return lines


def to_markdown(table: pd.DataFrame, failed: pd.DataFrame, baseline: str = "scratch") -> str:
    """One GitHub Markdown table per task (written here: `tabulate` is not a dependency), the published values'
    sources, then the failures with reasons."""
    lines: list[str] = []
    for title, header, rows in _blocks(table, baseline):
        lines += [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    if table.empty:
        lines += ["no fine-tunings", ""]
    lines.append(f"Mean ± sd over the finished runs of a row (its folds x seeds; n runs); p: Student's t-test "
                 f"against {baseline} at the same label fraction ({N_LT_2}: fewer than two runs a side).")
    flagged = _degenerate_notes(table)
    if flagged:
        lines += ["", DEGENERATE_RULES, ""] + [f"- {_md_cell(s)}" for s in flagged]
    sources = _sources(table)
    if sources:
        lines += ["", "Published values (MedIA 2021):", ""] + [f"- {_md_cell(s)}" for s in sources]
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


def _aligned(header: list[str], rows: list[list[str]]) -> list[str]:
    """A text table with padded columns: header, rule, rows (for a monospaced picture)."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return [fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows]


def table_lines(table: pd.DataFrame, baseline: str = "scratch", width: int = 110) -> list[tuple[str, str]]:
    """The picture's text, (line, style: "title" / "body" / "note"): the same blocks as the Markdown, with each
    "not comparable (why)" shortened to "not comparable [k]" and the reasons listed once under the table, and
    every note wrapped to the widest table line (at least `width` characters), so the picture is as wide as its
    tables and no wider."""
    import textwrap

    out: list[tuple[str, str]] = []
    blocks = _blocks(table, baseline)
    reasons: list[str] = []

    def short(cell: str) -> str:
        if not cell.startswith("not comparable (") or not cell.endswith(")"):
            return cell
        why = cell[len("not comparable ("):-1]
        if why not in reasons:
            reasons.append(why)
        return f"not comparable [{reasons.index(why) + 1}]"

    texts = []
    for title, header, rows in blocks:
        texts.append((title, _aligned(header, [[short(c) for c in row] for row in rows])))
    wrap = max([width] + [len(line) for _, body in texts for line in body])
    for k, (title, body) in enumerate(texts):
        out += ([("", "body")] if k else []) + [(title, "title")] + [(line, "body") for line in body]
    notes = [f"p: Student's t-test against {baseline}; {N_LT_2}: fewer than two finished runs a side."]
    notes += [f"[{k + 1}] not comparable: {why}" for k, why in enumerate(reasons)]
    flagged = _degenerate_notes(table)
    if flagged:
        notes += [DEGENERATE_RULES] + flagged
    notes += ["Published (MedIA 2021): " + s for s in _sources(table)]
    out.append(("", "body"))
    for note in notes:
        out += [(line, "note") for line in textwrap.wrap(note, wrap, subsequent_indent="    ")]
    return out


_FONT_PT, _LINE_PT, _CHAR_EM, _MARGIN_PT = 8.0, 10.5, 0.602, 8.0
"""The picture's monospaced text: font size, line pitch, a DejaVu Sans Mono character's width (em), margin."""


def table_figure(table: pd.DataFrame, baseline: str = "scratch"):
    """The results tables as a picture (the MLflow UI shows PNGs inline): monospaced text lines, the figure
    sized to them (width from the longest line, height from the line count), so it holds the table, not white
    space."""
    lines = table_lines(table, baseline) if not table.empty else [("no fine-tunings", "title")]
    chars = max(len(text) for text, _ in lines)
    width_pt = chars * _FONT_PT * _CHAR_EM + 2 * _MARGIN_PT
    height_pt = len(lines) * _LINE_PT + 2 * _MARGIN_PT
    fig = _figure(width_pt / 72, height_pt / 72)
    for i, (text, style) in enumerate(lines):
        y = 1 - (_MARGIN_PT + (i + 0.8) * _LINE_PT) / height_pt
        fig.text(_MARGIN_PT / width_pt, y, text, family="DejaVu Sans Mono", fontsize=_FONT_PT,
                 weight="bold" if style == "title" else "normal", color="#444444" if style == "note" else "black",
                 ha="left", va="baseline")
    return fig


EFFICIENCY_COLUMNS = ["task", "init", "label_fraction", "series", "mean", "error", "error_kind", "n", "degenerate",
                      "y_min", "y_max"]
"""label_efficiency.csv: one row per plotted point. series "ours" (error: sd over the row's runs, 0 with one run)
or "published" (error: the published sd); y_min / y_max: the task panel's axis range."""
PERCENT_RANGE = (0.0, 100.0)
MIN_SPAN = 20.0
"""A panel's y axis: 0-100 % when every plotted value and error bar lies there, else at least this span."""


def _axis_range(means: np.ndarray, errors: np.ndarray) -> tuple[float, float]:
    """0-100 when every mean is a percentage (an error bar past 100 is cut at the frame: the CSV keeps it); for
    a metric outside that (a user task's), mean ± error widened to at least `MIN_SPAN` about its middle, so
    noise never fills the panel."""
    if np.nanmin(means) >= PERCENT_RANGE[0] and np.nanmax(means) <= PERCENT_RANGE[1]:
        return PERCENT_RANGE
    lo, hi = float(np.nanmin(means - errors)), float(np.nanmax(means + errors))
    if hi - lo < MIN_SPAN:
        mid = (hi + lo) / 2
        lo, hi = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
    return lo, hi


def label_efficiency_data(cells: pd.DataFrame, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """The numbers `label_efficiency_figure` plots (columns `EFFICIENCY_COLUMNS`): per (task, init, label
    fraction) the mean and sample sd (%) over the finished runs and how many were degenerate; the published
    value (at 100% labels) only where `table` declares it comparable; each task's y range."""
    if cells.empty:
        return pd.DataFrame(columns=EFFICIENCY_COLUMNS)
    cells = _complete(cells)
    ok = cells.loc[_ok(cells)].assign(pct=lambda c: c["value"].astype(float) * 100.0,
                                      bad=lambda c: [bool(str(f).strip()) and str(f) != "nan"
                                                     for f in c["degenerate"].fillna("")])
    if ok.empty:
        return pd.DataFrame(columns=EFFICIENCY_COLUMNS)
    ours = ok.groupby(GROUP).agg(mean=("pct", "mean"), error=("pct", "std"), n=("pct", "size"),
                                 degenerate=("bad", "sum")).reset_index()
    ours["error"] = ours["error"].fillna(0.0)
    ours = ours.assign(series="ours", error_kind="sd over runs")
    frames = [ours]
    if table is not None and not table.empty:
        pub = table[table["comparable"].eq("yes") & np.isfinite(table["published_mean"].astype(float))]
        if len(pub):
            frames.append(pd.DataFrame({
                "task": pub["task"], "init": pub["init"], "label_fraction": pub["label_fraction"],
                "series": "published", "mean": pub["published_mean"].astype(float),
                "error": pub["published_sd"].astype(float).fillna(0.0), "error_kind": "published sd",
                "n": np.nan, "degenerate": 0}))
    data = pd.concat(frames, ignore_index=True)
    for task, g in data.groupby("task"):
        lo, hi = _axis_range(g["mean"].to_numpy(float), g["error"].to_numpy(float))
        data.loc[g.index, "y_min"], data.loc[g.index, "y_max"] = lo, hi
    data["degenerate"] = data["degenerate"].astype(int)
    order = data.assign(_t=data["task"].map(_task_rank))
    return order.sort_values(["_t", "task", "series", "init", "label_fraction"])[EFFICIENCY_COLUMNS] \
        .reset_index(drop=True)


def label_efficiency_figure(cells: pd.DataFrame, table: pd.DataFrame | None = None):
    """Metric (%) against label fraction, one panel per task and one line per init, error bars ± 1 sd over the
    row's runs (folds x seeds), on a 0-100 % axis; published values (stars) where `table` says they are
    comparable; hollow markers for rows with a degenerate run. The paper's claim is that pretraining helps most
    where labels are few: a difference shows here only if it is larger than the runs' spread."""
    data = label_efficiency_data(cells, table)
    tasks = sorted(data["task"].unique(), key=lambda t: (_task_rank(t), t))
    fig = _figure(4.5 * max(len(tasks), 1), 4.2)
    if not tasks:
        ax = fig.add_subplot()
        ax.axis("off")
        ax.text(0.5, 0.5, "no finished fine-tunings", ha="center", va="center")
        return fig
    inits = sorted(data.loc[data["series"] == "ours", "init"].unique(), key=lambda i: (i != "scratch", i))
    colours = {init: f"C{k % 10}" for k, init in enumerate(inits)}  # one colour per init in every panel
    for k, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), k + 1)
        rows = table[table["task"] == task] if table is not None and not table.empty else None
        _efficiency_panel(ax, task, data[data["task"] == task], rows, colours)
    fig.tight_layout()
    return fig


def _efficiency_panel(ax, task: str, points: pd.DataFrame, rows: pd.DataFrame | None, colours: dict) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator

    ours, pub = points[points["series"] == "ours"], points[points["series"] == "published"]
    for init, g in ours.groupby("init"):
        g = g.sort_values("label_fraction")
        colour = colours[init]
        ax.errorbar(g["label_fraction"], g["mean"], yerr=g["error"], marker="o", capsize=3, label=init, color=colour)
        bad = g[g["degenerate"] > 0]
        if len(bad):
            ax.plot(bad["label_fraction"], bad["mean"], "o", markersize=9, markerfacecolor="white", color=colour,
                    markeredgecolor=colour, label=f"{init}: degenerate {DEGENERATE_MARK}")
    for _, p in pub.iterrows():  # beside our point (x 1.06 on the log axis), in its init's colour
        ax.errorbar([p["label_fraction"] * 1.06], [p["mean"]], yerr=[p["error"]], marker="*", markersize=11,
                    capsize=3, linestyle="none", color=colours.get(p["init"], "black"), markeredgecolor="black",
                    label=f"published {published_kind(p['init'])} (MedIA 2021)")
    if rows is not None and len(pub) == 0 and rows["comparable"].eq("no").any():
        ax.text(0.02, 0.02, "published values not comparable (results.md says why)", transform=ax.transAxes,
                fontsize=6, color="0.35")
    if get_task(task).metrics[0] in ("auc", "keras_mean_iou"):
        ax.axhline(50, color="0.6", linestyle=":", linewidth=1)
        ax.text(0.98, 50, "chance" if get_task(task).metrics[0] == "auc" else "background only ≈ 50",
                transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=6, color="0.45")
    fractions = sorted(points["label_fraction"].unique())
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(fractions))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([_labels(f) for f in fractions])
    if len(fractions) == 1:
        ax.set_xlim(fractions[0] / 1.5, fractions[0] * 1.5)
    ax.set_ylim(float(points["y_min"].iloc[0]), float(points["y_max"].iloc[0]))
    ax.set_xlabel("labelled training data")
    ax.set_ylabel(f"{_metric_name(task)} (%)")
    ax.set_title(f"{task.upper()}: {_metric_name(task)}")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=6, title="mean ± 1 sd over runs (none: 1 run)",
              title_fontsize=6)


# --------------------------------------------------------------------------- files and MLflow artifacts

def write_results(table: pd.DataFrame, failed: pd.DataFrame, cells: pd.DataFrame, directory: str | Path,
                  baseline: str = "scratch") -> dict[str, Path]:
    """results.md, results.csv, cells.csv, results.png, label_efficiency.png and the numbers it plots
    (label_efficiency.csv) into `directory`; returns {file name: path}."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in ("results.md", "results.csv", "cells.csv", "results.png",
                                           "label_efficiency.png", "label_efficiency.csv")}
    paths["results.md"].write_text(to_markdown(table, failed, baseline), encoding="utf-8")
    table.to_csv(paths["results.csv"], index=False)
    cells.to_csv(paths["cells.csv"], index=False)
    table_figure(table, baseline).savefig(paths["results.png"], dpi=120, facecolor="white")
    label_efficiency_data(cells, table).to_csv(paths["label_efficiency.csv"], index=False)
    label_efficiency_figure(cells, table).savefig(paths["label_efficiency.png"], dpi=120, bbox_inches="tight")
    return paths


def log_results(tracking, parent_run_id: str, directory: str | Path, cells: pd.DataFrame | None = None) -> None:
    """The directory's files as artifacts of the parent run under `tables/` (by run id: no active run needed;
    `pipeline.transfer.summary` puts results.md alone at the root, where it sorts first), and the
    `genesis.degenerate` tag on every degenerate fine-tuning of `cells` (default: the directory's cells.csv, as
    `write_results` wrote it); `tracking`: a Tracker or a tracking URI."""
    from pipeline.runtime.tracking import Tracker

    tracker = Tracker.at(tracking)
    tracker.client.log_artifacts(parent_run_id, str(directory), artifact_path="tables")
    if cells is None and (Path(directory) / "cells.csv").is_file():
        cells = pd.read_csv(Path(directory) / "cells.csv", dtype={"degenerate": str, "run_id": str})
    if cells is not None:
        tag_degenerate(tracker, cells)


def tag_degenerate(tracking, cells: pd.DataFrame) -> int:
    """Tag each cell run whose `degenerate` flag is set and whose run lacks it (a run evaluated before the flag
    existed, or by a worker that did not tag) with `genesis.degenerate`; returns how many runs were tagged."""
    from pipeline.runtime.tracking import Tracker

    if cells.empty or "degenerate" not in cells.columns:
        return 0
    tracker, tagged = Tracker.at(tracking), 0
    for run_id, flag in zip(cells["run_id"], cells["degenerate"].fillna("")):
        if not str(flag).strip() or str(flag) == "nan" or not str(run_id).strip():
            continue
        if tracker.run(str(run_id)).data.tags.get(degenerate.TAG) != str(flag):
            tracker.client.set_tag(str(run_id), degenerate.TAG, str(flag))
            tagged += 1
    return tagged
