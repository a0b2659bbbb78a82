"""Exploratory-analysis report of a WBC set: one markdown page `eda.md` with PNGs and `eda.json`.

Class balance, a seeded montage and the mean image per class, per-channel intensity histograms, the
sizes of the original files, exact duplicates, and 2-D PCA / t-SNE maps of raw pixels and of each
frozen source's features (on a seeded, class-stratified subsample of at most `max_points` images).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from fusion.data import WBCData, find_duplicates, load_wbc
from pretrain.plots import plt, save_figure

MONTAGE_PER_CLASS = 8
TSNE_PCA_DIMS = 50  # t-SNE runs on the first 50 principal components (standard practice, far faster)
MIN_TSNE_POINTS = 4


@dataclass
class EDAConfig:
    data: str
    out: str = "runs/eda"
    image_size: int = 64
    sources: dict = field(default_factory=dict)  # name -> source spec (see fusion.sources.SourceSpec.parse)
    prcc_checkpoint: str = ""
    cam16_checkpoint: str = ""
    classes: list | dict | str = field(default_factory=list)
    preprocess: list[str] = field(default_factory=list)  # e.g. [cell_crop]: the page shows the crops it made
    max_points: int = 2000
    perplexity: float = 30.0
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_points, bool) or int(self.max_points) < 2:
            raise ValueError(f"max_points must be an integer >= 2, got {self.max_points!r}")
        if float(self.perplexity) <= 0:
            raise ValueError(f"perplexity must be > 0, got {self.perplexity!r}")


# ---- pure helpers (arrays in, arrays out) ----

def montage_rows(labels: np.ndarray, n_classes: int, k: int = MONTAGE_PER_CLASS, seed: int = 0) -> list[np.ndarray]:
    """Per class, `k` rows drawn without replacement (all of them, sorted, when a class has fewer)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(n_classes):
        rows = np.flatnonzero(labels == c)
        out.append(np.sort(rng.choice(rows, size=min(k, len(rows)), replace=False)))
    return out


def stratified_subsample(labels: np.ndarray, max_points: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of a seeded subsample of at most `max_points`, each class in proportion (>= 1 each)."""
    n = len(labels)
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    take = np.maximum(1, np.floor(counts * max_points / n).astype(int))
    rows = [rng.choice(np.flatnonzero(labels == c), size=min(t, cnt), replace=False)
            for c, t, cnt in zip(classes, take, counts, strict=True)]
    return np.sort(np.concatenate(rows))


def tsne_perplexity(perplexity: float, n: int) -> float:
    """`perplexity`, or a smaller one (with a warning) when it is not below the number of samples `n`."""
    if perplexity < n:
        return float(perplexity)
    new = float(min(max(5, (n - 1) // 3), n - 1))
    warnings.warn(f"t-SNE perplexity {perplexity:g} needs more than {n} samples; using perplexity {new:g} "
                  f"for these {n} points", stacklevel=2)
    return new


def embed_2d(x: np.ndarray, perplexity: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(N, D) -> (PCA (N, 2), t-SNE (N, 2) or None when N < 4, info with explained variance / perplexity)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = np.asarray(x, dtype=np.float32)
    x = x - x.mean(axis=0, keepdims=True)
    n_comp = min(TSNE_PCA_DIMS, x.shape[0], x.shape[1])
    pca = PCA(n_components=n_comp, random_state=seed).fit(x)
    z = pca.transform(x)
    info = {"pca_explained": [float(v) for v in pca.explained_variance_ratio_[:2]], "n": int(len(x))}
    if len(x) < MIN_TSNE_POINTS:
        warnings.warn(f"only {len(x)} points: no t-SNE map", stacklevel=2)
        return z[:, :2], None, info
    p = tsne_perplexity(perplexity, len(x))
    info["perplexity"] = p
    t = TSNE(n_components=2, perplexity=p, init="pca", random_state=seed).fit_transform(z)
    return z[:, :2], t, info


def original_sizes(data: WBCData) -> np.ndarray | None:
    """(N, 2) width, height of the original files (header read only); None for `.npz` sets."""
    root = Path(data.root)
    if not root.is_dir():
        return None
    sizes = []
    for i in data.ids:
        with Image.open(root / i) as im:
            sizes.append(im.size)
    return np.asarray(sizes, dtype=np.int64)


# ---- figures ----

def _colours(n: int) -> list:
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_counts(counts: dict[str, int], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.1 * len(counts) + 2, 3.2))
    bars = ax.bar(list(counts), list(counts.values()), color=_colours(len(counts)))
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("images")
    ax.tick_params(axis="x", rotation=30)
    save_figure(fig, path)


def plot_montage(images: np.ndarray, rows: np.ndarray, name: str, path: Path) -> None:
    fig, axes = plt.subplots(1, MONTAGE_PER_CLASS, figsize=(1.3 * MONTAGE_PER_CLASS, 1.6), squeeze=False)
    for j, ax in enumerate(axes[0]):
        if j < len(rows):
            ax.imshow(images[rows[j]])
        ax.axis("off")
    fig.suptitle(name)
    save_figure(fig, path)


def plot_means(means: np.ndarray, classes: tuple[str, ...], path: Path) -> None:
    fig, axes = plt.subplots(1, len(classes), figsize=(1.8 * len(classes), 2.1), squeeze=False)
    for ax, m, c in zip(axes[0], means, classes, strict=True):
        ax.imshow(m.clip(0, 255).astype(np.uint8))
        ax.set_title(c, fontsize=9)
        ax.axis("off")
    save_figure(fig, path)


def plot_histograms(hists: np.ndarray, classes: tuple[str, ...], path: Path) -> None:
    """hists: (C, 3, 256) per-class, per-channel intensity densities."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), sharey=True)
    for k, (ax, ch) in enumerate(zip(axes, ("R", "G", "B"), strict=True)):
        for c, col in zip(range(len(classes)), _colours(len(classes)), strict=True):
            ax.plot(np.arange(256), hists[c, k], color=col, lw=1, label=classes[c])
        ax.set_title(f"channel {ch}")
        ax.set_xlabel("intensity")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of pixels")
    axes[-1].legend(fontsize=7)
    save_figure(fig, path)


def plot_embedding(z: np.ndarray, labels: np.ndarray, classes: tuple[str, ...], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for c, col in zip(range(len(classes)), _colours(len(classes)), strict=True):
        m = labels == c
        ax.scatter(z[m, 0], z[m, 1], s=5, alpha=0.6, color=col, label=f"{classes[c]} ({int(m.sum())})")
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2.5, loc="best")
    save_figure(fig, path)


# ---- the report ----

def _size_table(sizes: np.ndarray, data: WBCData) -> tuple[list[str], dict]:
    lines = ["| class | n | width min / median / max | height min / median / max |", "|---|---|---|---|"]
    stats = {}
    for c, name in enumerate((*data.classes, "all")):
        s = sizes if name == "all" else sizes[data.labels == c]
        if not len(s):
            continue
        w, h = (np.percentile(s[:, k], [0, 50, 100]).astype(int).tolist() for k in (0, 1))
        stats[name] = {"n": int(len(s)), "width": w, "height": h}
        lines.append(f"| {name} | {len(s)} | {' / '.join(map(str, w))} | {' / '.join(map(str, h))} |")
    return lines, stats


def _source_features(cfg: EDAConfig, images: np.ndarray) -> dict[str, np.ndarray]:
    from fusion.encoders import compute_features, images_to_tensor
    from fusion.sources import build_registry, load_source
    from pretrain.utils import get_device

    reg = build_registry(cfg.sources, None, {"prcc_checkpoint": cfg.prcc_checkpoint,
                                             "cam16_checkpoint": cfg.cam16_checkpoint})
    if not reg.sources:
        return {}
    device = get_device(cfg.device)
    x = images_to_tensor(images)
    out = {}
    for name, spec in reg.sources.items():
        enc = load_source(spec)
        out[name] = compute_features({name: enc}, x, device, batch_size=128)[name].numpy()
    return out


def run_eda(cfg: EDAConfig) -> Path:
    """Write `eda.md`, `eda.json` and the PNGs into `cfg.out`; returns the path of `eda.md`."""
    t0 = time.time()
    data = load_wbc(cfg.data, cfg.image_size, cache_dir=None, progress=cfg.progress, classes=cfg.classes,
                    preprocess=cfg.preprocess)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    classes, n_cls = tuple(data.classes), len(data.classes)
    counts = data.class_counts()
    groups = find_duplicates(data.hashes)
    summary: dict = {"config": asdict(cfg), "root": data.root, "n_images": len(data), "classes": list(classes),
                     "counts": counts, "image_size": data.image_size,
                     "duplicate_groups": len(groups), "duplicate_files": sum(map(len, groups))}
    md = ["# Exploratory analysis", "",
          f"**{len(data)} images** in {n_cls} classes ({', '.join(classes)}) from `{data.root}`, "
          f"resized to {data.image_size}x{data.image_size} px. "
          f"Exact duplicates: {len(groups)} groups ({summary['duplicate_files']} files).", ""]
    left_out = {k: v for k, v in data.dropped.items() if k != "fallback"}  # fallbacks are kept
    if left_out:
        md += ["Left out while loading: " + ", ".join(f"{k}: {len(v)}" for k, v in left_out.items()), ""]

    def figure(name: str, caption: str) -> None:
        md.extend([f"![{caption}]({name})", "", f"*{caption}*", ""])

    # class balance
    md += ["## Class counts", "", "| class | images | share |", "|---|---|---|"]
    md += [f"| {c} | {k} | {k / max(1, len(data)):.1%} |" for c, k in counts.items()]
    md.append("")
    plot_counts(counts, out / "class_counts.png")
    figure("class_counts.png", f"Images per class (largest / smallest = "
                               f"{max(counts.values()) / max(1, min(counts.values())):.1f}).")

    # montages and mean images
    md += ["## Examples", ""]
    picks = montage_rows(data.labels, n_cls, MONTAGE_PER_CLASS, cfg.seed)
    summary["montage_ids"] = {c: [data.ids[i] for i in rows] for c, rows in zip(classes, picks, strict=True)}
    for c, (name, rows) in enumerate(zip(classes, picks, strict=True)):
        png = f"montage_{c}_{_slug(name)}.png"
        plot_montage(data.images, rows, name, out / png)
        figure(png, f"{len(rows)} random {name} images (seed {cfg.seed}).")
    means = np.stack([data.images[data.labels == c].mean(axis=0) if counts[name] else
                      np.zeros(data.images.shape[1:]) for c, name in enumerate(classes)])
    plot_means(means, classes, out / "mean_images.png")
    figure("mean_images.png", "Mean image per class.")

    if cfg.preprocess:
        md += _preprocess_section(cfg, data, picks, out, figure)

    # colour
    md += ["## Colour", ""]
    hists = np.zeros((n_cls, 3, 256))
    for c in range(n_cls):
        px = data.images[data.labels == c].reshape(-1, 3)
        for k in range(3):
            hists[c, k] = np.bincount(px[:, k], minlength=256) / max(1, len(px))
    md += ["| class | mean R | mean G | mean B |", "|---|---|---|---|"]
    md += [f"| {c} | " + " | ".join(f"{(hists[i, k] * np.arange(256)).sum():.1f}" for k in range(3)) + " |"
           for i, c in enumerate(classes)]
    md.append("")
    plot_histograms(hists, classes, out / "channel_histograms.png")
    figure("channel_histograms.png", "Per-channel pixel-intensity distribution per class (resized images).")

    # original sizes
    md += ["## Original image sizes", ""]
    sizes = original_sizes(data)
    if sizes is None:
        md += [f"`{data.root}` is not a folder of files (all images share the stored size).", ""]
    else:
        lines, summary["sizes"] = _size_table(sizes, data)
        md += ["Width and height in pixels of the files on disk, before resizing.", "", *lines, ""]

    # duplicates
    md += ["## Duplicates", ""]
    if groups:
        mixed = sum(len({int(data.labels[i]) for i in g}) > 1 for g in groups)
        md += [f"{len(groups)} groups of byte-identical files ({summary['duplicate_files']} files; "
               f"{mixed} groups with conflicting labels). The first ones:", ""]
        md += ["- " + ", ".join(f"`{data.ids[i]}`" for i in g) for g in groups[:5]]
        summary["duplicate_examples"] = [[data.ids[i] for i in g] for g in groups[:20]]
    else:
        md += ["No exact duplicates."]
    md.append("")

    # 2-D maps
    rows = stratified_subsample(data.labels, int(cfg.max_points), cfg.seed)
    sub_labels = data.labels[rows]
    md += ["## 2-D maps", "", f"{len(rows)} images (class-stratified, seed {cfg.seed}); t-SNE on the first "
           f"{TSNE_PCA_DIMS} principal components.", ""]
    spaces = {"pixels": data.images[rows].reshape(len(rows), -1).astype(np.float32) / 255}
    spaces.update(_source_features(cfg, data.images[rows]))
    summary["maps"] = {}
    for space, x in spaces.items():
        pca, tsne, info = embed_2d(x, float(cfg.perplexity), cfg.seed)
        info["dim"] = int(x.shape[1])
        summary["maps"][space] = info
        what = "raw pixels" if space == "pixels" else f"frozen `{space}` features ({x.shape[1]}-d)"
        ev = info["pca_explained"]
        plot_embedding(pca, sub_labels, classes, f"PCA, {space} ({sum(ev):.1%} var.)", out / f"pca_{space}.png")
        figure(f"pca_{space}.png", f"PCA of {what}: PC1 {ev[0]:.1%}, PC2 {ev[1] if len(ev) > 1 else 0:.1%} "
                                   f"of the variance.")
        if tsne is not None:
            plot_embedding(tsne, sub_labels, classes, f"t-SNE, {space} (perplexity {info['perplexity']:g})",
                           out / f"tsne_{space}.png")
            figure(f"tsne_{space}.png", f"t-SNE of {what}, perplexity {info['perplexity']:g}.")

    summary["seconds"] = round(time.time() - t0, 1)
    md += ["---", f"Written in {summary['seconds']} s.", ""]
    (out / "eda.json").write_text(json.dumps(summary, indent=1, default=str))
    page = out / "eda.md"
    page.write_text("\n".join(md))
    return page


def _preprocess_section(cfg: EDAConfig, data: WBCData, picks: list[np.ndarray], out: Path, figure) -> list[str]:
    """The montage images before preprocessing beside what the steps made of them (e.g. cell_crop's crops),
    and the images a step fell back on."""
    from .data import load_wbc

    plain = load_wbc(cfg.data, cfg.image_size, cache_dir=None, progress=False, classes=cfg.classes)
    where = {i: k for k, i in enumerate(plain.ids)}
    md = [f"## Preprocessing: {', '.join(cfg.preprocess)}", "",
          "Each pair: the image as decoded (centre square), then after the steps, as the model sees it.", ""]
    rows = np.concatenate(picks)
    pairs = np.stack([x for i in rows for x in (plain.images[where[data.ids[i]]], data.images[i])])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 2 * MONTAGE_PER_CLASS
    n_rows = int(np.ceil(len(pairs) / cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(cols * 1.0, n_rows * 1.05), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, im in zip(axes.flat, pairs, strict=False):
        ax.imshow(im)
    fig.tight_layout(pad=0.1)
    fig.savefig(out / "preprocess_pairs.png", dpi=100)
    plt.close(fig)
    figure("preprocess_pairs.png", f"Montage images before / after {', '.join(cfg.preprocess)} (one row per class).")
    fallback = data.dropped.get("fallback") or {}
    md += [f"Fallbacks: {len(fallback)} of {len(data)} images"
           + (": " + ", ".join(f"`{k}` ({v})" for k, v in list(fallback.items())[:10]) if fallback else "") + ".", ""]
    return md


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)
