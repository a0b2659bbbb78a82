"""Plots written by every stage (matplotlib, headless)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .utils import atomic_path  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=str(path).rsplit(".", 1)[-1])
    plt.close(fig)


def plot_curves(history: Sequence[dict], path: str | os.PathLike, metrics: Sequence[str] = ("loss",),
                title: str = "", logy: bool = False) -> None:
    """One panel per metric with train_<m> and val_<m> against epoch (from `fit` log rows)."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.5), squeeze=False)
    epochs = [r["epoch"] for r in history]
    for ax, m in zip(axes[0], metrics, strict=True):
        for split in ("train", "val"):
            key = f"{split}_{m}"
            ys = [r.get(key, np.nan) for r in history]
            if not all(np.isnan(y) for y in ys):
                ax.plot(epochs, ys, marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(m)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def image_grid(rows: Sequence[np.ndarray], path: str | os.PathLike, row_titles: Sequence[str] = (),
               title: str = "") -> None:
    """Rows of images (each an array (N, H, W, 3) uint8 or float in [0,1]) as one PNG grid."""
    n_rows = len(rows)
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.7 * n_rows), squeeze=False)
    for i, r in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.axis("off")
            if j < len(r):
                ax.imshow(np.clip(r[j], 0, 1) if r[j].dtype != np.uint8 else r[j])
        if i < len(row_titles):
            axes[i][0].set_title(row_titles[i], loc="left", fontsize=9)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)
