"""Patch stores: Models Genesis pretraining cubes (and later task patches) from a volume store."""

from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.extract import ExtractionResult, extract_pretrain
from pipeline.patches.store import PatchStore, PatchStoreError

__all__ = ["ExtractionResult", "PatchStore", "PatchStoreError", "PretrainPatchConfig", "extract_pretrain"]
