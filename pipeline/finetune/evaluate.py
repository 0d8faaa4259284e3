"""The test split of a fine-tuned model: predictions, the task's metrics, predictions.csv and figures.

- Classification (NCC, ECC): every test cube -> score (sigmoid of the logit) -> AUC; predictions.csv has
  one row per candidate (case_id, candidate = source_id, label, score); a ROC curve figure.
- Segmentation on cubes (NCS): every test cube -> probabilities; `test_keras_mean_iou` (the paper's metric) over
  all test voxels together, and dice / iou / hausdorff95 per cube, logged as the mean over cubes (`test_dice`)
  and its sample sd (`test_dice_sd`, ddof=1) (a cube is one nodule: predictions.csv has one row per cube, its
  case_id and candidate).
- Segmentation on whole volumes (LCS, BMS): every test case of `scans.parquet` is read from the volume
  store, normalised with the task's intensity rule (`pipeline.tasks.sampling`, as the patch store did),
  resized by `config.volume_scale` (the store's crop -> cube resize, e.g. BMS; 1 for LCS, whose tiny preset
  crops cubes without resampling), predicted by sliding window (roi = the network input), the
  probabilities resized back to the scan's grid, and scored against the stored label per case
  (Hausdorff in mm with the scan's spacing); `test_keras_mean_iou` (the paper's metric) sums the confusion counts
  of all cases (all test voxels pooled); what a clinician reads is the per-case foreground Dice, `test_dice` (mean
  over cases) and `test_dice_sd` (sample sd over cases, ddof=1; NaN with one case).
  predictions.csv has one row per case; an overlay figure per case (the slice with most target).
- Every segmentation (NCS, LCS, BMS) also logs `test_dice_pooled`: the foreground Dice of all test voxels
  together at the decision threshold (from the same counts as the Keras mean_iou), and the mean predicted and
  target foreground voxels per case (`test_n_pred`, `test_n_true`), so a model that predicts background only is
  told from one that learnt (`pipeline.degenerate`: its Keras mean_iou is ~50 all the same).

A degenerate result (`pipeline.degenerate.finetune_flag`: background only, chance AUC) comes back in
`TestResult.tags` as `genesis.degenerate`, for the fine-tuning's MLflow run.

No number depends on the evaluation batch size, `sw_batch_size` or the order of the test rows: predictions are
per cube (`steps.predict`, `evaluation.sliding_window_predict`), counts are integers, means are exact sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline import degenerate
from pipeline import evaluation as E
from pipeline.finetune.config import FinetuneConfig
from pipeline.finetune.data import batches
from pipeline.finetune.steps import predict

__all__ = ["TestResult", "evaluate_test", "pooled_dice", "count_columns", "counts_from_columns", "model_preprocessing",
           "PREPROCESSING_FORMAT", "DECISION_THRESHOLD", "SW_MODE", "SW_SIGMA_SCALE"]

PREPROCESSING_FORMAT, PREPROCESSING_VERSION = "genesis-preprocessing", 1
#: Foreground is `probability > 0.5` (`pipeline.evaluation`: strict), a positive candidate `sigmoid(logit) > 0.5`.
DECISION_THRESHOLD = 0.5
#: `evaluation.sliding_window_predict`'s blending, as `predict_volume` calls it.
SW_MODE, SW_SIGMA_SCALE = "gaussian", 0.125


@dataclass
class TestResult:
    metrics: dict[str, float]
    predictions: pd.DataFrame
    figures: list = field(default_factory=list)  # (matplotlib figure, artifact name)
    settings: dict = field(default_factory=dict)
    tags: dict = field(default_factory=dict)
    """MLflow tags for the run: `genesis.degenerate` with the rule's sentence when the result is degenerate."""


def _flagged(result: TestResult, kind: str) -> TestResult:
    """The result with its degenerate flag (if any) as a tag."""
    flag = degenerate.finetune_flag(kind, result.metrics)
    if flag:
        result.tags[degenerate.TAG] = flag
    return result


def pooled_dice(counts: np.ndarray) -> float:
    """Foreground Dice of all voxels of `keras_mean_iou_counts` rows together at the decision threshold (the
    row of threshold 0.50): 2 tp / (2 tp + fp + fn); NaN when neither truth nor prediction has foreground."""
    tp, fp, fn, _ = (float(v) for v in np.asarray(counts)[E.KERAS_MEAN_IOU_THRESHOLDS.index(DECISION_THRESHOLD)])
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn > 0 else float("nan")


def evaluate_test(model, store, config: FinetuneConfig, spec, device, figures: int = 4) -> TestResult:
    if config.kind == "classification":
        return _flagged(_classification(model, store, config, device), config.kind)
    if config.evaluation == "whole_volume":
        return _flagged(_whole_volume(model, store, config, spec, device, figures), config.kind)
    return _flagged(_cubes(model, store, config, device), config.kind)


def _test_rows(store) -> np.ndarray:
    rows = np.sort(store.rows("test"))
    if not len(rows):
        raise ValueError(f"{store.path}: no test cubes to evaluate")
    return rows


def _classification(model, store, config, device) -> TestResult:
    rows = _test_rows(store)
    scores = torch.cat([predict(model, x, config, device) for x, _ in batches(store, rows, config, config.batch_size)])
    idx = store.index.set_index("row").loc[rows]
    pred = pd.DataFrame({"case_id": idx["case_id"].to_numpy(), "candidate": idx["source_id"].to_numpy(),
                         "label": idx["label"].to_numpy().astype(int), "score": scores.numpy().astype(np.float64),
                         "row": rows})
    labels, s = pred["label"].to_numpy(), pred["score"].to_numpy()
    metrics = {"test_n": float(len(rows)), "test_positives": float(labels.sum())}
    figs = []
    if 0 < labels.sum() < len(labels):
        metrics["test_auc"] = E.roc_auc(labels, s)
        figs.append((_roc_figure(*E.roc_curve_points(labels, s)[:2], metrics["test_auc"]), "test/roc.png"))
    else:
        metrics["test_auc"] = float("nan")  # one class only: AUC undefined
    return TestResult(metrics, pred, figs)


def _cubes(model, store, config, device) -> TestResult:
    rows = _test_rows(store)
    idx = store.index.set_index("row").loc[rows]
    counts, per_cube = 0, []
    for i, (x, y) in zip(range(0, len(rows), config.batch_size), batches(store, rows, config, config.batch_size)):
        prob = predict(model, x, config, device).numpy()
        truth = y.numpy().astype(bool)
        for t, p in zip(truth, prob):
            c = E.keras_mean_iou_counts(t, p)
            counts = counts + c
            per_cube.append({**E.segmentation_case_metrics(t, p), **count_columns(c)})
    pred = pd.DataFrame(per_cube)
    pred.insert(0, "row", rows)
    pred.insert(0, "candidate", idx["source_id"].to_numpy())
    pred.insert(0, "case_id", idx["case_id"].to_numpy())
    metrics = {"test_keras_mean_iou": E.keras_mean_iou_from_counts(counts), "test_dice_pooled": pooled_dice(counts)}
    metrics.update({f"test_{k}": float(v) for k, v in E.summarise(per_cube).items() if "@" not in k})
    return TestResult(metrics, pred, [])


def count_columns(counts: np.ndarray) -> dict[str, int]:
    """One case's Keras mean_iou confusion counts as predictions.csv columns (`tp@0.50`, `fp@0.50`, ...): the
    sum of these columns over all rows, through `keras_mean_iou_from_counts`, is the logged test_keras_mean_iou."""
    return {f"{name}@{t:.2f}": int(v) for t, row in zip(E.KERAS_MEAN_IOU_THRESHOLDS, counts)
            for name, v in zip(E.COUNT_COLUMNS, row)}


def counts_from_columns(pred: pd.DataFrame) -> np.ndarray:
    """The summed (thresholds, 4) counts from predictions.csv's count columns (inverse of count_columns)."""
    return np.array([[pred[f"{name}@{t:.2f}"].sum() for name in E.COUNT_COLUMNS]
                     for t in E.KERAS_MEAN_IOU_THRESHOLDS], dtype=np.int64)


def read_case(vstore, case, spec) -> tuple[np.ndarray, np.ndarray, dict]:
    """(image (C, Z, Y, X) float32 in [0, 1] as the task store normalises it, binary target (Z, Y, X), scan attrs),
    on the grid the task samples at (`pipeline.tasks.sampling.to_task_grid`: LCS halved in-plane, as the
    reference evaluated LiTS at 256x256), so test metrics are computed where the cubes were drawn; the attrs'
    spacing and origin are those of that grid (Hausdorff distances in mm stay right)."""
    from pipeline.tasks import sampling as S
    from pipeline.tasks.geometry import resized_geometry

    channels = [vstore.open_scan(sid)["0"][...] for sid in case["scan_ids"]]
    group = vstore.open_scan(case["label_scan"])
    attrs = dict(group.attrs).get("genesis", {})
    label = group["labels"][case["label"]]["0"][...]
    stored = channels[0].shape
    image = channels[0][None] if len(channels) == 1 else np.stack(channels)
    image, label, _ = S.to_task_grid(image, label, attrs.get("spacing", (1.0, 1.0, 1.0)), spec)
    if tuple(image.shape[1:]) != tuple(stored):
        attrs = resized_geometry(attrs, stored, image.shape[1:])
    image = np.stack([S.scale(ch, S.intensity_bounds(ch, spec.intensity)) for ch in image])
    return image, S.target_mask(label, spec.sampling.target_values), attrs


def _resize(arr: np.ndarray, size) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0].numpy()


def predict_volume(model, image: np.ndarray, config: FinetuneConfig, device) -> tuple[np.ndarray, dict]:
    """Probabilities (Z, Y, X) on the scan's grid, and the sliding-window settings."""
    shape = image.shape[1:]
    scaled = tuple(max(1, round(s * f)) for s, f in zip(shape, config.volume_scale))
    x = image if scaled == tuple(shape) else _resize(image, scaled)
    prob, settings = E.sliding_window_predict(model, torch.from_numpy(np.ascontiguousarray(x)).to(device),
                                              roi_size=config.input_size, sw_batch_size=config.sw_batch_size,
                                              overlap=config.sw_overlap, mode=SW_MODE, sigma_scale=SW_SIGMA_SCALE)
    prob = prob.float().cpu().numpy()
    if scaled != tuple(shape):
        prob = _resize(prob, shape)
    settings = dict(settings, volume_scale=list(config.volume_scale))
    return prob[0], settings


def _whole_volume(model, store, config, spec, device, n_figures) -> TestResult:
    from pipeline.volume_store.store import VolumeStore

    cases = store.scans[store.scans["split"] == "test"]
    if not len(cases):
        raise ValueError(f"{store.path}: scans.parquet lists no test case to evaluate")
    vstore = VolumeStore(store.attrs["volume_store"]["path"])
    counts, per_case, figs, settings = 0, [], [], {}
    for _, case in cases.iterrows():
        image, truth, attrs = read_case(vstore, case, spec)
        prob, settings = predict_volume(model, image, config, device)
        c = E.keras_mean_iou_counts(truth, prob)
        counts = counts + c
        m = E.segmentation_case_metrics(truth, prob, spacing=attrs.get("spacing"))
        per_case.append({**m, **count_columns(c)})
        if len(figs) < n_figures:
            figs.append((_overlay_figure(image[0], truth, prob > 0.5, f"{case['case_id']}: dice {m['dice']:.3f}"),
                         f"test/overlay_{case['case_id']}.png"))
    pred = pd.DataFrame(per_case)
    pred.insert(0, "patient_id", cases["patient_id"].to_numpy())
    pred.insert(0, "case_id", cases["case_id"].to_numpy())
    metrics = {"test_keras_mean_iou": E.keras_mean_iou_from_counts(counts), "test_dice_pooled": pooled_dice(counts)}
    metrics.update({f"test_{k}": float(v) for k, v in E.summarise(per_case).items() if "@" not in k})
    return TestResult(metrics, pred, figs, settings)


def model_preprocessing(spec, config: FinetuneConfig, store=None) -> dict:
    """How a fine-tuned model is applied to a new scan, as `preprocessing.json` beside its weights
    (`pipeline.model_io.model_format.write_model_card`); `pipeline.predict` follows it step by step, so a model
    is applied as its test split was evaluated, not as a user guesses.

    Every scan is reoriented to LPS (`pipeline.ingest.volume.to_lps`, as the volume store stores it), resampled
    only where the store's conversion did (`spacing`), resized in-plane by `inplane_scale` (the task grid),
    normalised by the intensity rule, resized by `volume_scale`, predicted by sliding window over windows of
    `network_input_size`, and the probabilities taken back the same way; foreground is `probability > threshold`,
    written with `output_value`."""
    target = spec.sampling.target_values
    labels = dict(getattr(spec, "labels", {}) or {})
    output_value = int(target[0]) if target is not None and len(target) == 1 else 1
    spacing, spacing_unknown = _store_spacing(store)
    classification = spec.kind == "classification"
    out = {
        "format": PREPROCESSING_FORMAT, "format_version": PREPROCESSING_VERSION,
        "task": spec.name, "kind": spec.kind, "modality": spec.modality,
        "orientation": "LPS", "axes": "zyx",
        "channels": list(spec.channels) or ["image"], "in_channels": int(config.in_channels),
        "intensity": {"kind": spec.intensity.kind, "low": float(spec.intensity.low),
                      "high": float(spec.intensity.high),
                      "rule": ("clip to [low, high] and scale to [0, 1]" if spec.intensity.kind == "window" else
                               "per channel, clip to the [low, high] percentiles of the non-zero voxels and scale "
                               "to [0, 1]")},
        "spacing": {"resampled_to": spacing, "resampled_to_unknown": spacing_unknown,
                    "inplane_scale": float(getattr(spec, "inplane_scale", 1.0)),
                    "volume_scale": [float(v) for v in config.volume_scale]},
        "cube_size": [int(v) for v in spec.cube_size],
        "crop_size": [int(v) for v in (spec.sampling.crop_size or spec.cube_size)],
        "network_input_size": [int(v) for v in config.input_size], "input_rule": config.input_rule,
        "labels": {"names": {k: (list(v) if isinstance(v, tuple) else v) for k, v in labels.items()},
                   "target_values": None if target is None else [int(v) for v in target],
                   "output_value": output_value},
        "threshold": DECISION_THRESHOLD,
        "output": "logits" if classification else "probabilities",
        "score": "sigmoid(logit)" if classification else None,
        "sliding_window": None if classification else {
            "roi_size": [int(v) for v in config.input_size], "sw_batch_size": int(config.sw_batch_size),
            "overlap": float(config.sw_overlap), "mode": SW_MODE, "sigma_scale": SW_SIGMA_SCALE},
        "patch_store": None if store is None else {"key": getattr(store, "key", None)},
    }
    return out


def _store_spacing(store) -> tuple[list[float] | None, str | None]:
    """(the spacing (z, y, x mm) the volume store under `store` resampled its scans to, or None when it kept the
    source voxels; why that cannot be told, or None). Predict warns with the reason instead of guessing."""
    if store is None:
        return None, None
    try:
        from pipeline.volume_store.store import VolumeStore

        records = VolumeStore(store.attrs["volume_store"]["path"]).records()
    except Exception as exc:  # noqa: BLE001 - no store, or one moved since: the record says "not known"
        return None, f"its volume store cannot be read ({type(exc).__name__}; moved?)"
    spacings = {tuple((r.get("settings") or {}).get("spacing") or ()) for r in records if r.get("status") == "ok"}
    spacings.discard(())
    if len(spacings) > 1:
        return None, f"its volume store mixes spacings {sorted(spacings)}"
    return ([float(v) for v in next(iter(spacings))] if spacings else None), None


def _roc_figure(fpr, tpr, auc):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, lw=2, label=f"AUC {auc:.4f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("test ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _overlay_figure(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, title: str):
    """The axial slice with the most target: image, truth contour (green), prediction contour (red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    area = truth.reshape(truth.shape[0], -1).sum(1)
    z = int(np.argmax(area)) if area.any() else truth.shape[0] // 2
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(image[z], cmap="gray", vmin=0, vmax=1)
    for mask, colour in ((truth[z], "lime"), (pred[z], "red")):
        if mask.any() and not mask.all():
            ax.contour(mask.astype(float), levels=[0.5], colors=colour, linewidths=1)
    ax.set_title(f"{title} (z={z}; truth green, prediction red)", fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    return fig
