"""The transfer grid's results table: statistics recomputed by hand, published numbers placed, failures
listed, files written, and the MLflow reader against a real SQLite store."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.tasks.registry import get_task
from pipeline.transfer.table import (CELL_COLUMNS, TABLE_COLUMNS, cells_from_mlflow, failures, label_efficiency_figure,
                                     log_results, published_kind, results_table, to_markdown, write_results)

PRE = "models:/genesis-pretrained@best"
SCRATCH_1 = [0.80, 0.82, 0.78]
PRE_1 = [0.90, 0.88, 0.91]
SCRATCH_HALF = [0.70, 0.74, 0.69]
PRE_HALF = [0.85, 0.80, 0.86]


def _cell(task, init, fraction, seed, value, status="FINISHED", error=""):
    return {"cell": f"{task}|{init}|{fraction}|{seed}", "task": task, "init": init, "label_fraction": fraction,
            "seed": seed, "status": status, "error": error, "run_id": f"r-{init[-4:]}-{fraction}-{seed}",
            "metric": f"test_{get_task(task).metrics[0]}", "value": value,
            "start_time": pd.Timestamp(1_700_000_000_000 + seed, unit="ms", tz="UTC")}


@pytest.fixture
def cells() -> pd.DataFrame:
    rows = []
    for init, by_fraction in (("scratch", {1.0: SCRATCH_1, 0.5: SCRATCH_HALF}), (PRE, {1.0: PRE_1, 0.5: PRE_HALF})):
        for fraction, values in by_fraction.items():
            rows += [_cell("ecc", init, fraction, s, v) for s, v in enumerate(values)]
    rows.append(_cell("ecc", "scratch", 0.5, 3, math.nan, "FAILED", "CUDA out of memory at epoch 3"))
    rows.append(_cell("ecc", PRE, 1.0, 3, math.nan))  # finished without its metric: a failure too
    rows += [_cell("ncc", "scratch", 1.0, 0, math.nan, "KILLED", "preempted"),  # a group with failures only
             _cell("ncc", PRE, 1.0, 0, 0.95)]
    return pd.DataFrame(rows)


def _row(table, task, init, fraction):
    hit = table[(table.task == task) & (table.init == init) & (table.label_fraction == fraction)]
    assert len(hit) == 1
    return hit.iloc[0]


def _student_p(a, b) -> float:
    """Two-sided p of Student's pooled-variance t statistic, written out (independent of ttest_ind)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    na, nb = len(a), len(b)
    pooled = ((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2)
    t = (a.mean() - b.mean()) / math.sqrt(pooled * (1 / na + 1 / nb))
    return 2 * stats.t.sf(abs(t), na + nb - 2)


def test_results_table_statistics_in_percent(cells):
    table = results_table(cells)
    assert list(table.columns) == TABLE_COLUMNS
    for init, fraction, values in (("scratch", 1.0, SCRATCH_1), (PRE, 1.0, PRE_1), ("scratch", 0.5, SCRATCH_HALF),
                                   (PRE, 0.5, PRE_HALF)):
        r = _row(table, "ecc", init, fraction)
        pct = [100 * v for v in values]
        assert r["n"] == 3
        assert r["mean"] == pytest.approx(sum(pct) / 3, abs=1e-12)
        assert r["sd"] == pytest.approx(math.sqrt(sum((x - sum(pct) / 3) ** 2 for x in pct) / 2), abs=1e-12)
        assert r["metric"] == "AUC"
    assert _row(table, "ecc", PRE, 1.0)["p_vs_baseline"] == pytest.approx(_student_p(PRE_1, SCRATCH_1), rel=1e-10)
    assert _row(table, "ecc", PRE, 0.5)["p_vs_baseline"] == pytest.approx(_student_p(PRE_HALF, SCRATCH_HALF),
                                                                          rel=1e-10)
    assert math.isnan(_row(table, "ecc", "scratch", 1.0)["p_vs_baseline"])
    # n < 2 on a side: no test; n == 1: no sd
    ncc_pre = _row(table, "ncc", PRE, 1.0)
    assert ncc_pre["n"] == 1 and math.isnan(ncc_pre["sd"]) and math.isnan(ncc_pre["p_vs_baseline"])


def test_failed_counts_and_failure_list(cells):
    table = results_table(cells)
    assert _row(table, "ecc", "scratch", 0.5)["failed"] == 1
    assert _row(table, "ecc", PRE, 1.0)["failed"] == 1 and _row(table, "ecc", PRE, 1.0)["n"] == 3
    assert _row(table, "ecc", "scratch", 1.0)["failed"] == 0
    only_failed = _row(table, "ncc", "scratch", 1.0)
    assert only_failed["n"] == 0 and only_failed["failed"] == 1 and math.isnan(only_failed["mean"])
    failed = failures(cells)
    assert len(failed) == 3 == table["failed"].sum()
    reasons = dict(zip(failed["status"] + ":" + failed["task"], failed["error"]))
    assert reasons["FAILED:ecc"] == "CUDA out of memory at epoch 3"
    assert reasons["KILLED:ncc"] == "preempted"
    assert reasons["FINISHED:ecc"] == "finished without test_auc"


def test_published_only_at_full_labels_for_the_right_init(cells):
    table = results_table(cells)
    spec = get_task("ecc").published
    assert tuple(_row(table, "ecc", "scratch", 1.0)[["published_mean", "published_sd"]]) == spec.scratch
    assert tuple(_row(table, "ecc", PRE, 1.0)[["published_mean", "published_sd"]]) == spec.genesis
    for init in ("scratch", PRE):
        assert _row(table, "ecc", init, 0.5)[["published_mean", "published_sd"]].isna().all()
    assert tuple(_row(table, "ncc", PRE, 1.0)[["published_mean", "published_sd"]]) == get_task("ncc").published.genesis


@pytest.mark.parametrize("init, kind", [("scratch", "scratch"), ("official:/w/Genesis_Chest_CT.pt", "genesis"),
                                        ("models:/genesis-pretrained/3", "genesis"), ("models:/mine@best", "genesis"),
                                        ("/w/genesis_chest_ct.pt", "genesis"),
                                        ("/w/resnet_medicalnet.pt", "medicalnet"), ("/w/other.pt", None)])
def test_published_kind(init, kind):
    assert published_kind(init) == kind


def test_order_registry_tasks_then_baseline_first(cells):
    table = results_table(cells)
    assert list(table["task"].drop_duplicates()) == ["ncc", "ecc"]  # registry order, not alphabetical
    ecc = table[table.task == "ecc"]
    assert list(zip(ecc.init, ecc.label_fraction)) == [("scratch", 0.5), ("scratch", 1.0), (PRE, 0.5), (PRE, 1.0)]


def test_markdown(cells):
    table, failed = results_table(cells), failures(cells)
    md = to_markdown(table, failed)
    lines = md.splitlines()
    # one table per task, registry order, each header naming its metric and the published one
    assert [line for line in lines if line.startswith("### ")] == [
        "### NCC: lung nodule false-positive reduction", "### ECC: pulmonary embolism false-positive reduction"]
    header = "| init | labels | AUC over candidates (%) | n | folds | p vs scratch | published AUC (%) | failed |"
    assert lines.count(header) == 2
    ecc = lines[lines.index("### ECC: pulmonary embolism false-positive reduction"):]
    assert sum(line.startswith("| scratch |") or line.startswith(f"| {PRE} |") for line in ecc[:8]) == 4
    pre_full = next(line for line in ecc if line.startswith(f"| {PRE} | 100% |"))
    r = _row(table, "ecc", PRE, 1.0)
    assert f"{r['mean']:.2f} ± {r['sd']:.2f}" in pre_full and f"{r['p_vs_baseline']:.3g}" in pre_full
    # the fixture's runs carry no protocol record (older runs): never beside the published value
    assert "not comparable (" in pre_full and "no protocol record on the run" in pre_full and "87.20" not in pre_full
    assert "| scratch | 50% | " in md
    assert "| scratch | 100% | - | 0 | - | - | not comparable (" in md  # NCC scratch: failures only
    assert f"| {PRE} | 100% | 95.00 | 1 | - | n<2 | not comparable (" in md
    # every published value is listed with its source
    assert "Published values (MedIA 2021):" in md
    for kind, value in (("scratch", "80.36 ± 3.58"), ("genesis", "87.20 ± 2.87")):
        listed = next(line for line in lines if line.startswith(f"- ECC {kind} "))
        assert value in listed and get_task("ecc").published.sources[kind][:30] in listed
    assert "## Failed fine-tunings" in md and "CUDA out of memory at epoch 3" in md and "preempted" in md
    assert "Failed fine-tunings" not in to_markdown(table, failed.iloc[:0])


def test_files_written_and_csv_round_trip(cells, tmp_path):
    table, failed = results_table(cells), failures(cells)
    paths = write_results(table, failed, cells, tmp_path / "out")
    assert set(paths) == {"results.md", "results.csv", "cells.csv", "results.png", "label_efficiency.png",
                          "label_efficiency.csv"}
    for path in paths.values():
        assert path.is_file() and path.stat().st_size > 0
    for png in ("results.png", "label_efficiency.png"):
        assert paths[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pd.testing.assert_frame_equal(pd.read_csv(paths["results.csv"]), table.replace({"": np.nan}), check_dtype=False)
    assert len(pd.read_csv(paths["cells.csv"])) == len(cells)
    assert "±" in paths["results.md"].read_text(encoding="utf-8")


def test_label_efficiency_figure_panels(cells):
    fig = label_efficiency_figure(cells)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["NCC: AUC", "ECC: AUC"]
    ecc = fig.axes[1]
    assert [t.get_text() for t in ecc.get_xticklabels()] == ["50%", "100%"]
    assert {t.get_text() for t in ecc.get_legend().get_texts()} == {"scratch", PRE}


def test_empty_inputs():
    empty = pd.DataFrame(columns=CELL_COLUMNS)
    assert results_table(empty).empty and failures(empty).empty
    assert to_markdown(results_table(empty), failures(empty)).startswith("no fine-tunings")
    label_efficiency_figure(empty)


# --------------------------------------------------------------------------- a real MLflow store

def _child(client, exp_id, parent_id, *, cell, task, init, fraction, seed, start, status, auc=None, error=None):
    tags = {"mlflow.parentRunId": parent_id, "genesis.cell": cell, "task": task, "init": init,
            "label_fraction": str(fraction), "seed": str(seed), "preset": "paper", "freeze_encoder": "False"}
    if error:
        tags["error"] = error
    run = client.create_run(exp_id, start_time=start, tags=tags)
    if auc is not None:
        client.log_metric(run.info.run_id, "test_auc", auc)
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status, end_time=start + 1000)
    return run.info.run_id


def test_cells_from_mlflow_and_log_results(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = client.create_experiment("transfer", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp_id, run_name="grid").info.run_id
    other_parent = client.create_run(exp_id, run_name="other grid").info.run_id
    t0 = 1_700_000_000_000
    kw = dict(task="ecc", init="scratch", fraction=1.0)
    failed_old = _child(client, exp_id, parent, cell="c0", seed=0, start=t0, status="FAILED", error="NaN loss", **kw)
    finished_new = _child(client, exp_id, parent, cell="c0", seed=0, start=t0 + 10, status="FINISHED", auc=0.81, **kw)
    finished_older = _child(client, exp_id, parent, cell="c1", seed=1, start=t0, status="FINISHED", auc=0.79, **kw)
    failed_newer = _child(client, exp_id, parent, cell="c1", seed=1, start=t0 + 10, status="FAILED", error="x", **kw)
    killed = _child(client, exp_id, parent, cell="c2", seed=2, start=t0, status="KILLED", error="preempted", **kw)
    _child(client, exp_id, other_parent, cell="c3", seed=3, start=t0, status="FINISHED", auc=0.5, **kw)

    cells = cells_from_mlflow(uri, parent, page_size=2)  # several pages
    assert list(cells.columns) == CELL_COLUMNS
    by_cell = cells.set_index("cell")
    assert list(by_cell.index) == ["c0", "c1", "c2"]  # one per cell, the other parent's child left out
    assert by_cell.loc["c0", "run_id"] == finished_new and by_cell.loc["c0", "status"] == "FINISHED"
    assert by_cell.loc["c1", "run_id"] == finished_older  # a finished run beats a newer failed rerun
    assert {failed_old, failed_newer}.isdisjoint(cells["run_id"])
    assert by_cell.loc["c0", "value"] == pytest.approx(0.81) and by_cell.loc["c0", "error"] == ""
    assert by_cell.loc["c2", "run_id"] == killed and by_cell.loc["c2", "error"] == "preempted"
    assert math.isnan(by_cell.loc["c2", "value"])
    assert by_cell.loc["c0", "metric"] == "test_auc" and by_cell.loc["c0", "label_fraction"] == 1.0
    assert cells["seed"].tolist() == [0, 1, 2]

    table = results_table(cells)
    assert table.iloc[0]["n"] == 2 and table.iloc[0]["failed"] == 1

    paths = write_results(table, failures(cells), cells, tmp_path / "results")
    log_results(uri, parent, tmp_path / "results")
    logged = {a.path for a in client.list_artifacts(parent, "tables")}
    assert logged == {f"tables/{name}" for name in paths}
    assert not (tmp_path / "mlruns").exists()


def test_degenerate_cells_are_read_from_their_metrics_and_tagged_on_their_runs(tmp_path):
    """A cell whose logged metrics say "background only" is flagged in the cells frame and the table even when its
    run carries no tag (logged before the flag existed); `log_results` then tags it; a learnt cell is left alone."""
    from mlflow import MlflowClient

    from pipeline.degenerate import TAG

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp_id = client.create_experiment("transfer", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = client.create_run(exp_id, run_name="grid").info.run_id
    runs = {}
    for seed, (miou, dice) in enumerate([(0.4985, 0.0), (0.81, 0.62)]):
        tags = {"mlflow.parentRunId": parent, "genesis.cell": f"c{seed}", "task": "ncs", "init": "scratch",
                "label_fraction": "1.0", "seed": str(seed), "preset": "tiny", "freeze_encoder": "False"}
        run_id = client.create_run(exp_id, start_time=1_700_000_000_000 + seed, tags=tags).info.run_id
        metrics = {"test_keras_mean_iou": miou, "test_dice_pooled": dice, "test_n_pred": 0.0 if dice == 0 else 900.0,
                   "test_n_true": 1000.0}
        for key, value in metrics.items():
            client.log_metric(run_id, key, value)
        client.set_terminated(run_id, status="FINISHED")
        runs[seed] = run_id

    cells = cells_from_mlflow(uri, parent).set_index("cell")
    assert cells.loc["c0", "degenerate"].startswith("background only: foreground Dice 0.00")
    assert cells.loc["c1", "degenerate"] == ""
    table = results_table(cells.reset_index())
    assert table.iloc[0]["n_degenerate"] == 1 and table.iloc[0]["degenerate"].startswith("1 of 2 runs: background")

    write_results(table, failures(cells.reset_index()), cells.reset_index(), tmp_path / "results")
    log_results(uri, parent, tmp_path / "results")
    assert client.get_run(runs[0]).data.tags[TAG] == cells.loc["c0", "degenerate"]
    assert TAG not in client.get_run(runs[1]).data.tags
