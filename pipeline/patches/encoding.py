"""How a pretraining store holds its cubes, and the one decoder back to the model's float32 values.

    unit-float32  the [0, 1] float32 values themselves (format-1 stores, resized cubes, non-integer volumes)
    hu-int16      the clipped Hounsfield units; decoded with `hu_to_unit`, the very function that made the
                  float32 values, so the decoded floats are bit-identical (half the bytes, and integer HU
                  compress far better than their float images)

The encoding of a store is chosen before extraction (`choose_encoding`) and recorded in its
attributes (`cube_encoding`, storage_schemas/patch_store.schema.json); `encode_cubes` refuses
values that would not decode bit for bit, so a store never holds an inexact cube.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.patches.config import PretrainPatchConfig
from pipeline.patches.sampling import hu_to_unit

__all__ = ["UNIT_FLOAT32", "choose_encoding", "storage_dtype", "encode_cubes", "decode_cubes"]

UNIT_FLOAT32 = {"kind": "unit-float32"}
_INT16 = np.iinfo(np.int16)


def choose_encoding(config: PretrainPatchConfig, volume_dtypes: Iterable[str]) -> dict:
    """hu-int16 when every cube will be unresized integer HU inside an int16 window, else unit-float32."""
    lo, hi = config.hu_window
    exact = (config.cube_encoding == "auto"
             and all(s == 1 for s in config.scales)
             and all(np.issubdtype(np.dtype(d), np.integer) for d in volume_dtypes)
             and float(lo).is_integer() and float(hi).is_integer() and _INT16.min <= lo and hi <= _INT16.max)
    if not exact:
        return dict(UNIT_FLOAT32)
    return {"kind": "hu-int16", "hu_window": [float(lo), float(hi)],
            "decode": "float32: (clip(float32(hu), lo, hi) - lo) * float32(1 / (hi - lo)) "
                      "(pipeline.patches.sampling.hu_to_unit)"}


def storage_dtype(encoding: dict) -> str:
    return {"unit-float32": "float32", "hu-int16": "int16"}[_kind(encoding)]


def _kind(encoding: dict) -> str:
    kind = encoding.get("kind")
    if kind not in ("unit-float32", "hu-int16"):
        raise ValueError(f"unknown cube encoding {encoding!r}: this store was written by a newer pipeline "
                         "(update the code) or is damaged (rebuild it with `genesis patches pretrain`)")
    return kind


def encode_cubes(unit: np.ndarray, encoding: dict) -> np.ndarray:
    """The model's float32 cubes -> what the store holds; raises when they would not decode bit for bit."""
    if _kind(encoding) == "unit-float32":
        return np.asarray(unit, dtype=np.float32)
    lo, hi = encoding["hu_window"]
    hu = np.rint(unit.astype(np.float64) * (hi - lo) + lo).astype(np.int16)
    back = decode_cubes(hu, encoding)
    if not np.array_equal(back.view(np.uint32), np.asarray(unit, dtype=np.float32).view(np.uint32)):
        bad = int(np.sum(back.view(np.uint32) != unit.view(np.uint32)))
        raise ValueError(f"{bad} cube values are not clipped integer HU in {encoding['hu_window']} and would not "
                         "decode exactly; build the store with PretrainPatchConfig(cube_encoding='float32')")
    return hu


def decode_cubes(raw: np.ndarray, encoding: dict) -> np.ndarray:
    """Stored cubes -> float32 in [0, 1], bit-identical to what the sampler computed."""
    if _kind(encoding) == "unit-float32":
        return np.ascontiguousarray(raw, dtype=np.float32)
    lo, hi = encoding["hu_window"]
    return hu_to_unit(raw, (lo, hi))
