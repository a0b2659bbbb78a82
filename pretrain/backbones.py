"""External backbones as frozen encoder sources: `timm:<model>` and `torchvision:<model>`.

An external source is a named architecture plus a local weights file; nothing is ever downloaded
(timm models are built with `pretrained=False`, torchvision ones with `weights=None`):

    enc = load_external_encoder("timm:resnet10t", "weights/resnet10t.safetensors")
    feats = enc.encode(x)       # x: (B, 3, S, S) float RGB in [0, 1], S = enc.input_size -> (B, enc.out_dim)
    twin = load_external_encoder("timm:resnet10t", random_init=True, seed=3)   # the random control

The encoder normalises with its own mean/std inside `encode`, like the package's checkpoints, and
takes its input size and normalisation from timm's `pretrained_cfg` (torchvision: the weights enum's
preset, ImageNet 224 by default); the caller may override them.

Features are the globally pooled output of the backbone's trunk, before any classifier: timm's
`num_classes=0` features; for torchvision the classifier is cut at its first Linear (or Conv) layer,
keeping only the pooling/normalisation/flatten layers before it (ConvNeXt's LayerNorm2d + Flatten,
MaxViT's pool + LayerNorm). So VGG and AlexNet give their pooled-and-flattened conv features
(512*7*7 = 25088 and 256*6*6 = 9216), not the ImageNet-trained fc6/fc7 layers; MobileNetV3 gives its
576/960 pooled features, not the 1024/1280 hidden layer of its classifier (timm's MobileNetV3
keeps its `conv_head`: the two libraries differ there); SqueezeNet's conv classifier is replaced
by a global average pool of `features` (512).
"""

from __future__ import annotations

import difflib
import logging
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from .checkpoint import FORMAT, describe_load_error, freeze
from .layers import IMAGENET_MEAN, IMAGENET_STD
from .utils import sha256_file

LIBRARIES = ("timm", "torchvision")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (*TORCH_SUFFIXES, ".safetensors")
NEST_KEYS = ("state_dict", "model", "module", "model_state_dict")  # wrappers around a state dict
PREFIXES = ("module.", "model.", "backbone.", "encoder.")  # DDP / Lightning / SSL-framework prefixes
# top-level modules that hold a classifier: their keys in a file are dropped when the feature model
# no longer has them (a ResNet's fc, timm heads, Inception's auxiliary heads)
HEAD_NAMES = frozenset({"fc", "classifier", "heads", "head", "head_dist", "last_linear", "pre_logits",
                        "AuxLogits", "aux1", "aux2"})
_TV_HEADS = ("fc", "classifier", "heads", "head")
# torchvision minimum input side by model class (default 32: five stride-2 stages); below it the
# forward fails or the last stages see only padding
_TV_MIN_SIZE = {"AlexNet": 63, "Inception3": 75}
_log = logging.getLogger(__name__)


def parse_model_name(name: str) -> tuple[str, str]:
    """`"timm:resnet10t"` -> `("timm", "resnet10t")`; ValueError for another or no library prefix."""
    library, sep, model = str(name).partition(":")
    if not sep or library not in LIBRARIES or not model:
        raise ValueError(f"external encoder name {name!r} is not '<library>:<model>'; valid prefixes: "
                         f"{', '.join(f'{lib}:<model>' for lib in LIBRARIES)} (e.g. 'timm:resnet50', "
                         f"'torchvision:resnet18')")
    return library, model


def _close_names(query: str, known: list[str], n: int = 8) -> list[str]:
    """Known names nearest to `query`: difflib matches and names starting with it, most similar first."""
    pool = set(difflib.get_close_matches(query, known, n=n, cutoff=0.6))
    pool |= {k for k in known if k.startswith(query)}
    ratio = {k: difflib.SequenceMatcher(None, query, k).ratio() for k in pool}
    return sorted(pool, key=lambda k: (-ratio[k], k))[:n]


def _unknown_model(library: str, model: str, known: list[str]) -> ValueError:
    close = _close_names(model, known)
    hint = f"close names: {', '.join(close)}" if close else "no close name"
    listing = "timm.list_models()" if library == "timm" else "torchvision.models.list_models()"
    return ValueError(f"unknown {library} model {model!r}; {hint} (all: {listing})")


# the standard architectures of the small-data studies, by short name (`backbone: resnet18`)
STANDARD = {n: f"torchvision:{n}" for n in ("resnet18", "resnet50", "vgg16", "vgg19", "mobilenet_v2",
                                             "mobilenet_v3_small", "mobilenet_v3_large", "densenet121",
                                             "alexnet", "squeezenet1_1")}


def resolve_model_name(name: str) -> str:
    """A short standard name (`resnet18`) or `<library>:<model>` -> `<library>:<model>`, checked to exist
    (without building it). ValueError lists the standard names, or close names of the library's."""
    name = str(name)
    if ":" not in name:
        if name in STANDARD:
            return STANDARD[name]
        close = _close_names(name, list(STANDARD))
        raise ValueError(f"unknown architecture {name!r}{f' (close: {close[0]})' if close else ''}; valid short "
                         f"names: {', '.join(STANDARD)}; or any 'torchvision:<model>' / 'timm:<model>'")
    library, model = parse_model_name(name)
    if library == "timm":
        _check_timm_name(model)
    else:
        _check_torchvision_name(model)
    return name


def _check_timm_name(model: str) -> None:
    import timm

    if ":" in model:  # hf-hub:/local-dir: names resolve weights or configs remotely
        raise ValueError(f"timm name {model!r} points at a hub or directory; give a plain timm model name "
                         f"(e.g. 'timm:vit_small_patch14_dinov2') and the local weights file")
    if not timm.is_model(model.split(".")[0]):
        raise _unknown_model("timm", model, timm.list_models())


def _check_torchvision_name(model: str) -> None:
    import torchvision

    if model not in torchvision.models.list_models(module=torchvision.models):
        if model in torchvision.models.list_models():
            raise ValueError(f"torchvision model {model!r} is not an image classification backbone (it is a "
                             f"detection/segmentation/video/flow model); pick one of "
                             f"torchvision.models.list_models(module=torchvision.models)")
        raise _unknown_model("torchvision", model, torchvision.models.list_models(module=torchvision.models))


def _build_timm(model: str) -> nn.Module:
    import timm

    _check_timm_name(model)
    return timm.create_model(model, pretrained=False, num_classes=0)  # (B, D) pooled features


def _feature_part(head: nn.Module) -> nn.Module:
    """A torchvision classifier cut at its first Linear/Conv layer (pool/norm/flatten before it kept).

    Kept layers keep their names, so their weights still load from a full-model file; a conv
    classifier (SqueezeNet) becomes a global average pool.
    """
    if not isinstance(head, nn.Sequential):
        return nn.Identity()
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    for key, layer in head.named_children():
        if isinstance(layer, nn.Linear):
            break
        if isinstance(layer, nn.Conv2d):
            kept = OrderedDict(pool=nn.AdaptiveAvgPool2d(1))
            break
        if not isinstance(layer, nn.Dropout):
            kept[key] = layer
    return nn.Sequential(kept) if kept else nn.Identity()


def _build_torchvision(model: str) -> nn.Module:
    import torchvision

    _check_torchvision_name(model)
    # auxiliary heads are training-only classifiers; init_weights given to silence torchvision's warning
    kwargs = {"aux_logits": False, "init_weights": True} if model in ("googlenet", "inception_v3") else {}
    net = torchvision.models.get_model(model, weights=None, **kwargs)
    for attr in _TV_HEADS:
        if isinstance(getattr(net, attr, None), nn.Module):
            setattr(net, attr, _feature_part(getattr(net, attr)))
    return net


def build_backbone(name: str) -> nn.Module:
    """The architecture of `name` with fresh random weights; forward maps (B, 3, S, S) -> (B, D) features.

    The input is expected already normalised (`ExternalEncoder` does that). Never downloads.

    Raises:
        ValueError: unknown library prefix or model name (the message lists close names).
    """
    library, model = parse_model_name(name)
    return _build_timm(model) if library == "timm" else _build_torchvision(model)


def _size_limits(model: nn.Module, library: str, model_name: str = "") -> tuple[int, int | None]:
    """(minimum input side, the one side the model takes or None) of a built backbone."""
    if library == "timm":
        patch = getattr(model, "patch_embed", None)
        fixed = None
        if patch is not None and getattr(patch, "strict_img_size", False) and getattr(patch, "img_size", None):
            fixed = int(patch.img_size[-1])  # position embeddings and windows sized at build time
        cfg = getattr(model, "pretrained_cfg", None) or {}
        if cfg.get("min_input_size"):
            return int(cfg["min_input_size"][-1]), fixed
        info = getattr(model, "feature_info", None)
        reduction = info[-1].get("reduction") if isinstance(info, list) and info else None
        return int(reduction or 32), fixed
    cls = type(model).__name__
    if cls == "VisionTransformer":
        return int(model.image_size), int(model.image_size)
    if cls == "MaxVit":  # its partitions are sized for the 224 px it is built with
        return 224, 224
    if cls == "SqueezeNet":
        return (21 if model_name == "squeezenet1_0" else 17), None
    return _TV_MIN_SIZE.get(cls, 32), None


def minimum_input_size(name: str) -> int:
    """Smallest image side (pixels) the encoder `name` accepts (its fixed size where it has one)."""
    library, model = parse_model_name(name)
    with torch.random.fork_rng(devices=[]):
        backbone = build_backbone(name)
    low, fixed = _size_limits(backbone, library, model)
    return fixed or low


def input_config(model: nn.Module, library: str, model_name: str | None = None) -> dict:
    """{"size": S, "mean": (3,), "std": (3,)} the backbone was trained with (inputs in [0, 1]).

    timm: the model's `pretrained_cfg` (via `timm.data.resolve_model_data_config`). torchvision: the
    DEFAULT weights preset of `model_name` (read from the enum's metadata, no download), else ImageNet
    mean/std at 224; a model with a fixed input size (ViT, MaxViT) gets that size.
    """
    if library == "timm":
        from timm.data import resolve_model_data_config

        cfg = resolve_model_data_config(model)
        return {"size": int(cfg["input_size"][-1]), "mean": tuple(float(v) for v in cfg["mean"]),
                "std": tuple(float(v) for v in cfg["std"])}
    size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
    if model_name:
        import torchvision

        try:
            preset = torchvision.models.get_model_weights(model_name).DEFAULT.transforms()
            size, mean, std = int(preset.crop_size[0]), tuple(preset.mean), tuple(preset.std)
        except (ValueError, KeyError, AttributeError, TypeError, IndexError):
            pass  # no preset for this name: keep the ImageNet defaults
    fixed = _size_limits(model, library, model_name or "")[1]
    return {"size": int(fixed or size), "mean": tuple(float(v) for v in mean), "std": tuple(float(v) for v in std)}


def _read_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, unwrapped from `state_dict`/`model`/`module` nesting."""
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise ValueError(f"weights file {path} for {name} has suffix {path.suffix!r}; accepted: "
                         f"{', '.join(WEIGHT_SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} for {name} does not exist (weights are never downloaded; "
                                f"give a local {'/'.join(WEIGHT_SUFFIXES)} file)")
    if path.stat().st_size == 0:
        raise ValueError(f"weights file {path} for {name} is empty (0 bytes, e.g. a copy cut short); copy it again")
    if path.suffix.lower() == ".safetensors":
        import safetensors
        import safetensors.torch

        try:
            obj = safetensors.torch.load_file(str(path), device="cpu")
        except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"weights file {path} for {name} is not a readable safetensors file "
                             f"({describe_load_error(e)}); is it complete?") from e
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        # the weights_only unpickler raises any of these on arbitrary or truncated bytes
        except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError,
                KeyError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(f"weights file {path} for {name} cannot be read by torch.load(weights_only=True) "
                             f"({describe_load_error(e)}); is it complete, and a state dict?") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        raise ValueError(f"{path} is a wbc-fusion {obj.get('kind')!r} checkpoint, not {name} weights; use it "
                         f"as a checkpoint source (pretrain.load_encoder), not as an external backbone")
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}  # plain dict: no stale _metadata versions
        inner = next((obj[k] for k in NEST_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    what = f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise ValueError(f"weights file {path} for {name} holds {what}, not a state dict of tensors (also looked "
                     f"under {', '.join(repr(k) for k in NEST_KEYS)})")


def _strip_prefixes(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """Remove `PREFIXES` from keys, one at a time, while that makes more keys match `own`."""
    best, hits = state, len(own.intersection(state))
    improved = True
    while improved:
        improved = False
        for prefix in PREFIXES:
            cand = {k.removeprefix(prefix): v for k, v in best.items()}
            n = len(own.intersection(cand))
            if len(cand) == len(best) and n > hits:
                best, hits, improved = cand, n, True
    return best


def _few(items: list[str], n: int = 4) -> str:
    return f"[{', '.join(items[:n])}{', ...' if len(items) > n else ''}] ({len(items)})"


def load_weights(model: nn.Module, path: str | os.PathLike, name: str) -> list[str]:
    """Load a local weights file into the feature backbone `model` of `name`, in place.

    Reads .pth/.pt/.bin/.ckpt (torch.load, weights_only=True) and .safetensors; a state dict nested
    under `state_dict`/`model`/`module` and key prefixes (`module.`, `model.`, `backbone.`, `encoder.`)
    are handled. Classifier keys the feature model no longer has (a ResNet's `fc.*`, timm heads) are
    dropped with a log note; BatchNorm `num_batches_tracked` may be absent.

    Returns:
        The dropped classifier keys.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unknown suffix, unreadable or truncated file, or keys/shapes that do not fit `name`.
    """
    path = Path(path)
    if isinstance(model, ExternalEncoder):
        model = model.backbone
    own = model.state_dict()
    state = _strip_prefixes(_read_state_dict(path, name), set(own))
    dropped = sorted(k for k in state if k not in own and k.split(".")[0] in HEAD_NAMES)
    unexpected = sorted(k for k in state if k not in own and k not in dropped)
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    bad = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or bad:
        shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:3]]
        parts = [f"missing keys {_few(missing)}" if missing else "",
                 f"unexpected keys {_few(unexpected)}" if unexpected else "",
                 f"wrong shapes [{'; '.join(shapes)}{'; ...' if len(bad) > 3 else ''}] ({len(bad)})" if bad else ""]
        raise ValueError(f"weights file {path} does not fit {name}: {', '.join(p for p in parts if p)}; is this "
                         f"file for {name}? give weights saved from {name} or the model name they came from")
    try:
        model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=True)
    except RuntimeError as e:
        raise ValueError(f"weights file {path} does not load into {name}: {describe_load_error(e)}") from e
    if dropped:
        _log.info("%s: dropped %d classifier key(s) that the %s feature model has no use for: %s",
                  path, len(dropped), name, _few(dropped))
    return dropped


class ExternalEncoder(nn.Module):
    """A frozen external backbone with the package's encoder interface.

    Attributes:
        out_dim: feature width D of `encode`.
        input_size: image side S it expects; `min_size` the smallest it accepts, `fixed_size` the only
            one it accepts (ViT-like models) or None.
        kind: "external"; model_name: e.g. "timm:resnet10t"; weights_path / checkpoint_path: the
            weights file (None for the random twin); weights_sha256: its content hash (None for the
            twin); pretrained: True when weights were loaded; seed: the twin's seed (None otherwise).
    """

    kind = "external"

    def __init__(self, backbone: nn.Module, *, model_name: str, input_size: int, mean: tuple[float, ...],
                 std: tuple[float, ...], min_size: int, fixed_size: int | None = None,
                 weights_path: str | None = None, weights_sha256: str | None = None,
                 seed: int | None = None) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"{model_name}: mean and std need 3 values each (std > 0), got mean={mean} std={std}")
        self.backbone = backbone
        self.model_name, self.min_size, self.fixed_size = model_name, int(min_size), fixed_size
        self.input_size = int(input_size)
        self.weights_path = self.checkpoint_path = weights_path
        self.weights_sha256, self.seed, self.pretrained = weights_sha256, seed, weights_path is not None
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self._check_size(self.input_size, self.input_size, what="input_size")
        backbone.eval()
        out = self._dummy_forward()
        if out.ndim != 2:
            raise ValueError(f"{model_name} gives features of shape {tuple(out.shape)}, not (B, D)")
        self.out_dim = int(out.shape[1])

    @torch.no_grad()
    def _dummy_forward(self) -> torch.Tensor:
        """Features of one blank image, at the smallest accepted side (the width D does not depend on it,
        and a 224 px forward costs ~1 s on CPU), else at `input_size` for a model that refuses it."""
        small = self.fixed_size or self.min_size
        try:
            return self.backbone(torch.zeros(1, 3, small, small, device=self.mean.device))
        except (RuntimeError, ValueError, AssertionError):
            return self.backbone(torch.zeros(1, 3, self.input_size, self.input_size, device=self.mean.device))

    def _check_size(self, h: int, w: int, what: str = "images") -> None:
        if self.fixed_size is not None and (h, w) != (self.fixed_size, self.fixed_size):
            raise ValueError(f"encoder {self.model_name} takes only {self.fixed_size}x{self.fixed_size} images "
                             f"(its position embeddings/windows are fixed), got {what} {h}x{w}; resize to "
                             f"{self.fixed_size} (encoder_resize: true) or use input_size={self.fixed_size}")
        if min(h, w) < self.min_size:
            raise ValueError(f"encoder {self.model_name} needs images of at least {self.min_size}x{self.min_size} "
                             f"pixels, got {what} {h}x{w}; resize them to {max(self.min_size, self.input_size)} "
                             f"(encoder_resize: true, or a larger input_size) or pick another encoder")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float RGB in [0, 1], H = W = `input_size` -> (B, out_dim) pooled features."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"encoder {self.model_name} takes (B, 3, H, W) RGB, got shape {tuple(x.shape)}")
        self._check_size(int(x.shape[-2]), int(x.shape[-1]))
        return self.backbone((x - self.mean) / self.std)  # (B, D)

    forward = encode

    @property
    def cache_key(self) -> str:
        """What fixes the features of an image: model, weights (or twin seed), size and normalisation."""
        weights = self.weights_sha256 if self.pretrained else f"random{self.seed}"
        mean = ",".join(f"{v:g}" for v in self.mean.flatten().tolist())
        std = ",".join(f"{v:g}" for v in self.std.flatten().tolist())
        return f"{self.model_name}|{weights}|{self.input_size}|{mean}|{std}"

    def input_spec(self) -> dict:
        """What `encode` expects, in the format of a checkpoint's `input` entry."""
        return {"size": self.input_size, "channels": 3, "range": [0, 1],
                "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def extra_repr(self) -> str:
        src = self.weights_path if self.pretrained else f"random init, seed {self.seed}"
        return f"{self.model_name}, {src}, input {self.input_size}px, out_dim {self.out_dim}"


def load_external_encoder(name: str, weights: str | os.PathLike | None = None, *, input_size: int | None = None,
                          mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                          random_init: bool = False, seed: int | None = None) -> ExternalEncoder:
    """A frozen `ExternalEncoder` for `name` ("timm:<model>" / "torchvision:<model>") from a local file.

    Args:
        weights: local .pth/.pt/.bin/.ckpt/.safetensors file; required unless `random_init`, ignored then.
        input_size, mean, std: override the model's own input config (see `input_config`).
        random_init: the random twin: same architecture, frozen random weights drawn from `seed`
            (None means 0) without disturbing the global RNG.

    Raises:
        ValueError: bad name, no weights file, weights that do not fit, or an input size the model refuses.
        FileNotFoundError: the weights file does not exist.
    """
    library, model = parse_model_name(name)
    if weights is None and not random_init:
        raise ValueError(f"no weights file given for {name}; weights are never downloaded: give a local "
                         f".pth/.bin/.safetensors (or random_init=True for the random-weight control)")
    seed = (0 if seed is None else int(seed)) if random_init else None
    with torch.random.fork_rng(devices=[]):  # the build's initialisation never moves the caller's RNG
        torch.manual_seed(seed or 0)
        backbone = build_backbone(name)
    sha = None
    if not random_init:
        load_weights(backbone, weights, name)
        sha = sha256_file(weights)
    cfg = input_config(backbone, library, model)
    low, fixed = _size_limits(backbone, library, model)
    enc = ExternalEncoder(backbone, model_name=name, input_size=input_size or cfg["size"],
                          mean=tuple(mean) if mean is not None else cfg["mean"],
                          std=tuple(std) if std is not None else cfg["std"], min_size=low, fixed_size=fixed,
                          weights_path=None if random_init else str(weights), weights_sha256=sha, seed=seed)
    return freeze(enc)
