"""Small synthetic WBC sets and tiny encoder checkpoints for the fusion tests (CPU, seconds)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusion.data import CLASSES, WBCData
from pretrain.autoencoder import AEConfig, ConvAutoencoder
from pretrain.checkpoint import register_kind, save_checkpoint

TINY_CAM16 = "test_tiny_cam16"

COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40], [40, 200, 200]])


def synthetic_wbc(n_per_class: int = 12, size: int = 16, seed: int = 0) -> WBCData:
    """Learnable toy set: a noisy field with a disc whose colour depends on the class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels, ids, hashes = [], [], [], []
    for c in range(len(CLASSES)):
        for i in range(n_per_class):
            im = rng.integers(90, 160, size=(size, size, 3)).astype(np.float64)
            cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size * 0.3) ** 2
            im[disc] = 0.7 * COLOURS[c] + 0.3 * im[disc]
            im = im.clip(0, 255).astype(np.uint8)
            images.append(im)
            labels.append(c)
            ids.append(f"{CLASSES[c]}/img{i:03d}.png")
            hashes.append(hashlib.sha1(im.tobytes()).hexdigest())
    return WBCData(np.stack(images), np.array(labels, dtype=np.int64), ids, hashes, "/synthetic", size)


class TinyEncoder(nn.Module):
    """Stand-in for the CAM16 ResNet (a ResNet18 is too slow for unit tests): conv, pool, linear."""

    def __init__(self, input_size: int = 32, out_dim: int = 12, nan: bool = False) -> None:
        super().__init__()
        self.input_size, self.out_dim, self.nan = input_size, out_dim, nan
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, out_dim)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_size:
            raise ValueError(f"TinyEncoder expects {self.input_size} px, got {x.shape[-1]}")
        z = self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))
        return z * float("nan") if self.nan else z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)


@register_kind(TINY_CAM16, module="fusion_fakes")
def _build_tiny(config: dict) -> TinyEncoder:
    return TinyEncoder(**config)


def use_tiny_cam16(monkeypatch) -> None:
    """Make the `cam16` source expect the tiny stand-in kind for the duration of a test."""
    import fusion.sources

    monkeypatch.setitem(fusion.sources.DEFAULT_SOURCES, "cam16", (TINY_CAM16, "cam16_checkpoint"))


def tiny_checkpoints(folder: Path, size: int = 16, nan: bool = False) -> dict[str, Path]:
    """A tiny PRCC autoencoder (input `size`) and a tiny CAM16 stand-in (input 32, kind TINY_CAM16).

    `nan=True` makes the CAM16 stand-in return NaN features (a broken encoder -> NaN loss)."""
    folder.mkdir(parents=True, exist_ok=True)
    ae_cfg = AEConfig(input_size=size, base_width=4, depth=2, latent_channels=8)
    ae = ConvAutoencoder(ae_cfg)
    prcc = save_checkpoint(folder / "prcc.pt", kind="prcc_autoencoder", config=ae_cfg, model=ae,
                           input_spec=ae.input_spec())
    torch.manual_seed(0)
    tiny = TinyEncoder(32, 12, nan)
    cam16 = save_checkpoint(folder / ("cam16_nan.pt" if nan else "cam16.pt"), kind=TINY_CAM16,
                            config={"input_size": 32, "out_dim": 12, "nan": nan}, model=tiny,
                            input_spec={"size": 32, "channels": 3, "range": [0, 1]})
    return {"prcc": prcc, "cam16": cam16}


def write_wbc_folder(root: Path, n_per_class: int = 12, size: int = 16, seed: int = 0) -> Path:
    """The synthetic set as PNG files in one folder per class (what `load_wbc` reads)."""
    from PIL import Image

    data = synthetic_wbc(n_per_class, size, seed)
    for im, i in zip(data.images, data.ids, strict=True):
        p = root / i
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(p)
    return root


def _sections() -> dict[str, tuple[str, ...]]:
    import dataclasses

    from fusion.train import AugmentConfig, ModelConfig, OptimConfig, RuntimeConfig

    return {name: tuple(f.name for f in dataclasses.fields(cls)) for name, cls in
            (("model", ModelConfig), ("optim", OptimConfig), ("augment", AugmentConfig), ("runtime", RuntimeConfig))}


def nest(**kw) -> dict:
    """Flat test settings -> RunConfig's sections, so tests can list the few knobs they set in one line."""
    out: dict = {}
    for k, v in kw.items():
        section = next((s for s, names in _sections().items() if k in names), None)
        if section is None:
            out[k] = v
        else:
            out.setdefault(section, {})[k] = v
    return out


def strip_timing(rows):
    """Result rows without the machine's timings, sorted by run: equal for identical runs."""
    from fusion.train import TIMING_FIELDS

    return sorted(({k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows), key=lambda r: r["run"])
