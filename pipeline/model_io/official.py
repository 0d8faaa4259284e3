"""Read and write checkpoints in the layout of the published ``Genesis_Chest_CT.pt``:
``{"state_dict": {"module.<key>": tensor, ...}, "optimizer_state_dict": ..., "epoch": int}``.

Axis order. The published weights were trained on (N, 1, x, y, z) cubes (64x64x32), so their
3D kernels are (out, in, kx, ky, kz) ((in, out, kx, ky, kz) for the transposed convs). This
project's cubes and models are (N, 1, z, y, x) (D = slices). The official-layout reader and
writer therefore convert: every 5-D tensor of the state dict (the Conv3d and ConvTranspose3d
kernels; biases and norm parameters are 1-D and stay as they are) has its spatial axes
reversed, (2, 3, 4) -> (4, 3, 2), when read, and reversed back when written, so that our model
on a (z, y, x) cube gives the official model's output on the same voxels, transposed, and
load -> save -> load is the identity with the saved file holding the official tensors.
``axes`` names the FILE's layout: ``"xyz"`` (the official one, the default) or ``"zyx"``
(a file already in this project's order: nothing is permuted). The project's own training
checkpoints (``state.pt``) are native and never pass through here.

Files are read with ``torch.load(..., weights_only=True)`` only: a checkpoint may hold
tensors and plain containers, never objects whose unpickling would run code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from pipeline.model_io.state_dicts import (CheckpointError, CheckpointMismatchError, load_checked, load_weights_file,
                                           strip_prefix)

if TYPE_CHECKING:
    from pipeline.models.unet3d import UNet3D

FIRST_CONV_KEY = "down_tr64.ops.0.conv1.weight"
HEAD_CONV_KEY = "out_tr.final_conv.weight"

#: Axis layout of the published Genesis checkpoint's kernels: (.., x, y, z).
OFFICIAL_AXES = "xyz"
#: Axis layout of this project's cubes and models: (.., z, y, x).
NATIVE_AXES = "zyx"
AXES_CHOICES = (OFFICIAL_AXES, NATIVE_AXES)
#: Reverses the three spatial axes of a 5-D kernel; its own inverse.
_SWAP_SPATIAL = (0, 1, 4, 3, 2)


def _check_axes(axes: str) -> None:
    if axes not in AXES_CHOICES:
        raise ValueError(f"axes={axes!r}: expected {OFFICIAL_AXES!r} (official Genesis layout, kernels "
                         f"(.., x, y, z)) or {NATIVE_AXES!r} (this project's layout, kernels (.., z, y, x))")


def _swap(t: torch.Tensor) -> torch.Tensor:
    return t.permute(*_SWAP_SPATIAL).contiguous() if t.dim() == 5 else t


def convert_kernel_axes(state: Mapping[str, torch.Tensor], source: str, target: str) -> dict[str, torch.Tensor]:
    """Return ``state`` with its 3D kernels moved from layout ``source`` to ``target``
    ("xyz" or "zyx"): every 5-D tensor (Conv3d (out, in, k, k, k) and ConvTranspose3d
    (in, out, k, k, k) weights) gets its spatial axes reversed when the layouts differ;
    every other tensor (biases, norm parameters and buffers) is returned as is."""
    _check_axes(source)
    _check_axes(target)
    if source == target:
        return dict(state)
    return {k: _swap(v) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _optimizer_state_in(optimizer: torch.optim.Optimizer | None, axes: str) -> dict:
    """The optimizer's state dict with its per-parameter 5-D tensors (momentum buffers,
    Adam moments, shaped like the kernels) in layout ``axes``."""
    if optimizer is None:
        return {}
    state = optimizer.state_dict()
    if axes == NATIVE_AXES:
        return state
    return {**state, "state": {
        idx: {name: _swap(value.detach().cpu()) if isinstance(value, torch.Tensor) else value
              for name, value in entry.items()}
        for idx, entry in state["state"].items()}}


def read_official_state_dict(path: str | os.PathLike, axes: str = OFFICIAL_AXES) -> dict[str, torch.Tensor]:
    """Return the model state dict of a checkpoint, ``module.`` prefix removed, its kernels
    in this project's (z, y, x) order.

    Accepts the official layout (a dict with ``state_dict``) or a bare state dict.
    ``axes`` is the file's kernel layout: "xyz" (official, default: 5-D tensors get their
    spatial axes reversed) or "zyx" (returned as stored).
    Raises FileNotFoundError for a missing file, CheckpointError for anything unreadable
    or not a state dict (both messages name the file), ValueError for another ``axes``.
    """
    _check_axes(axes)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Genesis checkpoint {path!r} does not exist (or is not a file)")
    content = load_weights_file(path)  # weights_only=True; refusals name the file and what was refused
    if not isinstance(content, Mapping):
        raise CheckpointError(
            f"{path!r} holds a {type(content).__name__}, expected a dict with 'state_dict' "
            f"or a bare state dict"
        )
    state = content.get("state_dict", content)
    if not isinstance(state, Mapping) or not state or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{path!r} has no state dict of tensors: expected a dict with 'state_dict' or a "
            f"bare state dict, found top-level keys {sorted(map(str, content))[:10]}"
        )
    return convert_kernel_axes(strip_prefix(state), axes, NATIVE_AXES)


def load_official_genesis(path: str | os.PathLike, model: UNet3D | None = None,
                          norm: str = "batch_stats", sigmoid: bool = True,
                          axes: str = OFFICIAL_AXES) -> UNet3D:
    """Load Genesis weights (e.g. the published ``Genesis_Chest_CT.pt``) into a UNet3D.

    ``axes`` is the file's kernel layout: "xyz" (default; the published weights, trained on
    (x, y, z) cubes) has every Conv3d / ConvTranspose3d kernel's spatial axes reversed so the
    model works on this project's (N, C, z, y, x) cubes: ``model(x.permute(0, 1, 4, 3, 2))``
    equals the official model's output on ``x`` (N, C, x, y, z), permuted the same way.
    "zyx" loads a file already in this project's order unchanged.

    Without ``model``, one is built with ``norm`` and ``sigmoid``, its base_channels,
    in_channels and out_channels read from the checkpoint's first and last convs. Keys and
    shapes must match exactly, except missing ``num_batches_tracked`` buffers (older torch)
    and, for norm="instance", the BatchNorm buffers, which are ignored; otherwise
    CheckpointMismatchError (a ValueError) lists missing keys, unexpected keys and shape
    differences. The model is returned in its current mode (train for a new one).
    """
    from pipeline.models.unet3d import UNet3D  # the file format needs no model; building one does

    state = read_official_state_dict(path, axes=axes)
    source = repr(os.fspath(path))
    if model is None:
        missing = [k for k in (FIRST_CONV_KEY, HEAD_CONV_KEY) if k not in state]
        if missing:
            raise CheckpointMismatchError(source, missing, [], {})
        first, head = state[FIRST_CONV_KEY], state[HEAD_CONV_KEY]
        if first.dim() != 5 or head.dim() != 5:
            raise CheckpointMismatchError(source, [], [], {
                k: (("?",) * 5, tuple(state[k].shape)) for k in (FIRST_CONV_KEY, HEAD_CONV_KEY)
                if state[k].dim() != 5})
        model = UNet3D(base_channels=int(first.shape[0]), norm=norm, out_channels=int(head.shape[0]),
                       in_channels=int(first.shape[1]), sigmoid=sigmoid)
    load_checked(model, state, source)
    return model


def save_official_layout(model: nn.Module, path: str | os.PathLike,
                         optimizer: torch.optim.Optimizer | None = None, epoch: int = 0,
                         axes: str = OFFICIAL_AXES) -> None:
    """Write ``model`` (one of ours, kernels (z, y, x)) in the official layout
    (``module.``-prefixed ``state_dict``, ``optimizer_state_dict``, ``epoch``), readable by
    ``load_official_genesis`` with the same ``axes``.

    With ``axes="xyz"`` (default) the kernels, and the optimizer's per-parameter 5-D
    tensors, are written in the official (x, y, z) order, so the file can be used with the
    reference code on (x, y, z) cubes and a load -> save round trip reproduces the loaded
    file's tensors exactly; ``axes="zyx"`` writes them as they are in the model."""
    _check_axes(axes)
    native = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {f"module.{k}": v for k, v in convert_kernel_axes(native, NATIVE_AXES, axes).items()}
    torch.save({
        "state_dict": state,
        "optimizer_state_dict": _optimizer_state_in(optimizer, axes),
        "epoch": int(epoch),
    }, os.fspath(path))
