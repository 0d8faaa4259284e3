"""The on-disk form of a logged model: an architecture config (JSON) and the weights (safetensors), nothing
that is unpickled on load.

Why: a model logged as a pickled module (MLflow's pytorch flavor, `data/model.pth`) runs whatever code a
replaced file carries when it is loaded. Here the architecture is named in JSON and rebuilt from this
project's classes, and the weights are read by safetensors, a format of raw tensors and a JSON header, so a
tampered file is an error, never code.

A logged model folder (MLflow pyfunc, loader module `pipeline.model_format`):

    MLmodel                      flavors.python_function.loader_module: pipeline.model_format
                                 metadata.genesis_format: genesis-safetensors, genesis_format_version: 1,
                                 genesis_pipeline_version, genesis_git_commit
    data/genesis/architecture.json   {"architecture": "UNet3D", "kwargs": {"base_channels": 32, ...}}
    data/genesis/weights.safetensors the state dict
    code/pipeline/...            the model code it was logged with (pipeline/__init__.py, model_format.py,
                                 models/), so `mlflow.pyfunc.load_model` works without this project installed
    requirements.txt             pinned torch, safetensors, numpy (and MLflow's own pin); no genesis-pipeline,
                                 so a resolver never fetches a same-named package from an index

`pipeline.load_model` reads the folder itself (`read_model_folder`) and never imports the bundled code;
`mlflow.pyfunc.load_model` imports `pipeline.model_format` (the bundled copy when the project is not
installed) and calls `_load_pyfunc`, which reads the same two files the same safe way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

__all__ = ["FORMAT", "FORMAT_VERSION", "CONFIG_FILE", "WEIGHTS_FILE", "DATA_DIR", "LOADER_MODULE",
           "architecture_config", "build_from_config", "write_model_data", "read_model_data", "read_model_folder",
           "bundle_code", "model_requirements", "ModelFormatError", "GenesisPyfunc"]

FORMAT, FORMAT_VERSION = "genesis-safetensors", 1
CONFIG_FILE, WEIGHTS_FILE = "architecture.json", "weights.safetensors"
#: The data folder's name; MLflow copies it to `data/<name>` in the model.
DATA_DIR = "genesis"
LOADER_MODULE = "pipeline.model_format"

#: The constructor arguments each architecture may be rebuilt with, and their types.
_ARGS: dict[str, dict[str, type]] = {
    "UNet3D": {"base_channels": int, "in_channels": int, "out_channels": int, "norm": str, "sigmoid": bool},
    "UNet3DClassifier": {"base_channels": int, "in_channels": int, "n_outputs": int, "hidden": int, "norm": str},
}


class ModelFormatError(ValueError):
    """A logged model that cannot be loaded safely: wrong format, tampered or missing files."""


def architecture_config(model: nn.Module) -> dict:
    """The JSON-able description that `build_from_config` rebuilds `model`'s architecture from."""
    from pipeline.models import UNet3D, UNet3DClassifier

    if isinstance(model, UNet3D):
        kwargs = {"base_channels": model.base_channels, "in_channels": model.in_channels,
                  "out_channels": model.out_channels, "norm": model.norm, "sigmoid": bool(model.out_tr.apply_sigmoid)}
    elif isinstance(model, UNet3DClassifier):
        kwargs = {"base_channels": model.base_channels, "in_channels": model.in_channels, "norm": model.norm,
                  "n_outputs": model.fc2.out_features, "hidden": model.fc1.out_features}
    else:
        raise ModelFormatError(f"cannot log a {type(model).__name__}: only UNet3D and UNet3DClassifier have a "
                               f"safe logged form")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "architecture": type(model).__name__,
            "kwargs": kwargs}


def build_from_config(config: object, source: str = "the config") -> nn.Module:
    """A freshly initialised model of the architecture `config` names (checked: known class, known
    arguments of the right types; the constructor checks the values)."""
    from pipeline.models import UNet3D, UNet3DClassifier

    if not isinstance(config, dict):
        raise ModelFormatError(f"{source}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise ModelFormatError(f"{source}: format {config.get('format')!r} version {config.get('format_version')!r}, "
                               f"expected {FORMAT!r} version {FORMAT_VERSION} (logged by another genesis version?)")
    arch, kwargs = config.get("architecture"), config.get("kwargs")
    if arch not in _ARGS:
        raise ModelFormatError(f"{source}: architecture {arch!r} is not one of {sorted(_ARGS)}")
    if not isinstance(kwargs, dict):
        raise ModelFormatError(f"{source}: 'kwargs' must be an object, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        want = _ARGS[arch].get(key)
        if want is None:
            raise ModelFormatError(f"{source}: {arch} has no argument {key!r} (allowed: {sorted(_ARGS[arch])})")
        if type(value) is not want:  # noqa: E721 - bool is not an int here
            raise ModelFormatError(f"{source}: {arch} argument {key}={value!r} must be a {want.__name__}")
    cls = {"UNet3D": UNet3D, "UNet3DClassifier": UNet3DClassifier}[arch]
    try:
        return cls(**kwargs)
    except ValueError as err:
        raise ModelFormatError(f"{source}: {err}") from None


def write_model_data(model: nn.Module, folder: str | Path) -> Path:
    """Write `folder`/architecture.json and `folder`/weights.safetensors (CPU, contiguous) for `model`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = architecture_config(model)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt", "genesis_format": FORMAT})
    return folder


def read_model_data(folder: str | Path, source: str | None = None) -> nn.Module:
    """The model in `folder` (architecture.json + weights.safetensors), in eval mode on the CPU. Nothing in
    the folder is unpickled or executed: a file that is not what it should be is a ModelFormatError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from pipeline.models.state_dicts import load_checked

    folder = Path(folder)
    source = source or str(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ModelFormatError(f"{source}: no {path.name} in the model's data folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFormatError(f"{source}: {CONFIG_FILE} is not valid JSON ({err})") from None
    model = build_from_config(config, f"{source}: {CONFIG_FILE}")
    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFormatError(f"{source}: {WEIGHTS_FILE} is not a valid safetensors file, refusing to load it "
                               f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    try:
        load_checked(model, state, f"{source}: {WEIGHTS_FILE}")
    except ValueError as err:
        raise ModelFormatError(str(err)) from None
    return model.eval()


def read_model_folder(folder: str | Path, source: str | None = None) -> nn.Module:
    """The model of a logged MLflow model folder (one holding `MLmodel`), read with `read_model_data`.
    A model in MLflow's pickle format (pytorch flavor) is refused, not unpickled."""
    import yaml

    folder = Path(folder)
    source = source or str(folder)
    try:
        meta = yaml.safe_load((folder / "MLmodel").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ModelFormatError(f"{source}: cannot read its MLmodel file ({type(err).__name__})") from None
    meta = meta if isinstance(meta, dict) else {}
    flavors = meta.get("flavors") if isinstance(meta.get("flavors"), dict) else {}
    metadata = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
    if metadata.get("genesis_format") != FORMAT:
        if "pytorch" in flavors:
            fmt = flavors["pytorch"].get("serialization_format", "pickle") if isinstance(flavors["pytorch"], dict) \
                else "pickle"
            raise ModelFormatError(
                f"{source}: logged in MLflow's pytorch flavor ({fmt} serialization, data/model.pth), which is "
                f"refused because unpickling it can run arbitrary code; if you trust where it came from, "
                f"re-publish it in the safe format: torch.save(mlflow.pytorch.load_model(URI).state_dict(), "
                f"'w.pt'), then `genesis weights import w.pt --axes zyx --name NAME`")
        raise ModelFormatError(f"{source}: not a Genesis model (no genesis_format {FORMAT!r} in its MLmodel "
                               f"metadata; flavors: {sorted(flavors) or 'none'})")
    version = metadata.get("genesis_format_version")
    if version != FORMAT_VERSION:
        raise ModelFormatError(f"{source}: genesis_format_version {version!r}, this genesis reads version "
                               f"{FORMAT_VERSION}")
    pyfunc = flavors.get("python_function") if isinstance(flavors.get("python_function"), dict) else {}
    data = folder / str(pyfunc.get("data") or f"data/{DATA_DIR}")
    if not data.resolve().is_relative_to(folder.resolve()):
        raise ModelFormatError(f"{source}: its MLmodel points the model data outside the model folder ({data})")
    return read_model_data(data, source)


def bundle_code(dest: str | Path) -> Path:
    """Copy the code a logged model needs (`pipeline/__init__.py`, `model_format.py`, `models/*.py`; no
    caches) to `dest`/pipeline, for MLflow's `code_paths`; returns that folder."""
    src = Path(__file__).resolve().parent
    out = Path(dest) / "pipeline"
    (out / "models").mkdir(parents=True, exist_ok=True)
    for name in ("__init__.py", "model_format.py"):
        shutil.copy2(src / name, out / name)
    for path in sorted((src / "models").glob("*.py")):
        shutil.copy2(path, out / "models" / path.name)
    return out


def model_requirements() -> list[str]:
    """The pip requirements of a logged model, every one pinned to the version logging it: the model code
    travels in the model (`bundle_code`), so this project itself is not a requirement."""
    import importlib.metadata as md

    return [f"{name}=={md.version(name).split('+')[0]}" for name in ("torch", "safetensors", "numpy")]


class GenesisPyfunc:
    """What `mlflow.pyfunc.load_model` wraps: (N, C, D, H, W) float32 arrays in, the model's output out."""

    def __init__(self, model: nn.Module):
        self.model = model

    def predict(self, model_input, params=None):
        x = torch.from_numpy(np.ascontiguousarray(np.asarray(model_input, dtype=np.float32)))
        with torch.no_grad():
            return self.model(x).numpy()


def _load_pyfunc(data_path: str, model_config=None) -> GenesisPyfunc:
    """MLflow's entry point for the python_function flavor (loader_module)."""
    return GenesisPyfunc(read_model_data(data_path))
