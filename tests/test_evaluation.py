"""Tests for pipeline.evaluation: each metric against a hand-computed example, the Keras
mean_iou against an independent per-voxel implementation of tf.metrics.mean_iou, and the
sliding-window wrapper against a whole-volume forward."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.evaluation import (KERAS_MEAN_IOU_THRESHOLDS, METRICS, dice, foreground_iou, hausdorff95,
                                 keras_mean_iou, keras_mean_iou_counts, keras_mean_iou_from_counts,
                                 metric_table_name, roc_auc, roc_curve_points, segmentation_case_metrics,
                                 sliding_window_predict, summarise)
from pipeline.models.unet3d import UNet3D
from pipeline.tasks.builtin import BUILTIN_TASKS

# --------------------------------------------------------------------------- Keras mean_iou

# 8 voxels: 3 foreground, 5 background; probabilities at several levels so thresholds matter.
# 0.5 sits exactly on the first threshold: strict ">" makes it background there.
HAND_TRUE = np.array([1, 1, 1, 0, 0, 0, 0, 0])
HAND_PROB = np.array([0.9, 0.72, 0.52, 0.62, 0.3, 0.1, 0.97, 0.5])
# Per threshold (tp, fp, fn, tn), counted by hand:
#   fg probs 0.9 0.72 0.52 | bg probs 0.62 0.3 0.1 0.97 0.5
HAND_COUNTS = {
    0.50: (3, 2, 0, 3),  # fg > .5: all three; bg > .5: 0.62, 0.97 (0.5 is not > 0.5)
    0.55: (2, 2, 1, 3),  # 0.52 drops out
    0.60: (2, 2, 1, 3),
    0.65: (2, 1, 1, 4),  # 0.62 drops out
    0.70: (2, 1, 1, 4),
    0.75: (1, 1, 2, 4),  # 0.72 drops out
    0.80: (1, 1, 2, 4),
    0.85: (1, 1, 2, 4),
    0.90: (0, 1, 3, 4),  # 0.9 is not > 0.9
    0.95: (0, 1, 3, 4),  # 0.97 stays
}


def hand_mean_iou() -> Fraction:
    per_threshold = []
    for tp, fp, fn, tn in HAND_COUNTS.values():
        fg = Fraction(tp, tp + fp + fn)
        bg = Fraction(tn, tn + fn + fp)
        per_threshold.append((fg + bg) / 2)
    return sum(per_threshold) / len(per_threshold)


def test_thresholds_are_the_references():
    assert KERAS_MEAN_IOU_THRESHOLDS == (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
    np.testing.assert_allclose(KERAS_MEAN_IOU_THRESHOLDS, np.arange(0.5, 1.0, 0.05), atol=1e-12)


def test_keras_mean_iou_counts_by_hand():
    counts = keras_mean_iou_counts(HAND_TRUE, HAND_PROB)
    assert counts.tolist() == [list(c) for c in HAND_COUNTS.values()]


def test_keras_mean_iou_by_hand():
    # (0.6 + 2*0.45 + 2*(0.5+4/6)/2 + 3*(0.25+4/7)/2 + 2*0.25) / 10
    expected = hand_mean_iou()
    assert keras_mean_iou(HAND_TRUE, HAND_PROB) == pytest.approx(float(expected), abs=1e-12)
    assert float(expected) == pytest.approx(0.4398809524, abs=1e-9)
    # torch input and a 3D layout give the same number
    t = keras_mean_iou(torch.from_numpy(HAND_TRUE.reshape(2, 2, 2)), torch.from_numpy(HAND_PROB.reshape(2, 2, 2)))
    assert t == pytest.approx(float(expected), abs=1e-12)


def tf_mean_iou_slow(y_true: np.ndarray, y_prob: np.ndarray) -> float:
    """tf.metrics.mean_iou(labels, y_pred > t, 2) per threshold, one voxel at a time; mean over t."""
    scores = []
    for k in range(10):
        t = 0.5 + 0.05 * k
        cm = [[0, 0], [0, 0]]  # cm[label][prediction]
        for label, p in zip(y_true.ravel().tolist(), y_prob.ravel().tolist()):
            cm[int(label)][int(p > t)] += 1
        ious = []
        for c in range(2):
            denominator = sum(cm[c]) + cm[0][c] + cm[1][c] - cm[c][c]
            if denominator > 0:
                ious.append(cm[c][c] / denominator)
        scores.append(sum(ious) / len(ious) if ious else 0.0)
    return sum(scores) / len(scores)


@pytest.mark.parametrize("seed", range(6))
def test_keras_mean_iou_matches_slow_loop(seed):
    rng = np.random.default_rng(seed)
    shape = (4, 6, 5)
    fraction = [0.0, 0.1, 0.5, 0.9, 1.0, 0.3][seed]
    y_true = (rng.random(shape) < fraction).astype(np.uint8)
    # probabilities correlated with the truth, and a few exactly on thresholds
    y_prob = np.clip(0.5 * y_true + 0.6 * rng.random(shape), 0, 1)
    y_prob.ravel()[:10] = rng.choice(KERAS_MEAN_IOU_THRESHOLDS, 10)
    assert keras_mean_iou(y_true, y_prob) == pytest.approx(tf_mean_iou_slow(y_true, y_prob), abs=1e-12)


def test_keras_mean_iou_counts_add_like_pooling():
    rng = np.random.default_rng(3)
    a_true, b_true = (rng.random((2, 3, 4, 4)) < 0.3).astype(int)
    a_prob, b_prob = rng.random((2, 3, 4, 4))
    pooled = keras_mean_iou(np.concatenate([a_true, b_true]), np.concatenate([a_prob, b_prob]))
    summed = keras_mean_iou_counts(a_true, a_prob) + keras_mean_iou_counts(b_true, b_prob)
    assert keras_mean_iou_from_counts(summed) == pytest.approx(pooled, abs=1e-12)


def test_keras_mean_iou_degenerate_classes():
    zeros = np.zeros((2, 3, 3))
    # all background, predicted all background: the foreground class is ignored, background IoU 1
    assert keras_mean_iou(zeros, zeros + 0.2) == 1.0
    # all foreground, predicted above every threshold: the background class is ignored
    assert keras_mean_iou(zeros + 1, zeros + 0.99) == 1.0
    # all background, one voxel predicted foreground: foreground IoU 0 counts, background 17/18
    prob = zeros.copy()
    prob[0, 0, 0] = 0.99
    assert keras_mean_iou(zeros, prob) == pytest.approx((0 + 17 / 18) / 2)


def test_keras_mean_iou_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        keras_mean_iou(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="only 0 and 1"):
        keras_mean_iou(np.array([0, 2]), np.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        keras_mean_iou(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        keras_mean_iou(np.zeros(2), np.array([0.1, np.nan]))


# --------------------------------------------------------------------------- per-case Dice / IoU / HD95


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """Truth: 4 voxels. Prediction > 0.5: 3 of them plus 2 others -> tp 3, fp 2, fn 1."""
    y_true = np.zeros((2, 3, 4))
    y_true[0, 0, :4] = 1
    y_prob = np.full((2, 3, 4), 0.1)
    y_prob[0, 0, :3] = [0.9, 0.8, 0.51]
    y_prob[0, 0, 3] = 0.5  # exactly 0.5 is background (strict >)
    y_prob[1, 2, 2:4] = [0.7, 0.6]
    return y_true, y_prob


def test_dice_and_iou_by_hand():
    y_true, y_prob = hand_case()
    assert dice(y_true, y_prob) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))  # 2/3
    assert foreground_iou(y_true, y_prob) == pytest.approx(3 / (3 + 2 + 1))  # 1/2
    # channel axis of size 1 and torch input are accepted
    assert dice(torch.from_numpy(y_true[None]), torch.from_numpy(y_prob[None])) == pytest.approx(2 / 3)
    # a higher threshold removes 0.51 and 0.6: tp 2, fp 1, fn 2
    assert foreground_iou(y_true, y_prob, threshold=0.65) == pytest.approx(2 / 5)


def test_dice_and_iou_empty_truth():
    zeros = np.zeros((3, 3, 3))
    assert dice(zeros, zeros) == 1.0 and foreground_iou(zeros, zeros) == 1.0
    prob = zeros.copy()
    prob[1, 1, 1] = 0.9
    assert dice(zeros, prob) == 0.0 and foreground_iou(zeros, prob) == 0.0


def test_hausdorff95_two_boxes():
    # two 2x2x2 boxes 10 voxels apart along Z: the nearest distances are 9 (facing faces)
    # and 10 (far faces), half each; the 95th percentile of [9]*4 + [10]*4 is 10.
    y_true = np.zeros((16, 8, 8))
    y_pred = np.zeros((16, 8, 8))
    y_true[0:2, 2:4, 2:4] = 1
    y_pred[10:12, 2:4, 2:4] = 1
    assert hausdorff95(y_true, y_pred) == pytest.approx(10.0)
    assert hausdorff95(y_true, y_pred, spacing=(2.5, 1.0, 1.0)) == pytest.approx(25.0)
    assert hausdorff95(y_true, y_true) == 0.0


def test_hausdorff95_single_voxels_with_spacing():
    y_true = np.zeros((8, 8, 8))
    y_pred = np.zeros((8, 8, 8))
    y_true[1, 2, 1] = 1
    y_pred[4, 2, 5] = 1  # offset (3, 0, 4) voxels
    assert hausdorff95(y_true, y_pred) == pytest.approx(5.0)
    assert hausdorff95(y_true, y_pred, spacing=(2.0, 1.0, 0.5)) == pytest.approx(math.hypot(6.0, 2.0))


def test_hausdorff95_ignores_one_stray_voxel():
    # a 6x6x6 box has 152 surface voxels; one stray voxel far away is under 5% of them
    y_true = np.zeros((32, 12, 12))
    y_true[2:8, 2:8, 2:8] = 1
    y_pred = y_true.copy()
    y_pred[28, 5, 5] = 1
    assert hausdorff95(y_true, y_pred) == pytest.approx(0.0)


def test_hausdorff95_empty_masks():
    zeros = np.zeros((4, 4, 4))
    box = zeros.copy()
    box[1:3, 1:3, 1:3] = 1
    assert hausdorff95(zeros, zeros) == 0.0
    assert math.isnan(hausdorff95(zeros, box))
    assert math.isnan(hausdorff95(box, zeros))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff95(box, box, spacing=(1.0, 1.0))


def test_segmentation_case_metrics_and_summarise():
    y_true, y_prob = hand_case()
    case = segmentation_case_metrics(y_true, y_prob, spacing=(1.0, 1.0, 1.0))
    assert case["dice"] == pytest.approx(2 / 3) and case["iou"] == pytest.approx(0.5)
    assert case["n_voxels"] == 24 and case["n_true"] == 4 and case["n_pred"] == 5
    assert case["hausdorff95"] == pytest.approx(hausdorff95(y_true, y_prob))
    empty = segmentation_case_metrics(np.zeros((2, 3, 4)), y_prob)  # truth empty, prediction not
    assert empty["dice"] == 0.0 and math.isnan(empty["hausdorff95"])
    summary = summarise([case, empty])
    assert summary["n_cases"] == 2
    assert summary["dice"] == pytest.approx(1 / 3)
    assert summary["iou"] == pytest.approx(0.25)
    assert summary["hausdorff95"] == pytest.approx(case["hausdorff95"])  # NaN left out
    assert summary["hausdorff95_n_nan"] == 1 and summary["dice_n_nan"] == 0
    assert summary["n_true"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="empty"):
        summarise([])
    with pytest.raises(ValueError, match="keys"):
        summarise([case, {"dice": 1.0}])


# --------------------------------------------------------------------------- AUC


def test_roc_auc_by_hand():
    # positives 0.9, 0.4, 0.7; negatives 0.8, 0.3, 0.2. Correctly ordered (pos > neg) pairs:
    # 0.9: 3, 0.4: 2, 0.7: 2 -> 7 of 9.
    labels = [1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.8, 0.4, 0.3, 0.7, 0.2]
    assert roc_auc(labels, scores) == pytest.approx(7 / 9)
    assert roc_auc(torch.tensor(labels), torch.tensor(scores)) == pytest.approx(7 / 9)
    # a tie between a positive and a negative counts half
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    fpr, tpr, thresholds = roc_curve_points(labels, scores)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert np.trapezoid(tpr, fpr) == pytest.approx(7 / 9)
    assert len(thresholds) == len(fpr)


def test_roc_auc_one_class_raises():
    with pytest.raises(ValueError, match="3 positives and 0 negatives"):
        roc_auc([1, 1, 1], [0.2, 0.5, 0.9])
    with pytest.raises(ValueError, match="0 positives and 2 negatives"):
        roc_curve_points([0, 0], [0.2, 0.5])
    with pytest.raises(ValueError, match="labels must hold only 0 and 1"):
        roc_auc([0, 1, 2], [0.1, 0.2, 0.3])


# --------------------------------------------------------------------------- registry


def test_every_task_metric_has_a_function_and_a_label():
    names = {m for task in BUILTIN_TASKS for m in task.metrics}
    assert names == set(METRICS)
    for name in names:
        assert metric_table_name(name)
    assert "paper" in metric_table_name("keras_mean_iou")
    assert "foreground IoU @0.5" in metric_table_name("iou")
    assert metric_table_name("keras_mean_iou") != metric_table_name("iou")
    with pytest.raises(ValueError, match="unknown metric 'miou'"):
        metric_table_name("miou")


def test_metrics_mapping_calls():
    y_true, y_prob = hand_case()
    assert METRICS["iou"](y_true, y_prob) == pytest.approx(0.5)
    assert METRICS["keras_mean_iou"](HAND_TRUE, HAND_PROB) == pytest.approx(float(hand_mean_iou()))
    assert METRICS["auc"]([1, 0], [0.9, 0.1]) == 1.0


# --------------------------------------------------------------------------- sliding window


def test_sliding_window_equals_whole_volume_for_pointwise_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv3d(2, 1, kernel_size=1), nn.Sigmoid())
    volume = torch.rand(2, 20, 27, 18)
    expected = model(volume[None])[0].detach()
    for mode in ("gaussian", "constant"):
        out, settings = sliding_window_predict(model, volume, roi_size=(8, 16, 8), sw_batch_size=3,
                                               overlap=0.5, mode=mode)
        assert out.shape == (1, 20, 27, 18)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert settings == {"roi_size": [8, 16, 8], "sw_batch_size": 3, "overlap": 0.5, "mode": mode,
                            "sigma_scale": 0.125, "padding_mode": "constant", "cval": 0.0}


def test_sliding_window_unet_shape_numpy_and_mode_restored():
    torch.manual_seed(0)
    model = UNet3D(base_channels=4)
    model.train()
    volume = np.random.default_rng(0).random((1, 20, 36, 30)).astype(np.float32)
    out, settings = sliding_window_predict(model, volume, roi_size=(16, 16, 16))
    assert isinstance(out, np.ndarray) and out.shape == (1, 20, 36, 30)
    assert np.all((out >= 0) & (out <= 1))
    assert model.training  # restored
    assert settings["mode"] == "gaussian" and settings["overlap"] == 0.25 and settings["sw_batch_size"] == 4
    # a volume smaller than the window is padded and cropped back
    small, _ = sliding_window_predict(model, volume[:, :10, :12, :9], roi_size=(16, 16, 16))
    assert small.shape == (1, 10, 12, 9)


@pytest.mark.parametrize("kwargs, match", [
    ({"roi_size": (8, 8)}, "roi_size"),
    ({"roi_size": (8, 8, 8), "overlap": 1.0}, "overlap"),
    ({"roi_size": (8, 8, 8), "mode": "mean"}, "mode"),
    ({"roi_size": (8, 8, 8), "sw_batch_size": 0}, "sw_batch_size"),
])
def test_sliding_window_bad_settings(kwargs, match):
    model = nn.Conv3d(1, 1, 1)
    with pytest.raises(ValueError, match=match):
        sliding_window_predict(model, torch.zeros(1, 8, 8, 8), **kwargs)
    with pytest.raises(ValueError, match="C, Z, Y, X"):
        sliding_window_predict(model, torch.zeros(8, 8, 8), roi_size=(8, 8, 8))
