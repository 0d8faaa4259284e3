"""`TaskSpec`: everything that makes a Models Genesis target task, as data.

The reference has five copied notebooks, one per task; here a task is one frozen value that the
CLI, the patch-store builder, fine-tuning, the docs table and the tests all read. A task is written as a YAML
task file (`pipeline/tasks/task_file.py`, schema `storage_schemas/task_spec.schema.json`): the five built-in tasks
are the files in `pipeline/tasks/builtin_tasks/`, and a sixth task is one more file (`genesis tasks init` drafts one
from an nnU-Net dataset), plus a reader when its data layout is new.
Axis order is (z, y, x) throughout: the reference's 64x64x32 (x, y, z) cube is (32, 64, 64).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

__all__ = ["Intensity", "Sampling", "SplitRule", "Optimisation", "Published", "TaskSpec", "KINDS", "SPLIT_KINDS",
           "INITS"]

KINDS = ("classification", "segmentation")
SPLIT_KINDS = ("luna16_subsets", "index_ranges", "patient_seeded", "folds", "reference_lists", "file")
REFERENCE_LISTS = ("bms",)
"""Case lists of the reference shipped in `pipeline/tasks/data/<name>/` (BMS: keras/downstream_tasks/data/bms)."""
INITS = ("scratch", "medicalnet", "genesis")


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
    """How scans are assigned to train / validation / test, always by patient (`pipeline/tasks/splits.py`).

    - `luna16_subsets`: subsets 0-4 / 5-6 / 7-9 (the reference); scans without a subset fall back
      to the seeded draw.
    - `index_ranges`: the integer in the scan id (LiTS `volume-K`) against `ranges`; when the data
      do not cover all three ranges (a sample, a partial download), a seeded draw by patient.
    - `patient_seeded`: a seeded draw per patient against `fractions`.
    - `folds`: patient-level K-fold cross-validation, `subset` = foldK per patient (PE-CAD): fold
      `test_fold` is test; the other folds train, less `validation_fraction` of their patients
      (at least one), drawn with `seed`, for validation (the reference: 74 / 4 / 39 per fold).
      Patients without a fold are left out. A store holds every fold; `PatchStore.for_fold(k)` views one.
    - `reference_lists`: the reference's packaged case lists `lists` (BMS: fold_1 + fold_2 shuffled by
      `random.Random(4)`, the first 1/8 validation, fold_3 test); cases not in the lists get the
      seeded draw against `fractions`.
    - `file`: a user's splits file (`with_splits_file`): a CSV `case_id,split` or nnU-Net's
      `splits_final.json` (fold `json_fold`); its content hash `sha256` is part of the store's key.
    """

    kind: Literal["luna16_subsets", "index_ranges", "patient_seeded", "folds", "reference_lists", "file"]
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    ranges: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    """Inclusive (first, last) per split, for `index_ranges`."""
    test_fold: int = 1
    n_folds: int = 3
    validation_fraction: float = 0.05
    """`folds`: share of the training folds' patients drawn for validation (at least one)."""
    lists: str | None = None
    """`reference_lists`: which packaged lists (`pipeline/tasks/data/<lists>/`)."""
    path: str | None = None
    """`file`: the splits file (not part of the store's key: its content is, by `sha256`)."""
    sha256: str | None = None
    """`file`: sha256 of the splits file's bytes when the spec was made; a changed file is refused."""
    json_fold: int = 0
    """`file`, nnU-Net `splits_final.json`: which fold's train/val lists (0-based, as nnU-Net counts)."""
    seed: int = 0

    def __post_init__(self) -> None:
        w = "SplitRule"
        _check(self.kind in SPLIT_KINDS, f"{w}.kind", f"unknown rule {self.kind!r}; one of {', '.join(SPLIT_KINDS)}")
        _check(len(self.fractions) == 3 and abs(sum(self.fractions) - 1) < 1e-6 and min(self.fractions) >= 0,
               f"{w}.fractions", f"must be three shares summing to 1, got {self.fractions}")
        if self.kind == "index_ranges":
            _check(self.ranges is not None and len(self.ranges) == 3, f"{w}.ranges",
                   "three (first, last) ranges are required for 'index_ranges'")
        if self.kind == "folds":
            _check(self.n_folds >= 2, f"{w}.n_folds", f"must be >= 2, got {self.n_folds}")
            _check(1 <= self.test_fold <= self.n_folds, f"{w}.test_fold",
                   f"must be in 1..{self.n_folds}, got {self.test_fold}")
            _check(0 < self.validation_fraction < 1, f"{w}.validation_fraction",
                   f"must be in (0, 1), got {self.validation_fraction}")
        if self.kind == "reference_lists":
            _check(self.lists in REFERENCE_LISTS, f"{w}.lists",
                   f"must be one of {', '.join(REFERENCE_LISTS)} for 'reference_lists', got {self.lists!r}")
        if self.kind == "file":
            _check(bool(self.path), f"{w}.path", "a splits file is required for 'file' (use with_splits_file)")
            _check(isinstance(self.sha256, str) and len(self.sha256) == 64, f"{w}.sha256",
                   f"the splits file's sha256 (64 hex digits) is required for 'file', got {self.sha256!r}")
            _check(self.json_fold >= 0, f"{w}.json_fold", f"must be >= 0, got {self.json_fold}")

    def describe(self) -> str:
        """One short phrase for tables: the rule and its numbers."""
        if self.kind == "luna16_subsets":
            return "LUNA16 subsets 0-4/5-6/7-9"
        if self.kind == "index_ranges":
            return "ids " + "/".join(f"{lo}-{hi}" for lo, hi in self.ranges)
        if self.kind == "patient_seeded":
            return "patients " + "/".join(f"{f:.0%}" for f in self.fractions)
        if self.kind == "folds":
            return f"{self.n_folds}-fold CV, val {self.validation_fraction:.0%} of train patients"
        if self.kind == "reference_lists":
            return f"reference {self.lists} lists: folds 1+2 (1/8 val) / fold 3"
        name = os.path.basename(str(self.path))
        return f"file {name}" + (f"#{self.json_fold}" if name.endswith(".json") else "")


@dataclass(frozen=True, kw_only=True)
class Optimisation:
    """The reference's fine-tuning recipe (keras/downstream_tasks): Adam, reduce-on-plateau, early stop.

    Fine-tuning holds this object itself (`FinetuneConfig.optimisation`), so every value here is checked here,
    once, and reaches the training code unchanged."""

    optimizer: str = "adam"
    """The optimiser's name; fine-tuning builds the ones `pipeline.finetune.config.OPTIMIZERS` lists."""
    lr: float = 1e-3
    batch_size: int = 16
    patience: int = 10
    """Early stopping on validation loss (epochs without improvement)."""
    plateau_factor: float = 0.5
    plateau_patience: int = 6
    """Reduce-on-plateau: cut the lr on the plateau_patience-th epoch without improvement (Keras's counting,
    `pipeline.finetune.steps.KerasReduceLROnPlateau`)."""
    plateau_min_delta: float = 1e-4
    min_lr: float = 1e-6
    max_epochs: int = 10000

    def __post_init__(self) -> None:
        w = "Optimisation"
        _check(isinstance(self.optimizer, str) and bool(self.optimizer), f"{w}.optimizer",
               f"must be an optimiser's name, got {self.optimizer!r}")
        _check(self.lr > 0, f"{w}.lr", f"must be > 0, got {self.lr}")
        for name in ("batch_size", "patience", "plateau_patience", "max_epochs"):
            _check(getattr(self, name) >= 1, f"{w}.{name}", f"must be >= 1, got {getattr(self, name)}")
        _check(0 < self.plateau_factor < 1, f"{w}.plateau_factor", f"must be in (0, 1), got {self.plateau_factor}")
        _check(self.plateau_min_delta >= 0, f"{w}.plateau_min_delta", f"must be >= 0, got {self.plateau_min_delta}")
        _check(self.min_lr >= 0, f"{w}.min_lr", f"must be >= 0, got {self.min_lr}")


@dataclass(frozen=True, kw_only=True)
class Published:
    """The published result per initialisation (%, mean and sd over runs), each with where it comes from.

    `sources[init]` names the paper, table and row (and any second source that agrees); `unverified`
    lists the inits whose value could not be confirmed against a source that could be read (the table
    shows them as such). `figure` holds the values read off the repository's MICCAI 2019 figure
    (`figures/results.png`) where it shows this task, a second source that differs slightly.
    """

    metric: str
    scratch: tuple[float, float]
    medicalnet: tuple[float, float]
    genesis: tuple[float, float]
    sources: dict[str, str] = field(default_factory=dict, hash=False)
    """init (scratch, medicalnet, genesis) -> where the value comes from; every init needs one."""
    unverified: tuple[str, ...] = ()
    """Inits whose value could not be confirmed."""
    figure: dict[str, float] = field(default_factory=dict, hash=False)
    """init -> value read off the repository's MICCAI figure (bar tops, +-0.1), where it shows the task."""
    figure_source: str = ""

    def __post_init__(self) -> None:
        w = f"Published({self.metric!r})"
        missing = [i for i in INITS if not self.sources.get(i)]
        _check(not missing, f"{w}.sources", f"every published value needs its source; none for {', '.join(missing)}")
        for name, keys in (("sources", self.sources), ("unverified", self.unverified), ("figure", self.figure)):
            bad = sorted(set(keys) - set(INITS))
            _check(not bad, f"{w}.{name}", f"unknown init(s) {', '.join(bad)}; one of {', '.join(INITS)}")
        _check(not self.figure or bool(self.figure_source), f"{w}.figure_source", "figure values need their source")

    def value(self, init: str) -> tuple[float, float]:
        return getattr(self, init)


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
    labels: dict[str, int | tuple[int, ...]] = field(default_factory=dict, hash=False)
    """The dataset's label names -> values (nnU-Net's dataset.json `labels`; a region-based label is a tuple of
    values): what a prediction's values mean and which values a label map may hold. Not part of the store's key
    (`data_dict`): the target is `sampling.target_values`."""
    head: Literal["encoder-gap-dense", "unet"] = "unet"
    loss: Literal["bce", "dice"] = "dice"
    optimisation: Optimisation = field(default_factory=Optimisation)
    metrics: tuple[str, ...] = ()
    """Reported metrics; the first is the paper's (auc or keras_mean_iou)."""
    evaluation: Literal["cubes", "whole_volume"] = "cubes"
    inplane_scale: float = 1.0
    """Resample volumes in-plane (y, x) by this factor before sampling and evaluation (LCS: 0.5, the
    reference's 256x256 LiTS); part of the store's key."""
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
        _check(isinstance(self.inplane_scale, (int, float)) and math.isfinite(self.inplane_scale)
               and self.inplane_scale > 0, f"{w}.inplane_scale",
               f"must be a finite number > 0, got {self.inplane_scale!r}")
        for label, value in self.labels.items():
            values = value if isinstance(value, tuple) else (value,)
            _check(isinstance(label, str) and bool(label) and bool(values)
                   and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values),
                   f"{w}.labels", f"{label!r}: {value!r} must be a label value >= 0 or a non-empty list of them")

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
        """The fields that decide what a task patch store holds (its content key); training fields excluded.

        A fold-based store holds every fold (each is some run's test fold), so `split.test_fold` is not
        part of it; a splits file counts by its content (`split.sha256`), not by where it lies."""
        d = self.to_dict()
        out = {k: d[k] for k in ("name", "kind", "dataset", "modality", "intensity", "cube_size", "sampling",
                                 "split", "channels", "inplane_scale")}
        if self.split.kind == "folds":
            out["split"].pop("test_fold")
        if self.split.kind == "file":
            out["split"].pop("path")
        return out

    def row(self) -> dict:
        """One row of `genesis tasks list` and of the README's task table."""
        d, h, w = self.cube_size
        s = self.sampling
        crop = f" from {'x'.join(map(str, s.crop_size))}" if s.crop_size else ""
        scale = f", in-plane x{self.inplane_scale:g}" if self.inplane_scale != 1 else ""
        pub = self.published

        def cell(init: str) -> str:
            if pub is None:
                return ""
            mean, sd = pub.value(init)
            return f"{mean:.2f}+-{sd:.2f}" + (" (unverified)" if init in pub.unverified else "")

        return {
            "task": self.name.upper(), "title": self.title, "kind": self.kind, "dataset": self.dataset,
            "cube z,y,x": f"{d}x{h}x{w}{crop}{scale}", "channels": ",".join(self.channels) or "1",
            "split": self.split.describe(), "loss": self.loss,
            "lr/patience/batch": f"{self.optimisation.lr:g}/{self.optimisation.patience}/{self.optimisation.batch_size}",
            "metric": self.metrics[0], "scratch": cell("scratch"), "genesis": cell("genesis"),
        }
