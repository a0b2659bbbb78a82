"""Feature extraction: any encoder checkpoint + a folder of images -> HDF5 (features, paths, labels)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fusion.features import extract_features
from pretrain.checkpoint import CheckpointError, register_kind, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SIZE = 8
SPEC = {"size": SIZE, "channels": 3, "range": [0, 1], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


class ColourEncoder(nn.Module):
    """Test double: encode(x) = scale * per-channel mean, so features are known exactly."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(scale)))
        self.register_buffer("mean", torch.zeros(1, 3, 1, 1))
        self.register_buffer("std", torch.ones(1, 3, 1, 1))
        self.out_dim = 3

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, 3)
        assert x.shape[1:] == (3, SIZE, SIZE) and x.dtype == torch.float32
        return self.scale * ((x - self.mean) / self.std).mean(dim=(2, 3))


class NoEncode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)


register_kind("test_colour_encoder")(lambda cfg: ColourEncoder(**cfg))
register_kind("test_no_encode")(lambda cfg: NoEncode())

COLOURS = {"basophil": (255, 0, 0), "eosinophil": (0, 255, 0)}


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "imgs"
    for k, (cls, rgb) in enumerate(COLOURS.items()):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20 + i, 30 - k, 3), rgb, np.uint8)).save(root / cls / f"{i}.{'jpg' if i else 'png'}")
    Image.fromarray(np.full((10, 10, 3), (0, 0, 255), np.uint8)).save(root / "loose.png")
    (root / "eosinophil" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def _ckpt(tmp_path, kind="test_colour_encoder", config=None, model=None):
    model = model if model is not None else ColourEncoder(2.0)
    return save_checkpoint(tmp_path / f"{kind}.pt", kind=kind, config=config if config is not None else {"scale": 2.0},
                           model=model, input_spec=SPEC)


def _extract(*args, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = extract_features(*args, progress=False, **kw)
    return out, [str(x.message) for x in w]


def test_features_file_contents(tmp_path, image_dir):
    out, msgs = _extract(_ckpt(tmp_path), image_dir, tmp_path / "f.h5", batch_size=4, device="cpu")
    assert any("broken.png" in m for m in msgs)
    with h5py.File(out) as h5:
        feats = h5["features"][:]
        paths = [p.decode() for p in h5["paths"][:]]
        labels = [s.decode() for s in h5["labels"][:]]
        assert feats.shape == (7, 3) and feats.dtype == np.float32
        assert paths[0] == "basophil/0.png" and "loose.png" in paths and len(h5["sha1"]) == 7
        for p, lab, f in zip(paths, labels, feats, strict=True):
            want = COLOURS.get(lab, (0, 0, 255))
            np.testing.assert_allclose(f, 2.0 * np.array(want) / 255, atol=0.02, err_msg=p)  # JPEG is lossy
        assert labels[paths.index("loose.png")] == ""
        a = dict(h5.attrs)
        assert a["kind"] == "test_colour_encoder" and a["input_size"] == SIZE and a["out_dim"] == 3
        assert a["n_skipped"] == 1 and json.loads(a["skipped"]) == ["eosinophil/broken.png"]
        assert a["checkpoint"].endswith("test_colour_encoder.pt") and a["version"]
    assert not list(tmp_path.glob(".f.h5*"))  # no temporary left behind


def test_real_autoencoder_kind(tmp_path, image_dir):
    ae = pytest.importorskip("pretrain.autoencoder")
    model = ae.ConvAutoencoder(ae.AEConfig(base_width=4, depth=2, latent_channels=6, input_size=16))
    ckpt = save_checkpoint(tmp_path / "ae.pt", kind="prcc_autoencoder", config=model.cfg, model=model,
                           input_spec=model.input_spec())
    out, _ = _extract(ckpt, image_dir, tmp_path / "ae.h5", device="cpu")
    with h5py.File(out) as h5:
        assert h5["features"].shape == (7, 6) and h5.attrs["input_size"] == 16
        assert np.isfinite(h5["features"][:]).all()


def test_errors_name_the_problem(tmp_path, image_dir):
    with pytest.raises(CheckpointError, match="no encode"):
        extract_features(_ckpt(tmp_path, "test_no_encode", {}, NoEncode()), image_dir, tmp_path / "x.h5",
                         progress=False)
    with pytest.raises(CheckpointError, match="expected kind 'cam16_resnet'"):
        extract_features(_ckpt(tmp_path), image_dir, tmp_path / "x.h5", kind="cam16_resnet", progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        extract_features(tmp_path / "none.pt", image_dir, tmp_path / "x.h5", progress=False)
    with pytest.raises(FileNotFoundError, match="no images found|does not exist"):
        extract_features(_ckpt(tmp_path), tmp_path / "empty", tmp_path / "x.h5", progress=False)
    assert not (tmp_path / "x.h5").exists()


def test_script(tmp_path, image_dir):
    spec = importlib.util.spec_from_file_location("extract_features_script", ROOT / "scripts" / "extract_features.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script.main(["--checkpoint", str(_ckpt(tmp_path)), "--images", str(image_dir),
                     "--out", str(tmp_path / "s.h5"), "--batch-size", "2", "--device", "cpu"])
    with h5py.File(tmp_path / "s.h5") as h5:
        assert h5["features"].shape == (7, 3)
