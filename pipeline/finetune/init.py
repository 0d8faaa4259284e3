"""Where a fine-tuning run's weights start: `scratch`, a registered MLflow model, the official file, or ours.

- `scratch`: the seeded random initialisation.
- `models:/NAME/VERSION` or `models:/NAME@ALIAS`: a U-Net logged by `genesis pretrain` or
  `genesis weights import`, loaded back through `pipeline.model_io.load.load_model_state`.
- `official:FILE.pt`: the published checkpoint layout (`pipeline.model_io.official.load_official_genesis`).
- `FILE.pt`: one of our state dicts (`torch.save(model.state_dict())`), read with weights_only=True
  (`pipeline.model_io.state_dicts.read_state_file`).

Classification copies the encoder only (the dense head starts random); segmentation copies the whole U-Net. The
norms' running statistics (running_mean, running_var) are copied with the weights: every pretrained model has them
(ContBatchNorm3d keeps them, the official file holds them), so a fine-tuned "batch" model in eval mode starts from
the pretraining data's statistics and moves them to the task's as it trains (`pipeline.models.norms`).
A pretrained 1-channel first conv used for a C-channel task (BMS with several sequences) is repeated over
the C input channels and divided by C, so a C-channel input whose channels are all equal gives the
pretrained response (the usual inflation rule). Any other difference in width or channels is a ValueError
naming the init and the shapes.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from pipeline.finetune.config import FinetuneConfig
from pipeline.model_io.load import load_model_state
from pipeline.model_io.official import FIRST_CONV_KEY as FIRST_CONV
from pipeline.model_io.official import load_official_genesis
from pipeline.model_io.state_dicts import load_checked, read_state_file
from pipeline.models.blocks import ENCODER_NAMES
from pipeline.models.classifier import UNet3DClassifier
from pipeline.models.unet3d import UNet3D
from pipeline.runtime.tracking import Tracker

__all__ = ["build_model", "read_init", "apply_init", "FIRST_CONV", "check_init", "freeze_encoder"]


def build_model(config: FinetuneConfig) -> nn.Module:
    """UNet3DClassifier (logits) for classification, UNet3D (sigmoid output) for segmentation."""
    if config.kind == "classification":
        return UNet3DClassifier(base_channels=config.base_channels, in_channels=config.in_channels, norm=config.norm)
    return UNet3D(base_channels=config.base_channels, in_channels=config.in_channels, norm=config.norm, sigmoid=True)


def read_init(init: str, tracking: Tracker | str | None = None) -> dict[str, torch.Tensor] | None:
    """The U-Net state dict (this project's (z, y, x) kernel order) that `init` names; None for scratch.
    `tracking`: the registry a `models:/` init is read from (a Tracker or a tracking URI; None: the default)."""
    if init == "scratch":
        return None
    if init.startswith("models:/"):
        return load_model_state(tracking, init)
    if init.startswith("official:"):
        path = init[len("official:"):]
        return {k: v.detach().cpu() for k, v in load_official_genesis(path).state_dict().items()}
    if not os.path.isfile(init):
        raise ValueError(f"--init {init!r}: not 'scratch', 'models:/NAME/VERSION', 'models:/NAME@ALIAS', "
                         f"'official:FILE.pt' or an existing state-dict file")
    return read_state_file(init)


def _adapt_channels(state: dict, model: nn.Module, init: str) -> dict:
    want = model.state_dict()[FIRST_CONV].shape
    got = state.get(FIRST_CONV)
    if got is None:
        raise ValueError(f"--init {init!r}: no first conv {FIRST_CONV!r} in its state dict (not a Genesis U-Net?)")
    if got.shape[0] != want[0]:
        raise ValueError(f"--init {init!r}: pretrained width {got.shape[0]} (first conv {tuple(got.shape)}) does not "
                         f"fit the model's width {want[0]} (first conv {tuple(want)}); use the preset whose "
                         f"base_channels matches the pretrained model")
    if got.shape[1] != want[1]:
        if got.shape[1] != 1:
            raise ValueError(f"--init {init!r}: pretrained first conv has {got.shape[1]} input channels "
                             f"{tuple(got.shape)}, the task has {want[1]} {tuple(want)}; only a 1-channel "
                             f"first conv is expanded")
        state = dict(state)
        state[FIRST_CONV] = got.repeat(1, want[1], 1, 1, 1) / want[1]
    return state


def apply_init(model: nn.Module, state: dict[str, torch.Tensor] | None, init: str) -> nn.Module:
    """Copy `state` into `model` (encoder only for the classifier); raises ValueError on any mismatch."""
    if state is None:
        return model
    state = _adapt_channels(state, model, init)
    try:
        if isinstance(model, UNet3DClassifier):
            model.load_encoder_from(state, name=f"--init {init!r}")
        else:
            load_checked(model, state, f"--init {init!r}")
    except ValueError as err:
        raise ValueError(str(err)) from err
    return model


def check_init(config: FinetuneConfig, state: dict | None, init: str) -> None:
    """Fails (ValueError) before Ray starts when `state` does not fit the configured model."""
    apply_init(build_model(config), state, init)


def freeze_encoder(model: nn.Module) -> int:
    """Stop gradients through the encoder (down_tr64..down_tr512) and keep its BatchNorm layers in eval mode
    (`GenesisNetwork.freeze_encoder_norms`), so the frozen encoder is a fixed function: "batch" norms normalise
    with the running statistics the init brought and never update them (tf.keras 2's non-trainable
    BatchNormalization; the reference never freezes); "batch_stats" norms keep using each batch's statistics.
    Returns how many parameter tensors were frozen."""
    n = 0
    for name in ENCODER_NAMES:
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
            n += 1
    model.freeze_encoder_norms()
    return n
