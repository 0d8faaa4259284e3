"""Fine-tuning on a real local Ray (1 worker) with a real MLflow (SQLite): ECC from scratch, LCS from a
registered pretrained U-Net; metrics recomputed from predictions.csv; no test patient in training."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TASK_CUBE, assert_no_test_patient_in_training

from pipeline.finetune.config import paper, tiny
from pipeline.finetune.init import FIRST_CONV, apply_init, build_model, check_init, read_init
from pipeline.finetune.run import finetune
from pipeline.finetune.steps import soft_dice_loss
from pipeline.models.unet3d import UNet3D
from pipeline.patches.store import PatchStore
from pipeline.tasks.registry import get_task

CUBE = TASK_CUBE


@pytest.fixture(scope="module")
def stores(task_stores):
    return task_stores


def test_presets_follow_the_task_spec():
    lcs = get_task("lcs")
    o = lcs.optimisation  # the values the reference's code runs at, taken unchanged
    assert (paper(lcs).lr, paper(lcs).patience, paper(lcs).batch_size) == (o.lr, o.patience, o.batch_size)
    assert paper(lcs).patience == 20 and paper(lcs).batch_size == 16
    assert paper(lcs).norm == tiny(lcs).norm == "batch"  # running statistics at inference, as Keras
    assert paper(lcs).base_channels == 32 and paper(lcs).input_size == (32, 64, 64)
    assert tiny(lcs).base_channels == 4 and tiny(lcs).input_size == (16, 32, 32) and tiny(lcs).max_epochs <= 4
    assert tiny(get_task("ecc")).input_size == (32, 32, 32) and tiny(get_task("ecc")).input_rule == "downsample"
    assert tiny(get_task("bms")).volume_scale == pytest.approx((0.64, 0.64, 0.64))
    with pytest.raises(ValueError, match="label_fraction"):
        tiny(lcs).with_overrides(label_fraction=0.0)


def test_soft_dice_loss_has_smooth_one():
    p, t = torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 1, 4, 4, 4)
    assert float(soft_dice_loss(p, t)) == 0.0  # (0 + 1) / (0 + 1)
    t[0, 0, 0, 0, 0] = 1
    assert float(soft_dice_loss(t, t)) == pytest.approx(1 - 3 / 3)
    assert float(soft_dice_loss(p, t)) == pytest.approx(1 - 1 / 2)


def test_init_width_mismatch_and_channel_expansion(tmp_path):
    path = tmp_path / "w4.pt"
    torch.manual_seed(0)
    unet = UNet3D(base_channels=4)
    torch.save(unet.state_dict(), path)
    with pytest.raises(ValueError, match=r"pretrained width 4 .* width 32"):
        check_init(paper(get_task("lcs")), read_init(str(path)), str(path))
    two = tiny(get_task("bms").with_overrides(channels=("flair", "t1")))
    model = apply_init(build_model(two), read_init(str(path)), str(path))
    w = unet.state_dict()[FIRST_CONV]
    assert torch.allclose(model.state_dict()[FIRST_CONV], w.repeat(1, 2, 1, 1, 1) / 2)
    clf = apply_init(build_model(tiny(get_task("ecc"))), read_init(str(path)), str(path))
    assert torch.equal(clf.state_dict()[FIRST_CONV], w)
    from pipeline.model_io.official import save_official_layout

    save_official_layout(unet, tmp_path / "official.pt")  # kernels written (x, y, z), read back (z, y, x)
    seg = apply_init(build_model(tiny(get_task("lcs"))), read_init(f"official:{tmp_path / 'official.pt'}"), "official")
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in seg.state_dict().items())


def test_frozen_encoder_stays_fixed_while_the_head_learns():
    from pipeline.finetune.init import freeze_encoder
    from pipeline.finetune.steps import build_optimizer, loss_function, train_epoch

    config = tiny(get_task("ecc")).with_overrides(input_size=CUBE)
    torch.manual_seed(0)
    model = build_model(config)
    freeze_encoder(model)
    before = {k: v.clone() for k, v in model.named_parameters()}
    x, y = torch.rand(4, 1, *CUBE), torch.tensor([[0.0], [1.0], [0.0], [1.0]])
    train_epoch(model, [(x, y)], build_optimizer(model, config), loss_function(config), torch.device("cpu"))
    for k, v in model.named_parameters():
        assert torch.equal(before[k], v) == k.startswith("down_tr"), k


def test_deterministic_errors_come_before_ray(stores, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="task 'ecc', not 'lcs'"):
        finetune(stores["ecc"], "lcs", tracking_uri=uri)
    with pytest.raises(ValueError, match="fewer than the 1000 worker"):
        finetune(stores["ecc"], "ecc", workers=1000, tracking_uri=uri)
    with pytest.raises(ValueError, match="--init"):
        finetune(stores["ecc"], "ecc", "no-such-file.pt", tracking_uri=uri)


def _client(uri):
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _artifacts(client, run_id, tmp_path):
    pred = pd.read_csv(client.download_artifacts(run_id, "predictions.csv", str(tmp_path)))
    rows = json.loads(open(client.download_artifacts(run_id, "data/training_rows.json", str(tmp_path))).read())
    return pred, rows


def test_classification_ecc_end_to_end(ray_local, stores, tmp_path):
    from sklearn.metrics import roc_auc_score

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = finetune(stores["ecc"], "ecc", "scratch", preset="tiny", epochs=2, tracking_uri=uri,
                   storage_path=str(tmp_path / "ray"), name="ecc-test")
    assert res.error is None, res.error
    client = _client(uri)
    run = client.get_run(res.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(res.mlflow_run_id, "val_loss")) == 2
    pred, rows = _artifacts(client, res.mlflow_run_id, tmp_path)
    assert list(pred.columns[:4]) == ["case_id", "candidate", "label", "score"]
    assert run.data.metrics["test_auc"] == pytest.approx(roc_auc_score(pred["label"], pred["score"]), abs=1e-12)
    assert res.metrics["test_auc"] == run.data.metrics["test_auc"]
    assert_no_test_patient_in_training(stores["ecc"], rows)
    version = client.get_model_version("genesis-ecc", "1")
    assert version.run_id == res.mlflow_run_id
    assert float(version.tags["test_auc"]) == pytest.approx(run.data.metrics["test_auc"], rel=1e-5)
    assert "test/roc.png" in [a.path for a in client.list_artifacts(res.mlflow_run_id, "test")]
    assert "test: auc" in res.report() and "n 20" in res.report()


def test_whole_volume_segmentation_lcs_from_a_registered_model(ray_local, stores, tmp_path):
    from pipeline.runtime.tracking import PRETRAINED_MODEL, RunLogger, Tracker
    from pipeline.model_io.model_format import log_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    torch.manual_seed(1)
    pretrained = UNet3D(base_channels=4).eval()
    run_id = Tracker.at(uri).create_run("genesis-pretraining", "fake-pretraining")
    logger = RunLogger(uri, run_id, system_metrics=False)
    Tracker.at(uri).register_model(log_model(pretrained).model_uri, PRETRAINED_MODEL, metric=0.1)
    logger.end()
    res = finetune(stores["lcs"], "lcs", f"models:/{PRETRAINED_MODEL}/1", preset="tiny", epochs=2,
                   tracking_uri=uri, storage_path=str(tmp_path / "ray"), name="lcs-test")
    assert res.error is None, res.error
    client = _client(uri)
    metrics = client.get_run(res.mlflow_run_id).data.metrics
    for key in ("test_keras_mean_iou", "test_dice", "test_iou", "test_hausdorff95", "val_loss", "train_loss"):
        assert key in metrics
    pred, rows = _artifacts(client, res.mlflow_run_id, tmp_path)
    test_cases = PatchStore(stores["lcs"]).scans.query("split == 'test'")["case_id"]
    assert sorted(pred["case_id"]) == sorted(test_cases)
    assert metrics["test_dice"] == pytest.approx(np.mean(pred["dice"]), abs=1e-9)
    from pipeline import evaluation as E
    from pipeline.finetune.evaluate import counts_from_columns

    assert metrics["test_keras_mean_iou"] == pytest.approx(E.keras_mean_iou_from_counts(counts_from_columns(pred)),
                                                           abs=1e-12)
    assert_no_test_patient_in_training(stores["lcs"], rows)
    overlays = [a.path for a in client.list_artifacts(res.mlflow_run_id, "test")]
    assert any(p.startswith("test/overlay_") for p in overlays)
    version = client.get_model_version("genesis-lcs", "1")
    assert version.tags["init"] == f"models:/{PRETRAINED_MODEL}/1"
    assert float(version.tags["test_dice"]) == pytest.approx(metrics["test_dice"], rel=1e-5)
    assert "latest" not in client.get_registered_model("genesis-lcs").aliases


def test_cube_segmentation_ncs_metrics_recomputed_from_predictions(ray_local, stores, tmp_path):
    from pipeline import evaluation as E
    from pipeline.finetune.evaluate import counts_from_columns

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = finetune(stores["ncs"], "ncs", "scratch", preset="tiny", epochs=2, tracking_uri=uri,
                   storage_path=str(tmp_path / "ray"), name="ncs-test")
    assert res.error is None, res.error
    metrics = _client(uri).get_run(res.mlflow_run_id).data.metrics
    pred, rows = _artifacts(_client(uri), res.mlflow_run_id, tmp_path)
    store = PatchStore(stores["ncs"])
    assert sorted(pred["row"]) == sorted(store.rows("test"))  # one row per test cube (one nodule each)
    # anyone can recompute the paper's metric from predictions.csv: the summed confusion counts
    assert metrics["test_keras_mean_iou"] == pytest.approx(E.keras_mean_iou_from_counts(counts_from_columns(pred)),
                                                           abs=1e-12)
    assert metrics["test_dice"] == pytest.approx(pred["dice"].mean(), abs=1e-12)
    assert (pred["n_voxels"] == np.prod(CUBE)).all()  # the tiny preset's centre crop, evaluated as trained
    assert_no_test_patient_in_training(stores["ncs"], rows)


def test_two_workers_resume_after_a_killed_worker(ray_local, stores, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    marker = tmp_path / "killed"
    res = finetune(stores["ecc"], "ecc", "scratch", preset="tiny", epochs=3, workers=2, tracking_uri=uri,
                   storage_path=str(tmp_path / "ray"), name="ecc-restart", max_failures=1,
                   fault_injection={"rank": 1, "epoch": 1, "marker": str(marker)})
    assert marker.exists() and res.error is None, res.error
    client = _client(uri)
    steps = [m.step for m in client.get_metric_history(res.mlflow_run_id, "val_loss")]
    # the kill came after epoch 1's checkpoint was committed: the restarted group continued at epoch 2
    assert steps == [0, 1, 2], steps
    assert client.get_run(res.mlflow_run_id).info.status == "FINISHED" and "test_auc" in res.metrics
