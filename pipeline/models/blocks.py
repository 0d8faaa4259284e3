"""Building blocks of the Genesis 3D U-Net, named as in the reference so that the
official checkpoint's keys (``down_tr64.ops.0.conv1.weight`` ...) load directly, and the
inference behaviour both networks share (``GenesisNetwork``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from .norms import NORM_KINDS, PER_CUBE_ATTRIBUTE, make_norm

#: Attribute names of the four encoder levels, shallow to deep (reference names).
ENCODER_NAMES = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
#: Attribute names of the three decoder levels, deep to shallow (reference names).
DECODER_NAMES = ("up_tr256", "up_tr128", "up_tr64")
#: Three max-pools: every spatial side must be a multiple of this.
SIDE_MULTIPLE = 8


class LUConv(nn.Module):
    """Conv3d 3x3x3 (padding 1) -> norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = make_norm(norm, out_channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.bn1(self.conv1(x)))


class DownTransition(nn.Module):
    """Encoder level ``depth`` (0..3): two LUConv, then MaxPool3d(2) except at depth 3.

    Channels: in -> base*2**depth -> base*2**(depth+1). Returns (pooled, before_pool).
    """

    def __init__(self, in_channels: int, depth: int, base_channels: int, norm: str) -> None:
        super().__init__()
        mid = base_channels * 2**depth
        self.ops = nn.Sequential(LUConv(in_channels, mid, norm), LUConv(mid, 2 * mid, norm))
        self.maxpool = nn.MaxPool3d(2)
        self.current_depth = depth
        self.out_channels = 2 * mid

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        before_pool = self.ops(x)
        if self.current_depth == 3:
            return before_pool, before_pool
        return self.maxpool(before_pool), before_pool


class UpTransition(nn.Module):
    """Decoder level ``depth`` (2..0): ConvTranspose3d k2 s2 (c -> c), concatenate the
    skip (c/2 channels), two LUConv (3c/2 -> base*2**(depth+1) -> same)."""

    def __init__(self, in_channels: int, depth: int, base_channels: int, norm: str) -> None:
        super().__init__()
        out = base_channels * 2 ** (depth + 1)
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = nn.Sequential(
            LUConv(in_channels + in_channels // 2, out, norm), LUConv(out, out, norm)
        )
        self.depth = depth

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class OutputTransition(nn.Module):
    """Conv3d 1x1x1 head, followed by a sigmoid when ``sigmoid`` is true."""

    def __init__(self, in_channels: int, out_channels: int, sigmoid: bool = True) -> None:
        super().__init__()
        self.final_conv = nn.Conv3d(in_channels, out_channels, kernel_size=1)
        self.apply_sigmoid = sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.final_conv(x)
        return torch.sigmoid(out) if self.apply_sigmoid else out


def check_settings(base_channels: int, in_channels: int, norm: str) -> None:
    for name, value in (("base_channels", base_channels), ("in_channels", in_channels)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if norm not in NORM_KINDS:
        raise ValueError(f"norm={norm!r} is not supported; choose one of {NORM_KINDS}")


def build_encoder(owner: nn.Module, base_channels: int, in_channels: int, norm: str) -> None:
    """Attach the four encoder levels to ``owner`` under the reference names."""
    channels = in_channels
    for depth, name in enumerate(ENCODER_NAMES):
        level = DownTransition(channels, depth, base_channels, norm)
        setattr(owner, name, level)
        channels = level.out_channels


def run_encoder(owner: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return the bottleneck (base*16 channels, side/8) and the three skips, shallow first."""
    skips = []
    for name in ENCODER_NAMES:
        x, before_pool = getattr(owner, name)(x)
        skips.append(before_pool)
    return x, skips[:3]


def check_input(x: torch.Tensor, in_channels: int) -> None:
    """Raise ValueError, naming the shape and the rule, for an input the net cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor input, got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.dim() != 5:
        raise ValueError(
            f"input shape {shape}: expected a 5-D tensor (batch, channels, depth, height, width); "
            f"add the missing batch/channel axes, e.g. x[None, None]"
        )
    if shape[1] != in_channels:
        raise ValueError(f"input shape {shape}: expected {in_channels} channel(s) on axis 1, got {shape[1]}")
    bad = [s for s in shape[2:] if s < SIDE_MULTIPLE or s % SIDE_MULTIPLE]
    if bad:
        raise ValueError(
            f"input shape {shape}: every spatial side must be a positive multiple of {SIDE_MULTIPLE} "
            f"(the U-Net max-pools 3 times); sides {bad} are not; pad or crop the volume"
        )


class GenesisNetwork(nn.Module):
    """What UNet3D and UNet3DClassifier share beyond their layers: two switches (plain attributes, not
    part of the state dict).

    - ``per_cube_statistics`` (default False; ``pipeline.models.set_per_cube_statistics``): in eval mode a
      ``"batch_stats"`` network predicts each cube of a batch on its own, normalised with its own
      statistics (the reference normalises a batch of one that way), so its output for a cube does not
      depend on the rest of the batch. Other norms are batch-independent in eval mode already.
    - ``encoder_norms_frozen`` (``freeze_encoder_norms``): the encoder's BatchNorm layers stay in eval mode
      whatever ``train()`` says. A frozen encoder is then a fixed function: ``"batch"`` norms use the
      running statistics it came with (a pretrained model's) and never update them, as a non-trainable
      BatchNormalization does in tf.keras 2 (Keras 2.2.4, which the reference used, would normalise a
      frozen layer with batch statistics in training and its frozen moving statistics at inference, a
      train/test mismatch; the reference never freezes an encoder). ``"batch_stats"`` norms keep
      normalising with batch statistics, without updating their buffers.
    """

    norm: str

    def __init__(self) -> None:
        super().__init__()
        setattr(self, PER_CUBE_ATTRIBUTE, False)
        self.encoder_norms_frozen = False

    def each_cube(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``fn(x)``, or ``fn`` on each cube of ``x`` concatenated when ``per_cube_statistics`` applies."""
        if (getattr(self, PER_CUBE_ATTRIBUTE) and not self.training and self.norm == "batch_stats"
                and isinstance(x, torch.Tensor) and x.dim() == 5 and x.shape[0] > 1):
            return torch.cat([fn(x[i:i + 1]) for i in range(x.shape[0])])
        return fn(x)

    def freeze_encoder_norms(self) -> None:
        """Keep the encoder's BatchNorm layers in eval mode from now on (see the class docstring)."""
        self.encoder_norms_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True) -> GenesisNetwork:
        super().train(mode)
        if self.encoder_norms_frozen:
            for name in ENCODER_NAMES:
                for module in getattr(self, name).modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self
