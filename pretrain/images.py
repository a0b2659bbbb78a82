"""Finding and decoding image files, with clear errors for empty folders and bad files.

Used by PRCC region images here, by the patch sources in `pretrain.patches` and by the WBC side in
`fusion`. Every reader returns uint8 RGB (H, W, 3) and decides how to get there the same way:

- 8-bit modes Pillow converts itself ("1", "L", "P", "RGB", "CMYK" incl. Adobe-inverted JPEG CMYK,
  "YCbCr", "LAB", "HSV") go through `Image.convert("RGB")`; CMYK ignores any ICC profile.
- Alpha ("RGBA", "LA", "PA", palette transparency) is composited on white: the glass behind a smear
  or a tissue section is white, and fully opaque images (the usual RGBA PNG) come out unchanged.
- 16-bit pixels are scaled by the dtype's range, round(v / 65535 * 255), never by the image's own
  maximum (that would change contrast image by image). 16-bit grey is scaled here; Pillow already
  reduces 16-bit RGB(A) PNG/TIFF to 8 bits by keeping the high byte (at most 1 level below rounding).
- Float pixels (mode "F", float TIFFs) in [0, 1] are multiplied by 255, in [0, 255] taken as they
  are; anything else (negative, > 255, NaN) is refused. Float or RGB TIFFs that Pillow cannot open
  are read with tifffile.
- 32-bit or signed integer pixels, multi-frame files (GIF/APNG/multi-page TIFF: which page is the
  image is ambiguous) and other modes are refused. MPO JPEGs (camera files with an embedded preview)
  use their first frame, the primary image by the MPO standard.
- Images over Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`, about 89 Mpx) are
  refused by name before they are decoded; set the environment variable `WBC_MAX_IMAGE_PIXELS` to a
  larger pixel count (or "none") to read files you trust.

Refusals are `BadImageError` (a ValueError) with a one-line message "<file>: <reason>"; loaders skip
such files with a warning naming each one, and give up when most of a folder is bad.
"""

from __future__ import annotations

import io
import os
import re
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MIN_SIDE = 8  # default smallest side (px) `load_images` keeps: below it an "image" is an icon or a placeholder
MAX_PIXELS_ENV = "WBC_MAX_IMAGE_PIXELS"

_TO_RGB = {"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}  # Pillow converts these correctly
_ALPHA = {"LA", "La", "PA", "RGBA", "RGBa"}
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)


class NoImagesError(FileNotFoundError):
    """A data folder holds no image with any of the extensions looked for."""


class BadImageError(ValueError):
    """An image that cannot be decoded or is refused; `reason` is the message without the file name."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class TooManyBadImagesError(ValueError):
    """Most files of a data set are unreadable: something is wrong with the whole folder."""


class SmallImageError(BadImageError):
    """An image whose shorter side is below the minimum the loader was asked for."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _refuse(source: str, reason: str, cls: type[BadImageError] = BadImageError) -> BadImageError:
    reason = _one_line(reason)
    return cls(f"{source}: {reason}", reason)


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


def pixel_scale(x: np.ndarray, source: str) -> float:
    """Factor mapping the pixel values of `x` onto 0..255, from its dtype (floats: from its range).

    uint8 -> 1, bool -> 255, uint16 -> 255/65535; float with all values in [0, 1] -> 255, in
    [0, 255] -> 1. Decided for a whole array at once, so one data set is never scaled two ways.
    Raises:
        BadImageError: other integer dtypes, or floats that are negative, above 255, NaN or infinite.
    """
    kind, size = x.dtype.kind, x.dtype.itemsize
    if kind == "b":
        return 255.0
    if kind == "u" and size in (1, 2):
        return 1.0 if size == 1 else 255 / 65535
    if kind != "f":
        raise _refuse(source, f"{x.dtype} pixels have no standard 0-255 range; store uint8 (0-255), "
                              f"uint16 or float in [0, 1]")
    if x.size == 0:
        return 1.0
    if not np.isfinite(x).all():
        raise _refuse(source, f"{x.dtype} pixels include NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0 and hi <= 1:
        return 255.0
    if lo >= 0 and hi <= 255:
        return 1.0
    raise _refuse(source, f"{x.dtype} pixels range {lo:g}..{hi:g}, neither 0..1 nor 0..255; "
                          f"rescale them to one of these (or to uint8)")


def to_uint8(x: np.ndarray, source: str, scale: float | None = None) -> np.ndarray:
    """`x` (any shape) as uint8 0..255, scaled by `scale` or by `pixel_scale(x)`.

    A `scale` decided earlier for a whole data set is checked against this part's values, so a float
    patch outside the data set's range is refused rather than clipped.
    """
    if x.dtype == np.uint8:
        return x
    if scale is None:
        scale = pixel_scale(x, source)
    elif x.dtype.kind == "f" and x.size:
        if not np.isfinite(x).all() or x.min() < 0 or x.max() * scale > 255 * (1 + 1e-6):
            raise _refuse(source, f"{x.dtype} pixels range {float(np.nanmin(x)):g}..{float(np.nanmax(x)):g} "
                                  f"fall outside 0..{255 / scale:g}, the range found for the rest of the data")
    elif x.dtype.kind not in "bu" or x.dtype.itemsize > 2:
        pixel_scale(x, source)  # raises for dtypes without a standard range
    return np.rint(x.astype(np.float32) * np.float32(scale)).clip(0, 255).astype(np.uint8)


def array_to_rgb(x: np.ndarray, source: str, scale: float | None = None) -> np.ndarray:
    """(H, W) or (H, W, C) pixels, C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA -> uint8 (H, W, 3).

    Values are scaled as in `to_uint8`; alpha is composited on white.
    """
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
        raise _refuse(source, f"pixel array of shape {x.shape} is not an image (H, W) or (H, W, 1-4 channels)")
    x = to_uint8(x, source, scale)
    colour, alpha = (x[..., :-1], x[..., -1:]) if x.shape[-1] in (2, 4) else (x, None)
    if colour.shape[-1] == 1:
        colour = np.repeat(colour, 3, axis=-1)
    if alpha is not None and alpha.min() < 255:
        a = alpha.astype(np.float32) / 255
        colour = np.rint(colour * a + 255 * (1 - a)).astype(np.uint8)
    return np.ascontiguousarray(colour)


def pil_to_rgb(im: Image.Image, source: str) -> np.ndarray:
    """A loaded PIL image of any supported mode -> uint8 (H, W, 3) (rules in the module docstring)."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "F":
        return array_to_rgb(np.asarray(im), source)
    if mode == "I" and im.format == "PNG":  # older Pillow opens 16-bit grey PNGs as 32-bit "I"
        return array_to_rgb(np.asarray(im).astype(np.uint16), source)
    if mode == "I":
        raise _refuse(source, "32-bit or signed integer pixels (mode 'I') have no standard 0-255 range; "
                              "save the image as 8- or 16-bit")
    if mode in _ALPHA or (mode in _TO_RGB and "transparency" in im.info):
        return array_to_rgb(np.asarray(im.convert("RGBA")), source)
    if mode in _TO_RGB:
        return np.asarray(im.convert("RGB"))
    raise _refuse(source, f"unsupported image mode {mode!r}; save it as 8-bit RGB or grey")


def pixel_limit() -> int | None:
    """Pillow's decompression-bomb limit in pixels, after applying `WBC_MAX_IMAGE_PIXELS` if set."""
    env = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if env:
        if env.lower() in ("none", "0"):
            Image.MAX_IMAGE_PIXELS = None
        elif env.isdigit():
            Image.MAX_IMAGE_PIXELS = int(env)
        else:
            raise ValueError(f"{MAX_PIXELS_ENV}={env!r} is not a pixel count; use e.g. 200000000, or 'none' "
                             f"for no limit")
    return Image.MAX_IMAGE_PIXELS


def _bomb(source: str, pixels: str, limit: int | None) -> BadImageError:
    return _refuse(source, f"{pixels} px is over the decompression-bomb limit of {limit or 0:,} px "
                           f"(PIL.Image.MAX_IMAGE_PIXELS); if you trust the file, set the environment "
                           f"variable {MAX_PIXELS_ENV} to a larger pixel count, or to 'none'")


def _check_size(w: int, h: int, source: str, limit: int | None, min_size: int) -> None:
    if limit and w * h > limit:
        raise _bomb(source, f"{w}x{h} = {w * h:,}", limit)
    if min(w, h) < min_size:
        raise _refuse(source, f"{w}x{h} px is below the minimum of {min_size} px per side", SmallImageError)


def _decode_tiff(data: bytes, source: str, limit: int | None, min_size: int, pil_error: str) -> np.ndarray:
    """TIFFs Pillow cannot open (float RGB, float64, float16, ...), read with tifffile."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) > 1:
                raise _refuse(source, f"TIFF with {len(tif.pages)} pages; only single-image files are read "
                                      f"(which page is the image is ambiguous): save the page you want alone")
            page = tif.pages[0]
            _check_size(page.imagewidth, page.imagelength, source, limit, min_size)
            if page.photometric not in (tifffile.PHOTOMETRIC.MINISBLACK, tifffile.PHOTOMETRIC.RGB):
                raise _refuse(source, f"TIFF photometric {page.photometric.name} is not supported "
                                      f"(only grey or RGB)")
            arr, axes = page.asarray(), page.axes
    except BadImageError:
        raise
    except (ValueError, OSError, IndexError, KeyError, struct.error) as e:
        raise _refuse(source, f"cannot decode image (Pillow: {pil_error}; tifffile: {type(e).__name__}: {e})") from e
    if axes.startswith("S"):  # planar configuration: samples first
        arr = np.moveaxis(arr, 0, -1)
    return array_to_rgb(arr, source)


def decode_rgb(data: bytes, source: str, draft: int | None = None, min_size: int = 0) -> np.ndarray:
    """Decode encoded image bytes -> uint8 (H, W, 3) by the rules of the module docstring.

    Args:
        source: names the image in errors (a path or an id).
        draft: for JPEGs, let libjpeg downscale by 1/2..1/8 while both sides stay >= `draft` px.
        min_size: refuse (`SmallImageError`) an image whose shorter side is below it, before decoding.
    Raises:
        BadImageError: truncated, corrupt, not an image, too large, or in a refused mode; one line
            naming `source` and the reason.
    """
    limit = pixel_limit()
    try:
        with Image.open(io.BytesIO(data)) as im:
            _check_size(*im.size, source, limit, min_size)
            n = getattr(im, "n_frames", 1)
            if n > 1 and im.format != "MPO":
                raise _refuse(source, f"{im.format} with {n} frames/pages; only single-image files are read "
                                      f"(which frame is the image is ambiguous): save the one you want alone")
            if draft and im.format == "JPEG":
                im.draft("RGB", (draft, draft))
            im.load()
            return pil_to_rgb(im, source)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        raise _bomb(source, f"{int(m.group(1)):,}" if m else "the image", limit) from e
    except _PIL_ERRORS as e:
        reason = f"{type(e).__name__}: {e}"
        if data[:4] in _TIFF_MAGIC:
            return _decode_tiff(data, source, limit, min_size, reason)
        raise _refuse(source, f"cannot decode image ({reason})") from e


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to a uint8 array (H, W, 3) (conversion rules in the module docstring).

    Raises:
        BadImageError: unreadable, truncated, corrupt, not an image or refused; names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _refuse(str(path), f"cannot read file ({type(e).__name__}: {e})") from e
    return decode_rgb(data, str(path))


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
            f"{len(bad)} of {total} {what} could not be decoded (first: {bad[0][0]}: {bad[0][1]}); "
            f"more than {max_bad_fraction:.0%} are bad, so the folder is probably not what you meant")


def warn_small_files(small: list[tuple[Path, str]], total: int, what: str, min_size: int,
                     min_name: str = "minimum") -> None:
    """Warn about each image skipped for its size (`small`: (path, reason)) and the count."""
    if not small:
        return
    for p, reason in small:
        warnings.warn(f"skipping {p}: {reason}", stacklevel=3)
    warnings.warn(f"skipped {len(small)} {what} smaller than the {min_size} px {min_name} "
                  f"({len(small)} of {total})", stacklevel=3)


def load_images(paths: Sequence[Path], min_size: int = MIN_SIDE, max_bad_fraction: float = 0.5,
                what: str = "images", min_name: str = "minimum") -> tuple[list[np.ndarray], list[Path]]:
    """Decode every path; skip (and warn about) undecodable ones and those smaller than `min_size`.

    `min_name` says what the minimum is in messages (e.g. "crop" when it is the crop size).
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
            bad.append((p, e.reason))
            continue
        if min(a.shape[:2]) < min_size:
            small.append((p, f"{a.shape[1]}x{a.shape[0]} px is smaller than the {min_size} px {min_name}"))
            continue
        arrays.append(a)
        kept.append(p)
    warn_bad_files(bad, len(paths), what=what, max_bad_fraction=max_bad_fraction)
    warn_small_files(small, len(paths), what, min_size, min_name)
    if small and not arrays:
        raise ValueError(f"every readable image is smaller than the requested {min_name} of {min_size} px "
                         f"(e.g. {small[0][0]}: {small[0][1]}); lower the size or use larger images")
    return arrays, kept
