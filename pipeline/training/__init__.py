"""Models Genesis pretraining: presets, the training steps, the Ray Train worker loop and driver."""

from pipeline.training.config import PRESETS, PretrainConfig, preset

__all__ = ["PRESETS", "PretrainConfig", "preset"]
