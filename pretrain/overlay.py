"""Overlay PNG of one slide's extraction: tissue mask, annotation outlines and the patch grid."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .utils import atomic_path

TISSUE_RGBA = (0, 200, 0, 50)
TISSUE_EDGE = (0, 170, 0, 255)
NORMAL_RGBA = (255, 215, 0, 200)
TUMOR_RGBA = (255, 0, 0, 110)
OUTLINE = {"tumor": (220, 0, 0, 255), "exclusion": (0, 90, 255, 255), "other": (160, 0, 160, 255)}


def render_overlay(plan: Any, cfg: Any, min_side: int = 1024, max_side: int = 2048) -> Image.Image:
    """Thumbnail with tissue tinted and outlined green, normal patches outlined yellow, tumor patches filled red,
    tumor outlines red and exclusion outlines blue; a caption with the counts on top."""
    h, w = plan.mask.shape
    zoom = min(max(1.0, min_side / max(h, w)), max_side / max(h, w))  # 1024..2048 px on the long side
    W, H = round(w * zoom), round(h * zoom)
    base = Image.fromarray(plan.thumb).convert("RGBA").resize((W, H), Image.Resampling.BILINEAR)
    mask = np.asarray(Image.fromarray(plan.mask.astype(np.uint8) * 255).resize((W, H), Image.Resampling.NEAREST)) > 0
    edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
    tint = np.zeros((H, W, 4), np.uint8)
    tint[mask] = TISSUE_RGBA
    tint[edge] = TISSUE_EDGE
    base = Image.alpha_composite(base, Image.fromarray(tint, "RGBA"))
    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    w0, h0 = plan.thumb.shape[1] * plan.scale[0], plan.thumb.shape[0] * plan.scale[1]
    fx, fy = W / w0, H / h0  # output px per level-0 px
    fp = cfg.patch_size * plan.downsample
    for (x, y), lab in zip(plan.coords, plan.labels, strict=True):
        box = [x * fx, y * fy, (x + fp) * fx - 1, (y + fp) * fy - 1]
        if lab:
            d.rectangle(box, fill=TUMOR_RGBA, outline=(255, 0, 0, 255))
        else:
            d.rectangle(box, outline=NORMAL_RGBA)
    if plan.annotations is not None:
        for a in plan.annotations.annotations:
            pts = [(float(px * fx), float(py * fy)) for px, py in a.coords]
            d.line(pts + pts[:1], fill=OUTLINE.get(a.role, OUTLINE["other"]), width=3)
    img = Image.alpha_composite(base, layer).convert("RGB")
    caption = (f"{plan.name}: {len(plan.coords)} patches ({int(plan.labels.sum())} tumor), level {plan.level}, "
               f"ds {plan.downsample:.3g}, tissue {plan.tissue_fraction:.1%}")
    canvas = Image.new("RGB", (W, H + 18), "white")
    canvas.paste(img, (0, 18))
    ImageDraw.Draw(canvas).text((4, 3), caption, fill="black")
    return canvas


def save_overlay(plan: Any, cfg: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    img = render_overlay(plan, cfg)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", compress_level=1)  # 4x faster than the default, ~1.5x larger
    return path
