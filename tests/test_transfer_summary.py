"""The transfer parent run's summary (pipeline.transfer.summary) and the tracker's UI-facing parts
(pipeline.runtime.tracking: the experiment kind, the printed UI hint), against a real SQLite MLflow store."""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from pipeline.runtime.tracking import (EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, RUN_DESCRIPTION_TAG, UI_VIEW_QUERY,
                                       Tracker, ui_command)
from pipeline.tasks.registry import get_task
from pipeline.transfer.summary import DESCRIPTION_LIMIT, metric_key, summarise_parent_run, summary_of
from pipeline.transfer.table import failures, results_table, to_markdown

PRE = "models:/genesis-pretrained@best"


def _cell(task, init, fraction, seed, value, status="FINISHED"):
    return {"cell": f"{task}|{init}|{fraction}|{seed}", "task": task, "init": init, "label_fraction": fraction,
            "seed": seed, "status": status, "error": "" if status == "FINISHED" else "boom",
            "run_id": f"r{seed}", "metric": f"test_{get_task(task).metrics[0]}", "value": value,
            "start_time": pd.Timestamp(1_700_000_000_000 + seed, unit="ms", tz="UTC")}


@pytest.fixture
def cells() -> pd.DataFrame:
    rows = [_cell("ecc", "scratch", 1.0, s, v) for s, v in enumerate((0.80, 0.82, 0.78))]
    rows += [_cell("ecc", "scratch", 0.5, s, v) for s, v in enumerate((0.70, 0.74))]
    rows += [_cell("ecc", PRE, 1.0, s, v) for s, v in enumerate((0.90, 0.88))]
    rows += [_cell("ecc", PRE, 0.5, s, v) for s, v in enumerate((0.95, 0.93))]  # the best row at half labels
    rows += [_cell("ncc", "scratch", 1.0, 0, math.nan, "FAILED"), _cell("ncc", PRE, 1.0, 0, 0.75)]
    return pd.DataFrame(rows)


def test_summary_metrics_params_and_description(cells):
    table = results_table(cells)
    markdown = to_markdown(table, failures(cells))
    s = summary_of(table, markdown)
    assert s.metrics["best/ecc/scratch"] == pytest.approx(80.0)
    assert s.metrics["best/ecc/genesis-pretrained_best"] == pytest.approx(94.0)  # max over fractions, not full labels
    assert s.metrics["best/ncc/genesis-pretrained_best"] == pytest.approx(75.0)
    assert "best/ncc/scratch" not in s.metrics  # a row without a finished run has no mean to show
    assert s.metrics["fine_tunings/finished"] == 10 and s.metrics["fine_tunings/failed"] == 1
    assert s.params == {"fine_tunings": "11"}
    assert s.description.startswith(markdown.strip())  # the table first: what the UI shows before "Show more"
    assert "**Transfer grid: 11 fine-tunings, 10 finished, 1 failed.**" in s.description


def test_metric_keys_are_valid_mlflow_keys(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    run = tracker.create_run("keys", "k")
    inits = ["scratch", PRE, "models:/x/3", "official:/w/Genesis_Chest_CT.pt", "/w/my weights (v2).pt", "/w/...pt"]
    keys = {i: metric_key("ncc", i) for i in inits}
    assert keys["models:/x/3"] == "best/ncc/x-v3" and keys["/w/my weights (v2).pt"] == "best/ncc/my weights _v2_"
    tracker.log_metrics(run, {k: 1.0 for k in keys.values()})  # MLflow refuses an invalid key
    assert set(tracker.run_metrics(run)) == set(keys.values())


def test_two_inits_of_one_short_name_stay_apart(cells):
    other = cells[cells.init == "scratch"].assign(init="/b/genesis-pretrained@best.pt", value=0.5)
    other = other.assign(cell=other["cell"] + "b")
    s = summary_of(results_table(pd.concat([cells, other], ignore_index=True)), "t")
    best = {k: v for k, v in s.metrics.items() if k.startswith("best/ecc/genesis-pretrained_best")}
    assert sorted(best.values()) == [pytest.approx(50.0), pytest.approx(94.0)], best


def test_long_table_is_cut_at_a_line_and_says_where_the_rest_is(cells):
    table = results_table(cells)
    s = summary_of(table, "\n".join(f"| row {k} | {'x' * 60} |" for k in range(400)))
    assert len(s.description) <= DESCRIPTION_LIMIT
    assert "| row 0 |" in s.description and "| row 399 |" not in s.description
    rows = [line for line in s.description.splitlines() if line.startswith("| row")]
    assert all(line.endswith("|") for line in rows)  # cut between lines, not inside one
    assert "the whole table is the artifact `results.md`." in s.description
    assert "**Transfer grid: 11 fine-tunings" in s.description  # the counts survive the cut


def test_summarise_parent_run_writes_the_run(tmp_path, cells):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    parent = tracker.create_run("genesis-transfer", "transfer-tiny")
    table = results_table(cells)
    markdown = to_markdown(table, failures(cells))
    out = tmp_path / "results"
    out.mkdir()
    (out / "results.md").write_text(markdown + "\nfrom the file\n", encoding="utf-8")
    tracker.client.log_artifacts(parent, str(out), artifact_path="tables")  # as table.log_results does
    summarise_parent_run(tracker, parent, table, markdown, out)

    run = tracker.run(parent)
    assert run.data.tags[RUN_DESCRIPTION_TAG].startswith("### ")  # the table (its first task's title)
    assert "**Transfer grid: 11 fine-tunings, 10 finished, 1 failed.**" in run.data.tags[RUN_DESCRIPTION_TAG]
    assert run.data.metrics["best/ecc/genesis-pretrained_best"] == pytest.approx(94.0)
    assert run.data.params["fine_tunings"] == "11"
    assert tracker.read_text(parent, "results.md").endswith("from the file\n")  # the file on disk, at the root
    assert [a.path for a in tracker.client.list_artifacts(parent)] == ["results.md", "tables"]  # results.md first

    # a rerun of the grid reopens the run: the new numbers replace the old, the fixed param stays
    done = cells.assign(status="FINISHED", value=cells["value"].fillna(0.6))
    again = results_table(done)
    summarise_parent_run(tracker, parent, again, to_markdown(again, failures(done)))
    run = tracker.run(parent)
    assert run.data.metrics["fine_tunings/failed"] == 0 and run.data.metrics["best/ncc/scratch"] == pytest.approx(60)
    assert "**Transfer grid: 11 fine-tunings, 11 finished, 0 failed.**" in run.data.tags[RUN_DESCRIPTION_TAG]
    assert tracker.read_text(parent, "results.md") == to_markdown(again, failures(done))


def test_experiments_are_marked_model_training_new_and_old(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    old = client.create_experiment("made-before")  # an experiment of an earlier version: no kind
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    tracker = Tracker(uri)
    for name in ("genesis-pretraining", "made-before", "chosen"):
        tracker.create_run(name, "r")
    kind = {e.name: e.tags.get(EXPERIMENT_KIND_TAG) for e in client.search_experiments()}
    assert kind["genesis-pretraining"] == kind["made-before"] == MODEL_TRAINING_KIND
    assert kind["chosen"] == "genai_development"  # a kind someone chose is theirs
    assert tracker.ensure_experiment("made-before") == old and tracker.ensure_experiment("chosen") == chosen


def test_ui_hint_names_the_runs_view_and_a_runnable_command(tmp_path):
    folder = tmp_path / "a folder"  # a space: the printed command must quote it
    folder.mkdir()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(uri)
    run = tracker.create_run("genesis-pretraining", "r")
    exp = tracker.run(run).info.experiment_id
    lines = tracker.ui_hint(run).splitlines()
    assert lines[0] == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run}?{UI_VIEW_QUERY}"
    assert lines[1].endswith(f"/#/experiments/{exp}/runs?{UI_VIEW_QUERY}")
    cmd = lines[2].split("open the UI with: ", 1)[1]
    argv = shlex.split(cmd)
    assert argv[0] == str(Path(sys.executable).parent / "mlflow") and os.access(argv[0], os.X_OK)
    assert argv[1:4] == ["ui", "--backend-store-uri", uri]
    assert Tracker("http://mlflow.example:5000").ui_base() == "http://mlflow.example:5000"

    # that it serves the UI as printed: tests/test_mlflow_ui.py starts the UI with it


def test_ui_command_falls_back_to_the_module_form(tmp_path, monkeypatch):
    python = tmp_path / "bin" / "python3"  # a Python with no mlflow executable beside it
    python.parent.mkdir()
    monkeypatch.setattr(sys, "executable", str(python))
    assert shlex.split(ui_command("sqlite:////x y/m.db")) == [str(python), "-m", "mlflow", "ui", "--backend-store-uri",
                                                              "sqlite:////x y/m.db", "--port", "5000"]
