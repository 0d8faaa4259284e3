"""The restoration figure: the same validation cubes every epoch, one row per corruption type, so one sees
which corruption the model has learnt to undo (original / corrupted / restored, middle axial slice).

The same restorations say whether the pretraining learnt anything at all: `restoration_check` measures their
spread against the targets' (`pipeline.degenerate.restoration_spread`) and flags flat ones (a network that
outputs one grey value has a low MSE on CT cubes that are mostly one grey value); the figure's title says so."""

from __future__ import annotations

import numpy as np
import torch

from pipeline import degenerate
from pipeline.transforms import (GenesisConfig, GenesisParams, apply, sample_inpainting, sample_local_shuffle,
                                 sample_nonlinear, sample_outpainting, sample_params)
from pipeline.transforms.shapes import spatial_shape

__all__ = ["CORRUPTIONS", "figure_pairs", "restoration_check", "restoration_figure"]

CORRUPTIONS = ("local shuffle", "non-linear", "in-painting", "out-painting", "all (as in training)")


def _params(kind: str, rng: np.random.Generator, shape, genesis: GenesisConfig) -> GenesisParams:
    """One corruption type alone (no flip); the last kind is a full training draw with shuffle, non-linear
    map and painting all applied."""
    base = dict(shape=shape, flip_axes=(), shuffle=False, nonlinear=False, paint="none",
                bezier_samples=genesis.bezier_samples)
    if kind == "local shuffle":
        return GenesisParams(**{**base, "shuffle": True, "shuffle_blocks": sample_local_shuffle(rng, shape, genesis)})
    if kind == "non-linear":
        return GenesisParams(**{**base, "nonlinear": True, "bezier": sample_nonlinear(rng)})
    if kind in ("in-painting", "out-painting"):
        draw = sample_inpainting if kind == "in-painting" else sample_outpainting
        boxes = ()
        while not boxes:  # in-painting may draw no box at all (5%); the figure wants one
            boxes = draw(rng, shape, genesis)
        return GenesisParams(**{**base, "paint": kind.split("-")[0] + "paint", "boxes": boxes,
                                "noise_seed": int(rng.integers(2**63))})
    while True:
        params = sample_params(rng, shape, genesis)
        if params.shuffle and params.nonlinear and params.paint != "none":
            return params


def figure_pairs(cubes: np.ndarray, seed: int, genesis: GenesisConfig = GenesisConfig()
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted, target), each (len(CORRUPTIONS) * n, 1, D, H, W): row-major by corruption type, then
    cube, drawn once from `seed` (the same every epoch of a run)."""
    cubes = np.asarray(cubes, dtype=np.float32)
    shape = spatial_shape(cubes.shape[1:])
    rng = np.random.default_rng([seed, 0xF16])
    xs, ys = [], []
    for kind in CORRUPTIONS:
        for cube in cubes:
            x, y = apply(cube.reshape(shape), _params(kind, rng, shape, genesis))
            xs.append(x)
            ys.append(y)
    as_batch = lambda a: torch.from_numpy(np.stack(a))[:, None]  # noqa: E731
    return as_batch(xs), as_batch(ys)


def restoration_check(target, restored) -> tuple[float, str | None]:
    """(spread of the restorations over the targets' (1: as varied as the target, 0: constant), the flat flag
    or None): `pipeline.degenerate.restoration_spread` / `restoration_flag` on the figure's cubes, which are
    validation cubes (`figure_pairs`). For the run's metric `restoration_spread` and tag `genesis.degenerate`."""
    spread = degenerate.restoration_spread(target, restored)
    return spread, degenerate.restoration_flag(spread)


def restoration_figure(corrupted: torch.Tensor, target: torch.Tensor, restored: torch.Tensor, title: str):
    """A matplotlib figure from `figure_pairs` and the model's restorations: one row per corruption type,
    for each cube the columns original / corrupted / restored (middle axial slice). Flat restorations
    (`restoration_check`) are named in the title, in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(CORRUPTIONS)
    n = len(target) // rows
    fig, axes = plt.subplots(rows, 3 * n, figsize=(2.0 * 3 * n, 2.1 * rows + 0.4), facecolor="black", squeeze=False)
    d = target.shape[2] // 2
    for i, kind in enumerate(CORRUPTIONS):
        for j in range(n):
            k = i * n + j
            for c, (name, t) in enumerate((("original", target), ("corrupted", corrupted), ("restored", restored))):
                ax = axes[i, 3 * j + c]
                ax.imshow(np.asarray(t[k, 0, d], dtype=np.float32), cmap="gray", vmin=0, vmax=1)
                ax.set_title(name if i == 0 else "", color="white", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
            if j == 0:
                axes[i, 0].set_ylabel(kind, color="white", fontsize=8)
    _, flat = restoration_check(target, restored)
    fig.suptitle(f"{title}; DEGENERATE: {flat}" if flat else title, color="tomato" if flat else "white", fontsize=9)
    fig.tight_layout()
    return fig
