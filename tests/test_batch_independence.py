"""Issue 15, section 1 and the optimiser of section 2: a cube's prediction does not depend on the rest of its
batch (fine-tuned models, sliding windows, test metrics, `load_model`, the MLflow pyfunc), and the optimiser and
its schedule run as the reference's Keras code runs them (Adam's defaults, ReduceLROnPlateau's counting).

Tiny widths and cubes; the task stores are conftest's; MLflow is a SQLite file in tmp_path; no Ray."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import TASK_CUBE

from pipeline import evaluation as E
from pipeline import load_model
from pipeline.finetune.config import TINY_LR_SCALE, paper, tiny
from pipeline.finetune.init import apply_init, build_model, freeze_encoder, read_init
from pipeline.finetune.steps import (KERAS_ADAM_EPSILON, build_optimizer, build_scheduler, evaluate_loss,
                                     loss_function, predict, train_epoch)
from pipeline.model_io.official import save_official_layout
from pipeline.models.classifier import UNet3DClassifier
from pipeline.models.norms import per_cube_statistics, set_per_cube_statistics
from pipeline.models.unet3d import UNet3D
from pipeline.runtime.tracking import Tracker
from pipeline.tasks.registry import get_task

CPU = torch.device("cpu")
TOL = dict(rtol=0, atol=1e-5)


def _batches(config, n: int = 4, batch: int = 4, seed: int = 0):
    """`n` training batches of random cubes (mean 0.3, not the N(0, 1) that fresh norms assume) and targets."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, config.in_channels, *config.input_size)
    out = []
    for _ in range(n):
        x = 0.3 + 0.2 * torch.rand(shape, generator=g)
        if config.kind == "classification":
            y = (torch.rand(batch, 1, generator=g) > 0.5).float()
        else:
            y = (torch.rand(batch, 1, *config.input_size, generator=g) > 0.7).float()
        out.append((x, y))
    return out


def _trained(config, steps: int = 4, seed: int = 0) -> nn.Module:
    """The fine-tuning model of `config` after a few training steps (running statistics no longer 0 / 1)."""
    torch.manual_seed(seed)
    model = build_model(config)
    train_epoch(model, _batches(config, steps, seed=seed), build_optimizer(model, config), loss_function(config), CPU)
    return model.eval()


def _alone_and_in_a_batch(model: nn.Module, cube: torch.Tensor, others: torch.Tensor, at: int = 5):
    """(output of `cube` alone, output of `cube` at position `at` of a batch with `others`)."""
    batch = torch.cat([others[:at], cube, others[at:]])
    with torch.no_grad():
        return model(cube)[0], model(batch)[at]


# --------------------------------------------------------------------------- fine-tuned models


@pytest.mark.parametrize("task", ["ecc", "lcs"])
def test_a_finetuned_cube_alone_equals_the_same_cube_among_15_others(task):
    config = tiny(get_task(task))
    assert config.norm == "batch" and paper(get_task(task)).norm == "batch"
    model = _trained(config)
    bn = model.down_tr64.ops[0].bn1
    assert isinstance(bn, nn.BatchNorm3d) and bn.running_mean.abs().max() > 1e-3  # the statistics moved
    g = torch.Generator().manual_seed(1)
    cube = torch.rand(1, 1, *config.input_size, generator=g)
    others = 2.0 * torch.rand(15, 1, *config.input_size, generator=g) - 0.5  # another distribution
    alone, among = _alone_and_in_a_batch(model, cube, others)
    torch.testing.assert_close(among, alone, **TOL)
    # and through the evaluation's own predict
    torch.testing.assert_close(predict(model, torch.cat([others[:5], cube, others[5:]]), config, CPU)[5],
                               predict(model, cube, config, CPU)[0], **TOL)


def test_a_batch_stats_finetuned_model_is_evaluated_cube_by_cube():
    """A fine-tuning that asks for the reference's ContBatchNorm3d (norm="batch_stats") is still evaluated per
    cube: predict, the validation loss and the sliding window normalise each cube with its own statistics."""
    config = tiny(get_task("ecc")).with_overrides(norm="batch_stats")
    model = _trained(config)
    x = torch.rand(6, 1, *config.input_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        one_by_one = torch.sigmoid(torch.cat([model(x[i:i + 1]) for i in range(6)]))[:, 0]
        assert (torch.sigmoid(model(x))[:, 0] - one_by_one).abs().max() > 1e-4  # batch-pooled without the switch
    torch.testing.assert_close(predict(model, x, config, CPU), one_by_one, **TOL)
    assert not model.per_cube_statistics  # predict's switch is restored afterwards
    y = torch.tensor([[0.0], [1.0], [1.0], [0.0], [1.0], [0.0]])
    loss = loss_function(config)
    assert evaluate_loss(model, [(x, y)], loss, CPU) == pytest.approx(
        evaluate_loss(model, [(x[:1], y[:1]), (x[1:4], y[1:4]), (x[4:], y[4:])], loss, CPU), abs=1e-6)


def test_a_pretrained_init_brings_its_running_statistics(tmp_path):
    torch.manual_seed(0)
    pretrained = UNet3D(base_channels=4)  # batch_stats, as pretraining
    lcs = tiny(get_task("lcs"))
    train_epoch(pretrained, _batches(lcs, 3), torch.optim.SGD(pretrained.parameters(), lr=0.01), nn.MSELoss(), CPU)
    stats = {k: v for k, v in pretrained.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert stats and all(not torch.equal(v, torch.zeros_like(v)) for k, v in stats.items() if "mean" in k)
    save_official_layout(pretrained, tmp_path / "official.pt")
    torch.save(pretrained.state_dict(), tmp_path / "ours.pt")
    for init in (str(tmp_path / "ours.pt"), f"official:{tmp_path / 'official.pt'}"):
        for config in (lcs, tiny(get_task("ecc"))):
            model = apply_init(build_model(config), read_init(init), init)
            assert isinstance(model.down_tr64.ops[0].bn1, nn.BatchNorm3d)
            got = model.state_dict()
            for key, value in stats.items():
                if key in got:
                    assert torch.equal(got[key], value), (init, config.task, key)
            assert sum(k in got for k in stats) == (len(stats) if config.kind == "segmentation" else
                                                    sum(k.startswith("down_tr") for k in stats))


def test_a_frozen_encoder_keeps_its_running_statistics_and_its_output():
    config = tiny(get_task("lcs"))
    torch.manual_seed(0)
    model = _trained(config, steps=2)
    freeze_encoder(model)
    model.train()
    encoder_norms = [m for m in model.down_tr64.modules() if isinstance(m, nn.BatchNorm3d)]
    assert encoder_norms and not any(m.training for m in encoder_norms)
    assert model.up_tr64.ops[0].bn1.training  # the decoder still trains as usual
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 1, *config.input_size)
    with torch.no_grad():
        features_before = model.down_tr64(x)[1]
    train_epoch(model, _batches(config, 2, seed=3), build_optimizer(model, config), loss_function(config), CPU)
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("down_tr"):
            assert torch.equal(after[key], value), key  # weights and running statistics alike
    assert not torch.equal(after["up_tr64.ops.0.bn1.running_mean"], before["up_tr64.ops.0.bn1.running_mean"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.down_tr64(x)[1], features_before, rtol=0, atol=0)


# --------------------------------------------------------------------------- sliding window


@pytest.mark.parametrize("norm", ["batch", "batch_stats"])
def test_sliding_window_does_not_depend_on_sw_batch_size(norm):
    config = tiny(get_task("lcs")).with_overrides(norm=norm)
    model = _trained(config)
    volume = torch.rand(1, 32, 64, 48, generator=torch.Generator().manual_seed(4))  # 3 x 3 x 2 windows
    outs = [E.sliding_window_predict(model, volume, roi_size=config.input_size, sw_batch_size=b, overlap=0.25)[0]
            for b in (1, 8)]
    torch.testing.assert_close(outs[1], outs[0], **TOL)
    assert not model.per_cube_statistics


# --------------------------------------------------------------------------- test-split evaluation


def _store_model(store_path: str, task: str, **overrides):
    """(store, config, model trained a few steps on the store's training rows)."""
    from pipeline.finetune.data import batches
    from pipeline.patches.store import PatchStore

    store = PatchStore(store_path)
    config = tiny(get_task(task).with_overrides(cube_size=TASK_CUBE)).with_overrides(**overrides)
    torch.manual_seed(0)
    model = build_model(config)
    rows = np.sort(store.rows("train"))[:12]
    train_epoch(model, batches(store, rows, config, 4), build_optimizer(model, config), loss_function(config), CPU)
    return store, config, model.eval()


def _same_metrics(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert (math.isnan(a[key]) and math.isnan(b[key])) or a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("task, overrides", [("ecc", {}), ("ncs", {}), ("lcs", {})])
def test_test_metrics_do_not_depend_on_the_evaluation_batch(task_stores, task, overrides):
    from pipeline.finetune.evaluate import evaluate_test

    store, config, model = _store_model(task_stores[task], task, **overrides)
    spec = get_task(task).with_overrides(cube_size=TASK_CUBE)
    one = evaluate_test(model, store, config.with_overrides(batch_size=1, sw_batch_size=1), spec, CPU, figures=0)
    many = evaluate_test(model, store, config.with_overrides(batch_size=7, sw_batch_size=8), spec, CPU, figures=0)
    _same_metrics(one.metrics, many.metrics)
    if config.kind == "segmentation":
        pred = one.predictions
        for key in ("test_keras_mean_iou", "test_dice", "test_dice_sd"):
            assert key in one.metrics, key
        assert one.metrics["test_dice"] == pytest.approx(pred["dice"].mean(), abs=1e-12)
        expected_sd = pred["dice"].std(ddof=1) if len(pred) > 1 else math.nan
        assert (math.isnan(expected_sd) and math.isnan(one.metrics["test_dice_sd"])) or \
            one.metrics["test_dice_sd"] == pytest.approx(expected_sd, abs=1e-12)


def _in_batches(model, x, config, size: int) -> np.ndarray:
    return np.concatenate([predict(model, x[i:i + size], config, CPU).numpy() for i in range(0, len(x), size)])


@pytest.mark.parametrize("task", ["ecc", "ncs"])
def test_rows_in_another_order_and_batching_give_the_same_predictions_and_metrics(task_stores, task):
    """Every row of the store, predicted in batches of 4 in row order and in batches of 3 shuffled: each cube's
    prediction is the same, and so is every metric of the shuffled results (AUC over the labels; the pooled Keras
    mean_iou counts, per-case means and sds)."""
    from pipeline.finetune.data import read_batch

    store, config, model = _store_model(task_stores[task], task)
    rows = np.sort(store.rows())
    order = np.random.default_rng(5).permutation(len(rows))
    x, y = read_batch(store, rows, config)
    prob = _in_batches(model, x, config, 4)
    np.testing.assert_allclose(_in_batches(model, x[order], config, 3), prob[order], rtol=0, atol=1e-5)
    if config.kind == "classification":
        labels = y.numpy()[:, 0]
        assert 0 < labels.sum() < len(labels)
        assert E.roc_auc(labels, prob) == E.roc_auc(labels[order], prob[order])
        return
    truth = y.numpy().astype(bool)
    cases = [E.segmentation_case_metrics(t, p) for t, p in zip(truth, prob)]
    counts = sum(E.keras_mean_iou_counts(t, p) for t, p in zip(truth, prob))
    shuffled_counts = sum(E.keras_mean_iou_counts(truth[i], prob[i]) for i in order)
    assert E.keras_mean_iou_from_counts(counts) == E.keras_mean_iou_from_counts(shuffled_counts)
    assert E.summarise(cases) == E.summarise([cases[i] for i in order])


def test_summarise_reports_the_sample_sd_over_cases():
    cases = [{"dice": d, "iou": d / 2, "hausdorff95": h} for d, h in ((0.2, 1.0), (0.6, math.nan), (0.7, 3.0))]
    out = E.summarise(cases)
    assert out["dice"] == pytest.approx(0.5) and out["dice_sd"] == pytest.approx(np.std([0.2, 0.6, 0.7], ddof=1))
    assert out["hausdorff95_sd"] == pytest.approx(np.std([1.0, 3.0], ddof=1)) and out["hausdorff95_n_nan"] == 1
    one = E.summarise(cases[:1])
    assert one["dice"] == 0.2 and math.isnan(one["dice_sd"])


# --------------------------------------------------------------------------- load_model and the pyfunc


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """(tracking URI, {name: (model URI, original model)}): a pretrained-style batch_stats U-Net and a
    fine-tuned "batch" classifier, both trained a few steps, logged in the safe format."""
    tmp = tmp_path_factory.mktemp("batch-independence")
    uri = f"sqlite:///{tmp}/mlflow.db"
    mlflow.MlflowClient(tracking_uri=uri).create_experiment("bi", artifact_location=str(tmp / "artifacts"))
    unet = _trained(tiny(get_task("lcs")).with_overrides(norm="batch_stats"), seed=1)
    classifier = _trained(tiny(get_task("ecc")), seed=2)
    assert isinstance(unet, UNet3D) and unet.norm == "batch_stats"
    assert isinstance(classifier, UNet3DClassifier) and classifier.norm == "batch"
    from pipeline.model_io.model_format import log_finetuned_model, log_model

    tracker = Tracker(uri)
    run_id = tracker.create_run("bi", "models")
    logger = tracker.logger(run_id, system_metrics=False)
    try:
        out = {"unet": (log_model(unet).model_uri, unet),
               "classifier": (log_finetuned_model(classifier, kind="classification").model_uri, classifier)}
    finally:
        logger.end()
    return uri, out


def _cubes(model: nn.Module, n: int = 4) -> torch.Tensor:
    side = (16, 32, 32) if isinstance(model, UNet3D) else (32, 32, 32)
    return 0.3 + 0.4 * torch.rand(n, 1, *side, generator=torch.Generator().manual_seed(6))


def _one_at_a_time(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(x[i:i + 1]) for i in range(len(x))])


@pytest.mark.parametrize("name", ["unet", "classifier"])
def test_load_model_and_pyfunc_give_a_batch_what_they_give_each_cube(logged, name):
    import mlflow.pyfunc

    uri, models = logged
    model_uri, original = models[name]
    x = _cubes(original)
    expected = _one_at_a_time(original, x)
    loaded = load_model(model_uri, tracking_uri=uri)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, **TOL)
        torch.testing.assert_close(loaded(x[2:3])[0], expected[2], **TOL)
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    batch_out = pyfunc.predict(x.numpy())
    np.testing.assert_allclose(batch_out, expected.numpy(), rtol=0, atol=1e-5)
    single = np.concatenate([pyfunc.predict(x[i:i + 1].numpy()) for i in range(len(x))])
    np.testing.assert_allclose(batch_out, single, rtol=0, atol=1e-5)


def test_state_files_and_official_weights_load_cube_by_cube(tmp_path):
    torch.manual_seed(0)
    unet = UNet3D(base_channels=4)  # batch_stats, the official weights' norm
    torch.save(unet.state_dict(), tmp_path / "unet.pt")
    save_official_layout(unet, tmp_path / "official.pt")
    x = _cubes(unet, 3)
    expected = _one_at_a_time(unet, x)
    with torch.no_grad():
        assert (unet.eval()(x) - expected).abs().max() > 1e-4  # the reference's batch-pooled statistics differ
        for model_uri in (str(tmp_path / "unet.pt"), f"official:{tmp_path / 'official.pt'}"):
            loaded = load_model(model_uri)
            assert loaded.norm == "batch_stats" and loaded.per_cube_statistics
            torch.testing.assert_close(loaded(x), expected, **TOL)
        # the reference's batch-pooled behaviour stays available
        loaded = load_model(str(tmp_path / "unet.pt"))
        set_per_cube_statistics(loaded, False)
        torch.testing.assert_close(loaded(x), unet(x), **TOL)
    # a fine-tuned "batch" model saved as a state dict: its norm named at load time
    clf = _trained(tiny(get_task("ecc")))
    torch.save(clf.state_dict(), tmp_path / "clf.pt")
    with torch.no_grad():
        as_batch = load_model(str(tmp_path / "clf.pt"), norm="batch")
        assert isinstance(as_batch.down_tr64.ops[0].bn1, nn.BatchNorm3d) and as_batch.norm == "batch"
        xc = _cubes(clf, 3)
        torch.testing.assert_close(as_batch(xc), clf(xc), **TOL)
    with pytest.raises(ValueError, match="norm='batch' applies to a state-dict file only"):
        load_model(f"official:{tmp_path / 'official.pt'}", norm="batch")


def test_per_cube_switch_has_no_effect_in_training_mode():
    torch.manual_seed(0)
    net = UNet3D(base_channels=4).train()
    x = torch.rand(3, 1, 16, 16, 16)
    with torch.no_grad():
        pooled = net(x)
        with per_cube_statistics(net):
            torch.testing.assert_close(net(x), pooled, rtol=0, atol=0)


# --------------------------------------------------------------------------- the optimiser


def test_every_task_trains_with_keras_adam_at_the_task_lr():
    for task in ("ncc", "ncs", "ecc", "lcs", "bms"):
        spec = get_task(task)
        for config, scale in ((paper(spec), 1.0), (tiny(spec), TINY_LR_SCALE)):  # tiny: 10x, to learn in minutes
            assert config.lr == spec.optimisation.lr * scale
            opt = build_optimizer(nn.Linear(2, 1), config)
            assert opt.defaults["lr"] == config.lr and opt.defaults["betas"] == (0.9, 0.999)
            assert opt.defaults["eps"] == KERAS_ADAM_EPSILON == 1e-7


#: Validation losses and the lr after each epoch's step, worked out by hand with Keras 2.2.4's rules
#: (patience 3, factor 0.5, min_delta 1e-4, min_lr 2e-4, from lr 1e-3): an improvement is loss < best - 1e-4;
#: the 3rd epoch in a row without one cuts; the lr never goes below min_lr, and at min_lr nothing is cut.
KERAS_SEQUENCE = [
    (1.0, 1e-3),      # best 1.0
    (0.95, 1e-3),     # best 0.95
    (0.94995, 1e-3),  # not below 0.95 - 1e-4: wait 1
    (0.96, 1e-3),     # wait 2
    (0.97, 5e-4),     # wait 3: cut (PyTorch would wait for a 4th)
    (0.90, 5e-4),     # best 0.90, wait 0
    (0.91, 5e-4),     # wait 1
    (0.91, 5e-4),     # wait 2
    (0.91, 2.5e-4),   # wait 3: cut
    (0.91, 2.5e-4),
    (0.91, 2.5e-4),
    (0.91, 2e-4),     # cut to max(1.25e-4, min_lr)
    (0.91, 2e-4),
    (0.91, 2e-4),
    (0.91, 2e-4),     # wait 3 again, but the lr is at min_lr: no cut
    (float("nan"), 2e-4),  # NaN is no improvement
]


def _plateau(**overrides):
    config = tiny(get_task("ncc")).with_overrides(plateau_patience=3, plateau_factor=0.5, plateau_min_delta=1e-4,
                                                  min_lr=2e-4, lr=1e-3, **overrides)
    optimizer = build_optimizer(nn.Linear(2, 1), config)
    return optimizer, build_scheduler(optimizer, config)


def test_reduce_on_plateau_cuts_on_the_epoch_keras_cuts():
    optimizer, scheduler = _plateau()
    for epoch, (loss, lr) in enumerate(KERAS_SEQUENCE):
        scheduler.step(loss)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12), epoch


def test_reduce_on_plateau_resumes_from_its_state_dict():
    optimizer, scheduler = _plateau()
    for loss, _ in KERAS_SEQUENCE[:7]:
        scheduler.step(loss)
    state = torch.load(_roundtrip(scheduler.state_dict(), optimizer.state_dict()), weights_only=True)
    optimizer2, scheduler2 = _plateau()
    optimizer2.load_state_dict(state["optimizer"])
    scheduler2.load_state_dict(state["scheduler"])
    for epoch, (loss, lr) in enumerate(KERAS_SEQUENCE[7:], start=7):
        scheduler2.step(loss)
        assert optimizer2.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12), epoch
    # the state of a PyTorch ReduceLROnPlateau (checkpoints of older versions) is read too
    torch_sched = torch.optim.lr_scheduler.ReduceLROnPlateau(_plateau()[0], patience=3, threshold=1e-4,
                                                             threshold_mode="abs")
    for loss in (1.0, 1.0, 1.0):
        torch_sched.step(loss)
    _, keras = _plateau()
    keras.load_state_dict(torch_sched.state_dict())
    assert (keras.best, keras.wait) == (1.0, 2)


def _roundtrip(scheduler_state: dict, optimizer_state: dict):
    import io

    buffer = io.BytesIO()
    torch.save({"scheduler": scheduler_state, "optimizer": optimizer_state}, buffer)
    buffer.seek(0)
    return buffer


def test_paper_preset_cuts_after_six_epochs_without_improvement():
    spec = get_task("ncs")
    config = paper(spec)
    assert (config.plateau_patience, config.plateau_factor, config.plateau_min_delta, config.min_lr) == \
        (6, 0.5, 1e-4, 1e-6)  # keras/downstream_tasks/utils.py lines 135-136
    optimizer = build_optimizer(nn.Linear(2, 1), config)
    scheduler = build_scheduler(optimizer, config)
    lrs = []
    for loss in [1.0] + [1.0] * 7:
        scheduler.step(loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == [config.lr] * 6 + [config.lr / 2] * 2  # the 6th epoch without improvement cuts


def test_early_stopping_stops_on_the_epoch_keras_stops():
    """Keras 2.2.4's EarlyStopping(patience=3, mode='min', min_delta=0): wait += 1 on an epoch not strictly
    better, stop when wait >= patience. By hand: wait 0 0 1 2 0 1 2 3 -> stops after epoch 7."""
    from pipeline.training.checkpoint import track_best

    model = nn.Linear(1, 1)
    best, bad, kept, stopped_at = math.inf, 0, None, None
    for epoch, loss in enumerate([1.0, 0.9, 0.9, 0.95, 0.85, 0.86, float("nan"), 0.86, 0.5]):
        best, bad, kept = track_best(model, loss, best, bad, kept)
        if bad >= 3:  # the worker's rule: bad_epochs >= config.patience
            stopped_at = epoch
            break
    assert (stopped_at, best) == (7, 0.85)


def test_the_predictions_frame_of_a_shuffled_store_order_is_the_same(task_stores):
    """evaluate_test sorts the test rows: the same predictions.csv whatever order the store lists them in."""
    from pipeline.finetune.evaluate import evaluate_test

    store, config, model = _store_model(task_stores["ecc"], "ecc")
    spec = get_task("ecc").with_overrides(cube_size=TASK_CUBE)
    first = evaluate_test(model, store, config, spec, CPU, figures=0)
    rows = store.rows("test")
    store.rows = lambda split=None, _rows=rows: np.random.default_rng(9).permutation(_rows)  # another order
    second = evaluate_test(model, store, config.with_overrides(batch_size=3), spec, CPU, figures=0)
    pd.testing.assert_frame_equal(first.predictions, second.predictions, rtol=0, atol=1e-6)
    _same_metrics(first.metrics, second.metrics)
