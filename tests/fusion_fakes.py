"""Small synthetic WBC sets and tiny encoder checkpoints for the fusion tests (CPU, seconds)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from fusion.data import CLASSES, WBCData
from pretrain.autoencoder import AEConfig, ConvAutoencoder
from pretrain.checkpoint import save_checkpoint
from pretrain.resnet import Cam16ResNet, ResNetConfig

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


def tiny_checkpoints(folder: Path, size: int = 16) -> dict[str, Path]:
    """A tiny PRCC autoencoder (input `size`) and a ResNet18 CAM16 classifier (input 32) on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    ae_cfg = AEConfig(input_size=size, base_width=4, depth=2, latent_channels=8)
    ae = ConvAutoencoder(ae_cfg)
    prcc = save_checkpoint(folder / "prcc.pt", kind="prcc_autoencoder", config=ae_cfg, model=ae,
                           input_spec=ae.input_spec())
    rn_cfg = ResNetConfig(arch="resnet18", input_size=32)
    rn = Cam16ResNet(rn_cfg)
    cam16 = save_checkpoint(folder / "cam16.pt", kind="cam16_resnet", config=rn_cfg, model=rn,
                            input_spec=rn.input_spec())
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
