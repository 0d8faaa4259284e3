"""Degenerate results are flagged: one rule per kind on synthetic predictions (a background-only segmentation, a
classifier at chance, a flat restoration), the flag on a real test evaluation, and the table's marker."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from conftest import TASK_CUBE

from pipeline import degenerate as D
from pipeline import evaluation as E
from pipeline.finetune.evaluate import pooled_dice
from pipeline.tasks.registry import get_task

CPU = torch.device("cpu")


def _cases(rng, n=3, shape=(16, 32, 32)):
    """n truth masks, each a box of foreground (about 3% of the voxels) at a random place."""
    out = []
    for _ in range(n):
        t = np.zeros(shape, bool)
        z, y, x = rng.integers(2, 8), rng.integers(4, 20), rng.integers(4, 20)
        t[z:z + 5, y:y + 8, x:x + 8] = True
        out.append(t)
    return out


def _segmentation_metrics(truths, probs) -> dict:
    """The test metrics as `pipeline.finetune.evaluate` computes them for a segmentation."""
    counts = sum(E.keras_mean_iou_counts(t, p) for t, p in zip(truths, probs))
    per_case = [E.segmentation_case_metrics(t, p) for t, p in zip(truths, probs)]
    metrics = {"test_keras_mean_iou": E.keras_mean_iou_from_counts(counts), "test_dice_pooled": pooled_dice(counts)}
    metrics.update({f"test_{k}": float(v) for k, v in E.summarise(per_case).items()})
    return metrics


def test_a_background_only_segmentation_is_flagged_though_its_keras_mean_iou_is_near_50(rng):
    truths = _cases(rng)
    background = _segmentation_metrics(truths, [np.full(t.shape, 0.2, np.float32) for t in truths])
    assert 0.45 < background["test_keras_mean_iou"] <= 0.5  # the number that reads as "half right"
    assert background["test_dice_pooled"] == 0.0 and background["test_n_pred"] == 0
    flag = D.finetune_flag("segmentation", background)
    assert flag == "background only: foreground Dice 0.00, 0.0% of the target's voxels predicted"

    good = _segmentation_metrics(truths, [np.where(t, 0.9, 0.1).astype(np.float32) for t in truths])
    assert good["test_dice_pooled"] == 1.0 and D.finetune_flag("segmentation", good) is None

    elsewhere = [np.roll(t, 12, axis=2).astype(np.float32) * 0.9 for t in truths]  # right size, wrong place
    missed = _segmentation_metrics(truths, elsewhere)
    assert missed["test_dice_pooled"] < D.DICE_FLOOR
    assert D.finetune_flag("segmentation", missed).startswith("misses the target: foreground Dice 0.0")


def test_the_segmentation_rule_at_its_edges():
    assert D.segmentation_flag(D.DICE_FLOOR) is None
    assert D.segmentation_flag(D.DICE_FLOOR - 1e-9) == "background only: foreground Dice 0.05"  # no voxel counts
    assert D.segmentation_flag(math.nan) is None  # no evaluation: a failure, not a degenerate model
    # runs logged before test_dice_pooled existed fall back to the mean Dice over cases
    assert D.finetune_flag("segmentation", {"test_dice": 0.0, "test_n_pred": 0.0, "test_n_true": 100.0}) \
        .startswith("background only")
    assert D.finetune_flag("segmentation", {"test_dice": 0.7}) is None


def test_an_over_segmentation_no_better_than_background_is_flagged():
    """The demo's BMS at half its labels once: Dice 0.13 from 14 times the target's voxels, Keras mean_iou 33.4, worse
    than predicting background everywhere (~50): flagged, though its Dice clears the empty-model floor."""
    counts = {"test_dice_pooled": 0.13, "test_n_pred": 435147.0, "test_n_true": 31566.0, "test_keras_mean_iou": 0.334}
    flag = D.finetune_flag("segmentation", counts)
    assert flag is not None and flag.startswith("no better than background only") and "33.4" in flag
    assert D.finetune_flag("segmentation", {**counts, "test_keras_mean_iou": 0.51}) is None
    assert D.finetune_flag("segmentation", {"test_dice_pooled": 0.6, "test_keras_mean_iou": 0.78}) is None


def test_a_classifier_at_chance_is_flagged(rng):
    labels = np.r_[np.ones(50), np.zeros(50)]
    noise = rng.random(100)
    auc = E.roc_auc(labels, np.full(100, 0.3))  # one score for all: every pair tied
    assert auc == 0.5 and D.finetune_flag("classification", {"test_auc": auc}) == "chance: AUC 50.0"
    random_auc = E.roc_auc(labels, noise)
    assert 0.4 <= random_auc <= 0.6 and D.classification_flag(random_auc).startswith("chance: AUC ")
    inverted = E.roc_auc(labels, -labels + 0.5 * noise)
    assert inverted < 0.4 and D.classification_flag(inverted) == f"below chance: AUC {100 * inverted:.1f}"
    learnt = E.roc_auc(labels, labels + noise)
    assert learnt > 0.9 and D.classification_flag(learnt) is None
    assert D.classification_flag(D.AUC_CHANCE) is not None and D.classification_flag(D.AUC_CHANCE + 0.01) is None
    assert D.finetune_flag("classification", {"test_auc": math.nan}) is None  # one class: AUC undefined


def test_flat_restorations_are_flagged_and_named_in_the_figure(rng):
    from pipeline.training.pictures import figure_pairs, restoration_check, restoration_figure

    cubes = rng.random((2, 16, 16, 16)).astype(np.float32)
    x, y = figure_pairs(cubes, seed=1)
    flat = torch.full_like(y, float(y.mean()))
    assert D.restoration_spread(y, flat) == 0.0 and restoration_check(y, flat)[1].startswith("flat restorations")
    assert D.restoration_spread(y, y) == pytest.approx(1.0) and restoration_check(y, y) == (pytest.approx(1.0), None)
    washed = 0.05 * y + 0.4  # the right picture at 5% contrast: still flat
    assert D.restoration_spread(y, washed) == pytest.approx(0.05, rel=1e-4)
    assert D.restoration_flag(D.restoration_spread(y, washed)) == "flat restorations: spread 0.05 of the target's"
    assert D.restoration_spread(y.bfloat16(), y.bfloat16()) == pytest.approx(1.0)  # what a bf16 run restores
    with pytest.raises(ValueError, match="equal shape"):
        D.restoration_spread(y, y[:1])
    import matplotlib.pyplot as plt

    for restored, expected in ((flat, "DEGENERATE: flat restorations"), (y, None)):
        fig = restoration_figure(x, y, restored, "epoch 3")
        title = fig._suptitle.get_text()
        assert (expected in title) if expected else title == "epoch 3"
        plt.close(fig)


class _Constant(nn.Module):
    """A network that learnt nothing: the same output for every voxel (segmentation) or cube (classification)."""

    def __init__(self, value: float, classification: bool = False):
        super().__init__()
        self.value, self.classification = value, classification
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        shape = (len(x), 1) if self.classification else x[:, :1].shape
        return torch.full(shape, self.value, dtype=x.dtype, device=x.device) + 0 * self.scale


@pytest.mark.parametrize("task", ["ncs", "lcs", "ecc"])
def test_evaluate_test_flags_a_model_that_learnt_nothing(task_stores, task):
    from pipeline.finetune.config import tiny
    from pipeline.finetune.evaluate import evaluate_test
    from pipeline.patches.store import PatchStore

    spec = get_task(task).with_overrides(cube_size=TASK_CUBE)
    config = tiny(spec)
    classification = config.kind == "classification"
    result = evaluate_test(_Constant(0.0 if classification else 0.1, classification), PatchStore(task_stores[task]),
                           config, spec, CPU, figures=0)
    flag = result.tags[D.TAG]
    if classification:
        assert result.metrics["test_auc"] == 0.5 and flag == "chance: AUC 50.0"
    else:  # NCS (cubes) and LCS (whole volumes) both carry a pooled foreground Dice now
        assert result.metrics["test_dice_pooled"] == 0.0 and result.metrics["test_n_pred"] == 0
        assert result.metrics["test_keras_mean_iou"] == pytest.approx(0.5, abs=0.05)
        assert flag.startswith("background only: foreground Dice 0.00")


def test_the_table_marks_a_degenerate_row_in_markdown_csv_and_picture(tmp_path):
    from pipeline.transfer.table import DEGENERATE_MARK, failures, results_table, table_lines, write_results

    def cell(init, seed, value, flag=""):
        return {"cell": f"ncs|{init}|{seed}", "task": "ncs", "init": init, "label_fraction": 1.0, "seed": seed,
                "status": "FINISHED", "error": "", "run_id": f"r{init}{seed}", "metric": "test_keras_mean_iou",
                "value": value, "start_time": pd.Timestamp(0, unit="ms", tz="UTC"), "degenerate": flag}

    bg = "background only: foreground Dice 0.00, 0.0% of the target's voxels predicted"
    cells = pd.DataFrame([cell("scratch", 0, 0.4985, bg), cell("scratch", 1, 0.5029, bg),
                          cell("models:/g/1", 0, 0.81), cell("models:/g/1", 1, 0.79)])
    table = results_table(cells)
    flagged = table.set_index("init")
    assert flagged.loc["scratch", "n_degenerate"] == 2 and flagged.loc["models:/g/1", "n_degenerate"] == 0
    assert flagged.loc["scratch", "degenerate"] == f"2 of 2 runs: {bg}"
    paths = write_results(table, failures(cells), cells, tmp_path)
    md = paths["results.md"].read_text(encoding="utf-8")
    assert f"| scratch | 100% | 50.07 ± 0.31 {DEGENERATE_MARK} |" in md
    assert "| models:/g/1 | 100% | 80.00 ± 1.41 |" in md  # a learnt row has no marker
    assert f"{DEGENERATE_MARK} degenerate: the model did not learn the task" in md
    assert f"- {DEGENERATE_MARK} NCS scratch, 100% labels: 2 of 2 runs: {bg}" in md
    assert pd.read_csv(paths["results.csv"])["n_degenerate"].tolist() == [2, 0]
    picture = "\n".join(text for text, _ in table_lines(table))
    assert f"50.07 ± 0.31 {DEGENERATE_MARK}" in picture and "NCS scratch, 100% labels: 2 of 2 runs" in picture
