"""Models Genesis corruptions: numpy per cube (`corrupt`) and batched torch (`corrupt_batch`).

Each transform is a random draw (``sample_*``, from an explicit ``numpy.random.Generator``)
and a deterministic application (``apply_*``). Cubes are (D, H, W) = (z, y, x), or
(1, D, H, W); the reference's 64 x 64 x 32 (x, y, z) cube is stored as (32, 64, 64).
"""

from .batched import BatchParams, apply_batch, corrupt_batch, params_to_batch, sample_batch_params
from .config import GenesisConfig
from .flip import apply_flip, flip, sample_flip
from .genesis import GenesisParams, apply, corrupt, sample_params
from .local_shuffle import (ShuffleBlocks, apply_local_shuffle, local_pixel_shuffling,
                            sample_local_shuffle)
from .nonlinear import (BezierParams, apply_nonlinear, nonlinear_transformation,
                        reference_nonlinear, sample_nonlinear)
from .paint import (Box, apply_inpainting, apply_outpainting, inpainting, outpainting,
                    paint_noise, sample_inpainting, sample_outpainting)

__all__ = [
    "BatchParams", "BezierParams", "Box", "GenesisConfig", "GenesisParams", "ShuffleBlocks",
    "apply", "apply_batch", "apply_flip", "apply_inpainting", "apply_local_shuffle",
    "apply_nonlinear", "apply_outpainting", "corrupt", "corrupt_batch", "flip", "inpainting",
    "local_pixel_shuffling", "nonlinear_transformation", "outpainting", "paint_noise",
    "params_to_batch", "reference_nonlinear", "sample_batch_params", "sample_flip",
    "sample_inpainting", "sample_local_shuffle", "sample_nonlinear", "sample_outpainting",
    "sample_params",
]
