"""ASAP XML annotations (the Camelyon16 format): parsing with positions, and rasterisation.

Camelyon16 groups: `_0` and `_1` are tumor, `_2` marks exclusion regions (normal tissue inside or
next to tumor outlines) that are subtracted from tumor. Coordinates are level-0 pixels (x, y).

    <ASAP_Annotations><Annotations>
      <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0">
        <Coordinates><Coordinate Order="0" X="123.4" Y="567.8"/> ...
"""

from __future__ import annotations

import os
import warnings
import xml.parsers.expat
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TUMOR_GROUPS = ("_0", "_1", "tumor", "metastases")
EXCLUSION_GROUPS = ("_2", "exclusion", "exception", "none")
POLYGON_TYPES = ("polygon", "spline", "rectangle")


class AnnotationError(ValueError):
    """Malformed, empty or inconsistent annotation file; the message names the file and position."""


@dataclass
class Annotation:
    """One outline. `coords`: (K, 2) float64 level-0 (x, y); `role`: "tumor", "exclusion" or "other"."""

    name: str
    group: str
    role: str
    coords: np.ndarray
    line: int = 0

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in level-0 pixels."""
        return (*self.coords.min(0), *self.coords.max(0))


@dataclass
class SlideAnnotations:
    """All outlines of one slide, split by role, with fast bounding-box rejection."""

    path: str
    annotations: list[Annotation] = field(default_factory=list)

    @property
    def tumor(self) -> list[Annotation]:
        return [a for a in self.annotations if a.role == "tumor"]

    @property
    def exclusion(self) -> list[Annotation]:
        return [a for a in self.annotations if a.role == "exclusion"]

    def __len__(self) -> int:
        return len(self.annotations)


def _role(group: str, tumor_groups, exclusion_groups) -> str:
    g = group.strip().lower()
    if g in {t.lower() for t in tumor_groups}:
        return "tumor"
    if g in {e.lower() for e in exclusion_groups}:
        return "exclusion"
    return "other"


def parse_asap_xml(path: str | os.PathLike, tumor_groups=TUMOR_GROUPS,
                   exclusion_groups=EXCLUSION_GROUPS) -> SlideAnnotations:
    """Parse an ASAP XML file.

    Raises:
        AnnotationError: empty or malformed XML, or a bad coordinate (message: file, line, column).
    Warns:
        when the file holds no annotation, for point annotations (skipped) and for groups that are
        neither tumor nor exclusion (kept with role "other", ignored for labels).
    """
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise AnnotationError(f"{path}: line 1, column 0: annotation file is empty; expected ASAP XML "
                              f"(<ASAP_Annotations><Annotations><Annotation ...>)")
    parser = xml.parsers.expat.ParserCreate()
    anns: list[dict] = []
    state: dict = {"root": None, "cur": None}

    def pos() -> str:
        return f"line {parser.CurrentLineNumber}, column {parser.CurrentColumnNumber}"

    def start(tag: str, attrs: dict) -> None:
        if state["root"] is None:
            state["root"] = tag
            if tag != "ASAP_Annotations":
                raise AnnotationError(f"{path}: {pos()}: root element is <{tag}>; expected <ASAP_Annotations>")
        if tag == "Annotation":
            state["cur"] = {"name": attrs.get("Name", f"Annotation {len(anns)}"),
                            "group": attrs.get("PartOfGroup", "_0"), "type": attrs.get("Type", "Polygon"),
                            "line": parser.CurrentLineNumber, "pts": []}
            anns.append(state["cur"])
        elif tag == "Coordinate":
            if state["cur"] is None:
                raise AnnotationError(f"{path}: {pos()}: <Coordinate> outside an <Annotation>")
            try:
                order = int(float(attrs.get("Order", len(state["cur"]["pts"]))))
                x, y = float(attrs["X"].replace(",", ".")), float(attrs["Y"].replace(",", "."))
            except (KeyError, ValueError) as e:
                raise AnnotationError(f"{path}: {pos()}: bad <Coordinate {attrs}> in annotation "
                                      f"{state['cur']['name']!r}; expected numeric X, Y and Order ({e})") from e
            if not (np.isfinite(x) and np.isfinite(y)):
                raise AnnotationError(f"{path}: {pos()}: non-finite coordinate X={x}, Y={y}")
            state["cur"]["pts"].append((order, x, y))

    def end(tag: str) -> None:
        if tag == "Annotation":
            state["cur"] = None

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        parser.Parse(data, True)
    except xml.parsers.expat.ExpatError as e:
        raise AnnotationError(f"{path}: line {e.lineno}, column {e.offset}: malformed XML "
                              f"({xml.parsers.expat.ErrorString(e.code)})") from e
    out = SlideAnnotations(str(path))
    for a in anns:
        kind = a["type"].lower()
        if kind not in POLYGON_TYPES:
            warnings.warn(f"{path}: line {a['line']}: annotation {a['name']!r} of type {a['type']} is not an "
                          f"area; skipped", stacklevel=2)
            continue
        if len(a["pts"]) < 3:
            raise AnnotationError(f"{path}: line {a['line']}: annotation {a['name']!r} has {len(a['pts'])} "
                                  f"coordinate(s); a polygon needs at least 3")
        pts = sorted(a["pts"])
        coords = np.array([(x, y) for _, x, y in pts], dtype=np.float64)
        role = _role(a["group"], tumor_groups, exclusion_groups)
        if role == "other":
            warnings.warn(f"{path}: line {a['line']}: annotation {a['name']!r} is in group {a['group']!r}, "
                          f"neither tumor {list(tumor_groups)} nor exclusion {list(exclusion_groups)}; "
                          f"it is ignored for labels", stacklevel=2)
        out.annotations.append(Annotation(a["name"], a["group"], role, coords, a["line"]))
    if not out.annotations:
        warnings.warn(f"{path}: no polygon annotations found; every patch of this slide will be normal",
                      stacklevel=2)
    return out


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def match_annotations(folder: str | os.PathLike | None, slide_names: list[str]) -> list[str | None]:
    """`<folder>/<slide name>.xml` for each slide, or None where absent (that slide's patches are all normal).

    Slides without an XML are normal in Camelyon16, so one missing file is no error; but a folder
    matching no slide at all is almost always the wrong folder or naming scheme, and would label
    every patch normal without a word: that warns (one line: the folder, what it looked for, what it holds).

    Raises:
        FileNotFoundError / NotADirectoryError: `folder` is given but is not an existing folder.
    """
    if folder is None:
        return [None] * len(slide_names)
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"--annotations {folder} does not exist; pass the folder of <slide>.xml files")
    if not folder.is_dir():
        raise NotADirectoryError(f"--annotations {folder} is not a folder; pass the folder of <slide>.xml files")
    found = [str(folder / f"{n}.xml") if (folder / f"{n}.xml").is_file() else None for n in slide_names]
    if slide_names and not any(found):
        held = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".xml")
        warnings.warn(f"annotations folder {folder} has no XML for any of the {len(slide_names)} slide(s): looked "
                      f"for {_few([n + '.xml' for n in slide_names])}, it holds "
                      f"{_few(held) if held else 'no .xml files'}; every patch will be labelled normal (0)",
                      stacklevel=2)
    return found


def check_within_slide(ann: SlideAnnotations, width: int, height: int, slide_name: str = "") -> list[str]:
    """Warn (and return the messages) for outlines partly or wholly outside the level-0 slide area."""
    msgs = []
    for a in ann.annotations:
        x0, y0, x1, y1 = a.bbox
        where = f"{ann.path}: line {a.line}: annotation {a.name!r} ({a.group})"
        if x1 < 0 or y1 < 0 or x0 > width or y0 > height:
            msgs.append(f"{where} lies entirely outside slide {slide_name} ({width}x{height} px at level 0); "
                        f"bbox x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}")
        elif x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            msgs.append(f"{where} extends beyond slide {slide_name} ({width}x{height} px at level 0); "
                        f"bbox x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}; clipped")
    for m in msgs:
        warnings.warn(m, stacklevel=2)
    return msgs


def _overlaps(a: Annotation, x0: float, y0: float, x1: float, y1: float) -> bool:
    bx0, by0, bx1, by1 = a.bbox
    return bx0 < x1 and bx1 > x0 and by0 < y1 and by1 > y0


def fill_polygon(mask: np.ndarray, pts: np.ndarray, value: int = 1) -> np.ndarray:
    """Set `mask[i, j] = value` where pixel centre (j + 0.5, i + 0.5) lies inside polygon `pts` (K, 2) x, y.

    Even-odd rule, scanline per row: exact centre sampling, so adjacent polygons sharing an edge
    never both claim a pixel (PIL's polygon fill includes the boundary on both sides).
    """
    h, w = mask.shape
    p0 = np.asarray(pts, dtype=np.float64)
    p1 = np.roll(p0, -1, axis=0)
    keep = p0[:, 1] != p1[:, 1]
    p0, p1 = p0[keep], p1[keep]
    if not len(p0):
        return mask
    ylo, yhi = np.minimum(p0[:, 1], p1[:, 1]), np.maximum(p0[:, 1], p1[:, 1])
    r0 = max(0, int(np.floor(ylo.min() - 0.5)))
    r1 = min(h, int(np.ceil(yhi.max() - 0.5)) + 1)
    slope = (p1[:, 0] - p0[:, 0]) / (p1[:, 1] - p0[:, 1])
    for i in range(r0, r1):
        yc = i + 0.5
        on = (ylo <= yc) & (yc < yhi)
        if not on.any():
            continue
        xs = np.sort(p0[on, 0] + (yc - p0[on, 1]) * slope[on])
        cols = np.ceil(xs - 0.5).astype(np.int64).clip(0, w)  # first column whose centre is >= x
        for a, b in zip(cols[0::2], cols[1::2], strict=False):
            if b > a:
                mask[i, a:b] = value
    return mask


def rasterize(ann: SlideAnnotations | list[Annotation], origin: tuple[float, float], size: tuple[int, int],
              downsample: float = 1.0) -> np.ndarray:
    """Tumor mask of a window: uint8 (h, w), 1 inside tumor outlines and not inside exclusion ones.

    Args:
        origin: level-0 (x, y) of the window's top-left corner.
        size: (w, h) of the output mask in pixels.
        downsample: level-0 pixels per mask pixel.
    Pixel (i, j) covers level-0 x in [ox + j*ds, ox + (j+1)*ds) and is inside when its centre is.
    """
    anns = ann.annotations if isinstance(ann, SlideAnnotations) else ann
    w, h = int(size[0]), int(size[1])
    ox, oy = origin
    x1, y1 = ox + w * downsample, oy + h * downsample
    tum = [a for a in anns if a.role == "tumor" and _overlaps(a, ox, oy, x1, y1)]
    if not tum:
        return np.zeros((h, w), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for role, value in (("tumor", 1), ("exclusion", 0)):
        for a in anns:
            if a.role == role and _overlaps(a, ox, oy, x1, y1):
                fill_polygon(mask, (a.coords - (ox, oy)) / downsample, value)
    return mask


def region_fraction(ann: SlideAnnotations, x: float, y: float, w: float, h: float, grid: int = 16) -> float:
    """Fraction of the level-0 rectangle (x, y, w, h) inside tumor, sampled on a `grid` x `grid` lattice."""
    if not any(a.role == "tumor" and _overlaps(a, x, y, x + w, y + h) for a in ann.annotations):
        return 0.0
    ds = w / grid
    m = rasterize(ann, (x, y), (grid, max(1, round(h / ds))), downsample=ds)
    return float(m.mean())
