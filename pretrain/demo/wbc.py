"""Synthetic blood-smear crops: one white blood cell centred on a field of red cells (May-Grünwald-Giemsa look).

Each class has its own morphology, drawn in a randomly rotated, scaled and colour-jittered frame:

- neutrophil: pale lilac cytoplasm with fine granules, nucleus of 3-5 lobes joined by thin strands;
- eosinophil: cytoplasm packed with orange-red granules, bilobed ("spectacle") nucleus;
- basophil: dark purple-black coarse granules over the whole cell, nucleus mostly hidden;
- lymphocyte: small cell, round dense nucleus filling it, thin rim of sky-blue cytoplasm;
- monocyte: large cell, grey-blue cytoplasm with vacuoles, lighter kidney-shaped nucleus.

All lengths below are in units of the image half-width, so `size` only changes the resolution.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..utils import atomic_path

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
#: Images per class; the imbalance follows real sets (neutrophils most, basophils fewest).
DEFAULT_COUNTS = {"neutrophil": 260, "eosinophil": 240, "monocyte": 110, "lymphocyte": 100, "basophil": 90}
SMALL_COUNTS = {"neutrophil": 20, "eosinophil": 18, "monocyte": 10, "lymphocyte": 10, "basophil": 8}

# mean cell radius (half-widths) and RGB colours (0..255) per class
CELL_RADIUS = {"neutrophil": 0.40, "eosinophil": 0.42, "basophil": 0.36, "lymphocyte": 0.27, "monocyte": 0.52}
CYTOPLASM = {"neutrophil": (222, 196, 214), "eosinophil": (236, 186, 160), "basophil": (172, 136, 196),
             "lymphocyte": (168, 192, 232), "monocyte": (190, 188, 214)}
NUCLEUS = {"neutrophil": (96, 50, 140), "eosinophil": (104, 58, 140), "basophil": (80, 40, 120),
           "lymphocyte": (72, 38, 120), "monocyte": (138, 100, 172)}
GRANULE = {"neutrophil": (200, 160, 196), "eosinophil": (226, 110, 64), "basophil": (48, 20, 78)}
PLASMA = (236, 228, 222)
RBC = (222, 146, 142)


def _soft(d: np.ndarray, px: float) -> np.ndarray:
    """Signed distance (negative inside) -> anti-aliased coverage in [0, 1] with a 1.5 px edge."""
    return np.clip(0.5 - d / (1.5 * px), 0, 1)


def _over(img: np.ndarray, alpha: np.ndarray, color) -> None:
    """Composite a flat `color` with coverage `alpha` (H, W) over img (H, W, 3) in place."""
    a = alpha[..., None]
    img *= 1 - a
    img += a * np.asarray(color, np.float32)


def _granules(rng: np.random.Generator, n: int, scale_px: float, density: float) -> np.ndarray:
    """(n, n) float32 granule coverage: blurred white noise thresholded at its top `density` fraction."""
    g = ndimage.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), scale_px)
    thr = np.quantile(g, 1 - density)
    return np.clip((g - thr) / (g.std() * 0.35 + 1e-6), 0, 1)


def _seg_dist(x: np.ndarray, y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points (x, y) to segment a-b (points as (2,) x, y)."""
    ab = b - a
    t = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1]) / (ab @ ab + 1e-9), 0, 1)
    return np.hypot(x - a[0] - t * ab[0], y - a[1] - t * ab[1])


def _nucleus_distance(cls: str, rng: np.random.Generator, u: np.ndarray, v: np.ndarray, rc: float) -> np.ndarray:
    """Signed distance (negative inside) to the class's nucleus, in the cell's own frame (u, v), cell radius rc."""
    if cls in ("neutrophil", "eosinophil"):
        n_lobes = int(rng.integers(3, 6)) if cls == "neutrophil" else 2
        lobe_r = rc * (rng.uniform(0.26, 0.32) if cls == "neutrophil" else rng.uniform(0.36, 0.42))
        # lobes along an arc bending around the cell centre
        span = rng.uniform(1.6, 2.6) if cls == "neutrophil" else rng.uniform(1.3, 1.8)
        arc_r = rc * rng.uniform(0.42, 0.55)
        th = np.linspace(-span / 2, span / 2, n_lobes) + rng.normal(0, 0.12, n_lobes)
        centres = np.stack([arc_r * np.cos(th) - arc_r * 0.45, arc_r * np.sin(th)], 1)
        d = np.full(u.shape, np.inf, np.float32)
        for c in centres:
            rr = lobe_r * rng.uniform(0.85, 1.15)
            d = np.minimum(d, np.hypot(u - c[0], (v - c[1]) * rng.uniform(0.8, 1.2)) - rr)
        strand = rc * 0.06
        for a, b in zip(centres[:-1], centres[1:], strict=True):
            d = np.minimum(d, _seg_dist(u, v, a, b) - strand)
        return d
    if cls == "lymphocyte":
        rn = rc * rng.uniform(0.80, 0.88)
        off = rc - rn
        return np.hypot(u - off * rng.uniform(0.2, 0.9), v) - rn
    if cls == "monocyte":
        rn = rc * rng.uniform(0.55, 0.62)
        body = np.hypot((u - rc * 0.08) / 1.15, v) - rn
        notch = rn * rng.uniform(0.55, 0.7) - np.hypot(u - rc * 0.08 - rn * 1.05, v)  # kidney indentation
        return np.maximum(body, notch)
    # basophil: irregular lobed blob, later mostly hidden by granules
    rn = rc * rng.uniform(0.5, 0.6)
    th = np.arctan2(v, u)
    return np.hypot(u, v) - rn * (1 + 0.15 * np.cos(3 * th + rng.uniform(0, 6.3)))


def _red_cell_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """(size, size, 3) float32 plasma with scattered red cells (discs with a pale centre), drawn by PIL
    at 2x and box-downsampled for smooth edges."""
    ss = 2 * size
    plasma = tuple(int(c) for c in np.clip(np.asarray(PLASMA) + rng.normal(0, 4, 3), 0, 255))
    rim = np.asarray(RBC) + rng.normal(0, 6, 3)
    im = Image.new("RGB", (ss, ss), plasma)
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(9, 16))):
        cx, cy = rng.uniform(-0.05, 1.05, 2) * ss
        r = rng.uniform(0.10, 0.13) * ss
        tone = rng.normal(0, 5)
        for frac, mix in ((1.0, 0.0), (0.75, 0.2), (0.5, 0.45)):  # rim -> pale centre
            col = tuple(int(c) for c in np.clip((1 - mix) * (rim + tone) + mix * np.asarray(plasma), 0, 255))
            rr = r * frac
            draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=col)
    im = im.resize((size, size), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.float32).copy()


def render_wbc(cls: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Draw one (size, size, 3) uint8 image of class `cls` (one of CLASSES)."""
    if cls not in CLASSES:
        raise ValueError(f"unknown WBC class {cls!r}; expected one of {CLASSES}")
    px = 2.0 / size  # one pixel in half-width units
    ax = (np.arange(size, dtype=np.float32) + 0.5) * px - 1
    y, x = np.meshgrid(ax, ax, indexing="ij")
    img = _red_cell_field(rng, size)

    # the white cell, in its own rotated frame (u, v), slightly off-centre
    rc = CELL_RADIUS[cls] * rng.uniform(0.88, 1.12)
    ang = rng.uniform(0, 2 * np.pi)
    ox, oy = rng.normal(0, 0.04, 2)
    ca, sa = np.cos(ang), np.sin(ang)
    u = (x - ox) * ca + (y - oy) * sa
    v = -(x - ox) * sa + (y - oy) * ca
    if rng.random() < 0.5:
        v = -v
    th = np.arctan2(v, u)
    wob = 1 + sum(rng.uniform(0, 0.03) * np.cos(k * th + rng.uniform(0, 6.3)) for k in (2, 3))
    cell = _soft(np.hypot(u, v * rng.uniform(0.92, 1.0)) - rc * wob, px)
    jitter = rng.normal(0, 7, 3)
    _over(img, cell, np.asarray(CYTOPLASM[cls]) + jitter)
    if cls == "monocyte":  # a few vacuoles in the cytoplasm
        for _ in range(int(rng.integers(2, 6))):
            r0, t0 = rc * rng.uniform(0.55, 0.85), rng.uniform(0, 2 * np.pi)
            vac = _soft(np.hypot(u - r0 * np.cos(t0), v - r0 * np.sin(t0)) - rc * rng.uniform(0.05, 0.09), px)
            _over(img, vac * cell * 0.6, (236, 232, 240))

    nuc = _soft(_nucleus_distance(cls, rng, u, v, rc), px) * cell
    chrom = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), size / 100)
    chrom = 1 + (0.10 if cls != "monocyte" else 0.16) * chrom / (chrom.std() + 1e-6)
    ncol = np.asarray(NUCLEUS[cls], np.float32) + jitter * 0.5
    _over(img, nuc, 0)
    img += nuc[..., None] * ncol * chrom[..., None]

    if cls in GRANULE:
        dens = {"neutrophil": 0.25, "eosinophil": 0.45, "basophil": 0.42}[cls]
        gscale = size * {"neutrophil": 0.006, "eosinophil": 0.008, "basophil": 0.012}[cls]
        gran = _granules(rng, size, gscale, dens) * cell
        if cls != "basophil":  # eosinophil/neutrophil granules lie in the cytoplasm, not over the nucleus
            gran *= 1 - nuc
        strength = {"neutrophil": 0.35, "eosinophil": 0.9, "basophil": 0.95}[cls]
        _over(img, gran * strength, np.asarray(GRANULE[cls]) + jitter * 0.5)

    # whole-image colour cast, slight blur and sensor noise
    img *= rng.normal(1, 0.04, 3).astype(np.float32)
    img += rng.normal(0, 6)
    img = ndimage.gaussian_filter(img, (size / 256, size / 256, 0))
    img += rng.normal(0, 3, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def write_jpeg(path: Path, rgb: np.ndarray, quality: int = 92) -> None:
    """Save (H, W, 3) uint8 as a baseline JPEG, atomically (same pixels -> same bytes)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def write_wbc_images(out: Path, seed_key: tuple[int, ...], items: list[tuple[str, int]], size: int = 128) -> int:
    """Write `out/<class>/<class>_<i>.jpg` for each (class, i) in `items`; image i of class c is drawn
    from `np.random.default_rng([*seed_key, CLASSES.index(c), i])`. Returns the number written."""
    for cls, i in items:
        rng = np.random.default_rng([*seed_key, CLASSES.index(cls), i])
        write_jpeg(out / cls / f"{cls}_{i}.jpg", render_wbc(cls, rng, size))
    return len(items)
