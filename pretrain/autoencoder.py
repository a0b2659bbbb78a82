"""Convolutional autoencoder pretrained on PRCC region crops (unsupervised, MSE reconstruction).

The model takes float RGB in [0, 1] of shape (B, C, S, S), normalises it inside `forward` with
registered buffers `mean`/`std`, and returns the reconstruction in [0, 1] pixel space (sigmoid), so
the MSE is measured on plain pixels. `encode(x) -> (B, latent_channels)` is the global average pool
of the bottleneck map and is what the fusion side uses after `pretrain.load_encoder(path)`.

Shapes for the defaults (depth 3, base_width 32, latent 64, S = 64):

    x (B, 3, 64, 64) -> stem (B, 32, 64, 64) -> down x3 (B, 128, 8, 8) -> latent (B, 64, 8, 8)
    latent -> up x3 (B, 32, 64, 64) -> head (B, 3, 64, 64) -> sigmoid
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .checkpoint import register_kind
from .layers import IMAGENET_MEAN, IMAGENET_STD


@dataclass
class AEConfig:
    """Constructor arguments of `ConvAutoencoder` (stored as the checkpoint `config`).

    Attributes:
        in_channels: image channels (3 for RGB).
        base_width: channels of the first stage; stage i has base_width * 2**i.
        depth: number of stride-2 stages; the bottleneck is input_size / 2**depth pixels wide.
        latent_channels: channels of the bottleneck map = length of the `encode` vector.
        input_size: crop size S the model is trained on (any multiple of 2**depth also runs).
        mean, std: per-channel input normalisation applied inside `forward` (pixels in [0, 1]).
    """

    in_channels: int = 3
    base_width: int = 32
    depth: int = 3
    latent_channels: int = 64
    input_size: int = 64
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self) -> None:
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        for name in ("in_channels", "base_width", "depth", "latent_channels", "input_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"AEConfig.{name} must be a positive integer, got {v!r}")
        if self.depth > 8:
            raise ValueError(f"AEConfig.depth={self.depth} is too deep (at most 8 stride-2 stages)")
        if self.input_size % (2 ** self.depth):
            raise ValueError(f"AEConfig.input_size={self.input_size} must be divisible by 2**depth = "
                             f"{2 ** self.depth} (depth={self.depth}); pick e.g. "
                             f"{max(1, self.input_size // 2 ** self.depth) * 2 ** self.depth}")
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"AEConfig.mean/std must have in_channels={self.in_channels} values, "
                             f"got mean={self.mean}, std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"AEConfig.std must be positive, got {self.std}")


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class ConvAutoencoder(nn.Module):
    """Symmetric conv encoder/decoder; see the module docstring for shapes."""

    def __init__(self, cfg: AEConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or AEConfig()
        widths = [cfg.base_width * 2 ** i for i in range(cfg.depth)]
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1))

        enc: list[nn.Module] = _conv_bn_relu(cfg.in_channels, widths[0])  # stem at full resolution
        c = widths[0]
        for w in widths:  # each stage halves H and W
            enc += _conv_bn_relu(c, w, stride=2) + _conv_bn_relu(w, w)
            c = w
        enc.append(nn.Conv2d(c, cfg.latent_channels, 1))  # linear bottleneck
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(cfg.latent_channels, c, 1, bias=False), nn.BatchNorm2d(c),
                                nn.ReLU(inplace=True)]
        for w in reversed([widths[0]] + widths[:-1]):  # each stage doubles H and W
            dec += [nn.Upsample(scale_factor=2, mode="nearest")] + _conv_bn_relu(c, w) + _conv_bn_relu(w, w)
            c = w
        dec.append(nn.Conv2d(c, cfg.in_channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)
        self.out_dim = int(cfg.latent_channels)

    def _check(self, x: torch.Tensor) -> None:
        f = 2 ** self.cfg.depth
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"ConvAutoencoder expects (B, {self.cfg.in_channels}, S, S) float in [0, 1], "
                             f"got shape {tuple(x.shape)}")
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"ConvAutoencoder: height and width must be multiples of 2**depth = {f}, "
                             f"got {tuple(x.shape[-2:])}; resize or crop to {self.cfg.input_size}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> bottleneck map (B, latent_channels, S / 2**depth, S / 2**depth)."""
        self._check(x)
        return self.encoder((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> reconstruction (B, C, S, S) in [0, 1]."""
        return torch.sigmoid(self.decoder(self.forward_features(x)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) in [0, 1] -> (B, latent_channels): global average pool of the bottleneck."""
        return self.forward_features(x).mean(dim=(2, 3))

    def input_spec(self) -> dict:
        """The checkpoint `input` entry: size, channels, value range and normalisation."""
        return {"size": self.cfg.input_size, "channels": self.cfg.in_channels, "range": [0, 1],
                "mean": list(self.cfg.mean), "std": list(self.cfg.std)}


@register_kind("prcc_autoencoder", module="pretrain.autoencoder")
def build_autoencoder(config: dict) -> ConvAutoencoder:
    """Checkpoint builder: plain dict of `AEConfig` fields -> fresh `ConvAutoencoder`."""
    names = {f.name for f in dataclasses.fields(AEConfig)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise ValueError(f"prcc_autoencoder config has unknown key(s) {unknown}; valid keys: {sorted(names)}")
    return ConvAutoencoder(AEConfig(**config))
