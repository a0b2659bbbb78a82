"""Camelyon16 tumor-vs-normal patch classifier: a torchvision ResNet that is also a feature extractor.

`Cam16ResNet` holds the torchvision ResNet's own submodules (`conv1`, `bn1`, `layer1`..`layer4`, `fc`),
so its state dict uses torchvision's key names plus the two normalisation buffers `mean` and `std`.
Weights are Kaiming-initialised from scratch, or loaded from a local file (never downloaded).

    model = Cam16ResNet(ResNetConfig(arch="resnet18", input_size=96))
    logits = model(x)          # x: (B, 3, S, S) float RGB in [0, 1] -> (B, num_classes)
    feats = model.encode(x)    # (B, 512) for resnet18/34, (B, 2048) for resnet50 (pre-logits)
"""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torchvision.models as tvm
from torch import nn

from .checkpoint import FORMAT, register_kind
from .config import config_from_dict
from .layers import IMAGENET_MEAN, IMAGENET_STD, NORMS, kaiming_init

# name -> (torchvision builder, pre-logits feature width)
ARCHS: dict[str, tuple[Callable[..., tvm.ResNet], int]] = {
    "resnet18": (tvm.resnet18, 512),
    "resnet34": (tvm.resnet34, 512),
    "resnet50": (tvm.resnet50, 2048),
}
_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")


@dataclass
class ResNetConfig:
    """Constructor arguments of `Cam16ResNet` (saved as the checkpoint's `config`).

    Attributes:
        arch: one of `ARCHS` ("resnet18", "resnet34", "resnet50").
        num_classes: logits per image (2: normal, tumor).
        input_size: side S in pixels of the (B, 3, S, S) inputs the model is trained on (metadata:
            the network itself accepts any S >= 32 thanks to global pooling).
        weights_path: optional local file to initialise from: a torchvision ResNet state dict
            (e.g. `resnet18-f37072fd.pth`, its 1000-class `fc` is skipped when `num_classes`
            differs) or one of our `cam16_resnet` checkpoints. None: Kaiming initialisation.
        mean, std: per-channel normalisation applied inside `forward` to inputs in [0, 1].
        norm: normalisation layers, one of `pretrain.layers.NORMS` (batch, group, layer).
    """

    arch: str = "resnet18"
    num_classes: int = 2
    input_size: int = 96
    weights_path: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown normalisation layer {self.norm!r}; valid: {list(NORMS)}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown ResNet arch {self.arch!r}; valid archs: {sorted(ARCHS)}")
        if int(self.num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if int(self.input_size) < 32:
            raise ValueError(f"input_size must be >= 32 pixels for a ResNet (5 stride-2 stages), "
                             f"got {self.input_size}")
        self.mean, self.std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got mean={self.mean} std={self.std}")


class Cam16ResNet(nn.Module):
    """torchvision ResNet classifier with normalisation inside and a timm-style features/head split.

    Args:
        config: a `ResNetConfig`; keyword arguments override or replace it.
    """

    def __init__(self, config: ResNetConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = ResNetConfig(**kwargs)
        elif kwargs:
            config = ResNetConfig(**{**asdict(config), **kwargs})
        self.config = config
        builder, width = ARCHS[config.arch]
        net = builder(weights=None, norm_layer=NORMS[config.norm])  # never downloads: weights=None
        for name in _PARTS:
            setattr(self, name, getattr(net, name))
        self.fc = nn.Linear(width, config.num_classes)
        self.out_dim = width
        self.num_classes = config.num_classes
        self.input_size = config.input_size
        kaiming_init(self)
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1))
        if config.weights_path:
            load_weights(self, config.weights_path)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float RGB in [0, 1] -> (B, out_dim, S/32, S/32) last feature map."""
        x = (x - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, S/4, S/4)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)  # (B, D, S/32, S/32)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, D, h, w) -> pooled (B, D) when `pre_logits`, else logits (B, num_classes)."""
        pooled = torch.flatten(self.avgpool(feats), 1)  # (B, D)
        return pooled if pre_logits else self.fc(pooled)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float RGB in [0, 1] -> (B, out_dim) globally pooled pre-logit features."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float RGB in [0, 1] -> (B, num_classes) logits (class 1 = tumor)."""
        return self.forward_head(self.forward_features(x))

    def input_spec(self) -> dict:
        """The checkpoint's `input` entry: what `forward`/`encode` expect."""
        return {"size": int(self.input_size), "channels": 3, "range": [0, 1],
                "mean": [float(v) for v in self.config.mean], "std": [float(v) for v in self.config.std]}


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors of a local weights file and a word on what it was (torchvision / checkpoint)."""
    if not path.is_file():
        raise FileNotFoundError(f"ResNet weights file {path} does not exist (weights are never downloaded; "
                                f"give a local torchvision ResNet state dict or a cam16_resnet checkpoint)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError,
            KeyError, IndexError, TypeError, AttributeError) as e:  # arbitrary bytes raise any of these
        raise ValueError(f"ResNet weights file {path} cannot be read by torch.load(weights_only=True) "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); expected a state dict "
                         f"or a wbc-fusion checkpoint") from e
    what = "state dict"
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        if obj.get("kind") != "cam16_resnet":
            raise ValueError(f"ResNet weights file {path} is a {obj.get('kind')!r} checkpoint; "
                             f"expected a 'cam16_resnet' checkpoint or a torchvision ResNet state dict")
        obj, what = obj["model"], "cam16_resnet checkpoint"
    elif isinstance(obj, dict):
        for key in ("state_dict", "model"):  # common wrappers around a state dict
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"ResNet weights file {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("net."): v for k, v in obj.items()}
    return state, what


def load_weights(model: Cam16ResNet, path: str | os.PathLike) -> Cam16ResNet:
    """Initialise `model` in place from a local torchvision ResNet state dict or cam16_resnet checkpoint.

    A classifier `fc` whose shape differs (e.g. ImageNet's 1000 classes) is skipped with a warning and
    keeps its Kaiming initialisation; the normalisation buffers stay those of `model.config`.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file's keys or shapes do not fit `model.config.arch`; the message names the file.
    """
    path = Path(path)
    state, what = _read_state_dict(path)
    state = {k: v for k, v in state.items() if k not in ("mean", "std")}
    own = {k: v for k, v in model.state_dict().items() if k not in ("mean", "std")}
    skipped = [k for k in ("fc.weight", "fc.bias")
               if k in state and k in own and state[k].shape != own[k].shape]
    for k in skipped:
        state.pop(k)
    missing = sorted(set(own) - set(state) - set(skipped))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or bad_shape:
        def few(keys: list[str]) -> str:
            return f"{keys[:5]}{' ...' if len(keys) > 5 else ''} ({len(keys)})"
        raise ValueError(
            f"ResNet weights file {path} ({what}) does not fit arch {model.config.arch!r}: "
            f"missing keys {few(missing)}, unexpected keys {few(unexpected)}, wrong shapes {few(bad_shape)}; "
            f"give weights of a torchvision {model.config.arch} or pick the matching --arch")
    model.load_state_dict(state, strict=False)
    if skipped:
        warnings.warn(f"{path}: its classifier fc does not fit {model.num_classes} classes x {model.out_dim} "
                      f"features; fc keeps a fresh Kaiming initialisation, every other layer was loaded",
                      stacklevel=2)
    return model


@register_kind("cam16_resnet", module="pretrain.resnet")
def build_resnet(config: dict) -> Cam16ResNet:
    """Rebuild a `Cam16ResNet` from a checkpoint's config dict.

    `weights_path` is ignored here: the weights come from the checkpoint's state dict (or, for the
    random-init control of `load_encoder`, from a fresh Kaiming initialisation), never from that file.
    """
    cfg = config_from_dict(ResNetConfig, dict(config), source="cam16_resnet checkpoint config")
    cfg.weights_path = None
    return Cam16ResNet(cfg)


def describe(model: Cam16ResNet) -> str:
    """One line: arch, parameter count, feature width."""
    n = sum(p.numel() for p in model.parameters())
    return (f"{model.config.arch}: {n / 1e6:.1f}M parameters, encode -> (B, {model.out_dim}), "
            f"{model.num_classes} classes, input {model.input_size}px "
            f"({'from ' + str(model.config.weights_path) if model.config.weights_path else 'Kaiming init'})")


__all__ = ["ARCHS", "Cam16ResNet", "IMAGENET_MEAN", "IMAGENET_STD", "ResNetConfig", "build_resnet",
           "describe", "kaiming_init", "load_weights"]
