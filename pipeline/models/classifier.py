"""Encoder-only classifier for fine-tuning Genesis weights on classification tasks."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from .blocks import ENCODER_NAMES, GenesisNetwork, build_encoder, check_input, check_settings, run_encoder
from pipeline.model_io.state_dicts import load_checked, strip_prefix


class UNet3DClassifier(GenesisNetwork):
    """Genesis encoder -> global average pooling of the bottleneck (16*base channels,
    512 at the reference width) -> Linear(hidden) + ReLU -> Linear(n_outputs).

    Returns logits: the sigmoid (or softmax) is the loss's job, e.g.
    ``nn.BCEWithLogitsLoss``; apply ``torch.sigmoid`` for probabilities.
    The encoder modules carry the U-Net's names (``down_tr64`` .. ``down_tr512``), so
    ``UNet3D.encoder_state_dict()`` or an official checkpoint loads with
    ``load_encoder_from``, running statistics included. Input rules are the U-Net's (sides
    multiples of 8); norms as the U-Net's (``pipeline.models.norms``; fine-tuning uses "batch").
    ``per_cube_statistics`` and ``freeze_encoder_norms``: see ``GenesisNetwork``.
    """

    def __init__(self, n_outputs: int = 1, base_channels: int = 32, norm: str = "batch_stats",
                 in_channels: int = 1, hidden: int = 1024) -> None:
        super().__init__()
        check_settings(base_channels, in_channels, norm)
        for name, value in (("n_outputs", n_outputs), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.base_channels = base_channels
        self.in_channels = in_channels
        self.norm = norm
        build_encoder(self, base_channels, in_channels, norm)
        self.fc1 = nn.Linear(16 * base_channels, hidden)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, n_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.each_cube(self._forward, x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        bottleneck, _ = run_encoder(self, x)
        pooled = bottleneck.mean(dim=(2, 3, 4))
        return self.fc2(self.relu(self.fc1(pooled)))

    def load_encoder_from(self, source: nn.Module | Mapping[str, torch.Tensor],
                          name: str = "the given state dict") -> None:
        """Copy the encoder weights from a UNet3D (module or state dict, ``module.``
        prefix allowed). Decoder/head keys are ignored; any encoder key missing or of
        the wrong shape raises CheckpointMismatchError; the dense head is untouched."""
        state = source.state_dict() if isinstance(source, nn.Module) else strip_prefix(source)
        encoder = {k: v for k, v in state.items() if k.split(".", 1)[0] in ENCODER_NAMES}
        target = nn.ModuleDict({n: getattr(self, n) for n in ENCODER_NAMES})
        load_checked(target, encoder, name)
