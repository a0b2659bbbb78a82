"""Preprocessing applied once, in the decode-once cache, to every original image before it is resized.

    preprocess: [crop_border, clahe]     # in the run or sweep config; recorded in every run's config.yaml

- `crop_border`: crop the uninformative border, the rows and columns at the edges that are nearly one
  flat colour (scanner margins, black frames), keeping the bounding box of everything else.
- `equalize`: global histogram equalisation of the lightness (L of CIE Lab), colours kept.
- `clahe`: contrast-limited adaptive histogram equalisation of the lightness (OpenCV, clip 2.0, 8x8 tiles).
- `cell_crop`: scale normalisation. The white cell's nucleus is found as the haematoxylin-rich region
  (skimage `rgb2hed`, Otsu threshold, closing, the largest component near the centre) and a square of
  `CELL_SCALE` times its bounding box is cut around it (padded with the border colour where it leaves
  the image), so a 360 px PBC field with a small cell and another lab's tight 120 px crop reach the
  model with the cell at the same relative size. No nucleus found: the centre square, with a warning
  naming the images (`WBCData.dropped["fallback"]`: kept, not dropped).
- `macenko`: stain normalisation to torchstain's reference H&E stain vectors (Macenko et al. 2009);
  an image whose stains cannot be estimated is kept as it is, with the same warning.

Ops run in the order given. The same ops are applied again by `scripts/evaluate.py` and
`scripts/predict.py`, read from the checkpoint's training config, so a model always sees its inputs
prepared as in training.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import cv2
import numpy as np

CELL_SCALE = 2.0  # crop side / nucleus bounding-box side
_MASK_SIDE = 128  # the nucleus is found on a copy of about this size (speed); the crop is cut at full size


class Fallback(Exception):
    """An op could not do its job on this image; `image` is what it returns instead (kept, and named)."""

    def __init__(self, image: np.ndarray, reason: str) -> None:
        super().__init__(reason)
        self.image, self.reason = image, reason


def centre_square(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = min(h, w)
    return np.ascontiguousarray(img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s])


def nucleus_box(img: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) of the haematoxylin-rich component nearest the centre (the largest of those whose
    centroid lies in the central 70%), in full-resolution pixels; None when there is none."""
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu
    from skimage.measure import label, regionprops

    h, w = img.shape[:2]
    f = min(1.0, _MASK_SIDE / max(h, w))
    small = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else img
    hema = rgb2hed(small)[..., 0]
    if float(hema.max() - hema.min()) < 1e-3:
        return None
    mask = (hema > threshold_otsu(hema)).astype(np.uint8)
    r = max(1, min(mask.shape) // 40)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1,) * 2))
    cy, cx = mask.shape[0] / 2, mask.shape[1] / 2  # joined the lobes of a segmented nucleus; now the central part
    central = [p for p in regionprops(label(mask)) if p.area >= max(4, 0.002 * mask.size)
               and abs(p.centroid[0] - cy) < 0.35 * mask.shape[0] and abs(p.centroid[1] - cx) < 0.35 * mask.shape[1]]
    if not central:
        return None
    y0, x0, y1, x1 = max(central, key=lambda r: r.area).bbox
    return int(y0 / f), int(x0 / f), int(np.ceil(y1 / f)), int(np.ceil(x1 / f))


def cell_crop(img: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the square of CELL_SCALE x the nucleus box around it (see the module docstring)."""
    box = nucleus_box(img)
    if box is None:
        raise Fallback(centre_square(img), "no nucleus found: centre square")
    y0, x0, y1, x1 = box
    side = max(8, int(round(CELL_SCALE * max(y1 - y0, x1 - x0))))
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    top, left = cy - side // 2, cx - side // 2
    h, w = img.shape[:2]
    pad = max(0, -top, -left, top + side - h, left + side - w)
    if pad:
        border = np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]), axis=0).astype(np.uint8)
        canvas = np.empty((h + 2 * pad, w + 2 * pad, 3), np.uint8)
        canvas[:] = border
        canvas[pad:pad + h, pad:pad + w] = img
        img, top, left = canvas, top + pad, left + pad
    return np.ascontiguousarray(img[top:top + side, left:left + side])


_MACENKO = threading.local()


def macenko(img: np.ndarray) -> np.ndarray:
    """Stain-normalise to torchstain's reference H&E vectors; Fallback (image unchanged) when it fails."""
    if not hasattr(_MACENKO, "norm"):
        import torchstain

        _MACENKO.norm = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    od = -np.log((img.reshape(-1, 3).astype(np.float64) + 1) / 240)
    if int((od > 0.15).all(axis=1).sum()) < 16:  # torchstain's stain pixels (Io 240, beta 0.15): too few
        raise Fallback(img, "fewer than 16 stained pixels, stains not estimable: unchanged")
    try:
        with np.errstate(all="ignore"):
            out, _, _ = _MACENKO.norm.normalize(I=np.ascontiguousarray(img), stains=False)
    except (np.linalg.LinAlgError, ValueError, IndexError) as e:
        raise Fallback(img, f"stains not estimable ({type(e).__name__}): unchanged") from e
    if not np.isfinite(out).all():
        raise Fallback(img, "stains not estimable: unchanged")
    return out


def crop_border(img: np.ndarray, tol: float = 8.0) -> np.ndarray:
    """(H, W, 3) uint8 -> the bounding box of rows/columns whose std (over pixels and channels) exceeds
    `tol` grey levels; the whole image when nothing is flat or everything is."""
    g = img.astype(np.float32)
    rows = np.flatnonzero(g.std(axis=(1, 2)) > tol)
    cols = np.flatnonzero(g.std(axis=(0, 2)) > tol)
    if len(rows) < 2 or len(cols) < 2:
        return img
    return np.ascontiguousarray(img[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


def _on_lightness(img: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    lab = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2LAB)
    lab[..., 0] = fn(lab[..., 0])
    return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


def equalize(img: np.ndarray) -> np.ndarray:
    return _on_lightness(img, cv2.equalizeHist)


def clahe(img: np.ndarray) -> np.ndarray:
    op = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    return _on_lightness(img, op.apply)


PREPROCESS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"crop_border": crop_border, "equalize": equalize,
                                                             "clahe": clahe, "cell_crop": cell_crop,
                                                             "macenko": macenko}


def check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    bad = [o for o in ops if o not in PREPROCESS]
    if bad:
        raise ValueError(f"unknown preprocessing step(s) {bad}; valid steps: {sorted(PREPROCESS)}")
    return tuple(ops)


def apply(img: np.ndarray, ops: Sequence[str], notes: list[str] | None = None) -> np.ndarray:
    """Run the named steps in order on one (H, W, 3) uint8 image. A step that falls back (`Fallback`)
    passes its substitute on, and its reason is appended to `notes` ("cell_crop: no nucleus found ...")."""
    for o in ops:
        try:
            img = PREPROCESS[o](img)
        except Fallback as f:
            img = f.image
            if notes is not None:
                notes.append(f"{o}: {f.reason}")
    return img
