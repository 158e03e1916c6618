"""Figures (matplotlib, PNG): the paper's Figure 2-5 and the training panel."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def slice_panel(ct: np.ndarray, spect: np.ndarray, pred: np.ndarray, *, title: str | None = None):
    """CT, SPECT and prediction of one lung ROI (D, H, W = S-I, A-P, L-R): the coronal slice
    through the middle of the A-P axis, superior up."""
    j = ct.shape[1] // 2
    fig, axes = plt.subplots(1, 3, figsize=(7.5, 4.2))
    for ax, img, name, cmap, vr in (
        (axes[0], ct, "CT (enhanced)", "gray", (0, 1)),
        (axes[1], spect, "SPECT", "inferno", (0, 1)),
        (axes[2], pred, "prediction", "inferno", (0, 1)),
    ):
        ax.imshow(img[::-1, j, :], cmap=cmap, vmin=vr[0], vmax=vr[1], aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
