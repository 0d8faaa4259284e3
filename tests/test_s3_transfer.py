"""The transfer grid with its task store and its Ray storage in a bucket (issue 20).

The smallest grid tests/test_transfer_concurrency.py runs (NCS, scratch, one seed, one epoch, the session's
local Ray, MLflow on SQLite) twice as real `genesis transfer` processes: once on disk (the session's NCS task
store, `--storage-path` and `--results` in folders), once with the same task store extracted into a bucket of the
session's moto server (`--patches s3://BUCKET/ps`, found there as `task-ncs-*`) and `--storage-path s3://...`,
without `--results`, so the result files go under the storage path in the bucket. Nothing of S3, Ray or MLflow is
mocked. Both finish; the bucket run's Ray Tune experiment, its trial's checkpoint and the result files are objects
in the bucket (listed with boto3), and its table has the local run's shape: same columns, same rows, one finished fine-tuning each.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from conftest import TASK_CUBE

from pipeline.patches.store import PatchStore

ROOT = Path(__file__).resolve().parents[1]
RESULT_FILES = {"results.md", "results.csv", "results.png", "label_efficiency.png", "label_efficiency.csv",
                "cells.csv"}


def _transfer(args: list[str], ray_address: str, log: Path) -> tuple[int, str]:
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "transfer", *args, "--ray-address", ray_address],
                              cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=480,
                              env={**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    return proc.returncode, log.read_text(encoding="utf-8", errors="replace")


def _keys(s3_server, bucket: str, prefix: str = "") -> list[str]:
    keys = []
    for page in s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return sorted(keys)


def test_a_grid_on_a_task_store_in_a_bucket_with_storage_in_a_bucket(ray_local, task_stores, s3_server, bucket,
                                                                      tmp_path):
    from pipeline.patches.task_extract import extract_task
    from pipeline.tasks import get_task

    volumes = Path(task_stores["ncs"]).parents[1] / "lidc_vs"  # the volume store the session's NCS store came from
    spec = get_task("ncs").with_overrides(cube_size=TASK_CUBE)
    remote = extract_task(str(volumes), spec, out_root=f"s3://{bucket}/ps", workers=1, progress=False)
    assert str(remote.path).startswith(f"s3://{bucket}/ps/task-ncs-")
    assert PatchStore(str(remote.path)).key == PatchStore(task_stores["ncs"]).key  # the same content as on disk

    address = ray_local.get_runtime_context().gcs_address
    grid = ["--tasks", "ncs", "--inits", "scratch", "--seeds", "0", "--epochs", "1"]
    code, out = _transfer([*grid, "--patches", f"ncs={task_stores['ncs']}",
                           "--tracking-uri", f"sqlite:///{tmp_path}/local.db",
                           "--storage-path", str(tmp_path / "ray"), "--results", str(tmp_path / "results")],
                          address, tmp_path / "local.log")
    assert code == 0, out[-3000:]
    local = pd.read_csv(tmp_path / "results" / "results.csv")

    storage = f"s3://{bucket}/ray"
    code, out = _transfer([*grid, "--patches", f"s3://{bucket}/ps", "--tracking-uri",
                           f"sqlite:///{tmp_path}/s3.db", "--storage-path", storage], address, tmp_path / "s3.log")
    assert code == 0, out[-3000:]
    assert "1 fine-tunings, 0 already finished" in out and "1 finished" in out, out[-3000:]
    assert not (ROOT / "s3:").exists() and not (tmp_path / "s3:").exists()  # no URL taken for a local path

    keys = _keys(s3_server, bucket, "ray/")
    (tuner,) = [k for k in keys if k.endswith("/tuner.pkl")]  # one Tune experiment: transfer-<parent>-a1
    name = tuner.split("/")[1]
    assert name.startswith("transfer-") and name.endswith("-a1"), keys
    results = f"ray/{name}/results/"
    assert {k[len(results):] for k in keys if k.startswith(results)} == RESULT_FILES, keys
    assert f"{storage}/{name}/results" in out  # the report names where the results are
    assert any(k.startswith(f"ray/{name}/experiment_state-") for k in keys), keys  # Tune's state, to resume
    # the trial's Ray Train run keeps its checkpoint beside it: transfer-<parent>-a1-ncs-g0
    assert any(k.startswith(f"ray/{name}-ncs-g0/checkpoint_") and k.endswith("/state.pt") for k in keys), keys
    body = s3_server.client().get_object(Bucket=bucket, Key=f"{results}results.csv")["Body"].read()
    table = pd.read_csv(io.BytesIO(body))

    assert list(table.columns) == list(local.columns)
    assert table.shape == local.shape == (1, len(local.columns))
    same = ["task", "init", "n", "failed"]
    assert table[same].to_dict("records") == local[same].to_dict("records")
    assert table.loc[0, "n"] == 1 and table.loc[0, "failed"] == 0 and 0 <= table.loc[0, "mean"] <= 100
