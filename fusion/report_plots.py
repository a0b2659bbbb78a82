"""Figures of the sweep report: metric vs label fraction (log x, CI bands), confusion matrices, and a forest
plot of the paired differences."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
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


def forest_plot(paired_rows: Iterable[Mapping], path: str | os.PathLike, metric: str = "macro_f1",
                title: str = "test macro-F1") -> str:
    """Paired differences with their 95% CIs: one panel per label fraction, one row per comparison.

    `paired_rows`: the rows of a sweep's `paired.csv` (as `csv.DictReader` gives them, numbers as strings)
    or `Summary.paired`; each needs `fraction`, `arm`, `versus`, `{metric}_diff`, `{metric}_lo` and
    `{metric}_hi` (metric units, e.g. macro-F1 points in [-1, 1]). Rows keep their order top to bottom;
    colour is the reference arm (`versus`), a filled marker means the CI excludes 0, and a comparison
    without a CI (fewer than 3 pairs) is drawn as a point only.
    """
    rows = [dict(r) for r in paired_rows]
    if not rows:
        raise ValueError(f"forest_plot: no paired rows to draw for {path}")

    def num(r: Mapping, key: str) -> float:
        v = r.get(key, "")
        return math.nan if v in ("", None) else float(v)

    fractions = sorted({float(r["fraction"]) for r in rows})
    keys = list(dict.fromkeys((r["arm"], r["versus"]) for r in rows))  # y order: first appearance
    references = list(dict.fromkeys(r["versus"].split(" (")[0] for r in rows))
    colours = {ref: f"C{i}" for i, ref in enumerate(references)}
    fig, axes = plt.subplots(1, len(fractions), figsize=(1.9 + 2.9 * len(fractions), 0.8 + 0.3 * len(keys)),
                             sharex=True, sharey=True, squeeze=False)
    for ax, f in zip(axes[0], fractions, strict=True):
        ax.axvline(0.0, color="0.3", lw=0.9)
        for r in (r for r in rows if float(r["fraction"]) == f):
            y = keys.index((r["arm"], r["versus"]))
            d, lo, hi = num(r, f"{metric}_diff"), num(r, f"{metric}_lo"), num(r, f"{metric}_hi")
            c = colours[r["versus"].split(" (")[0]]
            excludes = lo > 0 or hi < 0  # False when the CI is NaN
            if not (math.isnan(lo) or math.isnan(hi)):
                ax.plot([lo, hi], [y, y], color=c, lw=1.6, solid_capstyle="butt")
            ax.plot([d], [y], "o", ms=5, color=c, markerfacecolor=c if excludes else "white", markeredgewidth=1.3)
        ax.set_title(f"{f * 100:g}% of the labels", fontsize=10)
        ax.set_xlabel(f"Δ {title}")
        ax.grid(axis="x", alpha=0.3)
    ax0 = axes[0][0]
    ax0.set_yticks(range(len(keys)), [f"{arm} − {versus}" for arm, versus in keys], fontsize=8)
    ax0.set_ylim(len(keys) - 0.5, -0.5)  # first row on top
    handles = [plt.Line2D([], [], color=colours[ref], marker="o", lw=1.6, label=f"versus {ref}")
               for ref in references]
    handles.append(plt.Line2D([], [], color="0.3", marker="o", lw=0, markerfacecolor="0.3",
                              label="filled: 95% CI excludes 0"))
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1.0))
    n = sorted({int(float(r["n_pairs"])) for r in rows if r.get("n_pairs") not in (None, "")})
    pairs = f" over {'/'.join(map(str, n))} seeds" if n else ""
    fig.suptitle(f"Paired difference in {title} (same seed): mean and 95% CI{pairs}", y=1.05, fontsize=10)
    save_figure(fig, path)
    return str(Path(path))
