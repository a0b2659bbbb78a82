"""ASAP XML parsing (with error positions) and polygon rasterisation."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.annotations import (
    Annotation,
    AnnotationError,
    SlideAnnotations,
    check_within_slide,
    fill_polygon,
    parse_asap_xml,
    rasterize,
    region_fraction,
)
from pretrain.demo.formats import write_asap_xml

XML = """<?xml version="1.0"?>
<ASAP_Annotations>
  <Annotations>
    <Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="_0" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="2" X="20" Y="20" />
        <Coordinate Order="0" X="10" Y="10" />
        <Coordinate Order="1" X="20" Y="10" />
        <Coordinate Order="3" X="10" Y="20" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="12" Y="12" /><Coordinate Order="1" X="14" Y="12" />
        <Coordinate Order="2" X="14" Y="14" /><Coordinate Order="3" X="12" Y="14" />
      </Coordinates>
    </Annotation>
    <Annotation Name="Annotation 2" Type="Spline" PartOfGroup="_1" Color="#F4FA58">
      <Coordinates>
        <Coordinate Order="0" X="1e2" Y="100" /><Coordinate Order="1" X="110" Y="100" />
        <Coordinate Order="2" X="110" Y="110" />
      </Coordinates>
    </Annotation>
  </Annotations>
  <AnnotationGroups><Group Name="_0" PartOfGroup="None" Color="#ff0000"><Attributes /></Group></AnnotationGroups>
</ASAP_Annotations>
"""


def square(x0, y0, x1, y1, role="tumor"):
    return Annotation("sq", "_0" if role == "tumor" else "_2", role,
                      np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float))


def test_parse_groups_and_order(tmp_path):
    p = tmp_path / "a.xml"
    p.write_text(XML)
    ann = parse_asap_xml(p)
    assert [a.role for a in ann.annotations] == ["tumor", "exclusion", "tumor"]
    np.testing.assert_array_equal(ann.annotations[0].coords, [[10, 10], [20, 10], [20, 20], [10, 20]])
    assert ann.annotations[0].line == 4 and ann.annotations[2].coords[0, 0] == 100
    assert len(ann.tumor) == 2 and len(ann.exclusion) == 1
    assert ann.annotations[0].bbox == (10, 10, 20, 20)


def test_parse_demo_writer_output(tmp_path):
    polys = [np.array([[0, 0], [5, 0], [5, 5]], float), np.array([[1, 1], [2, 1], [2, 2]], float)]
    p = write_asap_xml(tmp_path / "d.xml", polys, groups=["_1", "_2"])
    ann = parse_asap_xml(p)
    assert [a.role for a in ann.annotations] == ["tumor", "exclusion"]
    np.testing.assert_allclose(ann.annotations[0].coords, polys[0])


@pytest.mark.parametrize("text, where", [
    ("", "line 1, column 0"),
    ("   \n", "line 1, column 0"),
    ("<ASAP_Annotations>\n<Annotations>\n<Annotation Name='a'>\n</Annotations>", "line 4, column 2"),
    ("<ASAP_Annotations><Annotations>", "line 1, column 31"),
])
def test_malformed_or_empty_xml_names_file_and_position(tmp_path, text, where):
    p = tmp_path / "bad.xml"
    p.write_text(text)
    with pytest.raises(AnnotationError, match=f"bad.xml: {where}"):
        parse_asap_xml(p)


def test_bad_content_errors(tmp_path):
    p = tmp_path / "b.xml"
    p.write_text("<Other/>")
    with pytest.raises(AnnotationError, match="root element is <Other>"):
        parse_asap_xml(p)
    p.write_text('<ASAP_Annotations><Annotations><Annotation Name="z">\n<Coordinates>'
                 '<Coordinate Order="0" X="abc" Y="1"/></Coordinates></Annotation></Annotations></ASAP_Annotations>')
    with pytest.raises(AnnotationError, match=r"b.xml: line 2, column \d+: bad <Coordinate.*'z'"):
        parse_asap_xml(p)
    p.write_text('<ASAP_Annotations><Annotations><Annotation Name="two"><Coordinates>'
                 '<Coordinate Order="0" X="1" Y="1"/><Coordinate Order="1" X="2" Y="1"/></Coordinates>'
                 '</Annotation></Annotations></ASAP_Annotations>')
    with pytest.raises(AnnotationError, match="'two' has 2 coordinate"):
        parse_asap_xml(p)


def test_warnings_for_no_annotations_points_and_unknown_groups(tmp_path):
    p = tmp_path / "w.xml"
    p.write_text("<ASAP_Annotations><Annotations/></ASAP_Annotations>")
    with pytest.warns(UserWarning, match="no polygon annotations"):
        assert len(parse_asap_xml(p)) == 0
    p.write_text('<ASAP_Annotations><Annotations>'
                 '<Annotation Name="d" Type="Dot" PartOfGroup="_0"><Coordinates><Coordinate Order="0" X="1" Y="1"/>'
                 '</Coordinates></Annotation>'
                 '<Annotation Name="m" Type="Polygon" PartOfGroup="Mystery"><Coordinates>'
                 '<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="4" Y="0"/>'
                 '<Coordinate Order="2" X="4" Y="4"/></Coordinates></Annotation></Annotations></ASAP_Annotations>')
    with pytest.warns(UserWarning) as rec:
        ann = parse_asap_xml(p)
    msgs = " ".join(str(r.message) for r in rec)
    assert "type Dot is not an area" in msgs and "group 'Mystery'" in msgs
    assert [a.role for a in ann.annotations] == ["other"]


def test_annotations_outside_slide_warn():
    ann = SlideAnnotations("s.xml", [square(10, 10, 20, 20), square(90, 90, 120, 120), square(500, 500, 600, 600)])
    with pytest.warns(UserWarning) as rec:
        msgs = check_within_slide(ann, 100, 100, "s.tif")
    assert len(msgs) == 2 and "extends beyond" in msgs[0] and "entirely outside" in msgs[1]
    assert len(rec) == 2


def test_rasterize_square_exact_pixel_centres():
    m = rasterize([square(10, 10, 20, 20)], (0, 0), (30, 30))
    ys, xs = np.nonzero(m)
    assert m.sum() == 100 and xs.min() == 10 and xs.max() == 19 and ys.min() == 10 and ys.max() == 19
    # two squares sharing an edge never both claim a pixel
    left = rasterize([square(0, 0, 10, 10)], (0, 0), (20, 10))
    right = rasterize([square(10, 0, 20, 10)], (0, 0), (20, 10))
    assert (left & right).sum() == 0 and (left | right).sum() == 200


def test_rasterize_offset_downsample_exclusion_and_area():
    m = rasterize([square(100, 100, 200, 200)], (100, 100), (10, 10), downsample=10)
    assert m.sum() == 100
    m = rasterize([square(0, 0, 100, 100), square(25, 25, 75, 75, role="exclusion")], (0, 0), (100, 100))
    assert m.sum() == 100 * 100 - 50 * 50 and m[50, 50] == 0 and m[10, 10] == 1
    th = np.linspace(0, 2 * np.pi, 400, endpoint=False)
    disc = Annotation("c", "_0", "tumor", np.c_[50 + 40 * np.cos(th), 50 + 40 * np.sin(th)])
    assert abs(rasterize([disc], (0, 0), (100, 100)).sum() / (np.pi * 40**2) - 1) < 0.01
    assert rasterize([square(0, 0, 5, 5)], (50, 50), (4, 4)).sum() == 0  # no overlap: all zero


def test_fill_polygon_concave_even_odd():
    m = np.zeros((10, 10), np.uint8)
    u = np.array([[0, 0], [10, 0], [10, 10], [7, 10], [7, 3], [3, 3], [3, 10], [0, 10]], float)
    fill_polygon(m, u)
    assert m[1, 5] == 1 and m[5, 5] == 0 and m[5, 1] == 1 and m[5, 8] == 1


def test_region_fraction():
    ann = SlideAnnotations("x", [square(0, 0, 50, 100)])
    assert region_fraction(ann, 0, 0, 100, 100) == pytest.approx(0.5)
    assert region_fraction(ann, 200, 200, 10, 10) == 0.0
