"""The array core of `genesis predict`: one case's channels (LPS, (C, Z, Y, X)) -> probabilities on the same grid,
and candidate cubes -> scores. No file I/O; the steps are those the task store and the test evaluation take
(`pipeline.tasks.sampling`, `pipeline.finetune.evaluate.predict_volume`), read from the model's preprocessing.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import evaluation as E
from pipeline.tasks import sampling as S
from pipeline.tasks.geometry import world_to_index
from pipeline.tasks.spec import TaskSpec

__all__ = ["default_preprocessing", "segment", "classify", "network_input"]


def default_preprocessing(spec: TaskSpec) -> dict:
    """The preprocessing of a model that carries a task file but no preprocessing.json (its task from its run):
    the paper preset's (network input = the task's cube, crop -> cube scale, the evaluation's sliding window)."""
    crop = spec.sampling.crop_size or spec.cube_size
    target = spec.sampling.target_values
    return {"orientation": "LPS", "axes": "zyx", "channels": list(spec.channels) or ["image"],
            "intensity": {"kind": spec.intensity.kind, "low": spec.intensity.low, "high": spec.intensity.high},
            "spacing": {"resampled_to": None, "inplane_scale": float(S.inplane_scale(spec)),
                        "volume_scale": [c / r for c, r in zip(spec.cube_size, crop)]},
            "cube_size": list(spec.cube_size), "crop_size": list(crop), "network_input_size": list(spec.cube_size),
            "input_rule": "stored",
            "labels": {"target_values": None if target is None else list(target),
                       "output_value": int(target[0]) if target is not None and len(target) == 1 else 1},
            "threshold": 0.5,
            "sliding_window": {"roi_size": list(spec.cube_size), "sw_batch_size": 4, "overlap": 0.25,
                               "mode": "gaussian", "sigma_scale": 0.125}}


def _resize(arr: np.ndarray, size) -> np.ndarray:
    """(C, Z, Y, X) float32 resized trilinearly (as `finetune.evaluate._resize`)."""
    t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None]
    return F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear", align_corners=False)[0].numpy()


def segment(model: torch.nn.Module, channels: np.ndarray, spacing_zyx, spec: TaskSpec, pre: dict,
            device: torch.device) -> np.ndarray:
    """Probabilities (Z, Y, X) float32 on the grid of `channels` ((C, Z, Y, X), LPS as the volume store holds
    scans): the task grid (in-plane scale), the intensity rule per channel, `volume_scale`, the sliding window
    over windows of the network input, and each step undone on the probabilities."""
    shape = channels.shape[1:]
    image, _, _ = S.to_task_grid(np.asarray(channels, dtype=np.float32), None, spacing_zyx, spec)
    image = np.stack([S.scale(ch, S.intensity_bounds(ch, spec.intensity)) for ch in image])
    grid = image.shape[1:]
    volume_scale = (pre.get("spacing") or {}).get("volume_scale") or [1.0, 1.0, 1.0]
    scaled = tuple(max(1, round(s * f)) for s, f in zip(grid, volume_scale))
    x = image if scaled == tuple(grid) else _resize(image, scaled)
    sw = pre.get("sliding_window") or {}
    roi = sw.get("roi_size") or pre.get("network_input_size") or list(spec.cube_size)
    prob, _ = E.sliding_window_predict(model, torch.from_numpy(np.ascontiguousarray(x)).to(device), roi_size=roi,
                                       sw_batch_size=int(sw.get("sw_batch_size", 4)),
                                       overlap=float(sw.get("overlap", 0.25)), mode=sw.get("mode", "gaussian"),
                                       sigma_scale=float(sw.get("sigma_scale", 0.125)))
    prob = prob.float().cpu().numpy()
    if prob.shape[1:] != tuple(shape):
        prob = _resize(prob, shape)  # volume_scale and the in-plane scale undone in one resize
    return prob[0]


def network_input(cubes: np.ndarray, pre: dict) -> np.ndarray:
    """Stored-size cubes (N, C, D, H, W) -> the network input by the model's `input_rule` (as
    `pipeline.finetune.data.to_input` does for images)."""
    size = tuple(int(v) for v in pre.get("network_input_size") or cubes.shape[-3:])
    rule = pre.get("input_rule", "stored")
    if rule == "stored" or tuple(cubes.shape[-3:]) == size:
        return cubes
    if rule == "centre_crop":
        start = [(s - t) // 2 for s, t in zip(cubes.shape[-3:], size)]
        return np.ascontiguousarray(cubes[..., start[0]:start[0] + size[0], start[1]:start[1] + size[1],
                                          start[2]:start[2] + size[2]])
    t = torch.from_numpy(np.ascontiguousarray(cubes, dtype=np.float32))
    return F.interpolate(t, size=size, mode="trilinear", align_corners=False).numpy()


def classify(model: torch.nn.Module, channels: np.ndarray, attrs: dict, points_xyz: np.ndarray, spec: TaskSpec,
             pre: dict, device: torch.device, batch_size: int = 8) -> np.ndarray:
    """Scores (sigmoid of the logit) of candidates at world (x, y, z) mm LPS `points_xyz` (n, 3) in a scan
    (`channels` (C, Z, Y, X) in LPS, `attrs` its spacing / origin (z, y, x) and direction): a cube of the task's
    crop size centred on each point (`centred_start`, padded with the window's low end), normalised, resized to
    the cube size, as the task store cuts candidates. NaN for a point outside the scan."""
    crop_size = tuple(int(v) for v in (spec.sampling.crop_size or spec.cube_size))
    bounds = [S.intensity_bounds(None if spec.intensity.kind == "window" else ch, spec.intensity) for ch in channels]
    centres = world_to_index(np.asarray(points_xyz, dtype=float).reshape(-1, 3), attrs)
    shape = np.asarray(channels.shape[1:])
    scores = np.full(len(centres), np.nan)
    inside = [i for i, c in enumerate(centres)
              if np.all(np.isfinite(c)) and np.all(c >= -0.5) and np.all(c <= shape - 0.5)]
    for k in range(0, len(inside), batch_size):
        rows = inside[k:k + batch_size]
        cubes = []
        for i in rows:
            start = S.centred_start(centres[i], crop_size)
            cube = np.stack([S.scale(S.crop(ch, start, crop_size, fill=b[0]), b) for ch, b in zip(channels, bounds)])
            cubes.append(S.resize(cube, tuple(spec.cube_size), label=False))
        x = torch.from_numpy(network_input(np.stack(cubes).astype(np.float32), pre)).to(device)
        with torch.no_grad():
            logits = model(x).float().reshape(len(rows), -1)[:, 0]
        scores[rows] = torch.sigmoid(logits).cpu().numpy()
    return scores
