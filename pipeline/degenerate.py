"""Results that look like numbers but mean "nothing was learnt", said out loud.

Three failures read as plausible numbers unless someone knows the metric well:

- a segmentation model that predicts background everywhere still scores a Keras mean_iou of about 50 (the
  background IoU is ~1, the foreground IoU 0, and the metric is their mean);
- a classifier whose scores do not separate the classes scores an AUC of about 50;
- a pretraining whose restorations are flat (a constant grey cube: the network learnt the mean intensity) has a
  low, falling MSE that looks like progress.

Each rule here is a pure function of numbers the pipeline already computes, returns None when the result is
fine and otherwise one short sentence (the `genesis.degenerate` tag's value and the table's footnote), so the
same wording reaches the MLflow run, results.md, results.csv and results.png.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = ["TAG", "DICE_FLOOR", "BACKGROUND_SHARE", "BACKGROUND_MEAN_IOU", "AUC_CHANCE", "FLAT_SPREAD", "segmentation_flag",
           "classification_flag", "finetune_flag", "restoration_spread", "restoration_flag"]

TAG = "genesis.degenerate"
"""The MLflow tag a degenerate run carries; its value is the rule's sentence."""

DICE_FLOOR = 0.05
"""A segmentation whose foreground Dice on the test split is below this has not found the target (a model that
has learnt anything overlaps it more than 5%)."""
BACKGROUND_SHARE = 0.01
"""...and it predicts "background only" when its predicted foreground voxels are fewer than this share of the
target's voxels."""
BACKGROUND_MEAN_IOU = 0.5
"""...and one whose Keras mean_iou (0..1) is at or below this is no better than predicting background everywhere
(which scores about 0.5: IoU 1 on the background, 0 on the target), whatever its Dice: an over-segmenting model
(Dice 0.13 from 14 times the target's voxels) is as useless as an empty one."""
AUC_CHANCE = 0.6
"""A classifier with a test AUC at or below this does not separate the classes: 0.4-0.6 is chance, below 0.4
is worse than chance (inverted scores, or a test split unlike the training data)."""
FLAT_SPREAD = 0.1
"""Restorations whose spread (see `restoration_spread`) is below this are flat."""


def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def segmentation_flag(dice: float, pred_voxels: float | None = None, true_voxels: float | None = None,
                      mean_iou: float | None = None) -> str | None:
    """The rule for a segmentation: foreground Dice (0..1, at the decision threshold, on the test split) below
    `DICE_FLOOR` is degenerate; "background only" when the predicted foreground is under `BACKGROUND_SHARE` of
    the target's voxels (or the counts are not known), else "misses the target"; above the floor, a Keras
    `mean_iou` at or below `BACKGROUND_MEAN_IOU` is "no better than background only". None when the Dice is
    undefined (no finished evaluation: a failure, not a degenerate model) or high enough."""
    if not _finite(dice):
        return None
    if float(dice) >= DICE_FLOOR:
        if _finite(mean_iou) and float(mean_iou) <= BACKGROUND_MEAN_IOU:
            return (f"no better than background only: Keras mean_iou {100 * float(mean_iou):.1f} <= "
                    f"{100 * BACKGROUND_MEAN_IOU:.0f}, foreground Dice {float(dice):.2f}")
        return None
    text = f"foreground Dice {float(dice):.2f}"
    if _finite(pred_voxels) and _finite(true_voxels) and float(true_voxels) > 0:
        share = float(pred_voxels) / float(true_voxels)
        if share >= BACKGROUND_SHARE:
            return f"misses the target: {text}, {100 * share:.0f}% of the target's voxels predicted"
        return f"background only: {text}, {100 * share:.1f}% of the target's voxels predicted"
    return f"background only: {text}"


def classification_flag(auc: float) -> str | None:
    """The rule for a classifier: a test AUC (0..1) at or below `AUC_CHANCE` is chance (0.4-0.6) or below chance
    (< 0.4). A band, not a confidence interval: on the demo's few candidates every interval includes 0.5, and on
    the paper's thousands an AUC of 0.58 excludes it yet is useless. None for an undefined AUC (one class)."""
    if not _finite(auc) or float(auc) > AUC_CHANCE:
        return None
    pct = 100 * float(auc)
    return f"chance: AUC {pct:.1f}" if float(auc) >= 1 - AUC_CHANCE else f"below chance: AUC {pct:.1f}"


def finetune_flag(kind: str, metrics: Mapping[str, float]) -> str | None:
    """The flag of one fine-tuning from its logged test metrics (`pipeline.finetune.evaluate`: names with
    `test_`). Segmentation reads the pooled foreground Dice (`test_dice_pooled`: all test voxels together, so a
    cube or case without target predicted empty does not count as a hit) and, from runs logged before it
    existed, the mean Dice over cases; predicted and target voxels from `test_n_pred` / `test_n_true`."""
    if kind == "classification":
        return classification_flag(metrics.get("test_auc", math.nan))
    dice = metrics.get("test_dice_pooled", metrics.get("test_dice", math.nan))
    return segmentation_flag(dice, metrics.get("test_n_pred"), metrics.get("test_n_true"),
                             metrics.get("test_keras_mean_iou"))


def _array(x) -> np.ndarray:
    """A numpy float64 copy of an array or a (CPU or GPU, any float dtype) tensor."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def restoration_spread(target, restored) -> float:
    """How much a restoration varies compared with what it should restore: per cube, the standard deviation of
    the restored voxels over that of the target's, averaged over cubes with a non-constant target (a ratio of
    means, so one near-constant target cube cannot dominate). 1 for a faithful restoration, 0 for a constant
    one. `target`, `restored`: arrays or tensors of equal shape, cubes along the first axis."""
    t, r = _array(target), _array(restored)
    if t.shape != r.shape or t.ndim < 2:
        raise ValueError(f"target and restored must be batches of equal shape, got {t.shape} and {r.shape}")
    t_sd = t.reshape(len(t), -1).std(axis=1)
    r_sd = r.reshape(len(r), -1).std(axis=1)
    keep = t_sd > 1e-6
    if not keep.any():
        return math.nan
    return float(r_sd[keep].mean() / t_sd[keep].mean())


def restoration_flag(spread: float) -> str | None:
    """The rule for a pretraining: restorations with a spread below `FLAT_SPREAD` are flat (the network outputs
    about the same grey value everywhere). None for an unknown spread or a restoration that varies."""
    if not _finite(spread) or float(spread) >= FLAT_SPREAD:
        return None
    return f"flat restorations: spread {float(spread):.2f} of the target's"
