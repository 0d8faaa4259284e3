"""Pictures of a stored scan: the three orthogonal middle slices through a CT window."""

from __future__ import annotations

import os

import numpy as np

from pipeline.volume_store.store import VolumeStore

__all__ = ["WINDOWS", "render_preview"]

TITLE_CHARS = 120
"""The longest one-line title at the figure's width and 9 pt."""

# (level, width) in HU: the windows radiologists read chest CT with.
WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "bone": (400.0, 1800.0)}


def _window(img: np.ndarray, modality: str, window: str) -> tuple[float, float]:
    if modality == "CT":
        level, width = WINDOWS[window]
        return level - width / 2, level + width / 2
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0, 1)
    return float(lo), float(hi if hi > lo else lo + 1)


def render_preview(store_root: str, scan_id: str, out: str, window: str = "lung") -> str:
    """Axial, coronal and sagittal middle slices with physical aspect ratios; returns `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if window not in WINDOWS:
        raise ValueError(f"window must be one of {sorted(WINDOWS)}, got {window!r}")
    store = VolumeStore(store_root)
    group = store.open_scan(scan_id)
    attrs = dict(group.attrs)["genesis"]
    arr = group["0"]
    z, y, x = arr.shape
    sz, sy, sx = attrs["spacing"]
    views = [
        ("axial (z=%d)" % (z // 2), arr[z // 2, :, :], sy / sx),
        ("coronal (y=%d)" % (y // 2), arr[:, y // 2, :][::-1], sz / sx),
        ("sagittal (x=%d)" % (x // 2), arr[:, :, x // 2][::-1], sz / sy),
    ]
    lo, hi = _window(np.concatenate([v[1].ravel() for v in views]), attrs["modality"], window)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), facecolor="black")
    for ax, (title, img, aspect) in zip(axes, views):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, interpolation="nearest")
        ax.set_title(title, color="white", fontsize=10)
        ax.axis("off")
    label = f"{scan_id}  {attrs['modality']} {attrs['dataset']}  {z}x{y}x{x} voxels  spacing {sz:.2f},{sy:.2f},{sx:.2f} mm"
    if attrs["modality"] == "CT":
        label += f"  window {window} [{lo:.0f}, {hi:.0f}] HU"
    if len(label) > TITLE_CHARS:  # a long scan id (a DICOM UID) gets its own line: the title is never cut
        label = label.replace("  ", "\n", 1)
    fig.suptitle(label, color="white", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=90, facecolor="black")
    plt.close(fig)
    return out
