"""`genesis weights import`: an external checkpoint into the MLflow model registry.

Accepts the published `Genesis_Chest_CT.pt` layout (and bare state dicts of `UNet3D`), or a
checkpoint of our own pretraining (`state.pt`). Files are read with `weights_only=True`: a
checkpoint is never allowed to run code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["import_weights", "load_any_checkpoint"]


def load_any_checkpoint(path: str):
    """UNet3D from an official-layout file or from one of our training checkpoints."""
    from pipeline.models import CheckpointError, UNet3D, load_official_genesis

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a loadable weights file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
    if isinstance(raw, dict) and "model" in raw and "config" in raw:  # our state.pt
        cfg = raw["config"]
        model = UNet3D(base_channels=cfg["base_channels"], norm=cfg["norm"])
        model.load_state_dict(raw.get("best_model") or raw["model"])
        return model.eval()
    return load_official_genesis(path).eval()


def import_weights(path: str, name: str, alias: str = "imported", tracking_uri: str | None = None,
                   experiment: str = "genesis-weights") -> str:
    """Log the weights as an MLflow model and register them as `name` with `alias`; return the URI."""
    from pipeline.tracking import RunLogger, create_run, register_model, resolve_uri

    if alias == "latest":
        raise ValueError("alias 'latest' is reserved by MLflow; models:/NAME/latest already names the newest version")
    model = load_any_checkpoint(path)
    uri = resolve_uri(tracking_uri)
    run_id = create_run(uri, experiment, f"import-{Path(path).name}", tags={"source_file": str(Path(path).resolve())})
    logger = RunLogger(uri, run_id, system_metrics=False)
    try:
        logger.log_params({"source_file": str(Path(path).resolve()), "base_channels": model.base_channels,
                           "norm": model.norm})
        info = logger.log_model(model)
        register_model(uri, info.model_uri, name, aliases=(alias,), tags={"source_file": Path(path).name})
    finally:
        logger.end()
    return f"models:/{name}@{alias}"
