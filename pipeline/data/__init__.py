"""Training data from patch stores: streaming cube datasets and the corruption step on the device."""

from pipeline.data.cubes import CubeStreamConfig, PatchCubes, epoch_rows, ray_rank_and_world
from pipeline.data.genesis_batches import genesis_pairs

__all__ = ["CubeStreamConfig", "PatchCubes", "epoch_rows", "genesis_pairs", "ray_rank_and_world"]
