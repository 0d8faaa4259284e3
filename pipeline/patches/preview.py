"""`genesis patches preview`: sample cubes of a patch store, and what each corruption does to them.

The corruptions are shown each on a different cube (as training meets them: every cube gets its own draw), so
the picture shows the store's variety and the corruptions at once, not one cube six times."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from pipeline.patches.config import preprocessing_of
from pipeline.patches.store import PatchStore

__all__ = ["CORRUPTION_NAMES", "PreviewPlan", "preview_plan", "patch_preview_figure", "render_patch_preview"]

CORRUPTION_NAMES = ("flip", "local shuffle", "non-linear", "in-painting", "out-painting", "all (as trained)")


@dataclass(frozen=True)
class PreviewPlan:
    """Which store rows the preview draws: `rows` (top row, sorted) and, per corruption of `CORRUPTION_NAMES`,
    the row it is shown on (`corrupted`): distinct rows while the store has as many cubes as corruptions."""

    rows: np.ndarray
    corrupted: np.ndarray


def preview_plan(available: np.ndarray, n_cubes: int, seed: int, n_corruptions: int = len(CORRUPTION_NAMES)
                 ) -> PreviewPlan:
    """Draw `n_cubes` rows of `available` (seeded); the corruptions take rows from a shuffled draw of at least
    `n_corruptions` rows (the top row's first, then others), repeating only when the store is smaller."""
    rng = np.random.default_rng([seed, 0x9E])
    available = np.asarray(available)
    order = rng.permutation(available)
    rows = np.sort(order[:min(n_cubes, len(order))])
    shown = set(rows.tolist())
    pool = list(rng.permutation(rows)) + [r for r in order if r not in shown]
    pool = pool[:max(n_corruptions, 1)]
    corrupted = np.asarray([pool[i % len(pool)] for i in range(n_corruptions)], dtype=available.dtype)
    return PreviewPlan(rows=rows, corrupted=corrupted)


def _corruption(name: str, cube: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    from pipeline.transforms import (GenesisConfig, corrupt, flip, inpainting, local_pixel_shuffling,
                                     nonlinear_transformation, outpainting)

    cfg = GenesisConfig()
    if name == "flip":
        flipped, axes = flip(cube, np.random.default_rng(rng.integers(2**32)), GenesisConfig(flip_rate=1.0))
        return f"flip {axes}", flipped
    if name == "all (as trained)":
        return name, corrupt(cube, np.random.default_rng(rng.integers(2**32)), cfg)[0]
    fn = {"local shuffle": local_pixel_shuffling, "non-linear": nonlinear_transformation,
          "in-painting": inpainting, "out-painting": outpainting}[name]
    return name, fn(cube, rng, cfg)


def patch_preview_figure(store: PatchStore, n_cubes: int = 8, seed: int = 0):
    """(figure, plan): top, the middle axial slices of the plan's cubes; below, per corruption, its cube's
    original over the corrupted cube (`preview_plan`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = preview_plan(store.index["row"].to_numpy(), n_cubes, seed)
    needed = np.unique(np.concatenate([plan.rows, plan.corrupted]))
    cubes = dict(zip(needed.tolist(), store.read_cubes(needed)[:, 0]))
    d = next(iter(cubes.values())).shape[0] // 2
    rng = np.random.default_rng(seed)
    pairs = [(row, *_corruption(name, cubes[int(row)], rng)) for name, row in zip(CORRUPTION_NAMES, plan.corrupted)]
    ncols = max(len(plan.rows), len(pairs))
    fig, axes = plt.subplots(3, ncols, figsize=(1.9 * ncols, 6.2), facecolor="black", squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    idx = store.index.set_index("row")
    for i, row in enumerate(plan.rows):
        axes[0, i].imshow(cubes[int(row)][d], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"{idx.loc[row, 'split']} #{row}", color="white", fontsize=7)
    for i, (row, name, img) in enumerate(pairs):
        axes[1, i].imshow(cubes[int(row)][d], cmap="gray", vmin=0, vmax=1)
        axes[1, i].set_title(f"original #{row}", color="white", fontsize=7)
        axes[2, i].imshow(img[d], cmap="gray", vmin=0, vmax=1)
        axes[2, i].set_title(name, color="white", fontsize=7)
    D, H, W = store.attrs["cube_shape"]
    recipe = preprocessing_of(store.attrs)["recipe"]
    fig.suptitle(f"patch store {store.key} ({recipe} recipe): {len(store)} cubes {D}x{H}x{W} (z,y,x), middle axial "
                 f"slices; rows 2-3: each Models Genesis corruption on another cube, original above corrupted",
                 color="white", fontsize=8)
    fig.tight_layout()
    return fig, plan


def render_patch_preview(path: str, out: str, n_cubes: int = 8, seed: int = 0) -> str:
    """`patch_preview_figure` saved to `out`; returns `out`. Task stores get their own view (labels, masks):
    `pipeline.patches.task_preview`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = PatchStore(path)
    if store.is_task:
        from pipeline.patches.task_preview import render_task_preview

        return render_task_preview(path, out, n_cubes=n_cubes, seed=seed)
    fig, _ = patch_preview_figure(store, n_cubes, seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, facecolor="black")
    plt.close(fig)
    return out
