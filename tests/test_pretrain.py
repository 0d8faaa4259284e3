"""Pretraining on a real local Ray (2 workers) with a real MLflow (SQLite): learning, records, restarts."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch
from conftest import write_mhd

from pipeline.model_io.load import load_model
from pipeline.models.unet3d import UNet3D
from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.extract import extract_pretrain
from pipeline.patches.store import PatchStore
from pipeline.training.checkpoint import load_state
from pipeline.training.config import preset, tiny
from pipeline.training.pretrain import pretrain
from pipeline.training.steps import build_model, build_optimizer, train_epoch
from pipeline.volume_store.convert import convert

CUBE = PretrainPatchConfig(cube_size=(16, 16, 16), per_scan=8, border_yx=4, border_z=2, min_slices=16)


@pytest.fixture(scope="session")
def patch_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_data")
    rng = np.random.default_rng(0)
    for i, subset in enumerate([0, 1, 2, 3, 5]):
        vol = np.full((24, 48, 48), 40, dtype=np.int16)
        vol[:, :, :28] = -850
        yy, xx = np.mgrid[0:48, 0:48]
        vol[:, (yy - 20) ** 2 + (xx - 12) ** 2 < 16] = 40  # a vessel to restore
        vol = (vol + rng.normal(0, 10, vol.shape)).astype(np.int16)
        write_mhd(root / "src" / f"subset{subset}" / f"1.2.{i}.mhd", vol)
    assert convert([str(root / "src")], str(root / "vs"), workers=1, progress=False).ok
    return str(extract_pretrain(str(root / "vs"), CUBE, out_root=str(root / "ps"), workers=1, progress=False).path)


def _config(**kw):
    return tiny().with_overrides(**{"base_channels": 2, "batch_size": 4, "steps_per_epoch": 4, "val_cubes": 8,
                                    "read_block": 8, "figure_cubes": 1, **kw})


def test_presets_and_bad_values():
    assert preset("paper").lr == 1.0 and preset("paper").optimizer == "sgd" and preset("paper").batch_size == 6
    assert preset("paper").patience == 50 and preset("paper").step_size == 40 and preset("paper").gamma == 0.5
    assert preset("stable").optimizer == "adam"
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")
    with pytest.raises(ValueError, match="PretrainConfig.lr"):
        tiny().with_overrides(lr=-1.0)


def test_train_epoch_lowers_the_loss_on_one_batch():
    torch.manual_seed(0)
    cfg = _config(steps_per_epoch=0)
    model = build_model(cfg)
    opt = build_optimizer(model, cfg)
    x = torch.rand(4, 1, 16, 16, 16)
    y = x.clone()
    first = train_epoch(model, [(x, y)], opt, torch.device("cpu"), cfg).loss
    for _ in range(15):
        last = train_epoch(model, [(x, y)], opt, torch.device("cpu"), cfg).loss
    assert last < first * 0.8


def _history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def test_tiny_pretraining_two_workers_is_recorded_and_registered(ray_local, patch_store, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = pretrain(patch_store, _config(epochs=4), workers=2, tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                   register_as="genesis-test", system_metrics=False)
    assert res.error is None, res.error
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["pretrain.base_channels"] == "2" and params["ray.workers"] == "2"
    assert (params["batch.global"], params["batch.per_worker"], params["batch.lr"]) == ("4", "2", "0.003")
    assert params["precision"] == "fp32" and params["validation.cubes"] == "8"
    val = [v for _, v in _history(client, res.mlflow_run_id, "val_loss")]
    assert len(val) == 4 and val[-1] < val[0], val
    for key in ("train_loss", "lr", "cubes_per_s", "data_share", "epoch_seconds"):
        assert len(_history(client, res.mlflow_run_id, key)) == 4
    images = [a.path for a in client.list_artifacts(res.mlflow_run_id, "restoration")]
    assert images == [f"restoration/epoch_{e:04d}.png" for e in range(4)]
    assert run.inputs.dataset_inputs[0].dataset.name == f"patch-store-{PatchStore(patch_store).key}"
    version = client.get_model_version_by_alias("genesis-test", "best")
    assert version.run_id == res.mlflow_run_id
    loaded = load_model("models:/genesis-test/latest", tracking_uri=uri)  # the safe format: nothing unpickled
    state = load_state(str(sorted(p for p in (tmp_path / "ray").glob("*/checkpoint_*") if p.is_dir())[-1]))
    reference = UNet3D(base_channels=2)
    reference.load_state_dict(state["best_model"])
    x = torch.rand(3, 1, 16, 32, 24)  # another batch size and cube size than in training
    # batch-statistics norms: load_model predicts cube by cube, so a batch gives what its cubes give alone
    torch.testing.assert_close(loaded.eval()(x), torch.cat([reference.eval()(x[i:i + 1]) for i in range(3)]),
                               rtol=0, atol=1e-6)
    assert math.isclose(float(version.tags["val_loss"]), min(val), rel_tol=1e-9)


def test_killed_worker_restarts_from_checkpoint_in_one_mlflow_run(ray_local, patch_store, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    marker = tmp_path / "killed"
    res = pretrain(patch_store, _config(epochs=3, patience=10), workers=2, tracking_uri=uri,
                   storage_path=str(tmp_path / "ray"), register_as="genesis-test-fault", system_metrics=False,
                   fault_injection={"rank": 1, "epoch": 1, "marker": str(marker)})
    assert marker.exists(), "the worker was not killed"
    assert res.error is None, res.error
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("genesis-pretraining").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    steps = [s for s, _ in _history(client, res.mlflow_run_id, "val_loss")]
    # the kill came after epoch 1's checkpoint was committed: the restarted workers continued at epoch 2
    assert steps == [0, 1, 2], steps


def test_resume_continues_a_stopped_run(ray_local, patch_store, tmp_path, capsys):
    from pipeline.cli import main

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = pretrain(patch_store, _config(epochs=2), workers=2, tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                     name="resumable", register_as="genesis-test-resume", system_metrics=False)
    assert first.error is None
    code = main(["pretrain", "--patches", patch_store, "--preset", "tiny", "--epochs", "3", "--workers", "2",
                 "--storage-path", str(tmp_path / "ray"), "--resume"])
    assert code == 0, capsys.readouterr()
    client = mlflow.MlflowClient(tracking_uri=uri)
    steps = [s for s, _ in _history(client, first.mlflow_run_id, "val_loss")]
    assert steps == [0, 1, 2], steps  # epochs 0-1 from the first run, epoch 2 after resuming, one MLflow run
    assert len(client.search_runs([client.get_experiment_by_name("genesis-pretraining").experiment_id])) == 1
