"""The Models Genesis cube-sampling recipe as a typed config (defaults = the reference's values)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

__all__ = ["PretrainPatchConfig", "SPLITS"]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True, kw_only=True)
class PretrainPatchConfig:
    """How pretraining cubes are drawn from a volume store.

    Axis order is (z, y, x): the reference's 64 x 64 x 32 cube (x, y, z) is `cube_size=(32, 64, 64)`,
    its 100-voxel in-plane border is `border_yx`, its 30-slice border is `border_z`.
    """

    cube_size: tuple[int, int, int] = (32, 64, 64)
    """Stored cube (D, H, W) = (slices, rows, columns)."""
    per_scan: int = 32
    """Cubes per scan (the reference's `scale`)."""
    attempts_per_cube: int = 50
    """At most per_scan * attempts_per_cube candidate crops per scan."""
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    """HU clipped to this window and scaled linearly to [0, 1]."""
    border_yx: int = 100
    border_z: int = 30
    min_slices: int = 96
    """Scans with fewer slices are skipped (as in the reference)."""
    dense_hu: float = -150.0
    max_dense_fraction: float = 0.15
    """A crop is rejected when more than this share of its voxels is >= dense_hu (mostly lung is kept)."""
    scales: tuple[float, ...] = (1.0,)
    """Crop side multipliers; each cube draws one uniformly, larger crops are resized to cube_size."""
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    """Seeded scan-level split for datasets without LUNA16 subsets (train, validation, test)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        if len(self.cube_size) != 3 or any(int(s) != s or s < 1 for s in self.cube_size):
            raise ValueError(f"{name}.cube_size must be three positive ints (D, H, W), got {self.cube_size}")
        for field in ("per_scan", "attempts_per_cube"):
            if getattr(self, field) < 1:
                raise ValueError(f"{name}.{field} must be >= 1, got {getattr(self, field)}")
        for field in ("border_yx", "border_z", "min_slices"):
            if getattr(self, field) < 0:
                raise ValueError(f"{name}.{field} must be >= 0, got {getattr(self, field)}")
        if not self.hu_window[0] < self.hu_window[1]:
            raise ValueError(f"{name}.hu_window must be (low, high) with low < high, got {self.hu_window}")
        if not 0.0 <= self.max_dense_fraction <= 1.0:
            raise ValueError(f"{name}.max_dense_fraction must be in [0, 1], got {self.max_dense_fraction}")
        if not self.scales or any(not s >= 1.0 for s in self.scales):
            raise ValueError(f"{name}.scales must be non-empty multipliers >= 1, got {self.scales}")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"{name}.split_fractions must be three shares summing to 1, got {self.split_fractions}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def key_material(self) -> str:
        return json.dumps({"purpose": "pretrain", **self.to_dict()}, sort_keys=True)

    def summary(self) -> str:
        d, h, w = self.cube_size
        return (f"{d}x{h}x{w} x{self.per_scan}/scan scales {','.join(f'{s:g}' for s in self.scales)} "
                f"seed {self.seed}")


def content_key(catalog_hash: str, config: PretrainPatchConfig) -> str:
    return hashlib.sha256(f"{catalog_hash}\n{config.key_material()}".encode()).hexdigest()[:16]
