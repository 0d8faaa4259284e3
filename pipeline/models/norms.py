"""Normalisation layers for the Genesis 3D U-Net, and what each does at inference.

- ``"batch_stats"``: the reference's ``ContBatchNorm3d`` (MrGiovanni/ModelsGenesis, pytorch/unet3d.py):
  a BatchNorm whose forward always uses the statistics of the current batch, in eval mode too. The
  official PyTorch weights and this project's pretraining use it (the restoration task was learned that
  way), so reproducing the published model needs it. Its output for a cube depends on the other cubes of
  its batch; ``per_cube_statistics`` makes a model predict each cube on its own instead.
- ``"batch"``: ``nn.BatchNorm3d``, the default of fine-tuning: batch statistics in training, running
  statistics in eval mode, so a prediction does not depend on the rest of its batch. This is what the
  Keras models behind the paper's numbers do (keras/downstream_tasks/unet3d.py: ``BatchNormalization``;
  Keras 2.2.4 normalises with its moving statistics at inference). Momentum: PyTorch's 0.1
  (running = 0.9 running + 0.1 batch) is kept; Keras's ``momentum=0.99`` (moving = 0.99 moving + 0.01 batch)
  is PyTorch's 0.01. With 0.1 the running statistics reach the data's after a few tens of steps, where
  0.01 needs hundreds, which a short fine-tuning (the tiny preset, few labels) does not have; on a paper
  run both converge, 0.1 with less lag behind the weights. eps stays PyTorch's 1e-5 (Keras: 1e-3), the
  value the pretrained weights were learned with.
- ``"instance"``: ``nn.InstanceNorm3d`` (affine): each cube's own statistics, always.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["NORM_KINDS", "ContBatchNorm3d", "make_norm", "per_cube_statistics", "set_per_cube_statistics"]

NORM_KINDS = ("batch_stats", "batch", "instance")


class ContBatchNorm3d(nn.modules.batchnorm._BatchNorm):
    """BatchNorm3d that normalises with batch statistics in train AND eval mode.

    Same parameters and buffers as ``nn.BatchNorm3d`` (weight, bias, running_mean,
    running_var, num_batches_tracked), so state dicts are interchangeable, and the running
    statistics of a pretrained model are real (updated in training with momentum 0.1): a
    fine-tuned ``nn.BatchNorm3d`` model starts from them.

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
    """Build the normalisation layer named by ``kind`` (one of ``NORM_KINDS``; see the module docstring)."""
    if kind == "batch_stats":
        return ContBatchNorm3d(channels)
    if kind == "batch":
        return nn.BatchNorm3d(channels)  # momentum 0.1, eps 1e-5: see the module docstring
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm={kind!r} is not supported; choose one of {NORM_KINDS}")


#: The attribute of UNet3D / UNet3DClassifier that ``set_per_cube_statistics`` switches.
PER_CUBE_ATTRIBUTE = "per_cube_statistics"


def set_per_cube_statistics(model: nn.Module, enabled: bool = True) -> int:
    """Make every Genesis network inside ``model`` predict, in eval mode, each cube of a batch on its own
    when its norm is ``"batch_stats"``: each cube is then normalised with its own statistics, as the
    reference normalises a batch of one, and its output no longer depends on the rest of the batch.

    No effect in training mode, nor on ``"batch"`` / ``"instance"`` models (already batch-independent).
    Returns how many networks were switched."""
    n = 0
    for module in model.modules():
        if hasattr(module, PER_CUBE_ATTRIBUTE):
            setattr(module, PER_CUBE_ATTRIBUTE, bool(enabled))
            n += 1
    return n


@contextmanager
def per_cube_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """``set_per_cube_statistics(model)`` for the duration of a ``with`` block, restored afterwards."""
    before = [(m, getattr(m, PER_CUBE_ATTRIBUTE)) for m in model.modules() if hasattr(m, PER_CUBE_ATTRIBUTE)]
    set_per_cube_statistics(model, True)
    try:
        yield model
    finally:
        for module, value in before:
            setattr(module, PER_CUBE_ATTRIBUTE, value)
