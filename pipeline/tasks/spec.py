"""`TaskSpec`: everything that makes a Models Genesis target task, as data.

The reference has five copied notebooks, one per task; here a task is one frozen value that the
CLI, the patch-store builder, fine-tuning, the docs table and the tests all read. Adding a sixth
task is one new entry in `pipeline/tasks/builtin.py` (plus a reader when its data layout is new).
Axis order is (z, y, x) throughout: the reference's 64x64x32 (x, y, z) cube is (32, 64, 64).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

__all__ = ["Intensity", "Sampling", "SplitRule", "Optimisation", "Published", "TaskSpec", "KINDS"]

KINDS = ("classification", "segmentation")


def _check(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{where}: {message}")


@dataclass(frozen=True, kw_only=True)
class Intensity:
    """How voxels become network input in [0, 1].

    `window`: clip to [low, high] (HU for CT) and scale linearly (the reference's CT rule).
    `percentile`: per volume and channel, clip to the [low, high] percentiles of the non-zero
    (foreground) voxels and scale; MRI has no absolute unit, so a fixed window means nothing.
    """

    kind: Literal["window", "percentile"] = "window"
    low: float = -1000.0
    high: float = 1000.0

    def __post_init__(self) -> None:
        _check(self.kind in ("window", "percentile"), "Intensity.kind", f"must be window|percentile, got {self.kind!r}")
        _check(self.low < self.high, "Intensity", f"low must be < high, got ({self.low}, {self.high})")
        if self.kind == "percentile":
            _check(0 <= self.low and self.high <= 100, "Intensity", f"percentiles must lie in [0, 100], got "
                   f"({self.low}, {self.high})")


@dataclass(frozen=True, kw_only=True)
class Sampling:
    """How cubes are drawn for the task's patch store.

    - `candidates` (classification): one cube centred on every candidate of `table`; all positives
      kept, negatives subsampled to at most `negatives_per_positive` x positives per split (None keeps all).
    - `objects` (segmentation around findings, NCS): `per_object` cubes per labelled object, centred on
      it with a uniform jitter of up to `jitter` voxels per axis (recorded), plus `negatives_per_scan`
      cubes without foreground.
    - `pos_neg` (organ/tumour segmentation, LCS/BMS): `per_scan` cubes per training/validation scan,
      centres drawn on foreground with probability pos/(pos+neg), else on background (MONAI's
      RandCropByPosNegLabel rule); test scans are evaluated whole from the volume store.
    """

    kind: Literal["candidates", "objects", "pos_neg"]
    table: str | None = None
    """Candidates table of the volume store (classification)."""
    label: str | None = None
    """Label map of the volume store (segmentation)."""
    target_values: tuple[int, ...] | None = None
    """Label values that form the target (None: every value > 0)."""
    negatives_per_positive: float | None = None
    per_object: int = 1
    jitter: tuple[int, int, int] = (0, 0, 0)
    negatives_per_scan: int = 0
    per_scan: int = 16
    pos: float = 1.0
    neg: float = 1.0
    crop_size: tuple[int, int, int] | None = None
    """Crop this region (z, y, x) and resize it to the cube (BMS: 50x100x100 -> 32x64x64, as the reference)."""
    whole_volume_test: bool = False
    """Test scans are evaluated whole (sliding window) and get no cubes."""

    def __post_init__(self) -> None:
        w = "Sampling"
        _check(self.kind in ("candidates", "objects", "pos_neg"), f"{w}.kind",
               f"must be candidates|objects|pos_neg, got {self.kind!r}")
        if self.kind == "candidates":
            _check(bool(self.table), f"{w}.table", "a candidates table is required for kind 'candidates'")
        else:
            _check(bool(self.label), f"{w}.label", f"a label map name is required for kind {self.kind!r}")
        if self.negatives_per_positive is not None:
            _check(self.negatives_per_positive >= 0, f"{w}.negatives_per_positive",
                   f"must be >= 0 or None, got {self.negatives_per_positive}")
        for name in ("per_object", "per_scan"):
            _check(getattr(self, name) >= 1, f"{w}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(self.negatives_per_scan >= 0, f"{w}.negatives_per_scan", f"must be >= 0, got {self.negatives_per_scan}")
        _check(len(self.jitter) == 3 and min(self.jitter) >= 0, f"{w}.jitter",
               f"must be three ints >= 0, got {self.jitter}")
        _check(self.pos >= 0 and self.neg >= 0 and self.pos + self.neg > 0, f"{w}.pos/neg",
               f"must be >= 0 and not both 0, got ({self.pos}, {self.neg})")
        if self.crop_size is not None:
            _check(len(self.crop_size) == 3 and min(self.crop_size) >= 1, f"{w}.crop_size",
                   f"must be three positive ints, got {self.crop_size}")


@dataclass(frozen=True, kw_only=True)
class SplitRule:
    """How scans are assigned to train / validation / test, always by patient.

    - `luna16_subsets`: subsets 0-4 / 5-6 / 7-9 (the reference); scans without a subset fall back
      to the seeded draw.
    - `index_ranges`: the integer in the scan id (LiTS `volume-K`) against `ranges`; when the data
      do not cover all three ranges (a sample, a partial download), a seeded draw by patient.
    - `patient_seeded`: a seeded draw per patient against `fractions`.
    - `folds`: `subset` = foldK per patient (PE-CAD); fold `test_fold` is test, the next one validation.
    """

    kind: Literal["luna16_subsets", "index_ranges", "patient_seeded", "folds"]
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    ranges: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    """Inclusive (first, last) per split, for `index_ranges`."""
    test_fold: int = 1
    n_folds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        w = "SplitRule"
        _check(self.kind in ("luna16_subsets", "index_ranges", "patient_seeded", "folds"), f"{w}.kind",
               f"unknown rule {self.kind!r}")
        _check(len(self.fractions) == 3 and abs(sum(self.fractions) - 1) < 1e-6 and min(self.fractions) >= 0,
               f"{w}.fractions", f"must be three shares summing to 1, got {self.fractions}")
        if self.kind == "index_ranges":
            _check(self.ranges is not None and len(self.ranges) == 3, f"{w}.ranges",
                   "three (first, last) ranges are required for 'index_ranges'")
        if self.kind == "folds":
            _check(1 <= self.test_fold <= self.n_folds, f"{w}.test_fold",
                   f"must be in 1..{self.n_folds}, got {self.test_fold}")


@dataclass(frozen=True, kw_only=True)
class Optimisation:
    """The reference's fine-tuning recipe (keras/downstream_tasks): Adam, reduce-on-plateau, early stop."""

    optimizer: str = "adam"
    lr: float = 1e-3
    batch_size: int = 16
    patience: int = 10
    """Early stopping on validation loss (epochs without improvement)."""
    plateau_factor: float = 0.5
    plateau_patience: int = 6
    plateau_min_delta: float = 1e-4
    min_lr: float = 1e-6
    max_epochs: int = 10000

    def __post_init__(self) -> None:
        w = "Optimisation"
        _check(self.lr > 0, f"{w}.lr", f"must be > 0, got {self.lr}")
        for name in ("batch_size", "patience", "plateau_patience", "max_epochs"):
            _check(getattr(self, name) >= 1, f"{w}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(0 < self.plateau_factor < 1, f"{w}.plateau_factor", f"must be in (0, 1), got {self.plateau_factor}")


@dataclass(frozen=True, kw_only=True)
class Published:
    """The published result (MedIA 2021 table; % , mean and sd over runs) per initialisation."""

    metric: str
    scratch: tuple[float, float]
    medicalnet: tuple[float, float]
    genesis: tuple[float, float]


@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """One target task: data, preprocessing, cube, sampling, split, head, loss, optimiser, metrics."""

    name: str
    title: str
    kind: Literal["classification", "segmentation"]
    dataset: str
    """Catalog `dataset` of the scans the task reads (luna16, lidc, pe, lits, brats)."""
    modality: str
    data_layout: str
    """Where the raw data come from and in which layout (for people; readers find it by layout)."""
    intensity: Intensity
    cube_size: tuple[int, int, int]
    sampling: Sampling
    split: SplitRule
    channels: tuple[str, ...] = ()
    """Sequences stacked as input channels (BraTS); empty = the scan itself, one channel."""
    head: Literal["encoder-gap-dense", "unet"] = "unet"
    loss: Literal["bce", "dice"] = "dice"
    optimisation: Optimisation = field(default_factory=Optimisation)
    metrics: tuple[str, ...] = ()
    """Reported metrics; the first is the paper's (auc or keras_mean_iou)."""
    evaluation: Literal["cubes", "whole_volume"] = "cubes"
    published: Published | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        w = f"TaskSpec({self.name!r})"
        _check(self.name.isidentifier() and self.name == self.name.lower(), f"{w}.name",
               "must be a lower-case identifier (it names folders and registered models)")
        _check(self.kind in KINDS, f"{w}.kind", f"must be one of {KINDS}, got {self.kind!r}")
        _check(len(self.cube_size) == 3 and all(int(s) == s and s >= 1 for s in self.cube_size), f"{w}.cube_size",
               f"must be three positive ints (z, y, x), got {self.cube_size}")
        expect = "candidates" if self.kind == "classification" else ("objects", "pos_neg")
        _check(self.sampling.kind in expect, f"{w}.sampling.kind",
               f"{self.sampling.kind!r} does not fit a {self.kind} task")
        _check((self.head, self.loss) == (("encoder-gap-dense", "bce") if self.kind == "classification"
                                          else ("unet", "dice")), f"{w}.head/loss",
               f"{self.head}/{self.loss} does not fit a {self.kind} task")
        _check(bool(self.metrics), f"{w}.metrics", "at least one metric is required")

    @property
    def in_channels(self) -> int:
        return max(1, len(self.channels))

    def with_overrides(self, **changes) -> TaskSpec:
        """A copy with top-level fields or `sampling.X` / `split.X` / `optimisation.X` changed."""
        nested: dict[str, dict] = {}
        top = {}
        for key, value in changes.items():
            if value is None:
                continue
            head, _, rest = key.partition(".")
            if rest:
                nested.setdefault(head, {})[rest] = value
            else:
                top[key] = value
        for head, sub in nested.items():
            top[head] = replace(getattr(self, head), **sub)
        return replace(self, **top)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def data_dict(self) -> dict:
        """The fields that decide what a task patch store holds (its content key); training fields excluded."""
        d = self.to_dict()
        return {k: d[k] for k in ("name", "kind", "dataset", "modality", "intensity", "cube_size", "sampling",
                                  "split", "channels")}

    def row(self) -> dict:
        """One row of `genesis tasks list` and of the README's task table."""
        d, h, w = self.cube_size
        s = self.sampling
        crop = f" from {'x'.join(map(str, s.crop_size))}" if s.crop_size else ""
        pub = self.published
        return {
            "task": self.name.upper(), "title": self.title, "kind": self.kind, "dataset": self.dataset,
            "cube z,y,x": f"{d}x{h}x{w}{crop}", "channels": ",".join(self.channels) or "1",
            "split": self.split.kind, "loss": self.loss,
            "lr/patience/batch": f"{self.optimisation.lr:g}/{self.optimisation.patience}/{self.optimisation.batch_size}",
            "metric": self.metrics[0],
            "scratch": f"{pub.scratch[0]:.2f}+-{pub.scratch[1]:.2f}" if pub else "",
            "genesis": f"{pub.genesis[0]:.2f}+-{pub.genesis[1]:.2f}" if pub else "",
        }
