"""Vectorised drawing helpers shared by the demo generators: H&E colour, smooth noise, stamped nuclei.

Colours follow the Beer-Lambert model of stained tissue: each stain contributes an optical density
(OD) `concentration * vector`, and the transmitted colour is `white * exp(-OD)`; the vectors are
Ruifrok & Johnston's haematoxylin and eosin directions.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

HEMATOXYLIN = np.array([0.65, 0.70, 0.29], dtype=np.float32)  # OD per unit stain, R G B (purple-blue)
EOSIN = np.array([0.10, 0.85, 0.45], dtype=np.float32)  # (pink)


def he_to_rgb(h: np.ndarray, e: np.ndarray, white: float = 245.0, noise: float = 0.0,
              rng: np.random.Generator | None = None, h_max: float = 3.0, e_max: float = 1.5,
              h_vec: np.ndarray = HEMATOXYLIN, e_vec: np.ndarray = EOSIN) -> np.ndarray:
    """Stain concentrations (H, W) float -> (H, W, 3) uint8 RGB.

    Concentrations are quantised to 256 levels in [0, h_max] / [0, e_max] and looked up in a
    256 x 256 colour table (fast on whole slides); `noise` is the std of the noise added to both
    concentrations (stain units; 0.02 is about 2-3 grey levels; uniformly distributed).
    """
    lh = np.arange(256, dtype=np.float32) * (h_max / 255)
    le = np.arange(256, dtype=np.float32) * (e_max / 255)
    od = lh[:, None, None] * h_vec + le[None, :, None] * e_vec  # (256, 256, 3)
    lut = np.clip(white * np.exp(-od), 0, 255).astype(np.uint8).reshape(-1, 3)
    idx = np.zeros(h.shape, np.uint16)
    for x, vmax, shift in ((h, h_max, 8), (e, e_max, 0)):
        q = x * np.float32(255 / vmax)
        if noise > 0:  # uniform noise of std `noise` (cheaper to draw than Gaussian on whole slides)
            a = np.float32(noise * 255 / vmax * 3**0.5)
            q += rng.random(q.shape, dtype=np.float32) * (2 * a) - a
        q += np.float32(0.5)
        np.clip(q, 0, 255.4, out=q)
        idx |= q.astype(np.uint16) << shift
    return lut[idx]


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """(H, W) float32 noise with features about `scale` px wide, mean 0, std ~1 (drawn coarse, resized bilinearly)."""
    h, w = shape
    gh, gw = max(2, int(np.ceil(h / scale)) + 2), max(2, int(np.ceil(w / scale)) + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    img = Image.fromarray(g, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    s = out.std()
    return (out - out.mean()) / (s if s > 0 else 1.0)


def resize_field(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(h, w) float field -> (H, W) float32, bilinear."""
    return np.array(Image.fromarray(x.astype(np.float32), mode="F").resize((shape[1], shape[0]),
                                                                              Image.Resampling.BILINEAR))


def jittered_points(rng: np.random.Generator, shape: tuple[int, int], spacing: float,
                    jitter: float = 0.45) -> np.ndarray:
    """Roughly even random points over an (H, W) area: a grid of `spacing` px, each point moved up to
    `jitter * spacing`. Returns (N, 2) float32 (y, x)."""
    h, w = shape
    ys = np.arange(spacing / 2, h, spacing, dtype=np.float32)
    xs = np.arange(spacing / 2, w, spacing, dtype=np.float32)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1)
    pts += rng.uniform(-jitter, jitter, pts.shape).astype(np.float32) * spacing
    return pts


def blob_sprites(rng: np.random.Generator, n: int, radius: float, size_sd: float = 0.15,
                 elong: float = 0.25, wobble: float = 0.12, texture: float = 0.0) -> np.ndarray:
    """`n` soft-edged nucleus shapes: random ellipses with wobbly outlines, optional chromatin texture.

    Args:
        radius: mean radius in px; each sprite's radius is `radius * (1 + size_sd * N(0, 1))`.
        elong: max relative elongation (0 = round).
        wobble: relative amplitude of the outline's low harmonics.
        texture: 0..1, how much the interior density varies (coarse chromatin).

    Returns:
        (n, K, K) float32 in [0, 1], K odd, centred.
    """
    k = int(np.ceil(radius * (1 + 2.5 * size_sd) * (1 + elong) * (1 + 3 * wobble) + 2)) * 2 + 1
    c = k // 2
    yy, xx = np.mgrid[-c:c + 1, -c:c + 1].astype(np.float32)
    r = radius * np.clip(1 + size_sd * rng.standard_normal(n), 0.5, 1 + 2.5 * size_sd)  # (n,)
    ang = rng.uniform(0, np.pi, n)
    el = rng.uniform(0, elong, n)
    ca, sa = np.cos(ang)[:, None, None], np.sin(ang)[:, None, None]
    u = (xx * ca + yy * sa) / (1 + el)[:, None, None]
    v = -xx * sa + yy * ca
    d = np.sqrt(u * u + v * v)  # (n, K, K)
    th = np.arctan2(v, u)
    ph = rng.uniform(0, 2 * np.pi, (n, 3))
    amp = rng.uniform(0, wobble, (n, 3))
    edge = 1 + sum(amp[:, j, None, None] * np.cos((j + 2) * th + ph[:, j, None, None]) for j in range(3))
    rr = r[:, None, None] * edge
    s = np.clip(rr - d + 0.5, 0, 1)  # anti-aliased edge, 1 px wide
    if texture > 0:
        t = ndimage.gaussian_filter(rng.standard_normal((n, k, k)).astype(np.float32), (0, 1.0, 1.0))
        s = s * np.clip(1 - texture * (0.5 + 0.5 * t / (t.std() + 1e-6)), 0, 1)
    return s.astype(np.float32)


def stamp(shape: tuple[int, int], centres: np.ndarray, sprites: np.ndarray, which: np.ndarray | None = None,
          weights: np.ndarray | None = None) -> np.ndarray:
    """Add sprites at points: (N, 2) (y, x) centres, (M, K, K) sprites, `which` (N,) sprite index per point
    (default i % M), `weights` (N,) per-point scale. Returns the (H, W) float32 sum (overlaps add up)."""
    h, w = shape
    n = len(centres)
    if n == 0:
        return np.zeros(shape, np.float32)
    m, k, _ = sprites.shape
    c = k // 2
    which = np.arange(n) % m if which is None else which
    cy = np.rint(centres[:, 0]).astype(np.int64)
    cx = np.rint(centres[:, 1]).astype(np.int64)
    off = np.arange(-c, c + 1)
    ys = cy[:, None, None] + off[None, :, None]  # (N, K, 1)
    xs = cx[:, None, None] + off[None, None, :]  # (N, 1, K)
    ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)  # (N, K, K)
    vals = sprites[which]
    if weights is not None:
        vals = vals * weights[:, None, None]
    flat = (ys * w + xs)[ok]
    out = np.bincount(flat, weights=vals[ok], minlength=h * w)
    return out.astype(np.float32).reshape(h, w)
