"""Metrics of the five target tasks, as the paper computes them and as users expect them.

Pure functions on numpy arrays or torch tensors: no I/O, no tracking. Library code where it
exists (scikit-learn for ROC, MONAI for Dice / IoU / Hausdorff and sliding windows); the one
metric written here is the reference's Keras ``mean_iou``, because no library has it.

Two different "IoU"s live here, and tables must say which one they show
(``metric_table_name``; docs/transfer.md, "Evaluation"):

* ``keras_mean_iou`` -- the paper's NCS / LCS / BMS number (the reference's Keras ``mean_iou``,
  keras/downstream_tasks): mean of background and foreground IoU, over all evaluated voxels
  pooled, averaged over 10 thresholds. It is far higher than
* ``foreground_iou`` -- the usual per-case IoU of the foreground at threshold 0.5
  (77.14 vs 59.22 on the same model in the reference's NCS notebook).

Binarisation everywhere is strict: foreground = ``probability > threshold`` (the reference's
``y_pred > t``), so a probability of exactly 0.5 is background at threshold 0.5.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

__all__ = [
    "KERAS_MEAN_IOU_THRESHOLDS", "METRICS", "SEGMENTATION_CASE_METRICS", "dice", "foreground_iou",
    "hausdorff95", "keras_mean_iou", "keras_mean_iou_counts", "keras_mean_iou_from_counts",
    "metric_table_name", "roc_auc", "roc_curve_points", "segmentation_case_metrics",
    "sliding_window_predict", "summarise",
]

#: The reference's ``np.arange(0.5, 1.0, 0.05)``, written as the decimals it means.
KERAS_MEAN_IOU_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * k, 2) for k in range(10))
#: Per-case segmentation metrics that ``summarise`` reports with a count of undefined (NaN) cases.
SEGMENTATION_CASE_METRICS = ("dice", "iou", "hausdorff95")
#: Columns of ``keras_mean_iou_counts``.
COUNT_COLUMNS = ("tp", "fp", "fn", "tn")

ArrayLike = Any  # numpy array, torch tensor, or nested sequence


def _to_numpy(x: ArrayLike, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"{name} must be a numeric array, got dtype object")
    return arr


def _binary_truth(y_true: ArrayLike, name: str = "y_true") -> np.ndarray:
    """Ground truth as a bool array; values must be 0/1 (or bool)."""
    arr = _to_numpy(y_true, name)
    if arr.dtype == bool:
        return arr
    if arr.size and not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(f"{name} must hold only 0 and 1 (a binary mask or binary labels), found values "
                         f"{bad.tolist()}; binarise it first (for example labels > 0)")
    return arr.astype(bool)


def _pair(y_true: ArrayLike, y_prob: ArrayLike,
          names: tuple[str, str] = ("y_true", "y_prob")) -> tuple[np.ndarray, np.ndarray]:
    truth = _binary_truth(y_true, names[0])
    prob = _to_numpy(y_prob, names[1])
    if prob.dtype == bool:
        prob = prob.astype(np.float32)
    if truth.shape != prob.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got {truth.shape} and {prob.shape}")
    if prob.size == 0:
        raise ValueError(f"{names[0]} and {names[1]} are empty: there is nothing to evaluate")
    if np.isnan(prob).any():
        raise ValueError(f"{names[1]} contains {int(np.isnan(prob).sum())} NaN values; the model output is invalid")
    return truth, prob


# --------------------------------------------------------------------------- classification


def _check_two_classes(labels: np.ndarray) -> None:
    n_pos = int(labels.sum())
    n_neg = int(labels.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC is undefined with only one class present: {n_pos} positives and {n_neg} negatives; "
                         "evaluate on a split that holds both classes")


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (scikit-learn ``roc_auc_score``): the fraction of
    (positive, negative) pairs ordered correctly, ties counted half. The NCC / ECC metric.

    ``labels`` 0/1, ``scores`` any real values (probabilities), same shape (flattened).
    Raises ValueError when only one class is present (AUC undefined), naming the counts.
    """
    from sklearn.metrics import roc_auc_score

    truth, prob = _pair(labels, scores, ("labels", "scores"))
    truth, prob = truth.ravel(), prob.ravel()
    _check_two_classes(truth)
    return float(roc_auc_score(truth, prob))


def roc_curve_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the ROC curve (scikit-learn ``roc_curve``), for plotting.
    Same inputs and one-class error as ``roc_auc``."""
    from sklearn.metrics import roc_curve

    truth, prob = _pair(labels, scores, ("labels", "scores"))
    truth, prob = truth.ravel(), prob.ravel()
    _check_two_classes(truth)
    fpr, tpr, thresholds = roc_curve(truth, prob)
    return fpr, tpr, thresholds


# --------------------------------------------------------------------------- Keras mean_iou (paper)


def keras_mean_iou_counts(y_true: ArrayLike, y_prob: ArrayLike,
                          thresholds: Sequence[float] = KERAS_MEAN_IOU_THRESHOLDS) -> np.ndarray:
    """Confusion counts of the foreground class per threshold: int64 array (len(thresholds), 4)
    with columns (tp, fp, fn, tn), prediction = ``y_prob > t``.

    Counts add: summing the arrays of several cases (or batches) and passing the sum to
    ``keras_mean_iou_from_counts`` equals ``keras_mean_iou`` on all voxels concatenated, without
    holding them all in memory.
    """
    truth, prob = _pair(y_true, y_prob)
    truth, prob = truth.ravel(), prob.ravel()
    n = truth.size
    n_true = int(truth.sum())
    prob_in_truth = prob[truth]
    counts = np.empty((len(thresholds), 4), dtype=np.int64)
    for i, t in enumerate(thresholds):
        n_pred = int(np.count_nonzero(prob > t))
        tp = int(np.count_nonzero(prob_in_truth > t))
        fp = n_pred - tp
        fn = n_true - tp
        counts[i] = (tp, fp, fn, n - tp - fp - fn)
    return counts


def keras_mean_iou_from_counts(counts: ArrayLike) -> float:
    """The Keras ``mean_iou`` from ``keras_mean_iou_counts`` rows (tp, fp, fn, tn), one per threshold.

    Per threshold, as ``tf.metrics.mean_iou(labels, y_pred > t, num_classes=2)``:
    IoU_fg = tp / (tp + fp + fn), IoU_bg = tn / (tn + fn + fp), score = mean of the classes whose
    denominator is non-zero. A class absent from both truth and prediction (zero denominator) is
    left out of that mean, as TF does, so an all-background cube predicted all background scores
    1.0 (the background IoU alone). The result is the plain mean of the per-threshold scores.
    """
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != 4 or c.shape[0] == 0:
        raise ValueError(f"counts must have shape (n_thresholds, 4) with columns {COUNT_COLUMNS}, got {c.shape}")
    tp, fp, fn, tn = c.T
    if np.any(c.sum(axis=1) == 0):
        raise ValueError("counts hold a threshold row with no voxels; there is nothing to evaluate")
    scores = []
    for row in zip(tp, fp, fn, tn):
        r_tp, r_fp, r_fn, r_tn = row
        ious = [num / den for num, den in ((r_tp, r_tp + r_fp + r_fn), (r_tn, r_tn + r_fn + r_fp)) if den > 0]
        scores.append(sum(ious) / len(ious))
    return float(np.mean(scores))


def keras_mean_iou(y_true: ArrayLike, y_prob: ArrayLike) -> float:
    """The paper's segmentation metric (NCS, LCS, BMS): the reference's Keras ``mean_iou``
    (MrGiovanni/ModelsGenesis, keras/downstream_tasks).

    For each threshold t in 0.50, 0.55, ..., 0.95 (10 thresholds): binarise ``y_prob > t``,
    take over ALL voxels of the arrays together (not per case) the IoU of the foreground and the
    IoU of the background, and their mean (``tf.metrics.mean_iou`` with num_classes=2); then
    average over the 10 thresholds. A class with zero denominator (absent in both truth and
    prediction) is ignored in that threshold's mean, like TF. Returns a fraction in [0, 1]
    (the paper's tables show it x100).

    ``y_true`` is a 0/1 mask, ``y_prob`` probabilities of the same shape (any shape; a whole test
    set stacked, or a sum of ``keras_mean_iou_counts`` for data that does not fit in memory).
    """
    return keras_mean_iou_from_counts(keras_mean_iou_counts(y_true, y_prob))


# --------------------------------------------------------------------------- per-case segmentation


def _case(y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One case's truth and thresholded prediction as bool spatial arrays. Leading axes of size 1
    (batch, channel) are dropped while more than 3 axes remain."""
    truth, prob = _pair(y_true, y_prob)
    while truth.ndim > 3 and truth.shape[0] == 1:
        truth, prob = truth[0], prob[0]
    if truth.ndim > 3:
        raise ValueError(f"a case must be spatial (Z, Y, X), optionally with leading axes of size 1; got shape "
                         f"{truth.shape}; evaluate cases one at a time")
    return truth, prob > threshold


def _monai_pair(truth: np.ndarray, pred: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, *spatial) float tensors, MONAI's (batch, class, ...) one-hot layout."""
    return (torch.from_numpy(pred.astype(np.float32))[None, None],
            torch.from_numpy(truth.astype(np.float32))[None, None])


def dice(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = 0.5) -> float:
    """Foreground Dice of one case at ``y_prob > threshold`` (MONAI ``compute_dice``).
    Empty truth: 1.0 if the prediction is empty too, else 0.0 (MONAI ``ignore_empty=False``)."""
    from monai.metrics import compute_dice

    truth, pred = _case(y_true, y_prob, threshold)
    y_pred_t, y_t = _monai_pair(truth, pred)
    return float(compute_dice(y_pred_t, y_t, include_background=True, ignore_empty=False)[0, 0])


def foreground_iou(y_true: ArrayLike, y_prob: ArrayLike, threshold: float = 0.5) -> float:
    """Foreground IoU (Jaccard) of one case at ``y_prob > threshold`` (MONAI ``compute_iou``).
    Not the paper's metric (that is ``keras_mean_iou``). Empty truth: 1.0 if the prediction is
    empty too, else 0.0 (MONAI ``ignore_empty=False``)."""
    from monai.metrics import compute_iou

    truth, pred = _case(y_true, y_prob, threshold)
    y_pred_t, y_t = _monai_pair(truth, pred)
    return float(compute_iou(y_pred_t, y_t, include_background=True, ignore_empty=False)[0, 0])


def hausdorff95(y_true: ArrayLike, y_prob: ArrayLike, spacing: Sequence[float] | None = None,
                threshold: float = 0.5) -> float:
    """Symmetric 95th-percentile Hausdorff distance between the surfaces of truth and
    ``y_prob > threshold`` for one case (MONAI ``compute_hausdorff_distance``, percentile=95).

    ``spacing``: voxel size per spatial axis, in the arrays' axis order (Z, Y, X), giving
    millimetres; None gives voxel units. Empty masks: both empty -> 0.0 (identical, empty
    surfaces); exactly one empty -> NaN (no surface to measure to; ``summarise`` counts them).
    """
    from monai.metrics import compute_hausdorff_distance

    truth, pred = _case(y_true, y_prob, threshold)
    if spacing is not None:
        spacing = tuple(float(s) for s in spacing)
        if len(spacing) != truth.ndim or any(not s > 0 for s in spacing):
            raise ValueError(f"spacing must give one positive voxel size per spatial axis of shape {truth.shape}, "
                             f"got {spacing}")
    has_truth, has_pred = bool(truth.any()), bool(pred.any())
    if not has_truth and not has_pred:
        return 0.0
    if not has_truth or not has_pred:
        return math.nan
    y_pred_t, y_t = _monai_pair(truth, pred)
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd = compute_hausdorff_distance(y_pred_t, y_t, include_background=True, percentile=95, spacing=spacing)
    return float(hd[0, 0])


def segmentation_case_metrics(y_true: ArrayLike, y_prob: ArrayLike, spacing: Sequence[float] | None = None,
                              threshold: float = 0.5) -> dict[str, float]:
    """Dice, foreground IoU and Hausdorff 95 of one case at ``threshold``, with its voxel counts
    (``n_voxels``, ``n_true`` foreground in truth, ``n_pred`` foreground predicted), so empty cases
    can be seen. Degenerate cases as in ``dice`` / ``foreground_iou`` / ``hausdorff95``."""
    truth, pred = _case(y_true, y_prob, threshold)
    return {
        "dice": dice(truth, pred.astype(np.float32), threshold=0.5),
        "iou": foreground_iou(truth, pred.astype(np.float32), threshold=0.5),
        "hausdorff95": hausdorff95(truth, pred.astype(np.float32), spacing=spacing, threshold=0.5),
        "n_voxels": int(truth.size),
        "n_true": int(truth.sum()),
        "n_pred": int(pred.sum()),
    }


def summarise(per_case: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Means over cases of every key of ``per_case`` (dicts from ``segmentation_case_metrics``).

    NaN values (Hausdorff with one empty mask) are left out of their mean; for each of
    ``SEGMENTATION_CASE_METRICS`` present, ``<name>_sd`` is the sample standard deviation over the
    cases (ddof=1, the spread a clinician reads beside the mean: Dice mean +- sd over cases; NaN
    with fewer than two finite values) and ``<name>_n_nan`` says how many were NaN; ``n_cases``
    counts the cases. A metric NaN in every case has mean NaN. The result does not depend on the
    order of the cases.
    """
    if len(per_case) == 0:
        raise ValueError("per_case is empty: there are no cases to summarise")
    keys = list(per_case[0])
    for i, case in enumerate(per_case):
        if set(case) != set(keys):
            raise ValueError(f"case {i} has keys {sorted(case)}, expected {sorted(keys)} as case 0")
    out: dict[str, float] = {"n_cases": len(per_case)}
    for key in keys:
        values = np.asarray([float(case[key]) for case in per_case], dtype=np.float64)
        finite = values[~np.isnan(values)]
        out[key] = float(math.fsum(finite) / finite.size) if finite.size else math.nan  # fsum: order-free
        if key in SEGMENTATION_CASE_METRICS:
            out[f"{key}_sd"] = _sample_sd(finite)
            out[f"{key}_n_nan"] = int(values.size - finite.size)
    return out


def _sample_sd(values: np.ndarray) -> float:
    """Sample standard deviation (ddof=1) of ``values``, summed exactly (independent of their order);
    NaN with fewer than two values."""
    if values.size < 2:
        return math.nan
    mean = math.fsum(values) / values.size
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (values.size - 1))


# --------------------------------------------------------------------------- registry

METRICS: dict[str, Callable[..., float]] = {
    "auc": roc_auc,
    "keras_mean_iou": keras_mean_iou,
    "dice": dice,
    "iou": foreground_iou,
    "hausdorff95": hausdorff95,
}
"""Task metric names (``TaskSpec.metrics``) -> function(y_true, y_prob, ...) -> float."""

_TABLE_NAMES = {
    "auc": "AUC (ROC, over all cubes)",
    "keras_mean_iou": "Keras mean_iou (paper): mean of background and foreground IoU, "
                      "thresholds 0.50-0.95, all voxels pooled",
    "dice": "Dice, foreground @0.5 (mean over cases)",
    "iou": "foreground IoU @0.5 (mean over cases)",
    "hausdorff95": "Hausdorff 95 @0.5 (mm with spacing, else voxels; mean over cases)",
}


def metric_table_name(name: str) -> str:
    """Human label for a metric name, saying which metric a table column shows."""
    try:
        return _TABLE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; known metrics: {sorted(_TABLE_NAMES)}") from None


# --------------------------------------------------------------------------- whole-volume inference

BLEND_MODES = ("gaussian", "constant")


def sliding_window_predict(model: torch.nn.Module, volume: ArrayLike, roi_size: Sequence[int], sw_batch_size: int = 4,
                           overlap: float = 0.25, mode: str = "gaussian",
                           sigma_scale: float = 0.125) -> tuple[Any, dict[str, Any]]:
    """Predict a whole volume window by window (MONAI ``sliding_window_inference``).

    ``volume``: (C, Z, Y, X) float array or tensor. ``roi_size``: window (Z, Y, X) the model
    accepts (multiples of 8 for UNet3D); a volume smaller than it is padded with zeros and the
    output cropped back. Overlapping windows are blended with ``mode`` ("gaussian": weights
    falling off from each window's centre, sd = ``sigma_scale`` x roi; "constant": plain mean).

    The model runs in eval mode under ``torch.no_grad`` on its own device, and its training flag
    is restored afterwards. Its output is used as is (UNet3D's is a sigmoid probability). Results do
    not depend on ``sw_batch_size`` (it only sets how many windows go through one forward): a
    "batch" or "instance" model's window output does not depend on the other windows of its batch,
    and a "batch_stats" model (the reference's norm) predicts window by window
    (``pipeline.models.norms.per_cube_statistics``), each normalised with its own statistics.

    Returns (probabilities (C_out, Z, Y, X), same kind as ``volume``: numpy in -> numpy out,
    tensor in -> tensor on the volume's device; settings dict to record: roi_size, sw_batch_size,
    overlap, mode, sigma_scale, padding_mode, cval).
    """
    is_tensor = isinstance(volume, torch.Tensor)
    x = volume if is_tensor else torch.as_tensor(np.asarray(volume))
    if x.ndim != 4:
        raise ValueError(f"volume must be (C, Z, Y, X), got shape {tuple(x.shape)}")
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != 3 or any(r < 1 for r in roi):
        raise ValueError(f"roi_size must be three positive ints (Z, Y, X), got {roi_size!r}")
    if not isinstance(sw_batch_size, int) or sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be a positive int, got {sw_batch_size!r}")
    if not 0.0 <= float(overlap) < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    if mode not in BLEND_MODES:
        raise ValueError(f"mode must be one of {BLEND_MODES}, got {mode!r}")
    from monai.inferers import sliding_window_inference

    from pipeline.models.norms import per_cube_statistics

    settings = {"roi_size": list(roi), "sw_batch_size": sw_batch_size, "overlap": float(overlap), "mode": mode,
                "sigma_scale": float(sigma_scale), "padding_mode": "constant", "cval": 0.0}
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), per_cube_statistics(model):
            out = sliding_window_inference(
                x[None].to(device=device, dtype=torch.float32), roi_size=roi, sw_batch_size=sw_batch_size,
                predictor=model, overlap=float(overlap), mode=mode, sigma_scale=float(sigma_scale),
                padding_mode="constant", cval=0.0)
    finally:
        model.train(was_training)
    out = out.as_tensor()[0] if hasattr(out, "as_tensor") else out[0]  # drop MONAI MetaTensor wrapping
    if is_tensor:
        return out.to(volume.device), settings
    return out.cpu().numpy(), settings
