"""Tissue detection on a low-resolution thumbnail: Otsu on HSV saturation, then a minimum area.

H&E-stained tissue is coloured (saturated); glass, background and most dust are grey. Otsu's
threshold on the saturation channel separates the two; a floor on the threshold keeps a blank
slide (only noise) from being split in half, and components smaller than a minimum area are
dropped (dust, debris); holes smaller than that area are filled, larger ones (lumens) are not.
"""

from __future__ import annotations

import numpy as np
import openslide
from PIL import Image, ImageFilter
from scipy import ndimage

#: Saturation (0-255) below which nothing counts as tissue, whatever Otsu says.
MIN_SATURATION = 20
#: Pixels this dark are pen marks, folds or scanner black borders, not tissue.
MAX_DARKNESS = 30


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation of uint8 (H, W, 3) -> uint8 (H, W): 255 * (max - min) / max, 0 for grey pixels."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("HSV").getchannel("S"))


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: t maximising between-class variance of (< t, >= t)."""
    hist = np.bincount(values.reshape(-1), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256)
    w0 = np.cumsum(hist)  # count of values <= t-1 when threshold is t
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return int(np.argmax(between)) + 1


def tissue_mask(rgb: np.ndarray, min_area: int = 16, min_saturation: int = MIN_SATURATION,
                fill_holes: bool = True) -> tuple[np.ndarray, int]:
    """Tissue mask of a thumbnail.

    Args:
        rgb: uint8 (H, W, 3) thumbnail.
        min_area: connected components smaller than this many thumbnail pixels are dropped, and
            holes smaller than it are filled (when `fill_holes`).
        min_saturation: lower bound on the Otsu threshold (0-255).
    Returns:
        (mask bool (H, W), saturation threshold used).
    """
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        raise ValueError(f"tissue_mask expects an (H, W, 3) RGB thumbnail, got shape {rgb.shape}")
    hsv = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).convert("HSV")  # PIL: C speed
    sat = np.asarray(hsv.getchannel("S").filter(ImageFilter.MedianFilter(3)))
    thr = max(otsu_threshold(sat), int(min_saturation))
    mask = (sat >= thr) & (np.asarray(hsv.getchannel("V")) > MAX_DARKNESS)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=1, border_value=0)
    if fill_holes:  # small gaps inside tissue count as tissue; large lumens and vessels do not
        holes = ndimage.binary_fill_holes(mask) & ~mask
        lab, n = ndimage.label(holes)
        if n:
            small = np.bincount(lab.reshape(-1)) < max(min_area, 2)
            small[0] = False
            mask = mask | small[lab]
    if min_area > 1 and mask.any():
        lab, n = ndimage.label(mask)
        sizes = np.bincount(lab.reshape(-1))
        keep = sizes >= min_area
        keep[0] = False
        mask = keep[lab]
    return mask, thr


def slide_thumbnail(slide: openslide.OpenSlide, max_size: int = 2048, use_associated: bool = True,
                    ) -> tuple[np.ndarray, float, float]:
    """RGB thumbnail of at most `max_size` px on the long side (never upsampled).

    When the pyramid has no level near the thumbnail size (a 1-level slide would be decoded whole),
    the slide's own associated "thumbnail" image is used instead if it is at least as large and has
    the same aspect ratio (within 0.5%), as Aperio files have.

    Returns:
        (uint8 (h, w, 3), sx, sy): level-0 pixels per thumbnail pixel along x and y.
    """
    w0, h0 = slide.dimensions
    scale = max(1.0, max(w0, h0) / max_size)
    size = (max(1, round(w0 / scale)), max(1, round(h0 / scale)))
    lw, lh = slide.level_dimensions[slide.get_best_level_for_downsample(scale)]
    assoc = slide.associated_images.get("thumbnail") if use_associated and lw * lh > 16 * size[0] * size[1] else None
    if assoc is not None and assoc.width >= size[0] and abs(assoc.width / assoc.height / (w0 / h0) - 1) < 0.005:
        thumb = assoc.convert("RGB").resize(size, Image.Resampling.BOX)
    else:
        thumb = slide.get_thumbnail(size).convert("RGB")  # composited onto the slide's background colour
    arr = np.asarray(thumb)
    return arr, w0 / arr.shape[1], h0 / arr.shape[0]


def box_fractions(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Mean of `mask` over each box (x0, y0, x1, y1) in mask pixels (fractional allowed), via an integral image.

    Boxes are snapped outward to whole pixels and to at least one pixel.
    """
    ii = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), np.float64)
    ii[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.float64), 0), 1)
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    h, w = mask.shape
    x0 = np.clip(np.floor(b[:, 0] + 1e-6), 0, w - 1).astype(np.int64)
    y0 = np.clip(np.floor(b[:, 1] + 1e-6), 0, h - 1).astype(np.int64)
    x1 = np.clip(np.maximum(np.ceil(b[:, 2] - 1e-6), x0 + 1), 1, w).astype(np.int64)
    y1 = np.clip(np.maximum(np.ceil(b[:, 3] - 1e-6), y0 + 1), 1, h).astype(np.int64)
    s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
    return s / ((x1 - x0) * (y1 - y0))
