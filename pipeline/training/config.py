"""Pretraining configuration: one frozen dataclass, three named presets.

`paper` is the reference recipe; `stable` is what to use when `paper` collapses to a constant
output (users of the reference report this with SGD at lr 1.0); `tiny` shows the loss falling
on a CPU in minutes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

__all__ = ["PretrainConfig", "PRESETS", "preset", "per_worker_batch", "precision"]


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    preset: str = "custom"
    base_channels: int = 32
    """U-Net width (32 = the reference's 19,073,665 parameters)."""
    norm: str = "batch_stats"
    """batch_stats (the reference's ContBatchNorm3d, every preset), batch or instance.

    batch_stats is the reference's pretraining (pytorch/unet3d.py, ContBatchNorm3d): each training batch and each
    validation batch is normalised with its own statistics, in eval mode too, so the validation loss, like the
    reference's, depends on how the validation cubes are batched. The running statistics are still updated in
    training (momentum 0.1) and saved: a fine-tuned "batch" model starts from them. `pipeline.load_model` and the
    logged pyfunc predict such a model cube by cube (`pipeline.models.norms`)."""
    optimizer: str = "sgd"
    """sgd | adam."""
    lr: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 0.0
    scheduler: str = "step"
    """step (StepLR step_size/gamma, per epoch) | plateau (ReduceLROnPlateau on validation loss)."""
    step_size: int = 40
    gamma: float = 0.5
    grad_clip: float = 0.0
    """Max gradient norm; 0 = no clipping."""
    batch_size: int = 6
    """Global batch: cubes per optimiser step over all Ray workers (the reference: 6 in one process). It is
    split evenly across the workers (`per_worker_batch`); the lr is the reference's for this global batch,
    unscaled. Each global batch is drawn from different scans."""
    distinct_scans: bool = True
    """Batches of different scans, every cube once per epoch (pipeline.data.sampling); False: a plain
    uniform permutation of the train split."""
    epochs: int = 10_000
    steps_per_epoch: int = 0
    """Limit of training steps per epoch; 0 = one pass over this worker's share of the train split."""
    patience: int = 50
    """Epochs without a better validation loss before stopping."""
    val_cubes: int = 0
    """Validation cubes: 0 = the whole validation split (the reference); n = the first n of the run's
    validation order, drawn across scans."""
    val_recorrupt: bool = True
    """True: validation pairs corrupted afresh each epoch from (seed, epoch), as the reference re-corrupts
    (reproducible here); False: the same corruption every epoch (a less noisy early-stopping signal)."""
    seed: int = 0
    read_block: int = 12
    """Cubes the loader reads from the store per call, rounded up to whole per-worker batches (its memory: about
    3 blocks, 3 x 12 x 512 KiB = 18 MiB at 32x64x64)."""
    bf16: bool = False
    """bf16 autocast on GPU; never on CPU (fp32 there whatever this says). The reference trains in fp32."""
    image_every: int = 1
    """Log a restoration figure every this many epochs."""
    figure_cubes: int = 2
    """Validation cubes in the restoration figure (each shown under every corruption type)."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        checks = {
            "base_channels": self.base_channels >= 1, "lr": self.lr > 0, "batch_size": self.batch_size >= 1,
            "epochs": self.epochs >= 1, "patience": self.patience >= 1, "val_cubes": self.val_cubes >= 0,
            "read_block": self.read_block >= 1, "figure_cubes": self.figure_cubes >= 1,
            "steps_per_epoch": self.steps_per_epoch >= 0, "step_size": self.step_size >= 1,
            "gamma": 0 < self.gamma <= 1, "grad_clip": self.grad_clip >= 0, "image_every": self.image_every >= 1,
            "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}.{field} has an invalid value {getattr(self, field)!r}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"{name}.optimizer must be sgd or adam, got {self.optimizer!r}")
        if self.scheduler not in ("step", "plateau"):
            raise ValueError(f"{name}.scheduler must be step or plateau, got {self.scheduler!r}")
        if self.norm not in ("batch_stats", "batch", "instance"):
            raise ValueError(f"{name}.norm must be batch_stats, batch or instance, got {self.norm!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        """A run's recorded config; fields of older versions that no longer exist (buffer_size, val_pairs) are
        dropped, so older runs still resume."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def with_overrides(self, **kw) -> PretrainConfig:
        return replace(self, **{k: v for k, v in kw.items() if v is not None})


def per_worker_batch(global_batch: int, workers: int) -> int:
    """Cubes per worker per step; refuses a global batch that does not split evenly."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if global_batch % workers:
        options = [w for w in range(1, global_batch + 1) if global_batch % w == 0]
        raise ValueError(f"the global batch of {global_batch} cubes does not split evenly across {workers} Ray "
                         f"workers: use {options} workers, or a global batch that is a multiple of {workers} "
                         f"(--batch-size; the reference's lr belongs to its batch of 6)")
    return global_batch // workers


def precision(config: PretrainConfig, device_type: str) -> str:
    """What the run computes in: bf16 autocast only on a GPU and when asked for."""
    return "bf16-autocast" if config.bf16 and device_type == "cuda" else "fp32"


def paper() -> PretrainConfig:
    """The reference: SGD lr 1.0, momentum 0.9, StepLR(40, 0.5), global batch 6, patience 50, MSE, fp32,
    batch-statistics norm (ContBatchNorm3d); validation on the whole validation split, corrupted afresh each
    epoch."""
    return PretrainConfig(preset="paper")


def stable() -> PretrainConfig:
    """Adam at 1e-3 with gradient clipping and a plateau schedule: restores instead of collapsing. bf16
    autocast on a GPU; the whole validation split with the same corruption every epoch."""
    return PretrainConfig(preset="stable", optimizer="adam", lr=1e-3, weight_decay=1e-5, scheduler="plateau",
                          gamma=0.5, step_size=10, grad_clip=1.0, bf16=True, val_recorrupt=False)


def tiny() -> PretrainConfig:
    """A CPU run of a few minutes: 4-channel U-Net, short epochs, the stable optimiser, 8 fixed validation
    pairs."""
    return PretrainConfig(preset="tiny", base_channels=4, optimizer="adam", lr=3e-3, scheduler="plateau",
                          step_size=5, grad_clip=1.0, batch_size=4, epochs=8, steps_per_epoch=6, patience=8,
                          val_cubes=8, val_recorrupt=False)


PRESETS = {"paper": paper, "stable": stable, "tiny": tiny}


def preset(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
