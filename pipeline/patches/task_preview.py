"""`genesis patches preview` of a task store: cubes with their labels, masks drawn over the image.

A person checks a task store by eye: are positives centred on findings, do masks sit on the
organ or tumour they label, are negatives really negative. Classification stores show positives
and negatives side by side (axial and coronal middle slices); segmentation stores show each cube
at the axial slice with most target voxels, the mask outlined in red. Each panel names its case in full
(`case_title`: wrapped, never cut: "Brats18_2013_102_1", not "s18_2013_102_1").
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.patches.store import PatchStore

__all__ = ["case_title", "task_preview_figure", "render_task_preview"]

TITLE_CHARS = 28
"""Characters of a case id per title line at the panels' 2-inch width and 7 pt (longer ids wrap)."""


def case_title(case_id: str, width: int = TITLE_CHARS) -> str:
    """The whole case id, wrapped onto lines of at most `width` characters (at "_", "-" or "." where possible),
    so a long id is never cut off."""
    import re

    parts = re.findall(r"[^_.\-]+[_.\-]?", str(case_id)) or [str(case_id)]
    lines, line = [], ""
    for part in parts:
        while len(part) > width:  # one part longer than a line: hard-split it
            if line:
                lines.append(line)
                line = ""
            lines.append(part[:width])
            part = part[width:]
        if len(line) + len(part) > width and line:
            lines.append(line)
            line = ""
        line += part
    if line:
        lines.append(line)
    return "\n".join(lines)


def _pick(index, n: int, rng: np.random.Generator) -> np.ndarray:
    """Up to n rows, half positives (label 1) and half negatives, drawn with `rng`, in row order."""
    pos = index.loc[index["label"] == 1, "row"].to_numpy()
    neg = index.loc[index["label"] != 1, "row"].to_numpy()
    n_pos = min(len(pos), max(n - len(neg), n // 2))
    chosen = list(rng.choice(pos, n_pos, replace=False)) if n_pos else []
    n_neg = min(len(neg), n - n_pos)
    chosen += list(rng.choice(neg, n_neg, replace=False)) if n_neg else []
    return np.sort(np.asarray(chosen, dtype=np.int64))


def task_preview_figure(store: PatchStore, n_cubes: int = 8, seed: int = 0):
    """(figure, rows drawn): the task store's cubes with labels and masks, each titled with split, row, label or
    foreground share, and the full case id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = store.index.set_index("row", drop=False)
    rows = _pick(store.index, n_cubes, np.random.default_rng(seed))
    cubes = store.read(rows)[:, 0]
    masks = store.read(rows, "masks")[:, 0] if store.purpose == "segmentation" else None
    fig, axes = plt.subplots(2, len(rows), figsize=(2.0 * len(rows), 4.6), facecolor="black", squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, row in enumerate(rows):
        cube = cubes[i]
        r = idx.loc[row]
        if masks is not None:
            m = masks[i]
            z = int(np.argmax(m.sum(axis=(1, 2)))) if m.any() else cube.shape[0] // 2
            y = int(np.argmax(m.sum(axis=(0, 2)))) if m.any() else cube.shape[1] // 2
            views = [(cube[z], m[z], f"z={z}"), (cube[:, y], m[:, y], f"y={y}")]
            title = f"{r['split']} #{row}\nfg {100 * r['foreground_fraction']:.1f}%"
        else:
            views = [(cube[cube.shape[0] // 2], None, "axial"), (cube[:, cube.shape[1] // 2], None, "coronal")]
            title = f"{r['split']} #{row}\nlabel {int(r['label'])}"
        for k, (img, mask, _) in enumerate(views):
            ax = axes[k, i]
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, aspect="auto")
            if mask is not None and mask.any():
                ax.contour(mask, levels=[0.5], colors="red", linewidths=0.8)
        colour = "tomato" if int(r["label"]) == 1 else "white"
        axes[0, i].set_title(f"{title}\n{case_title(str(r['case_id']))}", color=colour, fontsize=7)
    a = store.attrs
    D, H, W = a["cube_shape"]
    fig.suptitle(f"task {a['task']} store {store.key}: {len(store)} cubes {D}x{H}x{W} (z,y,x), "
                 f"channel {a.get('channels', ['image'])[0]}; top axial, bottom coronal"
                 + ("; red: target mask" if masks is not None else "; red titles: positives"),
                 color="white", fontsize=8)
    fig.tight_layout()
    return fig, rows


def render_task_preview(path: str, out: str, n_cubes: int = 8, seed: int = 0) -> str:
    """`task_preview_figure` saved to `out`; returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, _ = task_preview_figure(PatchStore(path), n_cubes, seed)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100, facecolor="black")
    plt.close(fig)
    return out
