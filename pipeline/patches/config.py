"""The Models Genesis cube-sampling recipe as a typed config (defaults = the reference's values)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

__all__ = ["PretrainPatchConfig", "SPLITS", "STORE_FORMAT"]

SPLITS = ("train", "validation", "test")

STORE_FORMAT = 2
"""Version of the pretraining store layout and sampling rule, part of every store's key: 2 = the
reference's look-ahead acceptance score and start ranges, cubes stored encoded (`cube_encoding`);
1 = the dense-fraction rule, float32 cubes. Stores of another format are never reused for this one."""


@dataclass(frozen=True, kw_only=True)
class PretrainPatchConfig:
    """How pretraining cubes are drawn from a volume store.

    Axis order is (z, y, x): the reference's 64 x 64 x 32 cube (x, y, z) is `cube_size=(32, 64, 64)`,
    its `len_border` is `border_yx`, its `len_border_z` is `border_z`, its `len_depth` is `lookahead`.
    A crop of (d, h, w) voxels starts uniformly at z in [border_z, Z - d - lookahead - 1 - border_z],
    y in [border_yx, Y - h - 1 - border_yx] and x likewise (inclusive; the reference's `randint` ranges).
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
    """The reference's len_border: in-plane voxels never used at the low end (border_yx + 1 at the high end)."""
    border_z: int = 30
    """The reference's len_border_z: slices never used at the low end (border_z + lookahead + 1 at the high end)."""
    lookahead: int = 3
    """The reference's len_depth: a crop window is this many slices deeper than the cube, and the acceptance
    score of a voxel looks up to lookahead - 2 slices further (with 3: the voxel and the next slice)."""
    min_slices: int = 96
    """Scans with fewer slices are skipped (the reference's start range is empty under 96 slices)."""
    dense_hu: float = -150.0
    max_dense_fraction: float = 0.15
    """The reference's acceptance rule: each cube voxel scores 1 when >= dense_hu, else 1 - k / (lookahead - 1)
    for the first k < lookahead - 1 slices deeper that is >= dense_hu (0.5 for the next slice), else 0; a crop
    is rejected when the score sum exceeds this share of the cube's voxel count (mostly lung is kept)."""
    scales: tuple[float, ...] = (1.0,)
    """Crop side multipliers; each cube draws one uniformly, larger crops are resized to cube_size."""
    scale_axes: str = "yx"
    """Which sides a scale enlarges: "yx" (the reference's crop_rows/crop_cols: larger in-plane crops resized
    in-plane, depth never resized, scored after resizing) or "zyx" (3D crops, scored at native resolution)."""
    cube_encoding: str = "auto"
    """How the store holds cubes: "auto" = clipped HU as int16 when every cube is unresized integer HU (the
    decoded float32 is bit-identical), else float32 in [0, 1]; "float32" = always float32 (format-1 layout)."""
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
        if self.lookahead < 2:
            raise ValueError(f"{name}.lookahead must be >= 2 (the reference's len_depth is 3), got {self.lookahead}")
        if self.scale_axes not in ("yx", "zyx"):
            raise ValueError(f"{name}.scale_axes must be 'yx' (the reference) or 'zyx', got {self.scale_axes!r}")
        if self.cube_encoding not in ("auto", "float32"):
            raise ValueError(f"{name}.cube_encoding must be 'auto' or 'float32', got {self.cube_encoding!r}")
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
        return json.dumps({"purpose": "pretrain", "store_format": STORE_FORMAT, **self.to_dict()}, sort_keys=True)

    def summary(self) -> str:
        d, h, w = self.cube_size
        scales = ",".join(f"{s:g}" for s in self.scales)
        if any(s != 1 for s in self.scales):
            scales += f" ({self.scale_axes})"
        return f"{d}x{h}x{w} x{self.per_scan}/scan scales {scales} seed {self.seed}"


def content_key(catalog_hash: str, config: PretrainPatchConfig) -> str:
    return hashlib.sha256(f"{catalog_hash}\n{config.key_material()}".encode()).hexdigest()[:16]
