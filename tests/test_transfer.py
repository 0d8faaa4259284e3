"""The transfer grid for real: a `genesis transfer` process (Ray Tune over Ray Train on the session's Ray,
MLflow on SQLite) on 2 tasks x 3 inits, killed once a fine-tuning has finished, then rerun: finished
fine-tunings are reused, the table is complete, the init that cannot load is reported and never retried."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from conftest import assert_no_test_patient_in_training

from pipeline.models.unet3d import UNet3D
from pipeline.patches.store import PatchStore
from pipeline.transfer.grid import GridConfig, cells_of, group_cells, grid_key

ROOT = Path(__file__).resolve().parents[1]


def test_grid_cells_keys_and_groups():
    grid = GridConfig(tasks=("ecc", "lcs"), inits=("scratch", "a.pt"), seeds=(0, 1), label_fractions=(0.5, 1.0))
    cells = cells_of(grid, {"ecc": "k1", "lcs": "k2"})
    assert len(cells) == 16 and len({c.key for c in cells}) == 16
    again = cells_of(grid, {"ecc": "k1", "lcs": "k2"})
    assert [c.key for c in again] == [c.key for c in cells] and grid_key(again) == grid_key(cells)
    # another store content for one task changes that task's cells and the grid, not the other task's
    other = cells_of(grid, {"ecc": "k1", "lcs": "k3"})
    assert [c.key for c in other][:8] == [c.key for c in cells][:8] and grid_key(other) != grid_key(cells)
    groups = group_cells(cells, 3)
    assert [len(g) for g in groups] == [3, 3, 2, 3, 3, 2] and all(len({c.task for c in g}) == 1 for g in groups)
    with pytest.raises(ValueError, match="label_fractions"):
        GridConfig(tasks=("ecc",), label_fractions=(0.0,))
    with pytest.raises(ValueError, match="duplicates"):
        GridConfig(tasks=("ecc", "ecc"))


def _client(uri):
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _children(client, status=None):
    exp = client.get_experiment_by_name("genesis-transfer")
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`genesis.cell` != ''", max_results=1000)
    return [r for r in runs if status is None or r.info.status == status]


def _genesis(args, ray_address, log):
    cmd = [sys.executable, "-m", "pipeline.cli", "transfer", *args, "--ray-address", ray_address]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})


def test_transfer_killed_mid_grid_then_rerun(ray_local, task_stores, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    torch.manual_seed(7)  # not the scratch seed: the pretrained init must differ from scratch
    torch.save(UNet3D(base_channels=4).state_dict(), tmp_path / "pre.pt")
    stores_root = Path(task_stores["ecc"]).parent
    args = ["--tasks", "ecc,lcs", "--patches", str(stores_root),
            "--inits", f"scratch,{tmp_path / 'pre.pt'},{tmp_path / 'missing.pt'}", "--seeds", "0",
            "--label-fractions", "1.0", "--test-fold", "1", "--epochs", "2", "--max-concurrent", "2",
            "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray"), "--results", str(tmp_path / "results")]
    address = ray_local.get_runtime_context().gcs_address
    client = _client(uri)

    with open(tmp_path / "first.log", "w") as log:
        proc = _genesis(args, address, log)
        try:
            deadline = time.time() + 300
            while time.time() < deadline and proc.poll() is None and not _children(client, "FINISHED"):
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    first = {r.data.tags["genesis.cell"]: r.info.run_id for r in _children(client, "FINISHED")}
    assert first, (tmp_path / "first.log").read_text(encoding="utf-8")[-3000:]
    assert len(first) < 4, "the grid finished before it could be killed"

    with open(tmp_path / "second.log", "w") as log:
        rerun = _genesis(args, address, log)
        assert rerun.wait(timeout=600) == 1, (tmp_path / "second.log").read_text(encoding="utf-8")[-3000:]  # 1: two failed cells
    out = (tmp_path / "second.log").read_text(encoding="utf-8")
    assert f"{len(first)} already finished" in out, out[-3000:]

    finished = _children(client, "FINISHED")
    by_cell = {}
    for r in finished:
        by_cell.setdefault(r.data.tags["genesis.cell"], []).append(r.info.run_id)
    assert len(by_cell) == 4 and all(len(v) == 1 for v in by_cell.values()), by_cell  # no fine-tuning ran twice
    assert all(by_cell[k] == [v] for k, v in first.items())  # the first attempt's runs are the ones kept
    # the interrupted attempt's unfinished runs were closed as KILLED with a reason, none left RUNNING
    assert not _children(client, "RUNNING")
    assert all("interrupted" in r.data.tags.get("error", "") for r in _children(client, "KILLED"))

    table = pd.read_csv(tmp_path / "results" / "results.csv")
    assert len(table) == 6 and set(table["task"]) == {"ecc", "lcs"}
    ok = table[~table["init"].str.endswith("missing.pt")]
    assert (ok["n"] == 1).all() and (ok["failed"] == 0).all() and ok["mean"].between(0, 100).all()
    bad = table[table["init"].str.endswith("missing.pt")]
    assert (bad["n"] == 0).all() and (bad["failed"] == 1).all()
    md = (tmp_path / "results" / "results.md").read_text(encoding="utf-8")
    assert "missing.pt" in md and "not 'scratch'" in md  # the reason, from the failed run's tag
    # the deterministic failure was reported before Ray, once per attempt, never retried by Ray Train
    failed = _children(client, "FAILED")
    assert {r.data.tags["task"] for r in failed} == {"ecc", "lcs"}
    assert all(r.data.tags["init"].endswith("missing.pt") and not r.data.metrics for r in failed)

    # ECC's store holds three folds; --test-fold 1 ran one: every ECC run records it, as a tag and a param
    for r in _children(client):
        assert r.data.tags["genesis.entry_point"] == "genesis transfer"
        if r.data.tags["task"] == "ecc":
            assert r.data.tags["fold"] == r.data.params["fold"] == "1"
        else:
            assert "fold" not in r.data.tags

    parent_id = finished[0].data.tags["mlflow.parentRunId"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["genesis.attempts"] == "2"
    names = {a.path for a in client.list_artifacts(parent_id, "tables")}
    assert {"tables/results.md", "tables/results.csv", "tables/results.png",
            "tables/label_efficiency.png", "tables/label_efficiency.csv"} <= names
    assert [a.path for a in client.list_artifacts(parent_id)][0] == "results.md"  # the table, first
    assert parent.data.tags["mlflow.note.content"].startswith("### ")  # the description is the table
    shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "transfer", "show", parent_id,
                            "--tracking-uri", uri], cwd=ROOT, capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert shown.returncode == 0 and shown.stdout.strip() == md.strip(), shown.stderr[-2000:]

    # champion: per task the best finished fine-tuning's registered version
    for task in ("ecc", "lcs"):
        champion = client.get_model_version_by_alias(f"genesis-{task}", "champion")
        runs = [r for r in finished if r.data.tags["task"] == task]
        metric = "test_auc" if task == "ecc" else "test_keras_mean_iou"
        best = max(r.data.metrics[metric] for r in runs)
        assert [r.data.metrics[metric] for r in runs if r.info.run_id == champion.tags["run_id"]] == [best]
    # no test patient in any fine-tuning's training data (from its logged rows and the store)
    for r in finished:
        rows = json.loads(Path(client.download_artifacts(r.info.run_id, "data/training_rows.json",
                                                         str(tmp_path))).read_text(encoding="utf-8"))
        assert_no_test_patient_in_training(task_stores[r.data.tags["task"]], rows)
        assert r.data.tags["patch_store"] == PatchStore(task_stores[r.data.tags["task"]]).key
