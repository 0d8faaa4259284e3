"""Pretraining that reads its cubes from a bucket and keeps its checkpoints there (the moto S3 server of
tests/s3_server.py, a real S3 API over HTTP): the patch store is extracted into the bucket, Ray Train writes the
checkpoints through pyarrow's S3 filesystem, a killed worker restarts from them, and `--resume` continues the
run from the bucket alone. A storage path that cannot be used is one line, exit 2,
before an MLflow run or Ray exists."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from conftest import one_line_error, write_mhd
from s3_server import KEYS, new_bucket

from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.extract import extract_pretrain
from pipeline.storage.objects import StorageError
from pipeline.training.config import tiny
from pipeline.training.pretrain import RUN_FILE, pretrain
from pipeline.volume_store.convert import convert

CUBE = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=8, border_yx=4, border_z=2, min_slices=16)


@pytest.fixture(scope="module")
def data_bucket(s3_server) -> str:
    return new_bucket(s3_server, "genesis-data")


@pytest.fixture(scope="module")
def patch_store(tmp_path_factory, data_bucket) -> str:
    """A tiny pretraining patch store (5 scans of 24x48x48, 16-voxel cubes, as tests/test_pretrain.py builds it),
    extracted into the bucket: its s3:// URL."""
    root = tmp_path_factory.mktemp("s3_pretrain_data")
    rng = np.random.default_rng(0)
    for i, subset in enumerate([0, 1, 2, 3, 5]):
        vol = np.full((24, 48, 48), 40, dtype=np.int16)
        vol[:, :, :28] = -850
        vol = (vol + rng.normal(0, 10, vol.shape)).astype(np.int16)
        write_mhd(root / "src" / f"subset{subset}" / f"1.2.{i}.mhd", vol)
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    url = str(extract_pretrain(str(root / "vs"), CUBE, out_root=f"s3://{data_bucket}/patch_stores", workers=1,
                               progress=False).path)
    assert url.startswith(f"s3://{data_bucket}/patch_stores/pretrain-")
    return url


def _config(**kw):
    return tiny().with_overrides(**{"base_channels": 2, "batch_size": 4, "steps_per_epoch": 2, "val_cubes": 4,
                                    "read_block": 8, "figure_cubes": 1, "patience": 10, **kw})


def _keys(s3_server, bucket: str, prefix: str = "") -> list[str]:
    client = s3_server.client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def _steps(client, run_id: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.timestamp)]


def test_checkpoints_in_a_bucket_survive_a_killed_worker_and_resume(ray_local, patch_store, s3_server, bucket,
                                                                    tmp_path, capsys):
    from pipeline.cli import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"s3://{bucket}/ray"  # checkpoints in another bucket than the cubes
    marker = tmp_path / "killed"
    res = pretrain(patch_store, _config(epochs=2), workers=1, tracking_uri=uri, storage_path=storage,
                   name="bucketed", register_as="genesis-test-s3", system_metrics=False,
                   fault_injection={"rank": 0, "epoch": 0, "marker": str(marker)})
    assert marker.exists(), "the worker was not killed"
    assert res.error is None, res.error
    assert res.path == f"{storage}/bucketed"
    client = mlflow.MlflowClient(tracking_uri=uri)
    # the kill came after epoch 0's checkpoint reached the bucket: the restarted worker read it and went on at 1
    assert _steps(client, res.mlflow_run_id) == [0, 1]
    keys = _keys(s3_server, bucket, "ray/bucketed/")
    assert f"ray/bucketed/{RUN_FILE}" in keys
    states = sorted(k for k in keys if k.endswith("/state.pt"))
    assert states and all(k.startswith("ray/bucketed/checkpoint_") for k in states), keys

    # --resume finds the run in the bucket (its run file and its latest checkpoint) and trains one more epoch
    code = main(["pretrain", "--patches", patch_store, "--preset", "tiny", "--epochs", "3", "--workers", "1",
                 "--storage-path", storage, "--resume"])
    out = capsys.readouterr()
    assert code == 0, out
    assert _steps(client, res.mlflow_run_id) == [0, 1, 2]
    assert len(client.search_runs([client.get_experiment_by_name("genesis-pretraining").experiment_id])) == 1
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["patches.path"] == patch_store
    assert f"checkpoints: {storage}/bucketed" in out.out

    # no key of the bucket's credentials was written anywhere in it (Ray pickles the filesystem it is given)
    s3 = s3_server.client()
    for key in _keys(s3_server, bucket):
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert KEYS["AWS_SECRET_ACCESS_KEY"].encode() not in body, key


@pytest.mark.parametrize("url, needle", [("s3://genesis-no-such-bucket-zz/ray", "does not exist"),
                                         ("s3:///ray", "no bucket"), ("gs://b/ray", "unknown scheme")])
def test_an_unusable_storage_path_is_one_line_before_anything_is_written(patch_store, s3_server, tmp_path, url,
                                                                         needle, capsys):
    from pipeline.cli import main

    with pytest.raises(StorageError, match=needle):
        pretrain(patch_store, _config(epochs=1), workers=1, tracking_uri=f"sqlite:///{tmp_path}/a.db",
                 storage_path=url)
    db = tmp_path / "b.db"
    code = main(["pretrain", "--patches", patch_store, "--preset", "tiny", "--workers", "1",
                 "--tracking-uri", f"sqlite:///{db}", "--storage-path", url])
    assert code == 2
    one_line_error(capsys.readouterr().err, url.rstrip("/").split("://")[0] + "://", needle)
    assert not (tmp_path / "a.db").exists() and not db.exists()
