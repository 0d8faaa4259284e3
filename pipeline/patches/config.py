"""The pretraining cube-sampling recipes as one typed config: "ct" = the Models Genesis reference (its defaults
are the reference's values), "mr" = ours, for MR and every other non-CT modality (`pipeline.patches.mr_sampling`)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

__all__ = ["PretrainPatchConfig", "SPLITS", "STORE_FORMAT", "RECIPES", "MR_RULE", "content_key", "recipe_of_modality",
           "preprocessing_of"]

SPLITS = ("train", "validation", "test")

STORE_FORMAT = 2
"""Version of the pretraining store layout and sampling rule, part of every store's key: 2 = the
reference's look-ahead acceptance score and start ranges, cubes stored encoded (`cube_encoding`);
1 = the dense-fraction rule, float32 cubes. Stores of another format are never reused for this one."""

RECIPES = ("auto", "ct", "mr")
MR_RULE = 2
"""Version of the mr recipe's sampling rule, in every mr key (never in a ct key): 2 = borders capped so the crop
fits, short axes padded, Otsu foreground; stores of the first rule (borders capped at border_fraction only, no
padding) are never reused for it."""
_CT_ONLY = ("hu_window", "lookahead", "min_slices", "dense_hu", "max_dense_fraction", "cube_encoding")
_MR_ONLY = ("percentiles", "foreground_threshold", "min_foreground", "border_fraction")
_NOT_IN_KEY = ("recipe", "modality")
"""`modality` picks scans, and the picked scans are in the key through the catalog hash; `recipe` is in an MR
key (as "mr") and absent from a CT key, so every CT store keeps the key it had before recipes existed."""


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
    """Seeded scan-level split for datasets without LUNA16 subsets (train, validation, test). A store whose
    scans' own tags leave no validation scan gets a seeded validation share of split_fractions[1] of its
    training scans instead (`pipeline.patches.splits.pretrain_splits`)."""
    recipe: str = "auto"
    """"ct": the reference's recipe above (HU window, look-ahead density rule, fixed borders, min_slices).
    "mr": ours, for MR and any other non-CT modality (the fields below; `pipeline.patches.mr_sampling`).
    "auto": from the store's `modality` catalog column, CT -> ct, anything else -> mr (resolved by the build)."""
    modality: str | None = None
    """Only the scans of this modality (catalog `modality`, case-insensitive); None = the store's one modality.
    A store that mixes modalities is refused unless this picks one."""
    percentiles: tuple[float, float] = (0.5, 99.5)
    """mr: per scan, these percentiles of its non-zero voxels map to 0 and 1 (clipped): a scan's gain and offset
    do not change its cubes."""
    foreground_threshold: float | None = None
    """mr: a voxel is foreground when its normalised value is above this; None: above the scan's own Otsu
    threshold (between the background, exact 0 or noise, and the tissue); 0: above the low percentile (for a
    background that is exactly 0)."""
    min_foreground: float = 0.5
    """mr: a crop is accepted when at least this share of its voxels is foreground. 0.5 keeps crops inside the
    body or head and at its edge (where the restoration task learns the boundary), and rejects crops that are
    mostly air, whose restoration is trivial; a 64x64 crop of a 112x112 head slice passes it."""
    border_fraction: float = 0.1
    """mr: a border is min(border_yx or border_z, this share of the axis, (axis - crop) // 2), so small volumes
    yield cubes (112x112 in-plane: 11 voxels; 36 slices for 32: 2); an axis shorter than the crop is padded with
    the normalised background (0) to the crop's length; min_slices does not apply."""

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
            raise ValueError(f"{name}.max_dense_fraction (--max-dense-fraction) must be in [0, 1], got {self.max_dense_fraction}")
        if not self.scales or any(not s >= 1.0 for s in self.scales):
            raise ValueError(f"{name}.scales must be non-empty multipliers >= 1, got {self.scales}")
        if self.recipe not in RECIPES:
            raise ValueError(f"{name}.recipe (--recipe) must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.modality is not None and (not isinstance(self.modality, str) or not self.modality.strip()):
            raise ValueError(f"{name}.modality (--modality) must be a non-empty name (e.g. CT, T2) or None, got {self.modality!r}")
        lo, hi = self.percentiles if len(self.percentiles) == 2 else (None, None)
        if lo is None or not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"{name}.percentiles (--percentiles) must be (low, high) with 0 <= low < high <= 100, "
                             f"got {self.percentiles}")
        if self.foreground_threshold is not None and not 0.0 <= self.foreground_threshold < 1.0:
            raise ValueError(f"{name}.foreground_threshold must be None (Otsu per scan) or in [0, 1), got "
                             f"{self.foreground_threshold}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"{name}.min_foreground (--min-foreground) must be in [0, 1], got {self.min_foreground}")
        if not 0.0 <= self.border_fraction < 0.5:
            raise ValueError(f"{name}.border_fraction (--border-fraction) must be in [0, 0.5), got {self.border_fraction}")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6 or min(self.split_fractions) < 0:
            raise ValueError(f"{name}.split_fractions must be three shares summing to 1, got {self.split_fractions}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def key_material(self, validation_drawn: bool = False) -> str:
        """What the store's key hashes: the fields the resolved recipe uses. A "ct" key is exactly the key of
        the same config before recipes existed; `validation_drawn` (the build drew a validation share because
        the scans' tags left none) adds one entry, so such a store never reuses one built without the draw."""
        if self.recipe == "auto":
            raise ValueError("PretrainPatchConfig.recipe 'auto' must be resolved from the store's modality before "
                             "a key is made (pipeline.patches.source.resolve_recipe)")
        drop = set(_NOT_IN_KEY) | set(_MR_ONLY if self.recipe == "ct" else _CT_ONLY)
        material = {k: v for k, v in self.to_dict().items() if k not in drop}
        if self.recipe == "mr":
            material["recipe"] = "mr"
            material["mr_rule"] = MR_RULE
        if validation_drawn:  # drawn among the scans that gave cubes (a first rule drew among all: True)
            material["validation_drawn"] = "among scans with cubes"
        return json.dumps({"purpose": "pretrain", "store_format": STORE_FORMAT, **material}, sort_keys=True)

    def intensity(self) -> dict:
        """The intensity rule of the (resolved) recipe, as a model's preprocessing records it."""
        if self.recipe == "mr":
            return {"rule": "percentiles", "percentiles": list(self.percentiles), "of": "non-zero voxels, per scan",
                    "range": [0.0, 1.0], "clip": True}
        return {"rule": "hu_window", "window": list(self.hu_window), "range": [0.0, 1.0], "clip": True}

    def summary(self) -> str:
        d, h, w = self.cube_size
        scales = ",".join(f"{s:g}" for s in self.scales)
        if any(s != 1 for s in self.scales):
            scales += f" ({self.scale_axes})"
        recipe = "" if self.recipe == "auto" else f" recipe {self.recipe}"
        return f"{d}x{h}x{w} x{self.per_scan}/scan scales {scales} seed {self.seed}{recipe}"


def content_key(catalog_hash: str, config: PretrainPatchConfig, validation_drawn: bool = False) -> str:
    return hashlib.sha256(f"{catalog_hash}\n{config.key_material(validation_drawn)}".encode()).hexdigest()[:16]


def recipe_of_modality(modality: str) -> str:
    """CT -> "ct" (the reference); MR, PT, US, OT, T2, ADC, ... -> "mr" (ours)."""
    return "ct" if str(modality).strip().upper() == "CT" else "mr"


def preprocessing_of(store_attrs: dict) -> dict:
    """How a pretraining store's cubes were made from a scan: recipe, intensity rule, cube size, modality (what a
    pretrained model logs as its preprocessing). Stores built before recipes existed are the CT recipe."""
    recipe = store_attrs.get("recipe")
    if recipe:
        return {"recipe": recipe["name"], "intensity": recipe["intensity"], "cube_size": recipe["cube_size"],
                "modality": recipe.get("modality")}
    config = dict(store_attrs.get("config") or {})
    window = config.get("hu_window", [-1000.0, 1000.0])
    return {"recipe": "ct", "intensity": {"rule": "hu_window", "window": list(window), "range": [0.0, 1.0],
                                          "clip": True},
            "cube_size": list(store_attrs.get("cube_shape") or config.get("cube_size") or []), "modality": "CT"}
