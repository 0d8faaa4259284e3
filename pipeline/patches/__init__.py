"""Patch stores: Models Genesis pretraining cubes and the target tasks' cubes, from a volume store.

Reading a store (`PatchStore`, the training loaders) must not pay for the extraction code (Dask, SimpleITK, the
readers: ~110 MB in every loader process), so `extract_pretrain` and `ExtractionResult` load on first use.
"""

from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.store import PatchStore, PatchStoreError

__all__ = ["ExtractionResult", "PatchStore", "PatchStoreError", "PretrainPatchConfig", "extract_pretrain"]


def __getattr__(name: str):
    if name in ("ExtractionResult", "extract_pretrain"):
        from pipeline.patches import extract

        return getattr(extract, name)
    raise AttributeError(f"module 'pipeline.patches' has no attribute {name!r}")
