"""Preprocessing applied once, in the decode-once cache, to every original image before it is resized.

    preprocess: [crop_border, clahe]     # in the run or sweep config; recorded in every run's config.yaml

- `crop_border`: crop the uninformative border, the rows and columns at the edges that are nearly one
  flat colour (scanner margins, black frames), keeping the bounding box of everything else.
- `equalize`: global histogram equalisation of the lightness (L of CIE Lab), colours kept.
- `clahe`: contrast-limited adaptive histogram equalisation of the lightness (OpenCV, clip 2.0, 8x8 tiles).

Ops run in the order given. The same ops are applied again by `scripts/evaluate.py` and
`scripts/predict.py`, read from the checkpoint's training config, so a model always sees its inputs
prepared as in training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np


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
                                                             "clahe": clahe}


def check_ops(ops: Sequence[str]) -> tuple[str, ...]:
    bad = [o for o in ops if o not in PREPROCESS]
    if bad:
        raise ValueError(f"unknown preprocessing step(s) {bad}; valid steps: {sorted(PREPROCESS)}")
    return tuple(ops)


def apply(img: np.ndarray, ops: Sequence[str]) -> np.ndarray:
    """Run the named steps in order on one (H, W, 3) uint8 image."""
    for o in ops:
        img = PREPROCESS[o](img)
    return img
