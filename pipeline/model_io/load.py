"""`load_model(uri)`: any model of this project, ready for inference, in one call.

    from pipeline import load_model
    model = load_model("models:/genesis-pretrained@best", tracking_uri="sqlite:///demo_output/mlflow.db")
    with torch.no_grad():
        restored = model(cube)          # (N, 1, D, H, W) in [0, 1], D, H, W multiples of 8

URIs, and what each gives:
- `models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/RUN_ID/model`, or a local MLflow model folder (one
  holding an `MLmodel` file): the logged model (U-Net or classifier), from the registry at `tracking_uri`
  (default: `sqlite:///mlflow.db` here; a SQLite database that does not exist is a ValueError, never created by
  the reading), rebuilt from its architecture JSON with its safetensors weights
  (`pipeline.model_io.model_format`): nothing in a logged model is unpickled or executed, and a tampered weights
  file is a ValueError. Models logged in MLflow's pickle format (pytorch flavor, older genesis) are refused.
- `official:FILE.pt`: the published checkpoint layout (e.g. `Genesis_Chest_CT.pt`), kernels permuted to this
  project's (z, y, x) axes (`pipeline.model_io.official.load_official_genesis`).
- `FILE.pt`: one of our state dicts (`torch.save(model.state_dict())`, read with weights_only=True); the
  architecture is read from the weights: width and input channels from the first conv, a U-Net when the state
  has the U-Net's head, an encoder classifier when it has the dense head, instance norm when it has no batch
  statistics, otherwise the reference's batch-statistics norm ("batch_stats"; a state dict cannot tell it from
  nn.BatchNorm3d's, so pass `norm="batch"` for a fine-tuned model saved that way). The sizes it reads must lie in
  `pipeline.model_io.model_format.ARG_RANGES`, and the state is compared with the model built on the meta device
  before the model's memory is allocated, so a state that only claims a large width costs nothing.

A logged model carries how it is applied (`pipeline.model_io.model_format.write_model_card`):
`model.genesis_task_file` (its task file's YAML text; `pipeline.tasks.task_file` reads it into a TaskSpec) and
`model.genesis_preprocessing` (a dict: orientation, intensity rule, input size, label values, threshold, sliding
window); both None for models logged without them, official weights and state-dict files.
`pipeline.predict.model_card.load_model_card(uri)` reads the same without the weights, as a TaskSpec.

The model comes back in eval mode, on `device`. Anything that cannot be loaded is a ValueError naming the URI.

Its output for a cube does not depend on the rest of the batch: `model(batch)` equals the cubes predicted one at a
time. Fine-tuned models ("batch" norm) use their running statistics; a model whose norm is "batch_stats"
(pretrained restoration models, the official weights, fine-tuned models of older versions) predicts each cube of a
batch on its own, normalised with its own statistics as the reference normalises a batch of one
(`pipeline.models.norms.set_per_cube_statistics`; switch it off with `set_per_cube_statistics(model, False)` to
get the reference's batch-pooled statistics).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.model_io.official import FIRST_CONV_KEY as FIRST_CONV
from pipeline.model_io.official import HEAD_CONV_KEY as UNET_HEAD
from pipeline.runtime.errors import one_line
from pipeline.runtime.tracking import Tracker, resolve_uri

__all__ = ["load_model", "load_model_state", "model_from_state_dict"]

CLASSIFIER_HIDDEN, CLASSIFIER_OUT = "fc1.weight", "fc2.weight"


def load_model(uri: str, *, tracking_uri: str | None = None, device: str = "cpu", norm: str | None = None
               ) -> nn.Module:
    """The model `uri` names, in eval mode on `device`, predicting cube by cube (see the module docstring).
    `norm`: for a `FILE.pt` state dict only, the norm its BatchNorm buffers belong to ("batch_stats" or
    "batch"; None: read from the weights)."""
    if not isinstance(uri, str) or not uri:
        raise ValueError(f"load_model: expected a model URI string, got {uri!r}")
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"load_model({uri!r}): bad device {device!r}: {err}") from None
    is_file = not uri.startswith(("models:/", "runs:/", "official:")) and os.path.isfile(uri)
    if norm is not None and not is_file:
        raise ValueError(f"load_model({uri!r}): norm={norm!r} applies to a state-dict file only; a logged model "
                         f"names its norm in architecture.json, the official weights use batch_stats")
    if uri.startswith(("models:/", "runs:/")) or _is_mlflow_folder(uri):
        model = _from_mlflow(uri, tracking_uri)
    elif uri.startswith("official:"):
        model = _from_official(uri)
    elif os.path.isfile(uri):
        model = _from_state_file(uri, norm)
    else:
        raise ValueError(f"load_model: {uri!r} is not models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/model, "
                         f"an MLflow model folder, official:FILE.pt or an existing state-dict file")
    if not isinstance(model, nn.Module):
        raise ValueError(f"load_model({uri!r}): the logged object is a {type(model).__name__}, not a torch module")
    from pipeline.models.norms import set_per_cube_statistics

    set_per_cube_statistics(model)
    for attr in ("genesis_task_file", "genesis_preprocessing"):  # a logged model's card; None for the others
        if not hasattr(model, attr):
            setattr(model, attr, None)
    return model.to(torch_device).eval()


def load_model_state(tracking: Tracker | str | None, model_uri: str) -> dict[str, torch.Tensor]:
    """The state dict (CPU tensors) of a logged model, e.g. `models:/genesis-pretrained/3` or
    `models:/genesis-official@official`, from the registry of `tracking` (a Tracker or a tracking URI; None: the
    default), read in the safe format (`load_model`, nothing unpickled); a ValueError naming the URI when it
    cannot be loaded."""
    model = load_model(model_uri, tracking_uri=tracking.uri if isinstance(tracking, Tracker) else tracking)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _is_mlflow_folder(uri: str) -> bool:
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    return (path / "MLmodel").is_file()


def _from_mlflow(uri: str, tracking_uri: str | None) -> nn.Module:
    """Download the logged model folder (or use a local one) and read it with
    `pipeline.model_io.model_format.read_model_folder`: architecture JSON + safetensors, nothing unpickled or
    run."""
    import tempfile

    from pipeline.model_io.model_format import ModelFormatError, read_model_folder

    if _is_mlflow_folder(uri):
        folder = uri[len("file://"):] if uri.startswith("file://") else uri
        try:
            return read_model_folder(folder, repr(uri))
        except ModelFormatError as err:
            raise ValueError(f"load_model: {err}") from None
    where = _existing_store(uri, tracking_uri)  # reading never creates a store (MLflow would, at connect)
    tracker = Tracker.at(where)  # the tracking and registry URI that models:/ and runs:/ resolve against
    with tempfile.TemporaryDirectory(prefix="genesis-load-") as tmp:
        try:
            with _no_progress_bars():
                folder = tracker.download_artifacts(uri, tmp)
        except Exception as err:  # MlflowException: no such model / version / alias / run
            raise ValueError(f"load_model: cannot load {uri!r} (registry {where}): {one_line(err)}") from err
        if not (Path(folder) / "MLmodel").is_file():
            raise ValueError(f"load_model: {uri!r} (registry {where}) is not an MLflow model (no MLmodel file)")
        try:
            return read_model_folder(folder, repr(uri))
        except ModelFormatError as err:
            raise ValueError(f"load_model: {err}") from None


def _existing_store(uri: str, tracking_uri: str | None) -> str:
    """The tracking URI `uri` is read from (`resolve_uri`: the one given, else ./mlflow.db); a SQLite database
    that does not exist is a ValueError naming it and how to name the right one, since MLflow would create an
    empty one at the first connection and the model would then be "not found" in a store made by the reading."""
    where = resolve_uri(tracking_uri)
    if not where.startswith("sqlite:///"):
        return where
    db = Path(where[len("sqlite:///"):])
    if db.is_file():
        return where
    if tracking_uri is None:
        raise ValueError(f"load_model({uri!r}): no tracking URI given, and no MLflow database at {db} (the default, "
                         f"./mlflow.db; MLFLOW_TRACKING_URI is not read): pass tracking_uri='sqlite:///PATH/mlflow.db' "
                         f"or the tracking server's URL")
    raise ValueError(f"load_model({uri!r}): tracking_uri {tracking_uri!r}: no MLflow database at {db} (reading a "
                     f"model never creates one); check the path")


@contextmanager
def _no_progress_bars():
    """MLflow draws a progress bar per download; a model is a few files, so they are only noise here."""
    key, before = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def _from_official(uri: str) -> nn.Module:
    from pipeline.model_io.official import load_official_genesis

    try:
        return load_official_genesis(uri[len("official:"):])
    except (OSError, ValueError) as err:  # FileNotFoundError, CheckpointError (a ValueError) name the file
        raise ValueError(f"load_model({uri!r}): {err}") from err


def _from_state_file(uri: str, norm: str | None = None) -> nn.Module:
    from pipeline.model_io.state_dicts import read_state_file

    try:
        state = read_state_file(uri)
    except ValueError as err:
        raise ValueError(f"load_model({uri!r}): {err}") from err
    except Exception as err:  # not a torch file at all
        raise ValueError(f"load_model({uri!r}): cannot read it as a torch state dict: {one_line(err)}") from err
    return model_from_state_dict(state, name=repr(uri), norm=norm)


def model_from_state_dict(state: dict[str, torch.Tensor], name: str = "the state dict", norm: str | None = None
                          ) -> nn.Module:
    """A UNet3D or UNet3DClassifier built to fit `state` (see the module docstring) with `state` loaded. `norm`
    overrides the norm read from the weights ("batch_stats" when it has running statistics, else "instance")."""
    from pipeline.model_io.model_format import ARG_RANGES
    from pipeline.model_io.state_dicts import BATCH_STAT_SUFFIXES, check_state_dict, load_checked
    from pipeline.models.classifier import UNet3DClassifier
    from pipeline.models.unet3d import UNet3D

    first = state.get(FIRST_CONV)
    if not isinstance(first, torch.Tensor) or first.dim() != 5:
        raise ValueError(f"load_model({name}): no 5-D first conv {FIRST_CONV!r} in its state dict, so not a Genesis "
                         f"U-Net or classifier (keys: {sorted(state)[:5]}...)")
    has_stats = any(k.endswith("running_mean") for k in state)
    if norm is not None and norm not in ("batch_stats", "batch", "instance"):
        raise ValueError(f"load_model({name}): norm={norm!r}; choose batch_stats, batch or instance")
    if norm in ("batch_stats", "batch") and not has_stats:
        raise ValueError(f"load_model({name}): norm={norm!r} needs the BatchNorm running statistics, which its "
                         f"state dict does not hold (an instance-norm model?)")
    args: dict[str, object] = {"base_channels": int(first.shape[0]), "in_channels": int(first.shape[1]),
                               "norm": norm or ("batch_stats" if has_stats else "instance")}
    heads = ({"out_channels": UNET_HEAD} if UNET_HEAD in state
             else {"hidden": CLASSIFIER_HIDDEN, "n_outputs": CLASSIFIER_OUT})
    if not all(isinstance(state.get(key), torch.Tensor) and state[key].dim() >= 1 for key in heads.values()):
        raise ValueError(f"load_model({name}): neither a U-Net head ({UNET_HEAD!r}) nor a classifier head "
                         f"({CLASSIFIER_HIDDEN!r}, {CLASSIFIER_OUT!r}) in its state dict")
    args.update({arg: int(state[key].shape[0]) for arg, key in heads.items()})
    for arg, (low, high) in ARG_RANGES.items():
        if arg in args and not low <= args[arg] <= high:
            raise ValueError(f"load_model({name}): its tensors give {arg}={args[arg]}, outside the allowed range "
                             f"{low}..{high}")
    cls = UNet3D if "out_channels" in args else UNet3DClassifier
    # checked on the meta device first: the model's memory is allocated only once every tensor of the state
    # has its shape, so a state that merely claims a large width costs nothing
    try:
        with torch.device("meta"):
            expected = cls(**args).state_dict()
        if not any(k.endswith(BATCH_STAT_SUFFIXES) for k in expected):  # as load_checked: dropped, not compared
            compared = {k: v for k, v in state.items() if not k.endswith(BATCH_STAT_SUFFIXES)}
        else:
            compared = state
        check_state_dict(expected, compared, name)
        model = cls(**args)
        load_checked(model, state, name)
    except ValueError as err:
        raise ValueError(f"load_model({name}): {err}") from err
    return model
