"""Encoder sources and arms, read from config: a user's own encoder is one config entry, no code.

A **source** is a name bound to a frozen encoder with `encode(x) -> (B, D)`:

    sources:
      prcc: checkpoints/prcc_autoencoder.pt              # a checkpoint this package wrote (any encoder kind)
      r18:  {model: "torchvision:resnet18", weights: /data/r18_imagenet.pth}
      vit:  {model: "timm:vit_small_patch16_224", weights: vit.safetensors, input_size: 224}

`prcc` and `cam16` are defined by default from `prcc_checkpoint` / `cam16_checkpoint`. External
backbones (`timm:` / `torchvision:`) load a local weights file and are never downloaded; their input
size and mean/std come from the model's own pretrained config unless given.

An **arm** is a set of sources fused with the CNN (`scratch` is the empty set):

    arms: {scratch: [], prcc: [prcc], both: [prcc, cam16], imagenet: [r18]}

or, as a mapping, a standard architecture trained in place of the small CNN (`BackboneSpec`), from
scratch or from local weights, whole or frozen, optionally fused with sources like the CNN:

    arms: {scratch: [], r18: {backbone: resnet18}, vgg16: {backbone: vgg16},
           r18_ft: {backbone: resnet18, weights: r18_imagenet.pth}, effnet: {backbone: "timm:efficientnet_b0"}}

Every arm with sources has a **random twin**, `random:<arm>`: the same architectures with frozen
random weights, the control for extra parameters without pretrained knowledge. A twin's weights are
seeded from the source's name and the run seed (`twin_seed`), never from a position in a list, so
adding a source changes no other source's control. The original study's `random` arm is the twin of
`prcc+cam16`, and its two sources keep the seeds they always had, so the record's numbers stand.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

EXTERNAL_PREFIXES = ("timm:", "torchvision:")
# the original study's sources: name -> the checkpoint kind it must be and the RunConfig field giving it
DEFAULT_SOURCES = {"prcc": ("prcc_autoencoder", "prcc_checkpoint"), "cam16": ("cam16_resnet", "cam16_checkpoint")}
DEFAULT_ARMS: dict[str, tuple[str, ...]] = {"scratch": (), "prcc": ("prcc",), "cam16": ("cam16",),
                                            "prcc+cam16": ("prcc", "cam16")}
TWIN_PREFIX = "random:"
LEGACY_TWINS = {"random": "prcc+cam16"}  # the original study's name for the twin of prcc+cam16
# seeds the original two sources' random weights always had (10_000 + 100 * seed + offset)
_LEGACY_TWIN_OFFSET = {"cam16": 0, "prcc": 1}


class SourceError(ValueError):
    """An unknown or badly defined source or arm; the message names it and lists the known ones."""


@dataclass(frozen=True)
class SourceSpec:
    """One encoder source. Exactly one of `checkpoint` (a file of this package) or `model` (`timm:<name>` /
    `torchvision:<name>`, with a local `weights` file) is set."""

    name: str
    checkpoint: str = ""
    model: str = ""
    weights: str = ""
    kind: str = ""  # required checkpoint kind ("" = any kind with encode())
    input_size: int = 0  # 0: from the checkpoint or the model's pretrained config
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if bool(self.checkpoint) == bool(self.model):
            raise SourceError(f"source {self.name!r}: give either a checkpoint path or a model "
                              f"('timm:<name>' / 'torchvision:<name>' with weights: FILE), got {self.plain()}")
        if self.model and not self.model.startswith(EXTERNAL_PREFIXES):
            raise SourceError(f"source {self.name!r}: model {self.model!r} must start with one of "
                              f"{list(EXTERNAL_PREFIXES)}")

    @classmethod
    def parse(cls, name: str, value: Any) -> SourceSpec:
        """A config entry -> SourceSpec: a path string, a `timm:`/`torchvision:` string, or a mapping."""
        if isinstance(value, SourceSpec):
            return value
        if isinstance(value, str):
            return cls(name, model=value) if value.startswith(EXTERNAL_PREFIXES) else cls(name, checkpoint=value)
        if isinstance(value, Mapping):
            known = {f for f in cls.__dataclass_fields__ if f != "name"}
            unknown = sorted(set(value) - known)
            if unknown:
                raise SourceError(f"source {name!r}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
            kw = dict(value)
            for k in ("mean", "std"):
                if k in kw:
                    kw[k] = tuple(float(v) for v in kw[k])
            return cls(name, **kw)
        raise SourceError(f"source {name!r} must be a checkpoint path, a 'timm:<name>'/'torchvision:<name>' "
                          f"string or a mapping, got {type(value).__name__} {value!r}")

    def plain(self) -> dict:
        """The config entry (without the name) that `parse` turns back into this spec."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k != "name" and v not in ("", 0, ())}

    @property
    def path(self) -> str:
        """The file whose content defines this source's weights."""
        return self.checkpoint or self.weights


@dataclass(frozen=True)
class BackboneSpec:
    """An arm's trainable classifier when it is not the small CNN: a standard architecture trained on the
    WBC labels, from scratch or from a local weights file, whole or with the backbone frozen.

        arms: {r18: {backbone: resnet18}, r18_imagenet: {backbone: resnet18, weights: r18.pth, freeze: true}}
    """

    model: str  # `<library>:<model>` (a short standard name is resolved by `parse`)
    weights: str = ""  # local file the backbone starts from; "" = from scratch (the library's own init)
    freeze: bool = False  # train only the linear head; the backbone keeps its weights and BatchNorm statistics

    @classmethod
    def parse(cls, arm: str, value: Mapping) -> BackboneSpec:
        from pretrain.backbones import resolve_model_name

        try:
            model = resolve_model_name(value["backbone"])
        except ValueError as e:
            raise SourceError(f"arm {arm!r}: {e}") from e
        freeze = value.get("freeze", False)
        if not isinstance(freeze, bool):
            raise SourceError(f"arm {arm!r}: freeze must be true or false, got {freeze!r}")
        if freeze and not value.get("weights"):
            raise SourceError(f"arm {arm!r}: freeze: true needs weights: FILE (a frozen random backbone learns "
                              f"nothing); give the local weights file or drop freeze")
        return cls(model, str(value.get("weights") or ""), freeze)

    def plain(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", False)}


ARM_KEYS = ("sources", "backbone", "weights", "freeze")


@dataclass(frozen=True)
class ArmSpec:
    """The sources an arm fuses with its classifier (the small CNN, or `backbone`); `twin_of` names the arm
    whose random twin this is."""

    name: str
    sources: tuple[str, ...]
    twin_of: str | None = None
    backbone: BackboneSpec | None = None

    @property
    def random(self) -> bool:
        return self.twin_of is not None


@dataclass
class Registry:
    """The sources and arms of one run or sweep, resolved from config."""

    sources: dict[str, SourceSpec] = field(default_factory=dict)
    arms: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_ARMS))
    backbones: dict[str, BackboneSpec] = field(default_factory=dict)  # arm -> its classifier, when not the CNN

    def arm(self, name: str) -> ArmSpec:
        """The ArmSpec of `name`: a defined arm, `random:<arm>`, or the legacy `random`.

        Raises:
            SourceError: unknown arm, or an arm naming an undefined source; lists the valid names.
        """
        base = LEGACY_TWINS.get(name) or (name[len(TWIN_PREFIX):] if name.startswith(TWIN_PREFIX) else None)
        key = base or name
        if key not in self.arms:
            raise SourceError(f"unknown arm {name!r}; valid arms: {self.arm_names()}")
        srcs = tuple(self.arms[key])
        missing = [s for s in srcs if s not in self.sources]
        if missing:
            raise SourceError(f"arm {key!r} uses source(s) {missing} that are not defined; defined sources: "
                              f"{sorted(self.sources)} (add them under `sources:`)")
        if base is not None and not srcs:
            raise SourceError(f"arm {name!r}: {base!r} has no sources, so it has no random twin")
        return ArmSpec(name, srcs, twin_of=base, backbone=self.backbones.get(key))

    def arm_names(self) -> list[str]:
        """Every valid arm name: the defined arms, `random` (legacy) and a twin per arm with sources."""
        names = list(self.arms)
        names += [n for n, b in LEGACY_TWINS.items() if b in self.arms]
        names += [TWIN_PREFIX + a for a, s in self.arms.items() if s]
        return names

    def twin(self, arm: str) -> str | None:
        """The name of `arm`'s random twin (the legacy name where it has one); None for scratch."""
        spec = self.arm(arm)
        if spec.random or not spec.sources:
            return None
        for legacy, base in LEGACY_TWINS.items():
            if base == arm:
                return legacy
        return TWIN_PREFIX + arm


def build_registry(sources: Mapping[str, Any] | None = None, arms: Mapping[str, Sequence[str]] | None = None,
                   defaults: Mapping[str, str] | None = None) -> Registry:
    """Sources and arms from config; `defaults` gives the paths of the original sources
    ({"prcc_checkpoint": ..., "cam16_checkpoint": ...}), which entries of `sources` override."""
    reg = Registry()
    for name, (kind, key) in DEFAULT_SOURCES.items():
        path = (defaults or {}).get(key)
        if path:
            reg.sources[name] = SourceSpec(name, checkpoint=str(path), kind=kind)
    for name, value in (sources or {}).items():
        if name in ("scratch", *LEGACY_TWINS) or name.startswith(TWIN_PREFIX) or not name:
            raise SourceError(f"{name!r} cannot name a source (reserved for arms)")
        reg.sources[name] = SourceSpec.parse(name, value)
    for name, srcs in (arms or {}).items():
        if name in LEGACY_TWINS or name.startswith(TWIN_PREFIX):
            raise SourceError(f"arm name {name!r} is reserved for random twins")
        if isinstance(srcs, Mapping):  # {backbone: resnet18, weights: FILE, freeze: false, sources: [...]}
            unknown = sorted(set(srcs) - set(ARM_KEYS))
            if unknown or "backbone" not in srcs:
                raise SourceError(f"arm {name!r}: a mapping needs backbone: <architecture> and takes the keys "
                                  f"{list(ARM_KEYS)}; got {sorted(srcs)}")
            reg.backbones[name] = BackboneSpec.parse(name, srcs)
            srcs = srcs.get("sources") or []
        if isinstance(srcs, str) or not all(isinstance(s, str) for s in srcs):
            raise SourceError(f"arm {name!r} must list source names, e.g. {name}: [{srcs}], got {srcs!r}")
        reg.arms[name] = tuple(srcs)
    return reg


def twin_seed(source: str, seed: int) -> int:
    """Seed of the random weights of `source`'s twin in the run with seed `seed`.

    The original two sources keep the seeds the record was made with; any other source's seed is a hash
    of its name and the run seed, so it never depends on which other sources exist."""
    if source in _LEGACY_TWIN_OFFSET:
        return 10_000 + 100 * int(seed) + _LEGACY_TWIN_OFFSET[source]
    digest = hashlib.sha256(f"twin:{source}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


_SHA: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime): a sweep loads the same files often."""
    from pretrain.utils import sha256_file

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = sha256_file(path)
    return _SHA[key]


def config_key(spec: SourceSpec) -> str:
    """Where the user set this source: `prcc_checkpoint` for the original two, else `sources.<name>`."""
    if spec.name in DEFAULT_SOURCES and spec.kind == DEFAULT_SOURCES[spec.name][0]:
        return DEFAULT_SOURCES[spec.name][1]
    return f"sources.{spec.name}"


def load_source(spec: SourceSpec, random_init: bool = False, seed: int | None = None) -> nn.Module:
    """The frozen encoder of `spec` (eval, no gradients) with `encode(x) -> (B, D)`, `out_dim`,
    `input_size`, `kind`, `source` (the name), `pretrained` and `weights_sha256`.

    Raises:
        FileNotFoundError: the checkpoint or weights file does not exist (named, with the config key).
        CheckpointError / ValueError: wrong kind, weights that do not fit, unknown model name.
    """
    from pretrain.checkpoint import CheckpointError, load_encoder

    path, key = spec.path, config_key(spec)
    if not path:
        raise SourceError(f"{key}: no weights file given; weights are never downloaded: give a local "
                          f".pth/.bin/.safetensors as weights:")
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist")
    with torch.random.fork_rng(devices=[]):
        if spec.checkpoint:
            try:
                enc = load_encoder(path, kind=spec.kind or None, random_init=random_init, seed=seed)
            except CheckpointError as e:
                raise CheckpointError(f"{key}: {e}") from e
            if spec.input_size:
                enc.input_size = int(spec.input_size)
        else:
            from pretrain.backbones import load_external_encoder

            enc = load_external_encoder(spec.model, None if random_init else spec.weights,
                                        input_size=spec.input_size or None, mean=list(spec.mean) or None,
                                        std=list(spec.std) or None, random_init=random_init, seed=seed)
    enc.source = spec.name
    enc.weights_sha256 = getattr(enc, "weights_sha256", None) or file_sha256(path)
    return enc
