"""Training data from patch stores: cube batches of different scans, validation pairs, and the corruption
step on the device.

Names are imported on first use (PEP 562), so a process that only streams cubes does not load the
corruption kernels (numba, scipy: ~60 MB of RSS).
"""

from importlib import import_module

_WHERE = {
    "CubeStreamConfig": "cubes", "PatchCubes": "cubes", "ray_rank_and_world": "cubes",
    "split_rows": "cubes", "genesis_pairs": "genesis_batches", "distinct_scans_per_batch": "sampling",
    "epoch_order": "sampling", "rank_share": "sampling", "scan_codes": "sampling",
    "FIXED_CORRUPTION": "validation", "ValidationCubes": "validation",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'pipeline.data' has no attribute {name!r}")
    return getattr(import_module(f"pipeline.data.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
