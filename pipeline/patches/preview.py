"""`genesis patches preview`: sample cubes of a patch store, and what each corruption does to them."""

from __future__ import annotations

import os

import numpy as np

from pipeline.patches.config import preprocessing_of
from pipeline.patches.store import PatchStore

__all__ = ["render_patch_preview"]


def _corruptions(cube: np.ndarray, rng: np.random.Generator):
    from pipeline.transforms import (GenesisConfig, corrupt, flip, inpainting, local_pixel_shuffling,
                                     nonlinear_transformation, outpainting)

    cfg = GenesisConfig()
    flipped, axes = flip(cube, np.random.default_rng(rng.integers(2**32)), GenesisConfig(flip_rate=1.0))
    corrupted, target = corrupt(cube, np.random.default_rng(rng.integers(2**32)), cfg)
    return [
        (f"flip {axes}", flipped),
        ("local shuffle", local_pixel_shuffling(cube, rng, cfg)),
        ("non-linear", nonlinear_transformation(cube, rng, cfg)),
        ("in-painting", inpainting(cube, rng, cfg)),
        ("out-painting", outpainting(cube, rng, cfg)),
        ("all (as trained)", corrupted),
    ]


def render_patch_preview(path: str, out: str, n_cubes: int = 8, seed: int = 0) -> str:
    """Top: middle axial slices of `n_cubes` cubes; below: original / corrupted pairs per corruption.
    Task stores get their own view (labels, masks): `pipeline.patches.task_preview`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = PatchStore(path)
    if store.is_task:
        from pipeline.patches.task_preview import render_task_preview

        return render_task_preview(path, out, n_cubes=n_cubes, seed=seed)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(store.index["row"].to_numpy(), size=min(n_cubes, len(store)), replace=False))
    cubes = store.read_cubes(rows)[:, 0]
    d = cubes.shape[1] // 2
    demo = cubes[0]
    pairs = _corruptions(demo, rng)
    ncols = max(len(cubes), len(pairs))
    fig, axes = plt.subplots(3, ncols, figsize=(1.9 * ncols, 6.2), facecolor="black")
    for ax in axes.ravel():
        ax.axis("off")
    idx = store.index.set_index("row")
    for i, (row, cube) in enumerate(zip(rows, cubes)):
        axes[0, i].imshow(cube[d], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(f"{idx.loc[row, 'split']} #{row}", color="white", fontsize=7)
    for i, (name, img) in enumerate(pairs):
        axes[1, i].imshow(demo[d], cmap="gray", vmin=0, vmax=1)
        axes[1, i].set_title("original", color="white", fontsize=7)
        axes[2, i].imshow(img[d], cmap="gray", vmin=0, vmax=1)
        axes[2, i].set_title(name, color="white", fontsize=7)
    D, H, W = store.attrs["cube_shape"]
    recipe = preprocessing_of(store.attrs)["recipe"]
    fig.suptitle(f"patch store {store.key} ({recipe} recipe): {len(store)} cubes {D}x{H}x{W} (z,y,x), middle axial slices; "
                 f"rows 2-3: one cube and each Models Genesis corruption", color="white", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, facecolor="black")
    plt.close(fig)
    return out
