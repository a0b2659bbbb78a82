"""The demo data generator: real on-disk formats, class imbalance, determinism, learnability, tumor contrast."""

from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

import numpy as np
import openslide
import pytest
from matplotlib.path import Path as MplPath
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pretrain.demo import CLASSES, DemoSpec, ensure_demo_data, generate_demo_data
from pretrain.demo.formats import downsample2, read_asap_xml, write_asap_xml, write_pyramidal_tiff
from pretrain.demo.wbc import DEFAULT_COUNTS, render_wbc

TINY = DemoSpec(wbc_size=48, wbc_counts={c: 2 for c in CLASSES}, prcc_count=2, prcc_size=96, slide_count=1,
                slide_width=512, slide_height=384, slide_tile=128)


def _manifest(root):
    return json.loads((root / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------- formats


def test_pyramidal_tiff_round_trip_through_openslide(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (300, 520, 3), dtype=np.uint8)
    p = write_pyramidal_tiff(tmp_path / "s.tif", rgb, levels=3, tile=64, mpp=0.25)
    with openslide.OpenSlide(p) as s:
        assert s.level_count == 3 and s.dimensions == (520, 300)
        assert [round(d) for d in s.level_downsamples] == [1, 2, 4]
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        expect = rgb
        for level in range(3):
            h, w = expect.shape[:2]
            got = np.asarray(s.read_region((0, 0), level, (w, h)).convert("RGB"))
            np.testing.assert_array_equal(got, expect)
            expect = downsample2(expect)
    p2 = write_pyramidal_tiff(tmp_path / "n.tif", rgb, levels=2, tile=64, mpp=None, compression="none")
    with openslide.OpenSlide(p2) as s:
        assert "openslide.mpp-x" not in s.properties


@pytest.mark.parametrize("kwargs, match", [
    (dict(rgb=np.zeros((64, 64), np.uint8)), "uint8 RGB"),
    (dict(rgb=np.zeros((64, 64, 3), np.float32)), "uint8 RGB"),
    (dict(rgb=np.zeros((8, 8, 3), np.uint8), levels=5), "too small"),
    (dict(rgb=np.zeros((64, 64, 3), np.uint8), tile=100), "multiple of 16"),
    (dict(rgb=np.zeros((64, 64, 3), np.uint8), compression="lzma"), "compression"),
])
def test_pyramidal_tiff_rejects_bad_input(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        write_pyramidal_tiff(tmp_path / "bad.tif", **kwargs)
    assert not list(tmp_path.iterdir())


def test_asap_xml_is_camelyon_style(tmp_path):
    polys = [np.array([[10.5, 20.25], [30, 20], [25, 40.75]]), np.array([[0, 0], [5, 0], [5, 5], [0, 5]])]
    p = write_asap_xml(tmp_path / "a.xml", polys, groups=["_0", "_2"])
    root = ET.parse(p).getroot()
    assert root.tag == "ASAP_Annotations"
    anns = root.findall("./Annotations/Annotation")
    assert [a.get("Name") for a in anns] == ["Annotation 0", "Annotation 1"]
    assert [a.get("PartOfGroup") for a in anns] == ["_0", "_2"] and anns[0].get("Type") == "Polygon"
    c = anns[0].findall("./Coordinates/Coordinate")
    assert (c[0].get("Order"), float(c[0].get("X")), float(c[0].get("Y"))) == ("0", 10.5, 20.25)
    groups = root.findall("./AnnotationGroups/Group")
    assert [g.get("Name") for g in groups] == ["_0", "_2"] and groups[0].find("Attributes") is not None
    back = read_asap_xml(p)
    assert [g for g, _ in back] == ["_0", "_2"]
    np.testing.assert_allclose(back[0][1], polys[0])
    with pytest.raises(ValueError, match="group names"):
        write_asap_xml(tmp_path / "b.xml", polys, groups=["_0"])
    with pytest.raises(ValueError, match="polygon 0"):
        write_asap_xml(tmp_path / "c.xml", [np.zeros((2, 2))])


# ------------------------------------------------------------------------------------------ demo set


def test_demo_set_files_decode(demo_root):
    m = _manifest(demo_root)
    assert m["seed"] == 0 and m["small"] is True
    size = m["wbc"]["size"]
    for cls in CLASSES:
        files = sorted((demo_root / "wbc" / cls).glob("*.jpg"))
        assert len(files) == m["counts"]["wbc"][cls] > 0
        with Image.open(files[0]) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (size, size)
    pngs = sorted((demo_root / "prcc").glob("region_*.png"))
    assert len(pngs) == m["counts"]["prcc"] > 0
    for p in pngs:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size == (m["prcc"]["size"],) * 2
            a = np.asarray(im.convert("RGB"))
        assert a.std() > 10  # tissue, not a flat image


def test_demo_slides_open_with_openslide(demo_root):
    m = _manifest(demo_root)
    infos = m["cam16"]["slides_info"]
    assert len(infos) == m["counts"]["cam16_slides"] >= 2
    for info in infos:
        with openslide.OpenSlide(demo_root / "cam16" / info["slide"]) as s:
            assert s.level_count >= 3 and s.dimensions == (info["width"], info["height"])
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
            for level in range(s.level_count):
                w, h = s.level_dimensions[level]
                region = np.asarray(s.read_region((0, 0), level, (min(w, 200), min(h, 200))).convert("RGB"))
                assert region.shape == (min(h, 200), min(w, 200), 3)
            thumb = np.asarray(s.read_region((0, 0), s.level_count - 1, s.level_dimensions[-1]).convert("RGB"))
            tissue = thumb.mean(2) < 225
            assert 0.2 < tissue.mean() < 0.7, tissue.mean()  # tissue blobs on white glass
        root = ET.parse(demo_root / "cam16" / info["annotation"]).getroot()
        anns = root.findall("./Annotations/Annotation")
        assert 1 <= len(anns) <= 3 and all(a.get("PartOfGroup") == "_0" for a in anns)
        assert [g.get("Name") for g in root.findall("./AnnotationGroups/Group")] == ["_0"]
        for (_, xy), truth in zip(read_asap_xml(demo_root / "cam16" / info["annotation"]), info["tumor_polygons"],
                                  strict=True):
            assert len(xy) >= 3
            np.testing.assert_allclose(xy, np.asarray(truth))


def test_class_folders_and_imbalance(demo_root):
    assert sorted(p.name for p in (demo_root / "wbc").iterdir()) == sorted(CLASSES)
    for counts in (_manifest(demo_root)["counts"]["wbc"], DEFAULT_COUNTS):
        assert max(counts, key=counts.get) == "neutrophil" and min(counts, key=counts.get) == "basophil"
        assert counts["neutrophil"] > counts["eosinophil"] > counts["monocyte"] >= counts["lymphocyte"] \
            > counts["basophil"]
    assert 700 <= sum(DEFAULT_COUNTS.values()) <= 900


def test_same_seed_same_data_other_seed_differs(tmp_path):
    a = generate_demo_data(tmp_path / "a", seed=3, spec=TINY)
    b = generate_demo_data(tmp_path / "b", seed=3, spec=TINY, workers=2)  # process count must not matter
    c = generate_demo_data(tmp_path / "c", seed=4, spec=TINY)
    files = sorted(p.relative_to(a["root"]) for p in a["root"].rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b["root"]) for p in b["root"].rglob("*") if p.is_file())
    assert len(files) == 10 + 2 + 1 + 1 + 1
    for rel in files:
        fa, fb, fc = a["root"] / rel, b["root"] / rel, c["root"] / rel
        if rel.suffix in (".png", ".xml", ".json"):
            assert fa.read_bytes() == fb.read_bytes(), rel
        else:  # JPEG and TIFF: compare decoded pixels
            with Image.open(fa) as ia, Image.open(fb) as ib:
                np.testing.assert_array_equal(np.asarray(ia), np.asarray(ib))
        if rel.suffix in (".png", ".jpg"):
            with Image.open(fa) as ia, Image.open(fc) as ic:
                assert not np.array_equal(np.asarray(ia), np.asarray(ic)), rel


def test_ensure_demo_data_skips_forces_and_protects(tmp_path, capsys):
    out = tmp_path / "demo"
    paths, generated = ensure_demo_data(out, seed=1, spec=TINY)
    assert generated and paths["manifest"].is_file()
    stamp = paths["manifest"].stat().st_mtime_ns
    assert ensure_demo_data(out, seed=1, spec=TINY) == (paths, False)
    assert paths["manifest"].stat().st_mtime_ns == stamp
    assert ensure_demo_data(out, seed=2, spec=TINY)[1]  # other seed: regenerated in place
    assert _manifest(out)["seed"] == 2
    assert ensure_demo_data(out, seed=2, spec=TINY, force=True)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp/old folders left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("not demo data")
    with pytest.raises(FileExistsError, match="--force"):
        ensure_demo_data(other, seed=0, spec=TINY)
    assert (other / "keep.txt").read_text() == "not demo data"


def test_script_skips_second_run(tmp_path, capsys, monkeypatch):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
    spec = importlib.util.spec_from_file_location("make_demo_data", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr("pretrain.demo.generate.DemoSpec.small", classmethod(lambda cls: dataclasses.replace(TINY)))
    out = tmp_path / "d"
    mod.main(["--out", str(out), "--seed", "5", "--small", "--wbc-size", "48"])
    assert "wrote demo data" in capsys.readouterr().out
    mod.main(["--out", str(out), "--seed", "5", "--small", "--wbc-size", "48"])
    assert "already describes" in capsys.readouterr().out
    assert _manifest(out)["seed"] == 5


# ------------------------------------------------------------------------------------ learnability


def _wbc_features(rgb: np.ndarray) -> np.ndarray:
    """Colour and size features of the central disc: dark (nucleus), orange (eosinophil granules), blue area."""
    a = rgb.astype(np.float32) / 255
    s = a.shape[0]
    yy, xx = np.mgrid[0:s, 0:s]
    r = np.hypot(yy - s / 2 + 0.5, xx - s / 2 + 0.5) / (s / 2)
    c = a[r < 0.6]
    red, green, blue = c[:, 0], c[:, 1], c[:, 2]
    dark = c.mean(1) < 0.42
    f = [dark.mean(), ((red - blue > 0.2) & (green < 0.65)).mean(), ((blue - red > 0.08) & ~dark).mean(),
         *c.mean(0), c.std(0).mean()]
    f += [((a.mean(2) < 0.42) & (r < t)).mean() for t in (0.3, 0.45, 0.6)]
    return np.array(f)


def test_wbc_classes_are_learnable_from_simple_features():
    """A logistic regression on 10 colour/size features must beat chance (0.2) by far on held-out images."""
    n, size = 24, 64
    x = np.array([_wbc_features(render_wbc(c, np.random.default_rng([99, k, i]), size))
                  for k, c in enumerate(CLASSES) for i in range(n)])
    y = np.repeat(np.arange(len(CLASSES)), n)
    train = np.arange(len(y)) % 2 == 0
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[train], y[train])
    acc = (clf.predict(x[~train]) == y[~train]).mean()
    assert acc >= 0.6, acc
    per_class = [(clf.predict(x[~train & (y == k)]) == k).mean() for k in range(len(CLASSES))]
    assert min(per_class) >= 0.4, dict(zip(CLASSES, per_class, strict=True))


def test_tumor_patches_differ_from_normal_tissue(demo_root):
    """64-px level-0 patches centred inside tumor polygons hold far more dark nuclear pixels than normal tissue."""
    size = 64
    for info in _manifest(demo_root)["cam16"]["slides_info"]:
        with openslide.OpenSlide(demo_root / "cam16" / info["slide"]) as s:
            w, h = s.dimensions
            img = np.asarray(s.read_region((0, 0), 0, (w, h)).convert("RGB")).astype(np.float32)
        grey = img.mean(2)
        ys, xs = np.mgrid[0:h - size + 1:size, 0:w - size + 1:size]
        ys, xs = ys.ravel(), xs.ravel()
        centres = np.stack([xs + size / 2, ys + size / 2], 1)
        tumor = np.zeros(len(centres), bool)
        for poly in info["tumor_polygons"]:
            tumor |= MplPath(np.asarray(poly)).contains_points(centres)
        dark = np.array([(grey[y:y + size, x:x + size] < 120).mean() for y, x in zip(ys, xs, strict=True)])
        tissue = np.array([(grey[y:y + size, x:x + size] < 225).mean() for y, x in zip(ys, xs, strict=True)])
        normal = ~tumor & (tissue > 0.9)
        assert tumor.sum() >= 3 and normal.sum() >= 3, (info["name"], tumor.sum(), normal.sum())
        assert dark[tumor].mean() > dark[normal].mean() + 0.2, (info["name"], dark[tumor].mean(), dark[normal].mean())
        # a single threshold separates them almost perfectly
        thr = (np.median(dark[tumor]) + np.median(dark[normal])) / 2
        acc = ((dark[tumor] > thr).sum() + (dark[normal] <= thr).sum()) / (tumor.sum() + normal.sum())
        assert acc >= 0.9, (info["name"], acc)
