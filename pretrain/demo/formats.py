"""Writers for the real on-disk formats of Camelyon16: tiled pyramidal TIFF slides and ASAP XML.

Both are reusable outside the demo generator (e.g. tests that need a tiny slide):

    write_pyramidal_tiff("s.tif", rgb)                       # OpenSlide's generic-TIFF driver opens it
    write_asap_xml("s.xml", [np.array([[x0, y0], [x1, y1], [x2, y2]])])
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile

from ..utils import atomic_path

#: Colours Camelyon16's own XML files use: annotation outline and the tumor (_0/_1) / exclusion (_2) groups.
ANNOTATION_COLOR = "#F4FA58"
GROUP_COLORS = {"_0": "#FF0000", "_1": "#FF0000", "_2": "#00FF00"}


def downsample2(rgb: np.ndarray) -> np.ndarray:
    """(H, W, C) uint8 -> (H // 2, W // 2, C) uint8 by 2x2 box averaging (odd last row/col dropped)."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    x = rgb[:h, :w].astype(np.uint16)
    s = x[0::2, 0::2] + x[1::2, 0::2] + x[0::2, 1::2] + x[1::2, 1::2]
    return ((s + 2) // 4).astype(np.uint8)


def write_pyramidal_tiff(path: str | os.PathLike, rgb: np.ndarray, levels: int = 3, tile: int = 256,
                         mpp: float | None = 0.5, compression: str = "zlib") -> Path:
    """Write an RGB image as a tiled pyramidal TIFF that `openslide.OpenSlide` opens (generic-TIFF driver).

    Args:
        path: output file (written atomically: a temp file renamed at the end).
        rgb: (H, W, 3) uint8 level-0 pixels.
        levels: number of pyramid levels, each half the size of the one before (level 0 = `rgb`).
            Levels whose width or height would fall below 1 px raise a ValueError.
        tile: tile edge in px (a multiple of 16, as TIFF requires).
        mpp: micrometres per level-0 pixel, stored as XResolution/YResolution in px/cm
            (OpenSlide reports it as `openslide.mpp-x`/`-y`); None writes no resolution.
        compression: "zlib" (deflate, Adobe) or "none"; both read by OpenSlide/libtiff
            without extra codecs here.

    Returns:
        `Path(path)`.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"write_pyramidal_tiff({path}): expected (H, W, 3) uint8 RGB, got shape {rgb.shape} "
                         f"dtype {rgb.dtype}")
    if levels < 1:
        raise ValueError(f"write_pyramidal_tiff({path}): levels must be >= 1, got {levels}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"write_pyramidal_tiff({path}): tile must be a positive multiple of 16, got {tile}")
    if min(rgb.shape[:2]) >> (levels - 1) < 1:
        raise ValueError(f"write_pyramidal_tiff({path}): image {rgb.shape[1]}x{rgb.shape[0]} is too small for "
                         f"{levels} levels; use fewer levels")
    if compression not in ("zlib", "none"):
        raise ValueError(f"write_pyramidal_tiff({path}): compression must be 'zlib' or 'none', got {compression!r}")
    path = Path(path)
    kw: dict = dict(photometric="rgb", planarconfig="contig", tile=(tile, tile), metadata=None,
                    compression=None if compression == "none" else "zlib")
    if compression == "zlib":
        kw["compressionargs"] = {"level": 1}  # fast; demo slides compress well anyway
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tw:
        level = rgb
        for i in range(levels):
            res = {}
            if mpp is not None:
                ppcm = 1e4 / (mpp * 2**i)  # pixels per centimetre at this level
                res = dict(resolution=(ppcm, ppcm), resolutionunit="CENTIMETER")
            # Every level is a top-level IFD, the layout OpenSlide's generic-TIFF driver expects;
            # levels after the first are flagged as reduced-resolution images (NewSubfileType = 1).
            tw.write(level, subfiletype=0 if i == 0 else 1, **res, **kw)
            if i + 1 < levels:
                level = downsample2(level)
    return path


def write_asap_xml(path: str | os.PathLike, polygons: list[np.ndarray], groups: list[str] | None = None) -> Path:
    """Write polygons as ASAP XML, the annotation format of Camelyon16.

    Args:
        path: output .xml file (written atomically).
        polygons: list of (K, 2) float arrays of level-0 pixel coordinates (x, y), K >= 3.
        groups: one group name per polygon ("_0"/"_1" tumor, "_2" exclusion, as in Camelyon16);
            default "_0" for all.

    Returns:
        `Path(path)`. Same input -> byte-identical file.
    """
    groups = ["_0"] * len(polygons) if groups is None else list(groups)
    if len(groups) != len(polygons):
        raise ValueError(f"write_asap_xml({path}): {len(polygons)} polygons but {len(groups)} group names")
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    for i, (poly, g) in enumerate(zip(polygons, groups, strict=True)):
        poly = np.asarray(poly, dtype=np.float64)
        if poly.ndim != 2 or poly.shape[1] != 2 or len(poly) < 3:
            raise ValueError(f"write_asap_xml({path}): polygon {i} must be a (K>=3, 2) array of x, y; "
                             f"got shape {poly.shape}")
        a = ET.SubElement(anns, "Annotation", {"Name": f"Annotation {i}", "Type": "Polygon",
                                                "PartOfGroup": g, "Color": ANNOTATION_COLOR})
        coords = ET.SubElement(a, "Coordinates")
        for k, (x, y) in enumerate(poly):
            ET.SubElement(coords, "Coordinate", {"Order": str(k), "X": repr(float(x)), "Y": repr(float(y))})
    gr = ET.SubElement(root, "AnnotationGroups")
    for g in dict.fromkeys(groups):  # unique, in first-use order
        e = ET.SubElement(gr, "Group", {"Name": g, "PartOfGroup": "None", "Color": GROUP_COLORS.get(g, "#FF0000")})
        ET.SubElement(e, "Attributes")
    ET.indent(root, space="\t")
    path = Path(path)
    with atomic_path(path) as tmp:
        ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
    return path


def read_asap_xml(path: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """Read ASAP XML -> list of (group name, (K, 2) float64 x, y level-0 coordinates), in file order."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not valid ASAP XML ({e})") from e
    out = []
    for a in root.iter("Annotation"):
        pts = sorted(a.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
        xy = np.array([[float(c.get("X")), float(c.get("Y"))] for c in pts], dtype=np.float64).reshape(-1, 2)
        out.append((a.get("PartOfGroup", "_0"), xy))
    return out
