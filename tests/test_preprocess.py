"""Preprocessing in the decode-once cache: crop_border, equalize, clahe; recorded and repeated at evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from fusion_fakes import nest, write_wbc_folder
from PIL import Image

from fusion.data import load_wbc
from fusion.evaluate import load_classifier
from fusion.preprocess import apply, clahe, crop_border, equalize
from fusion.train import RunConfig, train_run


def test_crop_border_removes_a_flat_frame_and_keeps_an_image_without_one():
    rng = np.random.default_rng(0)
    inner = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    framed = np.zeros((40, 50, 3), np.uint8)
    framed[10:30, 12:42] = inner
    assert np.array_equal(crop_border(framed), inner)
    assert np.array_equal(crop_border(inner), inner)


@pytest.mark.parametrize("op", [equalize, clahe])
def test_equalisation_stretches_lightness_and_keeps_shape(op):
    rng = np.random.default_rng(1)
    dull = rng.integers(100, 140, (32, 32, 3), dtype=np.uint8)
    out = op(dull)
    assert out.shape == dull.shape and out.dtype == np.uint8
    assert out.astype(float).std() > 1.5 * dull.astype(float).std()


def test_preprocessing_is_cached_separately_recorded_and_repeated_by_evaluate(tmp_path):
    root = write_wbc_folder(tmp_path / "wbc", 8, 24)
    plain = load_wbc(root, 16, cache_dir=tmp_path / "cache", progress=False)
    prepared = load_wbc(root, 16, cache_dir=tmp_path / "cache", progress=False, preprocess=["clahe"])
    assert not np.array_equal(plain.images, prepared.images) and plain.hashes == prepared.hashes
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2  # one cache entry per preprocessing
    im = np.asarray(Image.open(root / plain.ids[0]).convert("RGB"))
    from fusion.data import square_resize
    assert np.array_equal(prepared.images[0], square_resize(apply(im, ["clahe"]), 16))
    cfg = RunConfig(**nest(data=str(root), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8],
                           epochs=1, min_steps=2, evals=1, batch_size=16, progress=False, curves=False,
                           device="cpu", preprocess=["crop_border", "clahe"], out=str(tmp_path / "run")))
    train_run(cfg)
    assert "- crop_border" in (tmp_path / "run" / "config.yaml").read_text()
    _, info = load_classifier(tmp_path / "run" / "best.pt", "cpu")
    assert info["preprocess"] == ["crop_border", "clahe"]
    with pytest.raises(ValueError, match=r"unknown preprocessing step\(s\) \['sharpen'\].*clahe"):
        RunConfig(preprocess=["sharpen"])
