"""The exploratory-analysis report on a tiny synthetic folder (CPU, seconds)."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from fusion_fakes import tiny_checkpoints, write_wbc_folder

from fusion.data import CLASSES
from fusion.eda import EDAConfig, montage_rows, run_eda, stratified_subsample, tsne_perplexity


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_wbc_folder(tmp_path_factory.mktemp("wbc"), n_per_class=8, size=16)


def _referenced(page):
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())


def test_report_page_and_figures(folder, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 40 points: perplexity 30 fits, nothing to warn about
        page = run_eda(EDAConfig(data=str(folder), out=str(tmp_path), image_size=16, progress=False))
    assert page == tmp_path / "eda.md"
    text = page.read_text()
    assert text.startswith("# Exploratory analysis") and "40 images" in text
    for c in CLASSES:
        assert c in text
    pngs = _referenced(page)
    assert {"class_counts.png", "mean_images.png", "channel_histograms.png", "pca_pixels.png",
            "tsne_pixels.png"} <= set(pngs)
    assert sum(p.startswith("montage_") for p in pngs) == len(CLASSES)
    for p in pngs:
        assert (tmp_path / p).stat().st_size > 0, p
    summary = json.loads((tmp_path / "eda.json").read_text())
    assert summary["sizes"]["all"] == {"n": 40, "width": [16, 16, 16], "height": [16, 16, 16]}
    assert summary["duplicate_groups"] == 0


def test_small_sample_lowers_perplexity(folder, tmp_path):
    with pytest.warns(UserWarning, match=r"perplexity 30 .*perplexity 6"):
        run_eda(EDAConfig(data=str(folder), out=str(tmp_path), image_size=16, max_points=20, progress=False))
    summary = json.loads((tmp_path / "eda.json").read_text())
    assert summary["maps"]["pixels"]["n"] == 20 and summary["maps"]["pixels"]["perplexity"] == 6
    with pytest.warns(UserWarning, match="perplexity 10 .*perplexity 3"):
        assert tsne_perplexity(10, 4) == 3


def test_source_maps(folder, tmp_path):
    ck = tiny_checkpoints(tmp_path / "ck", size=16)
    page = run_eda(EDAConfig(data=str(folder), out=str(tmp_path / "eda"), image_size=16,
                             prcc_checkpoint=str(ck["prcc"]), device="cpu", progress=False))
    pngs = _referenced(page)
    for p in ("pca_prcc.png", "tsne_prcc.png"):
        assert p in pngs and (page.parent / p).stat().st_size > 0
    assert "frozen `prcc` features" in page.read_text()


def test_seeded_choices():
    labels = np.repeat(np.arange(5), [30, 3, 12, 50, 9])
    a, b = montage_rows(labels, 5, seed=1), montage_rows(labels, 5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert [len(r) for r in a] == [8, 3, 8, 8, 8]
    assert all((labels[r] == c).all() for c, r in enumerate(a))
    assert not all(np.array_equal(x, y) for x, y in zip(a, montage_rows(labels, 5, seed=2), strict=True))
    rows = stratified_subsample(labels, 52, seed=0)
    assert np.array_equal(rows, stratified_subsample(labels, 52, seed=0))
    assert len(rows) <= 52 and set(labels[rows]) == set(range(5))


def test_montage_ids_repeat(folder, tmp_path):
    ids = []
    for k in range(2):
        run_eda(EDAConfig(data=str(folder), out=str(tmp_path / str(k)), image_size=16, seed=3, progress=False))
        ids.append(json.loads((tmp_path / str(k) / "eda.json").read_text())["montage_ids"])
    assert ids[0] == ids[1]
    assert all(len(v) == 8 for v in ids[0].values())
