"""Restoration pictures: original / corrupted / restored middle slices, the picture of learning."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["restoration_figure"]


def restoration_figure(corrupted: torch.Tensor, target: torch.Tensor, restored: torch.Tensor, title: str,
                       n: int = 4):
    """A matplotlib figure: one column per pair, rows target / corrupted / restored (middle axial slice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(n, len(target))
    fig, axes = plt.subplots(3, n, figsize=(2.2 * n, 6.8), facecolor="black", squeeze=False)
    d = target.shape[2] // 2
    for j in range(n):
        for i, (name, t) in enumerate((("original", target), ("corrupted", corrupted), ("restored", restored))):
            ax = axes[i, j]
            ax.imshow(np.asarray(t[j, 0, d], dtype=np.float32), cmap="gray", vmin=0, vmax=1)
            ax.set_title(name, color="white", fontsize=8)
            ax.axis("off")
    fig.suptitle(title, color="white", fontsize=9)
    fig.tight_layout()
    return fig
