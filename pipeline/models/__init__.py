"""Models Genesis networks: the reference 3D U-Net and an encoder-only classifier. Reading and writing them (the
published checkpoint layout, state dicts, the safe logged format) is `pipeline.model_io`."""

from .blocks import ENCODER_NAMES, SIDE_MULTIPLE, GenesisNetwork, check_input
from .classifier import UNet3DClassifier
from .norms import NORM_KINDS, ContBatchNorm3d, make_norm, per_cube_statistics, set_per_cube_statistics
from .unet3d import UNet3D, count_trainable_parameters

#: Trainable parameters of UNet3D() at the reference defaults.
REFERENCE_PARAMETER_COUNT = 19_073_665

__all__ = [
    "ContBatchNorm3d", "ENCODER_NAMES", "GenesisNetwork",
    "NORM_KINDS", "REFERENCE_PARAMETER_COUNT", "SIDE_MULTIPLE", "UNet3D", "UNet3DClassifier",
    "check_input", "count_trainable_parameters", "make_norm",
    "per_cube_statistics", "set_per_cube_statistics",
]
