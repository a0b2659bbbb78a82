"""Frozen encoders of an arm, and their features computed once per image.

An arm's sources and whether their weights are the pretrained ones or a random twin come from the
`fusion.sources.Registry` of the run (sources and arms are config, see `fusion.sources`).
`load_arm_encoders` builds them via `fusion.sources.load_source` (frozen: eval, no grads).

Frozen features do not depend on the training step, so `FeatureCache` computes them once per
(source weights, random seed, image set) under `torch.inference_mode()` and every run of a sweep
(all fractions, seeds and fusion modes) reuses them. Features are of the un-augmented image: the CNN
sees augmented views, the frozen branch sees the image itself, as in linear probing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from pretrain.checkpoint import CheckpointError, register_kind
from pretrain.utils import eval_batches

from .models import FusionModel, classifier_from_config, resize_for_encoder
from .sources import Registry, SourceSpec, build_registry, load_source, twin_seed


def as_registry(sources: Registry | Mapping[str, str | os.PathLike | None]) -> Registry:
    """A Registry, or one built from {"prcc": path, "cam16": path} (the original sources' checkpoints)."""
    if isinstance(sources, Registry):
        return sources
    return build_registry(defaults={f"{k}_checkpoint": str(v) for k, v in sources.items() if v})


def load_arm_encoders(arm: str, sources: Registry | Mapping[str, str | os.PathLike | None], seed: int = 0,
                      image_size: int | None = None, encoder_resize: bool = True,
                      ) -> dict[str, nn.Module]:
    """Frozen encoders {source: module} for `arm` (empty for `scratch`).

    Args:
        sources: the run's Registry, or {"prcc": path, "cam16": path} for the original two sources.
        seed: run seed; a random twin's weights are drawn from `twin_seed(source, seed)` without
            disturbing the global RNG.
        image_size: WBC image side; when it differs from an encoder's input size and
            `encoder_resize` is False, a ValueError names the source, both sizes and the fix.

    Raises:
        SourceError: unknown arm, or an arm using an undefined source (lists the defined ones).
        FileNotFoundError: a checkpoint or weights file does not exist.
        CheckpointError: a checkpoint is of the wrong kind (e.g. a ResNet given as prcc_checkpoint).
    """
    reg = as_registry(sources)
    spec = reg.arm(arm)
    encoders: dict[str, nn.Module] = {}
    for name in spec.sources:
        enc = load_source(reg.sources[name], random_init=spec.random,
                          seed=twin_seed(name, seed) if spec.random else None)
        enc.twin_seed = twin_seed(name, seed) if spec.random else None
        if image_size is not None and not encoder_resize and enc.input_size not in (0, image_size):
            resize_for_encoder(enc, torch.zeros(1, 3, image_size, image_size), allow=False, name=name)
        encoders[name] = enc
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
    if device.type == "cuda" and not images.is_cuda:  # page-locked: the per-batch copies overlap the compute
        images = images.pin_memory()
    for name, enc in encoders.items():
        enc.to(device)
        feats[name] = _encode_all(enc, images, batch_size, device, encoder_resize, name).clone()
    return feats


def images_key(hashes: Sequence[str], image_size: int) -> str:
    """Short fingerprint of an image set (per-image content hashes, in order) at one size."""
    h = hashlib.sha256(f"{image_size}:".encode())
    for x in hashes:
        h.update(x.encode())
    return h.hexdigest()[:16]


class FeatureCache:
    """In-memory cache of frozen features of a whole image set, shared by the runs of a sweep.

    Key: (source, sha256 of its weights file, random seed or "pretrained", images key, resize flag).
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
            tag = "pretrained" if getattr(enc, "pretrained", True) else f"random{twin_seed(name, seed)}"
            k = (name, getattr(enc, "weights_sha256", None) or id(enc), tag, key, encoder_resize)
            if k not in self._store:
                self._store[k] = compute_features({name: enc}, images, device, batch_size, encoder_resize)[name]
            out[name] = self._store[k]
        return out


def fusion_sources_config(reg: Registry, arm: str) -> dict:
    """{source: spec + sha256 of its file} of `arm`, as a fusion checkpoint records them."""
    from .sources import file_sha256

    return {name: {**reg.sources[name].plain(), "sha256": file_sha256(reg.sources[name].path)}
            for name in reg.arm(arm).sources}


def _recorded_registry(config: dict) -> tuple[Registry, str]:
    """The registry and arm name that rebuild a fusion checkpoint's encoders; a source file whose
    content changed since training is refused by name."""
    from .sources import file_sha256

    if "sources" not in config:  # checkpoints from before sources were config: {"prcc": path, ...}
        return as_registry(config.get("checkpoints", {})), config["arm"]
    reg = Registry(sources={}, arms={"trained": tuple(config["sources"])})
    for name, d in config["sources"].items():
        d = dict(d)
        sha = d.pop("sha256", None)
        spec = SourceSpec.parse(name, d)
        if sha and os.path.isfile(spec.path) and (now := file_sha256(spec.path)) != sha:
            raise CheckpointError(f"source {name!r}: {spec.path} changed since this fusion model was trained "
                                  f"(sha256 {now[:12]}..., recorded {sha[:12]}...); restore the original file")
        reg.sources[name] = spec
    return reg, ("random:trained" if config.get("twin") else "trained")


@register_kind("wbc_fusion", module="fusion.encoders")
def build_fusion_model(config: dict) -> FusionModel:
    """Checkpoint builder for kind "wbc_fusion": the CNN from its config, the frozen encoders from the
    sources recorded at training time (checked by sha256; a random twin gets the same seeded weights)."""
    reg, arm = _recorded_registry(config)
    encoders = load_arm_encoders(arm, reg, int(config.get("seed", 0)))
    cnn = classifier_from_config(config.get("classifier", "small_cnn"), config["cnn"])
    return FusionModel(cnn, encoders, config["mode"], int(config["num_classes"]),
                       bool(config.get("encoder_resize", True)), float(config.get("dropout", 0.2)))
