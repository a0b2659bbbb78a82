"""Camelyon16-like demo slides: H&E tissue blobs on white glass, 1-3 tumor regions per slide.

Normal tissue: pink stroma with sparse small dark round nuclei (lymphocyte-like).
Tumor tissue (inside irregular polygons, which are also the ASAP annotations): crowded, larger,
darker, pleomorphic nuclei on a more purple background, so tumor and normal differ clearly at
patch level. Every slide has both tumor and normal tissue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .formats import write_asap_xml, write_pyramidal_tiff
from .stain import blob_sprites, he_to_rgb, jittered_points, resize_field, smooth_noise, stamp


@dataclass
class SlideTruth:
    """What was generated for one slide (level-0 px; polygons as (K, 2) x, y)."""

    width: int
    height: int
    polygons: list[np.ndarray] = field(default_factory=list)
    tissue_fraction: float = 0.0
    tumor_fraction: float = 0.0  # of the tissue area


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float, k: int = 28) -> np.ndarray:
    """Irregular star-shaped polygon around (cx, cy) with mean radius r: (k, 2) float64 x, y."""
    # angles stay increasing and radii positive, so the polygon is simple (never self-intersecting)
    th = (np.arange(k) + rng.uniform(-0.4, 0.4, k)) * (2 * np.pi / k)
    harm = sum(rng.uniform(0, 0.25 / j) * np.cos(j * th + rng.uniform(0, 2 * np.pi)) for j in range(2, 6))
    rr = r * (1 + harm + rng.uniform(-0.05, 0.05, k))
    xy = np.stack([cx + rr * np.cos(th), cy + rr * np.sin(th)], 1)
    return np.round(xy, 2)


def _tissue_field(rng: np.random.Generator, h: int, w: int, frac: float, cell: int = 16) -> np.ndarray:
    """Low-res (h//cell, w//cell) float32 field, > 0 on tissue, covering about `frac` of the area."""
    lh, lw = max(8, h // cell), max(8, w // cell)
    n = smooth_noise(rng, (lh, lw), scale=min(lh, lw) / 3) + 0.6 * smooth_noise(rng, (lh, lw), scale=min(lh, lw) / 8)
    # a gentle centre bias so tissue sits on the glass, not on its edges
    yy, xx = np.mgrid[0:lh, 0:lw]
    n -= 1.2 * (((yy / lh - 0.5) * 2) ** 2 + ((xx / lw - 0.5) * 2) ** 2)
    return (n - np.quantile(n, 1 - frac)).astype(np.float32)


def render_slide(rng: np.random.Generator, width: int = 4096, height: int = 3072,
                 n_tumors: int | None = None) -> tuple[np.ndarray, SlideTruth]:
    """Draw one slide at level 0.

    Returns:
        (height, width, 3) uint8 RGB, and the truth (tumor polygons in level-0 px, fractions).
    """
    h, w = height, width
    cell = 16
    low = _tissue_field(rng, h, w, frac=rng.uniform(0.32, 0.45), cell=cell)
    lh, lw = low.shape
    # tumor polygons: centred deep inside tissue, not overlapping, together < ~half the tissue
    n_tumors = int(rng.integers(1, 4)) if n_tumors is None else n_tumors
    inside = ndimage.distance_transform_edt(low > 0) * (h / lh)  # level-0 px to the tissue edge
    polys: list[np.ndarray] = []
    placed: list[tuple[float, float, float]] = []
    tissue_area = float((low > 0).sum()) * (h / lh) * (w / lw)
    budget = 0.45 * tissue_area
    for _ in range(200):
        if len(polys) == n_tumors:
            break
        r = rng.uniform(0.09, 0.16) * min(h, w)
        cand = np.argwhere(inside > 0.7 * r)
        if len(cand) == 0 or np.pi * r * r > budget:
            continue
        cy, cx = (cand[rng.integers(len(cand))] + rng.uniform(0, 1, 2)) * np.array([h / lh, w / lw])
        if any(np.hypot(cx - px, cy - py) < 1.3 * (r + pr) for px, py, pr in placed):
            continue
        polys.append(_polygon(rng, cx, cy, r))
        placed.append((cx, cy, r))
        budget -= np.pi * r * r
    if not polys:  # tissue too thin for the drawn radius: fall back to one small region at the deepest point
        iy, ix = np.unravel_index(np.argmax(inside), inside.shape)
        r = max(float(inside.max()), 0.04 * min(h, w))
        polys.append(_polygon(rng, (ix + 0.5) * w / lw, (iy + 0.5) * h / lh, r))

    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for p in polys:
        draw.polygon([tuple(v) for v in p], fill=1)
    tumor = np.asarray(canvas, dtype=bool)
    # soft 0..1 tissue with edges ~10 px wide; tumor regions are always tissue
    tissue = resize_field(low, (h, w))
    tissue *= np.float32(80.0 * cell / 16)
    tissue += np.float32(0.5)
    np.clip(tissue, 0, 1, out=tissue)
    np.maximum(tissue, tumor, out=tissue)
    solid = tissue > 0.5

    # nuclei: normal = sparse small round dark; tumor = crowded, larger, darker, pleomorphic
    pts_n = jittered_points(rng, (h, w), spacing=26.0)
    pts_t = jittered_points(rng, (h, w), spacing=19.0)
    yi_n, xi_n = np.clip(pts_n[:, 0].astype(int), 0, h - 1), np.clip(pts_n[:, 1].astype(int), 0, w - 1)
    yi_t, xi_t = np.clip(pts_t[:, 0].astype(int), 0, h - 1), np.clip(pts_t[:, 1].astype(int), 0, w - 1)
    keep_n = solid[yi_n, xi_n] & ~tumor[yi_n, xi_n] & (rng.random(len(pts_n)) < 0.75)
    keep_t = tumor[yi_t, xi_t]
    spr_n = blob_sprites(rng, 16, radius=4.5, size_sd=0.12, elong=0.2, wobble=0.05, texture=0.2)
    spr_t = blob_sprites(rng, 24, radius=7.5, size_sd=0.25, elong=0.4, wobble=0.08, texture=0.5)
    nuc = stamp((h, w), pts_n[keep_n], spr_n, rng.integers(0, 16, keep_n.sum()),
                rng.uniform(1.3, 1.7, keep_n.sum()).astype(np.float32))
    nuc += stamp((h, w), pts_t[keep_t], spr_t, rng.integers(0, 24, keep_t.sum()),
                 rng.uniform(1.4, 1.9, keep_t.sum()).astype(np.float32))
    np.minimum(nuc, 2.3, out=nuc)

    # stain concentrations: stroma eosin texture; tumor background more purple, less pink
    tex = resize_field(smooth_noise(rng, (h // 4, w // 4), scale=12)
                       + 0.7 * smooth_noise(rng, (h // 4, w // 4), scale=3), (h, w))
    tum_soft = tumor.astype(np.float32)
    e = tissue * (0.55 + 0.08 * tex - 0.15 * tum_soft)
    hh = nuc + tissue * (0.07 + 0.02 * tex + 0.25 * tum_soft)
    rgb = he_to_rgb(hh, e, white=rng.uniform(238, 248), noise=0.02, rng=rng)
    truth = SlideTruth(width=w, height=h, polygons=polys, tissue_fraction=float(solid.mean()),
                       tumor_fraction=float(tumor.sum() / max(1, solid.sum())))
    return rgb, truth


def write_slide(out: Path, name: str, rng: np.random.Generator, width: int, height: int, levels: int = 3,
                tile: int = 256, mpp: float = 0.5) -> dict:
    """Draw one slide; write `out/slides/<name>.tif` and `out/annotations/<name>.xml`.

    Returns its manifest row (paths relative to `out`, sizes, fractions, tumor polygons in level-0 px).
    """
    rgb, truth = render_slide(rng, width, height)
    write_pyramidal_tiff(out / "slides" / f"{name}.tif", rgb, levels=levels, tile=tile, mpp=mpp)
    write_asap_xml(out / "annotations" / f"{name}.xml", truth.polygons)
    return {"name": name, "slide": f"slides/{name}.tif", "annotation": f"annotations/{name}.xml",
            "width": truth.width, "height": truth.height, "levels": levels, "tile": tile, "mpp": mpp,
            "tissue_fraction": round(truth.tissue_fraction, 4),
            "tumor_fraction_of_tissue": round(truth.tumor_fraction, 4),
            "tumor_polygons": [p.tolist() for p in truth.polygons]}
