"""Frozen encoders for each arm of the study, and their features computed once per image.

`ARMS` maps an arm name to which sources it uses and whether their weights are the pretrained ones
or random (the `random` control: same architectures and extra parameters, no pretrained knowledge).
`load_arm_encoders` builds them from checkpoints via `pretrain.load_encoder` (frozen: eval, no grads).

Frozen features do not depend on the training step, so `FeatureCache` computes them once per
(encoder checkpoint, random seed, image set) under `torch.inference_mode()` and every run of a sweep
(all fractions, seeds and fusion modes) reuses them. Features are of the un-augmented image: the CNN
sees augmented views, the frozen branch sees the image itself, as in linear probing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pretrain.checkpoint import CheckpointError, load_encoder, register_kind
from pretrain.utils import eval_batches

from .models import CNNConfig, FusionModel, SmallCNN, resize_for_encoder

# source name -> checkpoint kind it must be
SOURCE_KINDS = {"prcc": "prcc_autoencoder", "cam16": "cam16_resnet"}


@dataclass(frozen=True)
class ArmSpec:
    """Sources an arm fuses with the CNN, and whether their weights are random (the control)."""

    sources: tuple[str, ...]
    random: bool = False


ARMS: dict[str, ArmSpec] = {
    "scratch": ArmSpec(()),
    "prcc": ArmSpec(("prcc",)),
    "cam16": ArmSpec(("cam16",)),
    "prcc+cam16": ArmSpec(("prcc", "cam16")),
    "random": ArmSpec(("prcc", "cam16"), random=True),
}


def check_arm(arm: str) -> ArmSpec:
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; valid arms: {list(ARMS)}")
    return ARMS[arm]


def random_seed_for(seed: int, source: str) -> int:
    """Seed of the random-weight control encoder of `source` in the run with seed `seed`."""
    return 10_000 + 100 * int(seed) + sorted(SOURCE_KINDS).index(source)


def load_arm_encoders(arm: str, checkpoints: dict[str, str | os.PathLike | None], seed: int = 0,
                      image_size: int | None = None, encoder_resize: bool = True,
                      ) -> dict[str, nn.Module]:
    """Frozen encoders {source: module} for `arm` (empty for `scratch`).

    Args:
        checkpoints: {"prcc": path, "cam16": path}; only the arm's sources are needed.
        seed: run seed; the `random` arm's weights are drawn from `random_seed_for(seed, source)`
            without disturbing the global RNG.
        image_size: WBC image side; when it differs from an encoder's input size and
            `encoder_resize` is False, a ValueError names the checkpoint, both sizes and the fix.

    Raises:
        ValueError: unknown arm, missing checkpoint path, or size mismatch (see above).
        FileNotFoundError: a checkpoint file does not exist.
        CheckpointError: a checkpoint is of the wrong kind (e.g. a ResNet given as prcc_checkpoint).
    """
    spec = check_arm(arm)
    encoders: dict[str, nn.Module] = {}
    for source in spec.sources:
        path = checkpoints.get(source)
        if not path:
            raise ValueError(f"arm {arm!r} needs the {source} encoder but {source}_checkpoint is not set; "
                             f"give --{source}-checkpoint PATH (a {SOURCE_KINDS[source]!r} checkpoint)")
        with torch.random.fork_rng(devices=[]):
            try:
                enc = load_encoder(path, kind=SOURCE_KINDS[source], random_init=spec.random,
                                   seed=random_seed_for(seed, source) if spec.random else None)
            except CheckpointError as e:
                raise CheckpointError(f"{source}_checkpoint: {e}") from e
        if image_size is not None and not encoder_resize and enc.input_size not in (0, image_size):
            resize_for_encoder(enc, torch.zeros(1, 3, image_size, image_size), allow=False, name=source)
        encoders[source] = enc
    return encoders


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, S, S, 3) uint8 -> (N, 3, S, S) uint8 tensor (convert to float in [0, 1] per batch)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()


@torch.inference_mode()
def _encode_all(enc: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device,
                resize: bool, name: str) -> torch.Tensor:
    out = []
    for i, j in eval_batches(len(images), batch_size):
        x = images[i:j].to(device, non_blocking=True).float().div_(255)
        out.append(enc.encode(resize_for_encoder(enc, x, resize, name)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, int(enc.out_dim))


def compute_features(encoders: dict[str, nn.Module], images: torch.Tensor, device: torch.device,
                     batch_size: int = 256, encoder_resize: bool = True) -> dict[str, torch.Tensor]:
    """{source: (N, D_s) float32 CPU tensor} for (N, 3, S, S) uint8 images, as normal tensors."""
    feats = {}
    for name, enc in encoders.items():
        enc.to(device)
        feats[name] = _encode_all(enc, images, batch_size, device, encoder_resize, name).clone()
    return feats


def _file_key(path: str | os.PathLike) -> str:
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def images_key(hashes: Sequence[str], image_size: int) -> str:
    """Short fingerprint of an image set (per-image content hashes, in order) at one size."""
    h = hashlib.sha256(f"{image_size}:".encode())
    for x in hashes:
        h.update(x.encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """In-memory cache of frozen features of a whole image set, shared by the runs of a sweep.

    Key: (source, checkpoint file identity, random seed or "pretrained", images key, resize flag).
    """

    def __init__(self) -> None:
        self._store: dict[tuple, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def get(self, encoders: dict[str, nn.Module], images: torch.Tensor, key: str, device: torch.device,
            seed: int = 0, batch_size: int = 256, encoder_resize: bool = True) -> dict[str, torch.Tensor]:
        """{source: (N, D) features} of `images` (uint8 (N, 3, S, S)), computed only when not cached."""
        out = {}
        for name, enc in encoders.items():
            tag = "pretrained" if getattr(enc, "pretrained", True) else f"random{random_seed_for(seed, name)}"
            path = getattr(enc, "checkpoint_path", None)
            k = (name, _file_key(path) if path else id(enc), tag, key, encoder_resize)
            if k not in self._store:
                self._store[k] = compute_features({name: enc}, images, device, batch_size, encoder_resize)[name]
            out[name] = self._store[k]
        return out


@register_kind("wbc_fusion", module="fusion.encoders")
def build_fusion_model(config: dict) -> FusionModel:
    """Checkpoint builder for kind "wbc_fusion": the CNN from its config, the frozen encoders from the
    checkpoint paths recorded at training time (random arm: the same seeded random weights)."""
    encoders = load_arm_encoders(config["arm"], config.get("checkpoints", {}), int(config.get("seed", 0)))
    cnn = SmallCNN(CNNConfig(**config["cnn"]))
    return FusionModel(cnn, encoders, config["mode"], int(config["num_classes"]),
                       bool(config.get("encoder_resize", True)), float(config.get("dropout", 0.2)))
