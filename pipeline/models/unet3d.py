"""The Models Genesis 3D U-Net (reference: MrGiovanni/ModelsGenesis, pytorch/unet3d.py)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import (DECODER_NAMES, ENCODER_NAMES, GenesisNetwork, OutputTransition, UpTransition,
                     build_encoder, check_input, check_settings, run_encoder)


class UNet3D(GenesisNetwork):
    """3D U-Net, 4 levels, 3 max-pools; at the defaults identical to the reference
    (19,073,665 trainable parameters, output = sigmoid of a 1x1x1 conv).

    Channels scale with ``base_channels`` (reference: 32): encoder
    in -> b -> 2b | 2b -> 2b -> 4b | 4b -> 4b -> 8b | 8b -> 8b -> 16b; decoder
    up-convs 16b, 8b, 4b, then (24b -> 8b -> 8b), (12b -> 4b -> 4b), (6b -> 2b -> 2b).

    Args:
        base_channels: width of the first conv (32 in the reference).
        norm: "batch_stats" (reference ContBatchNorm3d: batch statistics in eval too; the default,
            as pretraining and the official weights use it), "batch" (nn.BatchNorm3d: running
            statistics in eval; what fine-tuning uses) or "instance" (nn.InstanceNorm3d, affine).
            See ``pipeline.models.norms``.
        out_channels: channels of the head.
        in_channels: channels of the input.
        sigmoid: apply the sigmoid in ``forward`` (reference behaviour). Set False to get
            logits for BCEWithLogits; ``forward_logits`` gives logits either way.

    Input: (N, in_channels, D, H, W) with D, H, W multiples of 8, else ValueError.
    With the batch-statistics norms the bottleneck needs more than one value per channel,
    so a single 8x8x8 volume is too small; use 16 or more.

    ``per_cube_statistics`` and ``freeze_encoder_norms``: see ``GenesisNetwork``.
    """

    def __init__(self, base_channels: int = 32, norm: str = "batch_stats", out_channels: int = 1,
                 in_channels: int = 1, sigmoid: bool = True) -> None:
        super().__init__()
        check_settings(base_channels, in_channels, norm)
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        self.base_channels = base_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm = norm
        build_encoder(self, base_channels, in_channels, norm)
        for name, depth in zip(DECODER_NAMES, (2, 1, 0)):
            setattr(self, name, UpTransition(base_channels * 2 ** (depth + 2), depth, base_channels, norm))
        self.out_tr = OutputTransition(2 * base_channels, out_channels, sigmoid=sigmoid)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Output before the sigmoid (for BCEWithLogitsLoss)."""
        return self.each_cube(lambda cube: self.out_tr.final_conv(self._decode(cube)), x)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Features before the head: (N, 2*base_channels, D, H, W)."""
        return self.each_cube(self._decode, x)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        out, skips = run_encoder(self, x)
        for name, skip in zip(DECODER_NAMES, reversed(skips)):
            out = getattr(self, name)(out, skip)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.each_cube(lambda cube: self.out_tr(self._decode(cube)), x)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's entries of ``state_dict()`` (keys ``down_tr64.`` .. ``down_tr512.``),
        loadable by ``UNet3DClassifier.load_encoder_from``."""
        return {k: v for k, v in self.state_dict().items() if k.split(".", 1)[0] in ENCODER_NAMES}


def count_trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
