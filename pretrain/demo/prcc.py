"""PRCC-like region images: H&E papillary structures.

Each papilla is a branching fibrovascular core (pink stroma with a few elongated fibroblast nuclei)
lined by a band of epithelial cells with crowded ovoid purple nuclei, floating in pale lumen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..utils import atomic_path
from .stain import blob_sprites, he_to_rgb, jittered_points, smooth_noise, stamp


def _branch(rng: np.random.Generator, size: int, step: float = 22.0) -> list[list[tuple[float, float]]]:
    """One random branching tree of polylines (a papilla's axis), as lists of (x, y) points in px."""
    lines = []
    x0, y0 = rng.uniform(0.15, 0.85, 2) * size
    stack = [(x0, y0, rng.uniform(0, 2 * np.pi), 0)]
    while stack:
        x, y, a, depth = stack.pop()
        pts = [(x, y)]
        for _ in range(int(rng.integers(4, 9))):
            a += rng.normal(0, 0.3)
            x, y = x + step * np.cos(a), y + step * np.sin(a)
            pts.append((x, y))
        lines.append(pts)
        if depth < 2:
            for side in (-1, 1):
                if rng.random() < 0.7:
                    stack.append((x, y, a + side * rng.uniform(0.5, 1.0), depth + 1))
    return lines


def render_region(rng: np.random.Generator, size: int = 384) -> np.ndarray:
    """Draw one (size, size, 3) uint8 H&E region with papillary structures."""
    canvas = Image.new("L", (size, size), 0)
    reach = Image.new("L", (size, size), 0)  # papilla incl. its epithelium, to measure coverage
    draw, draw_reach = ImageDraw.Draw(canvas), ImageDraw.Draw(reach)
    epi_w = rng.uniform(9, 13)
    target = rng.uniform(0.4, 0.65)
    for _ in range(40):
        for pts in _branch(rng, size):
            width = int(rng.uniform(10, 22))
            draw.line(pts, fill=1, width=width, joint="curve")
            draw_reach.line(pts, fill=1, width=int(width + 2 * epi_w), joint="curve")
        if np.asarray(reach).mean() >= target:
            break
    axis = np.asarray(canvas, dtype=bool)
    dist = ndimage.distance_transform_edt(~axis).astype(np.float32)  # px to the nearest core
    wobble = 3.0 * smooth_noise(rng, (size, size), scale=12)
    core = (dist + wobble) <= 0
    epi = ~core & ((dist + wobble) <= epi_w)
    # epithelial nuclei: crowded ovoids along the band; fibroblasts: sparse, elongated, in the cores
    pts = jittered_points(rng, (size, size), spacing=6.5, jitter=0.35)
    yi, xi = np.clip(pts[:, 0].astype(int), 0, size - 1), np.clip(pts[:, 1].astype(int), 0, size - 1)
    band = epi[yi, xi] & (dist[yi, xi] > epi_w * 0.25) & (rng.random(len(pts)) < 0.8)
    fpts = jittered_points(rng, (size, size), spacing=16.0)
    fyi, fxi = np.clip(fpts[:, 0].astype(int), 0, size - 1), np.clip(fpts[:, 1].astype(int), 0, size - 1)
    fib = core[fyi, fxi] & (rng.random(len(fpts)) < 0.5)
    spr_e = blob_sprites(rng, 16, radius=3.6, size_sd=0.15, elong=0.4, wobble=0.06, texture=0.35)
    spr_f = blob_sprites(rng, 8, radius=2.2, size_sd=0.1, elong=1.2, wobble=0.02)
    nuc = stamp((size, size), pts[band], spr_e, rng.integers(0, 16, band.sum()),
                rng.uniform(1.1, 1.5, band.sum()).astype(np.float32))
    nuc += stamp((size, size), fpts[fib], spr_f, rng.integers(0, 8, fib.sum()),
                 rng.uniform(1.0, 1.3, fib.sum()).astype(np.float32))
    tex = smooth_noise(rng, (size, size), scale=6)
    coref = ndimage.gaussian_filter(core.astype(np.float32), 1.5)
    epif = ndimage.gaussian_filter(epi.astype(np.float32), 1.0)
    fluid = 0.06 + 0.05 * np.clip(smooth_noise(rng, (size, size), scale=40), 0, None)
    e = fluid + coref * (0.55 + 0.1 * tex) + epif * (0.4 + 0.06 * tex)
    h = np.minimum(nuc, 2.0) + 0.02 + epif * 0.12 + coref * 0.04
    return he_to_rgb(h, e, white=rng.uniform(236, 248), noise=0.02, rng=rng)


def write_prcc_regions(out: Path, seed_key: tuple[int, ...], indices: list[int], size: int = 384) -> int:
    """Write `out/region_<i>.png` for i in `indices`, region i drawn from `default_rng([*seed_key, i])`."""
    for i in indices:
        rgb = render_region(np.random.default_rng([*seed_key, i]), size)
        with atomic_path(out / f"region_{i}.png") as tmp:
            Image.fromarray(rgb).save(tmp, format="PNG")
    return len(indices)
