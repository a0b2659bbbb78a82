"""Tissue masking, grid + labels, the HDF5 store, multi-slide extraction and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from matplotlib.path import Path as MplPath
from wsi_fakes import GLASS, PINK, TUMOR_BOX, write_fake_slide

from pretrain.extract import ExtractConfig, extract_slide, iter_tissue_tiles, plan_slide
from pretrain.extract_job import ExtractionError, extract_patches
from pretrain.patches import open_patch_dataset
from pretrain.tissue import box_fractions, otsu_threshold, saturation, tissue_mask
from pretrain.wsi import SlideError

ROOT = Path(__file__).resolve().parents[1]
CFG = dict(patch_size=64, overlays=False)


def test_tissue_mask_on_synthetic_thumbnail():
    rng = np.random.default_rng(0)
    img = np.full((60, 80, 3), GLASS, np.uint8)
    img[10:40, 20:60] = PINK
    img[12:14, 22:24] = GLASS  # a tiny hole: filled
    img[50, 5] = PINK  # a speck of dust: below the minimum area
    img = np.clip(img + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
    mask, thr = tissue_mask(img, min_area=9)
    truth = np.zeros((60, 80), bool)
    truth[10:40, 20:60] = True
    assert (mask == truth).mean() > 0.99 and not mask[50, 5] and mask[12, 22]
    assert 20 <= thr < saturation(np.array([[PINK]], np.uint8))[0, 0]


def test_blank_thumbnail_has_no_tissue():
    rng = np.random.default_rng(1)
    blank = np.clip(np.full((50, 50, 3), 240) + rng.integers(-6, 7, (50, 50, 3)), 0, 255).astype(np.uint8)
    mask, thr = tissue_mask(blank)
    assert not mask.any() and thr >= 20  # Otsu alone would split the noise in half


def test_otsu_and_box_fractions():
    v = np.r_[np.full(100, 10), np.full(100, 200)].astype(np.uint8)
    assert 10 < otsu_threshold(v) <= 200
    m = np.zeros((10, 10), bool)
    m[:, :5] = True
    np.testing.assert_allclose(box_fractions(m, [[0, 0, 10, 10], [0, 0, 5, 5], [5, 5, 10, 10], [2.5, 0, 7.5, 10]]),
                               [0.5, 1.0, 0.0, 0.5])


def test_grid_labels_and_masks(tmp_path):
    slide, xml = write_fake_slide(tmp_path)
    arrays, summary = extract_slide(slide, xml, ExtractConfig(save_masks=True, **CFG))
    coords, labels = arrays["coords"], arrays["labels"]
    # tissue is x 64..448, y 64..320: a 6 x 4 block of 64 px patches; tumor x, y 128..256 = 4 patches
    assert summary["patches"] == 24 and summary["grid_patches"] == 48 and summary["tumor_patches"] == 4
    tumor_xy = {tuple(c) for c, lab in zip(coords.tolist(), labels, strict=True) if lab}
    assert tumor_xy == {(128, 128), (192, 128), (128, 192), (192, 192)}
    assert arrays["images"].shape == (24, 64, 64, 3) and arrays["images"].dtype == np.uint8
    np.testing.assert_array_equal(arrays["masks"].reshape(24, -1).mean(1), labels)
    # the pixels match the slide: tumor patches are purple (blue > green), normal ones pink
    img = arrays["images"]
    assert (img[labels == 1][..., 2].mean() > 140) and (img[labels == 0][..., 1].mean() > 140)


def test_label_rule_uses_centre_region(tmp_path):
    slide, xml = write_fake_slide(tmp_path)
    # stride 32: patches straddling the tumor edge; label 1 iff >= half the central 32x32 is tumor
    arrays, _ = extract_slide(slide, xml, ExtractConfig(stride=32, tissue_threshold=0.5, **CFG))
    x0, y0, x1, y1 = TUMOR_BOX
    cx, cy = arrays["coords"][:, 0] + 32, arrays["coords"][:, 1] + 32  # patch centres
    ox = np.clip(np.minimum(x1, cx + 16) - np.maximum(x0, cx - 16), 0, None) / 32
    oy = np.clip(np.minimum(y1, cy + 16) - np.maximum(y0, cy - 16), 0, None) / 32
    np.testing.assert_allclose(arrays["tumor"], ox * oy)
    np.testing.assert_array_equal(arrays["labels"].astype(bool), ox * oy >= 0.5)
    assert 0 < arrays["labels"].sum() < (ox * oy > 0).sum()  # edge patches with little tumor stay normal


def test_store_round_trip_and_attrs(tmp_path):
    a, xa = write_fake_slide(tmp_path, "slide_a")
    b, _ = write_fake_slide(tmp_path, "slide_b", annotate=False)
    out = tmp_path / "p.h5"
    summary = extract_patches([a, b], tmp_path / "annotations", out, ExtractConfig(save_masks=True, patch_size=64))
    assert [s["status"] for s in summary] == ["ok", "ok"]
    assert not (tmp_path / "p.h5.tmp").exists()
    with h5py.File(out) as f:
        assert f["images"].chunks == (1, 64, 64, 3) and f["images"].dtype == np.uint8
        assert f["labels"].dtype == np.int8 and f["coords"].dtype == np.int64 and f["slide_index"].dtype == np.int32
        assert f.attrs["format"] == "wbc-fusion-patches" and f.attrs["patch_size"] == 64
        assert f.attrs["level"] == 0 and f.attrs["mpp"] == 0.5 and f.attrs["stride"] == 64  # same for all slides
        assert "tumor" in f.attrs["label_rule"]
        slides = json.loads(f.attrs["slides"])
        assert [s["slide"] for s in slides] == ["slide_a", "slide_b"]
    ds = open_patch_dataset(out)
    assert len(ds) == 48 and ds.labels.sum() == 4  # slide_b has no XML: all normal
    assert set(ds.slide_ids[ds.labels == 1]) == {"slide_a"}
    assert ds[0][0].shape == (64, 64, 3) and ds.read_mask(int(np.argmax(ds.labels))).all()
    assert (tmp_path / "p_overlays" / "slide_a.png").is_file()
    assert summary[0]["annotations"] == str(xa)
    assert json.loads((tmp_path / "p_summary.json").read_text())[1]["slide"] == "slide_b"


def test_bad_slides_do_not_stop_the_others(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_patches_script",
                                                  ROOT / "scripts" / "extract_patches.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    main = script.main
    good, _ = write_fake_slide(tmp_path)
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"\0" * 200)
    out = tmp_path / "p.h5"
    code = main(["--slides", str(good), str(junk), "--out", str(out), "--patch-size", "64", "--overlays", "false"])
    text = capsys.readouterr().out
    assert code == 1 and "1 slide(s) failed" in text and "junk.svs: cannot read slide with OpenSlide" in text
    ds = open_patch_dataset(out)
    assert len(ds) == 24 and set(ds.slide_ids) == {"slide_a"}


def test_slide_without_tissue_gives_zero_patches_and_warning(tmp_path):
    slide, _ = write_fake_slide(tmp_path, "blank", tissue=False, annotate=False)
    with pytest.warns(UserWarning, match="no patch has >= 0.5 tissue"):
        summary = extract_patches([slide], None, tmp_path / "p.h5", ExtractConfig(**CFG))
    assert summary[0]["status"] == "ok" and summary[0]["patches"] == 0
    assert len(open_patch_dataset(tmp_path / "p.h5")) == 0


def test_patch_larger_than_level(tmp_path):
    slide, _ = write_fake_slide(tmp_path)
    with pytest.raises(ValueError, match="needs 1024x1024 px of level 0, which is only 512x384"):
        plan_slide(slide, None, ExtractConfig(patch_size=1024))
    summary = extract_patches([slide], None, tmp_path / "p.h5", ExtractConfig(patch_size=64, level=1, overlays=False))
    assert summary[0]["patches"] > 0 and summary[0]["downsample"] == 2
    before = (tmp_path / "p.h5").read_bytes()
    with pytest.raises(ExtractionError, match="no slide could be extracted, .*p.h5 left as it was: .*only 256x192"):
        extract_patches([slide], None, tmp_path / "p.h5", ExtractConfig(patch_size=256, level=1, overlays=False))
    assert (tmp_path / "p.h5").read_bytes() == before  # never replaced by an empty store


def test_annotation_problems(tmp_path):
    slide, _ = write_fake_slide(tmp_path, annotate=False)
    ann = tmp_path / "annotations"
    ann.mkdir()
    (ann / "slide_a.xml").write_text("<ASAP_Annotations><Annotations>")
    with pytest.raises(ExtractionError, match="slide_a.xml: line 1, column 31: malformed XML") as e:
        extract_patches([slide], ann, tmp_path / "p.h5", ExtractConfig(**CFG))
    assert e.value.summary[0]["status"] == "failed" and not (tmp_path / "p.h5").exists()
    (ann / "slide_a.xml").write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="far" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="5000" Y="5000"/><Coordinate Order="1" X="6000" Y="5000"/>'
        '<Coordinate Order="2" X="6000" Y="6000"/></Coordinates></Annotation></Annotations></ASAP_Annotations>')
    with pytest.warns(UserWarning, match="'far' .* lies entirely outside slide"):
        summary = extract_patches([slide], ann, tmp_path / "p.h5", ExtractConfig(**CFG))
    assert summary[0]["status"] == "ok" and summary[0]["tumor_patches"] == 0


def test_iter_tissue_tiles(tmp_path):
    slide, _ = write_fake_slide(tmp_path)
    tiles = list(iter_tissue_tiles(slide, size=64))
    assert len(tiles) == 24 and tiles[0].shape == (64, 64, 3) and tiles[0].dtype == np.uint8
    shuffled = list(iter_tissue_tiles(slide, size=32, mpp=1.0, shuffle=True, seed=1))  # level 1, 32 px
    assert len(shuffled) == 24 and shuffled[0].shape == (32, 32, 3)


def test_two_workers_match_one(tmp_path):
    a, _ = write_fake_slide(tmp_path, "slide_a")
    b, _ = write_fake_slide(tmp_path, "slide_b")
    bad = tmp_path / "slides" / "slide_c.svs"
    bad.write_bytes(b"junk")
    cfg = ExtractConfig(**CFG)
    s1 = extract_patches([a, b, bad], tmp_path / "annotations", tmp_path / "one.h5", cfg, workers=1)
    s2 = extract_patches([a, b, bad], tmp_path / "annotations", tmp_path / "two.h5", cfg, workers=2)
    assert [s["status"] for s in s2] == ["ok", "ok", "failed"] and "slide_c.svs" in s2[2]["error"]
    assert [s["patches"] for s in s1] == [s["patches"] for s in s2]
    with h5py.File(tmp_path / "one.h5") as f, h5py.File(tmp_path / "two.h5") as g:
        for k in ("images", "labels", "coords", "slide_index"):
            np.testing.assert_array_equal(f[k][:], g[k][:])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp store, no parts


def test_demo_labels_agree_with_generated_tumor_regions(demo_root, tmp_path):
    """>= 95% of patch labels match the true tumor polygons of the demo generator (manifest.json)."""
    manifest = json.loads((demo_root / "manifest.json").read_text())
    cam = manifest["cam16"]
    cfg = ExtractConfig(patch_size=64, overlays=False)
    extract_patches([demo_root / "cam16" / "slides"], demo_root / "cam16" / "annotations", tmp_path / "d.h5", cfg)
    ds = open_patch_dataset(tmp_path / "d.h5")
    truth = np.zeros(len(ds), bool)
    g = (np.arange(8) + 0.5) / 8 * 32 + 16  # an 8x8 lattice over the central 32x32 of each patch
    offs = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    for info in cam["slides_info"]:
        sel = np.nonzero(ds.slide_ids == info["name"])[0]
        pts = (ds.coords[sel][:, None, :] + offs[None]).reshape(-1, 2)
        inside = np.zeros(len(pts), bool)
        for poly in info["tumor_polygons"]:
            inside |= MplPath(np.asarray(poly)).contains_points(pts)
        truth[sel] = inside.reshape(len(sel), -1).mean(1) >= 0.5
    agreement = (truth == ds.labels.astype(bool)).mean()
    assert ds.labels.sum() > 0 and (ds.labels == 0).sum() > 0
    assert agreement >= 0.95, agreement


def test_config_rejects_conflicts():
    with pytest.raises(ValueError, match="only one of"):
        ExtractConfig(mpp=0.5, level=1)
    with pytest.raises(ValueError, match="compression"):
        ExtractConfig(compression="zip")


@pytest.mark.slow
def test_real_slides_extraction(shared_data, tmp_path):
    root = shared_data("wsi")
    slides = [root / n for n in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs", "small.svs", "boxes.tiff")]
    slides += sorted((root / "bad").iterdir())
    summary = extract_patches(slides, None, tmp_path / "real.h5", ExtractConfig(patch_size=256, mpp=0.5), workers=1)
    by = {s["slide"]: s for s in summary}
    assert 25 <= by["cmu-1-small-region"]["patches"] <= 40 and by["cmu-1-small-region"]["grid_patches"] == 88
    assert 100 < by["tcga-cr-7395-01a-01-ts1"]["patches"] < by["tcga-cr-7395-01a-01-ts1"]["grid_patches"] == 221
    assert "no µm/px" in by["tcga-cr-7395-01a-01-ts1"]["level_note"]
    assert "only 16x16" in by["small"]["error"] and "only 300x250" in by["boxes"]["error"]
    for n in ("broken", "unreadable", "unopenable"):
        assert by[n]["status"] == "failed" and f"{n}." in by[n]["error"] and "OpenSlide" in by[n]["error"]
    assert (tmp_path / "real_overlays" / "cmu-1-small-region.png").is_file()
    with pytest.raises(SlideError):
        list(iter_tissue_tiles(root / "bad" / "unreadable.svs"))
    assert len(list(iter_tissue_tiles(root / "boxes.tiff", size=64))) > 0
