"""Models Genesis networks: the reference 3D U-Net, an encoder-only classifier, and
loaders for the published checkpoint layout."""

from .blocks import ENCODER_NAMES, SIDE_MULTIPLE, GenesisNetwork, check_input
from .classifier import UNet3DClassifier
from .norms import NORM_KINDS, ContBatchNorm3d, make_norm, per_cube_statistics, set_per_cube_statistics
from .official import load_official_genesis, read_official_state_dict, save_official_layout
from .state_dicts import CheckpointError, CheckpointMismatchError
from .unet3d import UNet3D, count_trainable_parameters

#: Trainable parameters of UNet3D() at the reference defaults.
REFERENCE_PARAMETER_COUNT = 19_073_665

__all__ = [
    "CheckpointError", "CheckpointMismatchError", "ContBatchNorm3d", "ENCODER_NAMES", "GenesisNetwork",
    "NORM_KINDS", "REFERENCE_PARAMETER_COUNT", "SIDE_MULTIPLE", "UNet3D", "UNet3DClassifier",
    "check_input", "count_trainable_parameters", "load_official_genesis", "make_norm",
    "per_cube_statistics", "read_official_state_dict", "save_official_layout", "set_per_cube_statistics",
]
