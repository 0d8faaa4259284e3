"""`genesis weights import`: an external checkpoint into the MLflow model registry.

Accepts the published `Genesis_Chest_CT.pt` layout (and bare state dicts of `UNet3D`), or a
checkpoint of our own pretraining (`state.pt`). Files are read with `weights_only=True`: a
checkpoint is never allowed to run code.

Axis order: the published weights were trained on (x, y, z) cubes, this project's cubes are
(z, y, x). An official-layout file is read with `axes="xyz"` by default: every 3D conv and
transposed-conv kernel has its spatial axes reversed on import, so the registered model takes
our (N, 1, z, y, x) cubes and gives the official model's output on the same voxels. Pass
`axes="zyx"` for an official-layout (or bare) file whose kernels are already in our order: its
architecture (U-Net or encoder classifier, width, channels, norm) is read from the weights, so any
state dict of this project's models imports (e.g. one saved from a model of the old pickle format).
A `state.pt` of our pretraining is always in our order and is loaded unchanged.

The registered model is in the safe logged form of `pipeline.model_io.model_format` (architecture JSON and
safetensors weights, the model code bundled, requirements pinned): what is read with `weights_only=True`
is never re-published as a pickle.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.model_io.load import model_from_state_dict
from pipeline.model_io.official import AXES_CHOICES, load_official_genesis, read_official_state_dict
from pipeline.model_io.state_dicts import load_weights_file
from pipeline.models.unet3d import UNet3D
from pipeline.runtime.errors import disk_full, one_line
from pipeline.runtime.tracking import Tracker
from pipeline.model_io.model_format import log_model

__all__ = ["import_weights", "load_any_checkpoint"]


def load_any_checkpoint(path: str, axes: str = "xyz"):
    """UNet3D (kernels in our (z, y, x) order) from an official-layout file, whose kernels
    are in layout `axes` ("xyz", the published weights, are permuted; "zyx" are not), or
    from one of our training checkpoints (`state.pt`, always native, `axes` not used)."""
    return _load(path, axes)[0]


def _load(path: str, axes: str):
    """(model, the layout the file's kernels were read in: "zyx" for our own state.pt)."""
    if axes not in AXES_CHOICES:
        raise ValueError(f"axes={axes!r}: expected one of {AXES_CHOICES} (the file's kernel layout)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    raw = load_weights_file(path)  # weights_only=True; a refusal is one line that never advises otherwise
    if isinstance(raw, dict) and "model" in raw and "config" in raw:  # our state.pt
        cfg = raw["config"]
        model = UNet3D(base_channels=cfg["base_channels"], norm=cfg["norm"])
        model.load_state_dict(raw.get("best_model") or raw["model"])
        return model.eval(), "zyx"
    if axes == "zyx":  # already in our order: any of our state dicts (U-Net or classifier, any norm)
        return model_from_state_dict(read_official_state_dict(path, axes="zyx"), name=repr(path)).eval(), "zyx"
    return load_official_genesis(path, axes=axes).eval(), axes


def import_weights(path: str, name: str, alias: str = "imported", tracking_uri: str | None = None,
                   experiment: str = "genesis-weights", axes: str = "xyz") -> str:
    """Log the weights as an MLflow model and register them as `name` with `alias`; return the URI.

    The registered model takes this project's (N, 1, z, y, x) cubes: an official-layout file
    (`axes="xyz"`, the default) has its kernels' spatial axes reversed on import; see the
    module docstring. The run records `kernel_axes_in_file` (the file's layout) as a param. `tracking_uri`:
    the registry, already checked (`pipeline.runtime.tracking.check_uri`); None: the default."""
    if alias == "latest":
        raise ValueError("alias 'latest' is reserved by MLflow; models:/NAME/latest already names the newest version")
    model, file_axes = _load(path, axes)
    tracker = Tracker.at(tracking_uri)
    run_id = tracker.create_run(experiment, f"import-{Path(path).name}",
                                tags={"source_file": str(Path(path).resolve())})
    logger = tracker.logger(run_id, system_metrics=False)
    try:
        logger.log_params({"source_file": str(Path(path).resolve()), "base_channels": model.base_channels,
                           "norm": model.norm, "kernel_axes_in_file": file_axes})
        info = log_model(model)
        tracker.register_model(info.model_uri, name, aliases=(alias,), tags={"source_file": Path(path).name})
    except BaseException as exc:  # a failed import is a FAILED run with its cause, and leaves no version behind
        logger.end("FAILED")
        tracker.mark_failed(run_id, reason=disk_full(exc) or one_line(exc))
        raise
    logger.end()
    return f"models:/{name}@{alias}"
