"""Figures of the sweep report: metric vs label fraction (log x, CI bands) and confusion matrices."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pretrain.plots import plt, save_figure

from .metrics import mean_ci


def plot_metric_vs_fraction(summary, path: str | os.PathLike,
                            metrics: Sequence[tuple[str, str]] = (("accuracy", "test accuracy"),
                                                                  ("macro_f1", "test macro-F1"))) -> str:
    """One panel per metric: mean over seeds per arm against fraction (log x), 95% CI as a band."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, (m, title) in zip(axes[0], metrics, strict=True):
        for lab in summary.labels:
            xs, mean, lo, hi = [], [], [], []
            for f in summary.fractions:
                runs = summary.cells.get((f, lab), {})
                if not runs:
                    continue
                mu, hw = mean_ci([r[m] for r in runs.values()])
                hw = 0.0 if math.isnan(hw) else hw
                xs.append(f * 100)
                mean.append(mu)
                lo.append(max(0.0, mu - hw))  # metrics live in [0, 1]; a t-interval may not
                hi.append(min(1.0, mu + hw))
            if xs:
                (line,) = ax.plot(xs, mean, marker="o", ms=4, label=lab)
                ax.fill_between(xs, lo, hi, alpha=0.15, color=line.get_color())
        ax.set_xscale("log")
        ax.set_xlabel("label fraction of train (%)")
        ax.set_ylabel(f"{title} (band: 95% CI over seeds, clipped to [0, 1])")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return str(path)


def plot_confusion(matrices: Sequence[Sequence[Sequence[int]]], classes: Sequence[str],
                   path: str | os.PathLike, title: str = "") -> str:
    """Confusion counts summed over runs, shaded by row-normalised rate (true class = row)."""
    cm = np.sum(np.asarray(matrices, dtype=np.int64), axis=0)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    k = len(classes)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if rates[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), [c[:4] for c in classes])
    ax.set_yticks(range(k), [c[:4] for c in classes])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize=9)
    save_figure(fig, path)
    return str(Path(path))
