"""Normalisation layers for the Genesis 3D U-Net.

The reference (MrGiovanni/ModelsGenesis, pytorch/unet3d.py) normalises with
``ContBatchNorm3d``: a BatchNorm whose forward always uses the statistics of the
current batch, in eval mode too. The pretrained weights were learned that way, so
reproducing the published model needs it; ``"batch"`` and ``"instance"`` are the
usual alternatives for fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

NORM_KINDS = ("batch_stats", "batch", "instance")


class ContBatchNorm3d(nn.modules.batchnorm._BatchNorm):
    """BatchNorm3d that normalises with batch statistics in train AND eval mode.

    Same parameters and buffers as ``nn.BatchNorm3d`` (weight, bias, running_mean,
    running_var, num_batches_tracked), so state dicts are interchangeable.

    One deliberate difference from the reference: the running statistics are updated
    only in training mode. The reference also updates them during evaluation, which
    silently changes a model's buffers when it is merely evaluated; the forward output
    is identical either way because the running statistics are never used here.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 5:
            raise ValueError(f"ContBatchNorm3d expects a 5-D input, got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        update = self.training and self.track_running_stats
        momentum = 0.0 if self.momentum is None else self.momentum
        if update and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as in _BatchNorm
                momentum = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            input,
            self.running_mean if update else None,
            self.running_var if update else None,
            self.weight,
            self.bias,
            True,  # always batch statistics: the reference's behaviour
            momentum,
            self.eps,
        )


def make_norm(kind: str, channels: int) -> nn.Module:
    """Build the normalisation layer named by ``kind`` (one of ``NORM_KINDS``)."""
    if kind == "batch_stats":
        return ContBatchNorm3d(channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm={kind!r} is not supported; choose one of {NORM_KINDS}")
