"""`FinetuneConfig`: one fine-tuning run's settings, built from a task's `TaskSpec` by a named preset.

- `paper(spec)`: the reference's recipe (Adam at the task's lr, reduce-on-plateau counted as Keras counts it,
  early stopping with the task's patience, its batch size), the full-width U-Net (32).

The optimiser's settings are the task's `TaskSpec.optimisation` object itself, held by the config (not copied
field by field, so none is dropped or drifts): `paper` takes it unchanged, `tiny` shortens it with
`dataclasses.replace`, and its fields read as the config's own (`config.lr`, `config.optimizer`, ...). `lr` there is
the learning rate the reference code actually trains at (its Keras `compile(optimizer='adam')` passes a string, so
Adam runs at its default 1e-3 and `config.lr` is never read; keras/downstream_tasks/utils.py lines 80-98). Fine-tuning
builds Adam only (`pipeline.finetune.steps.build_optimizer`), so a config naming another optimiser is refused.

Norm: fine-tuned models use "batch" (nn.BatchNorm3d: running statistics in eval mode), as the Keras models behind
the paper's numbers do, so a cube's prediction does not depend on the rest of its batch; a pretrained init brings
its running statistics along (`pipeline.models.norms`).
- `tiny(spec)`: for a CPU and for tests: U-Net width 4, at most 4 epochs, batch 4, smaller inputs, Adam at
  `TINY_LR_SCALE` (10) times the task's rate: at 1e-3 a width-4 U-Net trained for a handful of short epochs
  barely leaves its initialisation (a segmentation predicts background only, a classifier scores at chance);
  at 1e-2 it learns the sample tasks in about ten epochs (`make demo` caps its fine-tunings there).
  Segmentation cubes are centre-cropped to 16x32x32 (no resampling, so whole volumes are predicted at
  the stored resolution); classification cubes are halved (area averaging) until no side exceeds 32
  (64^3 -> 32^3, 32x64x64 -> 16x32x32).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

from pipeline.tasks.spec import Optimisation, TaskSpec

__all__ = ["FinetuneConfig", "paper", "tiny", "preset", "PRESETS", "INPUT_RULES", "OPTIMIZERS", "TINY_LR_SCALE"]

INPUT_RULES = ("stored", "centre_crop", "downsample")
#: pipeline.models.norms.NORM_KINDS, repeated so that a config is checked without importing torch.
NORMS = ("batch_stats", "batch", "instance")
#: The optimisers `pipeline.finetune.steps.build_optimizer` builds: the reference fine-tunes with Adam only.
OPTIMIZERS = ("adam",)
#: `Optimisation`'s fields: a config reads, overrides (`with_overrides(lr=...)`) and flattens them by these names.
OPTIMISATION_FIELDS = tuple(f.name for f in fields(Optimisation))


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    task: str
    """Task name (registry key)."""
    kind: str
    """classification | segmentation."""
    preset: str
    base_channels: int = 32
    """U-Net width (first conv); must match a pretrained init's."""
    in_channels: int = 1
    norm: str = "batch"
    """batch (nn.BatchNorm3d, running statistics at inference: the Keras models' BatchNormalization) | batch_stats
    (the PyTorch port's ContBatchNorm3d; evaluated cube by cube) | instance."""
    input_rule: str = "stored"
    """How stored cubes become network input: stored | centre_crop (to input_size) | downsample (to input_size)."""
    input_size: tuple[int, int, int] = (32, 64, 64)
    """Network input (z, y, x); also the sliding-window roi for whole-volume evaluation."""
    volume_scale: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Whole-volume evaluation: volumes are resized by this factor before the sliding window (the store's
    crop -> cube resize, e.g. BMS 50x100x100 -> 32x64x64, times a tiny downsample) and probabilities back."""
    evaluation: str = "cubes"
    optimisation: Optimisation = field(default_factory=Optimisation)
    """The task's `TaskSpec.optimisation` (optimiser, lr, batch size, early stopping, reduce-on-plateau, epochs),
    held as it is; `Optimisation` checks its values. Its fields read as the config's own (`__getattr__`)."""
    freeze_encoder: bool = False
    label_fraction: float = 1.0
    seed: int = 0
    sw_batch_size: int = 4
    sw_overlap: float = 0.25

    def __post_init__(self) -> None:
        w = "FinetuneConfig"

        def check(cond, field, msg):
            if not cond:
                raise ValueError(f"{w}.{field}: {msg}")

        check(self.kind in ("classification", "segmentation"), "kind", f"must be classification|segmentation, got {self.kind!r}")
        check(isinstance(self.base_channels, int) and self.base_channels >= 1, "base_channels",
              f"must be a positive int, got {self.base_channels!r}")
        check(self.input_rule in INPUT_RULES, "input_rule", f"must be one of {INPUT_RULES}, got {self.input_rule!r}")
        check(len(self.input_size) == 3 and all(int(s) % 8 == 0 and s >= 8 for s in self.input_size), "input_size",
              f"must be three multiples of 8 (the U-Net pools three times), got {self.input_size}")
        check(self.norm in NORMS, "norm", f"must be one of {NORMS}, got {self.norm!r}")
        check(self.evaluation in ("cubes", "whole_volume"), "evaluation", f"must be cubes|whole_volume, got {self.evaluation!r}")
        check(isinstance(self.optimisation, Optimisation), "optimisation",
              f"must be an Optimisation (a TaskSpec's optimisation), got {type(self.optimisation).__name__}")
        check(self.optimizer in OPTIMIZERS, "optimizer",
              f"fine-tuning builds {'|'.join(OPTIMIZERS)} (the reference's optimiser), got {self.optimizer!r}")
        check(self.sw_batch_size >= 1, "sw_batch_size", f"must be >= 1, got {self.sw_batch_size}")
        check(0 < self.label_fraction <= 1, "label_fraction", f"must be in (0, 1], got {self.label_fraction}")
        check(0 <= self.sw_overlap < 1, "sw_overlap", f"must be in [0, 1), got {self.sw_overlap}")

    def __getattr__(self, name: str):
        """The optimisation's fields read as the config's own (`config.lr` is `config.optimisation.lr`), so the
        training code reads the task's values without this class re-declaring them; any other name is missing."""
        if name in OPTIMISATION_FIELDS:
            return getattr(self.optimisation, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def settable(cls) -> tuple[str, ...]:
        """The names `with_overrides` and `from_dict` take: the config's fields and the optimisation's."""
        return tuple(sorted({*cls.__dataclass_fields__, *OPTIMISATION_FIELDS}))

    def with_overrides(self, **changes) -> FinetuneConfig:
        """A copy with the given fields changed (None leaves a field as it is); an optimisation field by its own
        name (`lr=...`) changes the held `optimisation`, whose checks the new value passes."""
        bad = [k for k in changes if k not in self.settable()]
        if bad:
            raise ValueError(f"FinetuneConfig has no field(s) {bad}; fields: {list(self.settable())}")
        own = {k: v for k, v in changes.items() if v is not None and k not in OPTIMISATION_FIELDS}
        tuned = {k: v for k, v in changes.items() if v is not None and k in OPTIMISATION_FIELDS}
        if tuned:
            own["optimisation"] = replace(own.get("optimisation", self.optimisation), **tuned)
        return replace(self, **own)

    def to_dict(self) -> dict:
        """Flat, in field order: the optimisation's fields sit where `optimisation` is declared, under their own
        names (the MLflow params `finetune.lr`, ... and the checkpoints' `config` keep their keys)."""
        out: dict = {}
        for name, value in asdict(self).items():
            out.update(value if name == "optimisation" else {name: value})
        return out

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """The inverse of `to_dict`; an optimisation field it lacks takes `Optimisation`'s default (a dict
        written before `optimizer` was kept reads as Adam, the only optimiser fine-tuning ever built)."""
        d = dict(d)
        for k in ("input_size", "volume_scale"):
            d[k] = tuple(d[k])
        optimisation = Optimisation(**{k: d.pop(k) for k in OPTIMISATION_FIELDS if k in d})
        return cls(**d, optimisation=optimisation)


def _crop_scale(spec: TaskSpec) -> tuple[float, float, float]:
    crop = spec.sampling.crop_size or spec.cube_size
    return tuple(c / r for c, r in zip(spec.cube_size, crop))


def _common(spec: TaskSpec, name: str) -> dict:
    return dict(task=spec.name, kind=spec.kind, preset=name, in_channels=spec.in_channels, evaluation=spec.evaluation,
                optimisation=spec.optimisation, input_size=tuple(spec.cube_size), volume_scale=_crop_scale(spec))


def paper(spec: TaskSpec) -> FinetuneConfig:
    """The reference's recipe for `spec`: full-width U-Net, the task's optimisation values, cubes as stored."""
    return FinetuneConfig(**_common(spec, "paper"), base_channels=32, input_rule="stored")


TINY_SEGMENTATION = (16, 32, 32)
TINY_MAX_SIDE = 32
TINY_LR_SCALE = 10.0
"""The tiny preset trains at this multiple of the task's learning rate (1e-3 -> 1e-2): a width-4 U-Net on a few
dozen cubes needs it to learn within the few epochs a CPU run affords."""


def tiny(spec: TaskSpec) -> FinetuneConfig:
    """Width 4, at most 4 epochs, batch 4, lr `TINY_LR_SCALE` x the task's; segmentation centre-cropped to
    16x32x32, classification halved until every side is <= 32 (see the module docstring)."""
    base = _common(spec, "tiny")
    stored = tuple(spec.cube_size)
    if spec.kind == "segmentation":
        size = tuple(min(s, t) for s, t in zip(stored, TINY_SEGMENTATION))
        rule = "centre_crop" if size != stored else "stored"
    else:
        halvings = max(0, math.ceil(math.log2(max(stored) / TINY_MAX_SIDE))) if max(stored) > TINY_MAX_SIDE else 0
        size = tuple(max(8, s // 2 ** halvings) for s in stored)
        rule = "downsample" if size != stored else "stored"
    scale = base.pop("volume_scale")
    if rule == "downsample":
        scale = tuple(sc * n / s for sc, n, s in zip(scale, size, stored))
    o = spec.optimisation
    short = replace(o, lr=o.lr * TINY_LR_SCALE, max_epochs=min(o.max_epochs, 4), batch_size=4,
                    patience=min(o.patience, 4), plateau_patience=min(o.plateau_patience, 2))
    base.update(input_size=size, optimisation=short)
    return FinetuneConfig(**base, base_channels=4, input_rule=rule, volume_scale=scale)


PRESETS = {"paper": paper, "tiny": tiny}


def preset(name: str, spec: TaskSpec) -> FinetuneConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name](spec)
