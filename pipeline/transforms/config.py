"""`GenesisConfig`: the rates and size rules of the Models Genesis corruptions."""

from __future__ import annotations

from dataclasses import dataclass

MIN_SIDE = 14
"""Smallest cube side the size rules allow: out-painting boxes need ``3 * side // 7 >= 6``."""


@dataclass(frozen=True, kw_only=True)
class GenesisConfig:
    """Rates and block-size rules; the defaults are the reference's.

    Size rules that follow the cube side ``S`` of each axis (not configurable, as in the
    reference): shuffle block sides ``1..S // shuffle_block_divisor``; in-painting box sides
    ``S // 6..S // 3``; out-painting box sides ``S - U{3S // 7..4S // 7}``; boxes keep
    ``paint_border`` voxels from every face.
    """

    flip_rate: float = 0.4
    """Probability of each further flip (at most ``max_flips``)."""
    max_flips: int = 3
    local_shuffle_rate: float = 0.5
    shuffle_blocks: int = 10_000
    """Number of shuffle blocks per shuffled cube."""
    shuffle_block_divisor: int = 10
    """A block side along an axis of size S is drawn from 1..S // shuffle_block_divisor."""
    nonlinear_rate: float = 0.9
    bezier_samples: int = 8193
    """Points on which the Bezier curve is evaluated (the reference uses 100,000)."""
    paint_rate: float = 0.9
    inpaint_share: float = 0.2
    """Among painted cubes, the share in-painted (the rest is out-painted)."""
    inpaint_max_boxes: int = 5
    inpaint_box_prob: float = 0.95
    outpaint_max_extra_boxes: int = 4
    outpaint_box_prob: float = 0.95
    paint_border: int = 3

    def __post_init__(self) -> None:
        for name in ("flip_rate", "local_shuffle_rate", "nonlinear_rate", "paint_rate",
                     "inpaint_share", "inpaint_box_prob", "outpaint_box_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"GenesisConfig.{name} must be a probability in [0, 1], got {value!r}")
        minimums = {"max_flips": 0, "shuffle_blocks": 0, "shuffle_block_divisor": 1,
                    "bezier_samples": 2, "inpaint_max_boxes": 0, "outpaint_max_extra_boxes": 0,
                    "paint_border": 0}
        for name, low in minimums.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"GenesisConfig.{name} must be an integer >= {low}, got {value!r}")
