"""Finding and decoding image files, with clear errors for empty folders and bad files.

Used by PRCC region images here and by the WBC side in `fusion`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class NoImagesError(FileNotFoundError):
    """A data folder holds no image with any of the extensions looked for."""


class BadImageError(ValueError):
    """A file with an image name that cannot be decoded."""


class TooManyBadImagesError(ValueError):
    """Most files of a data set are unreadable: something is wrong with the whole folder."""


def find_images(root: str | os.PathLike, exts: Sequence[str] = IMAGE_EXTS) -> list[Path]:
    """All files under `root` (recursively) whose suffix is in `exts` (case-insensitive), sorted.

    Raises:
        NoImagesError: `root` is missing or holds no such file; the message names both.
    """
    root = Path(root)
    if not root.is_dir():
        raise NoImagesError(f"data folder {root} does not exist or is not a folder")
    exts = tuple(e.lower() for e in exts)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts
                   and not p.name.startswith("."))
    if not files:
        raise NoImagesError(f"no images found under {root} (looked for {', '.join(exts)}, recursively)")
    return files


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to a uint8 array (H, W, 3); RGBA/grey/palette converted to RGB.

    Raises:
        BadImageError: the file is truncated, corrupt or not an image; the message names the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    return arr


def warn_bad_files(bad: list[tuple[Path, str]], total: int, what: str = "images",
                   max_bad_fraction: float = 0.5) -> None:
    """Warn about each skipped file and the count; raise when more than `max_bad_fraction` are bad."""
    if not bad:
        return
    for p, reason in bad:
        warnings.warn(f"skipping unreadable file {p}: {reason}", stacklevel=3)
    warnings.warn(f"skipped {len(bad)} of {total} {what} that could not be decoded", stacklevel=3)
    if len(bad) > max_bad_fraction * total:
        raise TooManyBadImagesError(
            f"{len(bad)} of {total} {what} could not be decoded (first: {bad[0][0]}); "
            f"more than {max_bad_fraction:.0%} are bad, so the folder is probably not what you meant")


def load_images(paths: Sequence[Path], min_size: int = 0, max_bad_fraction: float = 0.5,
                what: str = "images") -> tuple[list[np.ndarray], list[Path]]:
    """Decode every path; skip (and warn about) undecodable ones and those smaller than `min_size`.

    Returns the decoded arrays and the paths they came from (same order).
    Raises:
        TooManyBadImagesError: more than `max_bad_fraction` of the files are undecodable.
        ValueError: every decodable image is smaller than `min_size`.
    """
    arrays, kept, bad, small = [], [], [], []
    for p in paths:
        try:
            a = load_rgb(p)
        except BadImageError as e:
            bad.append((p, str(e.__cause__ or e)))
            continue
        if min(a.shape[:2]) < min_size:
            small.append((p, a.shape[:2]))
            continue
        arrays.append(a)
        kept.append(p)
    warn_bad_files(bad, len(paths), what=what, max_bad_fraction=max_bad_fraction)
    if small:
        for p, hw in small[:10]:
            warnings.warn(f"skipping {p}: {hw[1]}x{hw[0]} px is smaller than the {min_size} px crop", stacklevel=2)
        warnings.warn(f"skipped {len(small)} {what} smaller than {min_size} px", stacklevel=2)
        if not arrays:
            raise ValueError(f"every readable image is smaller than the requested crop of {min_size} px "
                             f"(e.g. {small[0][0]} is {small[0][1][1]}x{small[0][1][0]}); "
                             f"lower --image-size or use larger images")
    return arrays, kept
