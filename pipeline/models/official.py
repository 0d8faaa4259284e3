"""Read and write checkpoints in the layout of the published ``Genesis_Chest_CT.pt``:
``{"state_dict": {"module.<key>": tensor, ...}, "optimizer_state_dict": ..., "epoch": int}``.

Files are read with ``torch.load(..., weights_only=True)`` only: a checkpoint may hold
tensors and plain containers, never objects whose unpickling would run code.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch
import torch.nn as nn

from .state_dicts import CheckpointError, CheckpointMismatchError, load_checked, strip_prefix
from .unet3d import UNet3D

FIRST_CONV_KEY = "down_tr64.ops.0.conv1.weight"
HEAD_CONV_KEY = "out_tr.final_conv.weight"


def _refused_global(err: Exception) -> str:
    """The line of torch's refusal that names the offending global, if any."""
    for line in str(err).splitlines():
        if "Unsupported global" in line or "Unsupported operand" in line:
            return f" ({line.strip().split('. ')[0].rstrip('.')})"
    return ""


def read_official_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Return the model state dict of a checkpoint, ``module.`` prefix removed.

    Accepts the official layout (a dict with ``state_dict``) or a bare state dict.
    Raises FileNotFoundError for a missing file, CheckpointError for anything unreadable
    or not a state dict (both messages name the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Genesis checkpoint {path!r} does not exist (or is not a file)")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"refused to load {path!r}: it holds objects other than tensors and plain containers, "
            f"and checkpoints are only read with weights_only=True{_refused_global(err)}"
        ) from err
    except Exception as err:  # corrupt / truncated / not a torch file
        raise CheckpointError(f"cannot read {path!r} as a torch checkpoint: {err}") from err
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
    return strip_prefix(state)


def load_official_genesis(path: str | os.PathLike, model: UNet3D | None = None,
                          norm: str = "batch_stats", sigmoid: bool = True) -> UNet3D:
    """Load Genesis weights (e.g. the published ``Genesis_Chest_CT.pt``) into a UNet3D.

    Without ``model``, one is built with ``norm`` and ``sigmoid``, its base_channels,
    in_channels and out_channels read from the checkpoint's first and last convs. Keys and
    shapes must match exactly, except missing ``num_batches_tracked`` buffers (older torch)
    and, for norm="instance", the BatchNorm buffers, which are ignored; otherwise
    CheckpointMismatchError (a ValueError) lists missing keys, unexpected keys and shape
    differences. The model is returned in its current mode (train for a new one).
    """
    state = read_official_state_dict(path)
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
                         optimizer: torch.optim.Optimizer | None = None, epoch: int = 0) -> None:
    """Write ``model`` in the official layout (``module.``-prefixed ``state_dict``,
    ``optimizer_state_dict``, ``epoch``), readable by ``load_official_genesis``."""
    state = {f"module.{k}": v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({
        "state_dict": state,
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else {},
        "epoch": int(epoch),
    }, os.fspath(path))
