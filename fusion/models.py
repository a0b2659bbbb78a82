"""The WBC classifier: a small Kaiming-initialised CNN, and the fusion model around it.

`SmallCNN` is conv-BN-maxpool-ReLU blocks (the same function as conv-BN-ReLU-maxpool, cheaper), global
average pooling and a linear head (`forward_features -> (B, F)`, `forward_head -> (B, C)`). `FusionModel`
adds frozen encoders (`encode(x) -> (B, D)`) and combines their features with the CNN in one of the `FUSIONS` modes:

- `sum`:    each source's latent -> class logits (LayerNorm, linear), added to the CNN's logits;
- `concat`: [CNN features, normalised source latents] -> dropout -> linear head;
- `gated`:  softmax weights over [cnn, sources...] computed from the CNN features, applied to each
            branch's logits; the batch-mean weights of the last forward are in `gate_weights`.

Frozen encoders are kept OUTSIDE the module tree (a plain dict), so `parameters()`, `state_dict()` and
the optimizer see only the trainable CNN and heads, and `train()` can never switch an encoder out of
eval mode. They move with the model (`_apply`) and run under `torch.inference_mode()`; their outputs
are cloned into normal tensors before the trainable heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.layers import IMAGENET_MEAN, IMAGENET_STD, NORMS, kaiming_init


@dataclass
class CNNConfig:
    """SmallCNN architecture.

    Attributes:
        channels: output width of each conv-BN-maxpool-ReLU block; the default (32, 64, 128, 192, 256)
            has ~0.76M parameters. Inputs must be at least 2**len(channels) pixels wide.
        num_classes: number of output classes.
        dropout: dropout before the linear head.
        input_size: image side S the model is trained on (metadata for the checkpoint's input spec).
        mean, std: per-channel normalisation applied inside `forward` (inputs are RGB in [0, 1]).
        norm: the normalisation layer of each block, one of `NORMS`: "batch" (BatchNorm, the default),
            "group" (GroupNorm, 8 groups or fewer) or "layer" (GroupNorm with one group: LayerNorm over
            channels and space). Group and layer norm use no batch statistics, a known point of failure
            when another lab's images shift the statistics.
    """

    channels: Sequence[int] = (32, 64, 128, 192, 256)
    num_classes: int = 5
    dropout: float = 0.2
    input_size: int = 64
    mean: Sequence[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: Sequence[float] = field(default_factory=lambda: list(IMAGENET_STD))
    norm: str = "batch"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown normalisation layer {self.norm!r}; valid: {list(NORMS)}")
        self.channels = [int(c) for c in self.channels]
        if not self.channels or min(self.channels) < 1:
            raise ValueError(f"CNNConfig.channels must be a non-empty list of positive widths, got {self.channels}")
        if self.num_classes < 2:
            raise ValueError(f"CNNConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.input_size < 2 ** len(self.channels):
            raise ValueError(f"CNNConfig.input_size={self.input_size} is too small for {len(self.channels)} "
                             f"max-pool blocks (needs >= {2 ** len(self.channels)}); use fewer channels")


class SmallCNN(nn.Module):
    """Conv-BN-maxpool-ReLU blocks -> global average pool -> dropout -> linear."""

    def __init__(self, cfg: CNNConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CNNConfig()
        blocks: list[nn.Module] = []
        c_in = 3
        for c_out in cfg.channels:
            # max-pool before ReLU: the same numbers, bit for bit (ReLU is monotone, so it commutes with
            # max), with the ReLU and its backward on a 4x smaller tensor. Indices of conv/BN (4i, 4i+1)
            # are unchanged, so older checkpoints load as they are.
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), NORMS[cfg.norm](c_out),
                       nn.MaxPool2d(2), nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        self.out_dim = c_in
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(c_in, cfg.num_classes)
        self.register_buffer("mean", torch.tensor(list(cfg.mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(cfg.std), dtype=torch.float32).view(1, 3, 1, 1))
        kaiming_init(self)
        # the head starts small so the initial logits are near uniform
        nn.init.normal_(self.head.weight, std=0.01)
        # NHWC convolutions: ~20% faster per step on CPU (benchmarks/real_study), and the layout AMP prefers
        self.features.to(memory_format=torch.channels_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> (B, F) pooled features, F = channels[-1]."""
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return self.features(x).mean(dim=(2, 3))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B, C) logits."""
        return self.head(self.dropout(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _source_head(dim: int, out: int, dropout: float) -> nn.Module:
    """(B, D) latent -> (B, out): LayerNorm (frozen latents come at any scale), dropout, small linear."""
    head = nn.Sequential(nn.LayerNorm(dim), nn.Dropout(dropout), nn.Linear(dim, out))
    nn.init.normal_(head[-1].weight, std=0.01)
    nn.init.zeros_(head[-1].bias)
    return head


class SumFusion(nn.Module):
    """The original study: each source's latent projected to class logits, added to the CNN's."""

    def __init__(self, feat_dim: int, dims: dict[str, int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({s: _source_head(d, num_classes, dropout) for s, d in dims.items()})

    def forward(self, f: torch.Tensor, logits: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        for s, head in self.heads.items():
            logits = logits + head(feats[s])
        return logits


class ConcatFusion(nn.Module):
    """[CNN features (B, F), LayerNorm(latent_s) (B, D_s)...] -> dropout -> linear (replaces the CNN head)."""

    def __init__(self, feat_dim: int, dims: dict[str, int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.norms = nn.ModuleDict({s: nn.LayerNorm(d) for s, d in dims.items()})
        self.head = _source_head(feat_dim + sum(dims.values()), num_classes, dropout)[1:]  # no norm

    def forward(self, f: torch.Tensor, logits: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        z = torch.cat([f] + [norm(feats[s]) for s, norm in self.norms.items()], dim=1)
        return self.head(z)


class GatedFusion(nn.Module):
    """Softmax weights (B, 1+S) over [cnn, sources...] from the CNN features, applied to branch logits.

    The weighted mean is scaled by 1+S so that equal weights reproduce `sum`. The batch-mean weights
    of the last forward are kept in `last_weights` (1+S,).
    """

    def __init__(self, feat_dim: int, dims: dict[str, int], num_classes: int, dropout: float) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({s: _source_head(d, num_classes, dropout) for s, d in dims.items()})
        self.gate = nn.Linear(feat_dim, 1 + len(dims))
        nn.init.zeros_(self.gate.weight)  # start from equal weights
        nn.init.zeros_(self.gate.bias)
        self.last_weights: torch.Tensor | None = None

    def forward(self, f: torch.Tensor, logits: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        branch = torch.stack([logits] + [h(feats[s]) for s, h in self.heads.items()], dim=1)  # (B, 1+S, C)
        w = torch.softmax(self.gate(f).float(), dim=1)  # (B, 1+S)
        self.last_weights = w.detach().mean(0)
        return (w.unsqueeze(-1).to(branch.dtype) * branch).sum(1) * branch.shape[1]


FUSIONS: dict[str, type[nn.Module]] = {"sum": SumFusion, "concat": ConcatFusion, "gated": GatedFusion}


def check_mode(mode: str) -> str:
    if mode not in FUSIONS:
        raise ValueError(f"unknown fusion mode {mode!r}; valid modes: {sorted(FUSIONS)}")
    return mode


class FusionModel(nn.Module):
    """SmallCNN plus frozen encoders fused by `mode` (see module docstring).

    Args:
        cnn: the trainable SmallCNN.
        encoders: name -> frozen module with `encode(x) -> (B, D)`, `out_dim`, `input_size`;
            empty for the `scratch` arm (the model is then the CNN alone, whatever the mode).
        mode: one of `FUSIONS`.
        num_classes: C.
        encoder_resize: resize images to each encoder's `input_size` when they differ (bilinear);
            when False a size mismatch raises ValueError naming the encoder and both sizes.
        dropout: dropout on source latents before their heads.
    """

    def __init__(self, cnn: SmallCNN, encoders: dict[str, nn.Module] | None, mode: str = "sum",
                 num_classes: int = 5, encoder_resize: bool = True, dropout: float = 0.2) -> None:
        super().__init__()
        check_mode(mode)
        self.cnn = cnn
        self.mode = mode
        self.num_classes = num_classes
        self.encoder_resize = encoder_resize
        self.encoders: dict[str, nn.Module] = {s: e for s, e in sorted((encoders or {}).items())}
        self.sources = list(self.encoders)
        dims = {s: int(e.out_dim) for s, e in self.encoders.items()}
        self.fusion = FUSIONS[mode](cnn.out_dim, dims, num_classes, dropout) if self.sources else None

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        for e in self.encoders.values():  # frozen encoders follow .to(device) / .float() etc.
            e._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for e in self.encoders.values():
            nn.Module.train(e, False)  # frozen stays in eval, whatever the caller asks
        return self

    @property
    def gate_weights(self) -> dict[str, float] | None:
        """Batch-mean gate weights {"cnn": w0, source: w...} of the last forward (gated mode only)."""
        w = getattr(self.fusion, "last_weights", None)
        return None if w is None else dict(zip(["cnn"] + self.sources, w.float().cpu().tolist(), strict=True))

    def encoder_inputs(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Resize (B, 3, S, S) images to encoder `name`'s input size, or raise if not allowed."""
        return resize_for_encoder(self.encoders[name], x, self.encoder_resize, name)

    @torch.inference_mode()
    def _encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {s: e.encode(self.encoder_inputs(s, x)).float() for s, e in self.encoders.items()}

    def encode_sources(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen features {source: (B, D_s)} as normal (non-inference) tensors, safe for autograd."""
        return {s: z.clone() for s, z in self._encode(x).items()}

    def forward(self, x: torch.Tensor, feats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> (B, C) logits.

        `feats` may carry precomputed source latents {source: (B, D_s)}; missing ones are computed
        from `x` by the frozen encoders.
        """
        feats = dict(feats or {})
        if self.fusion is not None and any(s not in feats for s in self.sources):
            feats = {**self.encode_sources(x), **feats}
        return self.forward_head(self.cnn.forward_features(x), feats)

    def forward_head(self, f: torch.Tensor, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, F) CNN features and {source: (B, D_s)} latents -> (B, C) logits (batched runs call it on
        features computed elsewhere, fusion/batched.py)."""
        logits = self.cnn.forward_head(f)  # (B, C)
        return logits if self.fusion is None else self.fusion(f, logits, feats)


def resize_for_encoder(enc: nn.Module, x: torch.Tensor, allow: bool = True, name: str = "") -> torch.Tensor:
    """(B, 3, S, S) -> (B, 3, E, E), E = `enc.input_size` (bilinear); ValueError when not `allow`."""
    size = int(getattr(enc, "input_size", 0) or x.shape[-1])
    if x.shape[-2:] == (size, size):
        return x
    if not allow:
        raise ValueError(
            f"encoder {name or getattr(enc, 'kind', '?')!r} from {getattr(enc, 'checkpoint_path', '(in memory)')} "
            f"expects {size}x{size} images but the WBC images are {x.shape[-2]}x{x.shape[-1]}; set "
            f"encoder_resize: true to resize inside the model, or image_size: {size}")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)




@dataclass
class BackboneConfig:
    """A standard architecture trained as the WBC classifier (`BackboneClassifier`).

    Attributes:
        model: `<library>:<model>`, e.g. "torchvision:resnet18".
        num_classes, dropout, input_size: as in `CNNConfig`.
        weights: local file the backbone was initialised from ("" = the library's random init); a record
            only: the trained weights live in the checkpoint.
        freeze: only the head trains; the backbone stays in eval mode (its BatchNorm statistics kept).
        mean, std: normalisation inside `forward_features`; None = the model's pretrained preset (filled in
            when the model is built, so the checkpoint records the values).
    """

    model: str
    num_classes: int = 5
    dropout: float = 0.2
    input_size: int = 64
    weights: str = ""
    freeze: bool = False
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None


class BackboneClassifier(nn.Module):
    """timm/torchvision backbone (pooled features) -> dropout -> linear, with SmallCNN's interface.

    Built with the library's own initialisation (never downloaded); `load_backbone_weights` starts it
    from a local file. Raises ValueError when `input_size` is below the architecture's minimum.
    """

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        from pretrain.backbones import _size_limits, build_backbone, input_config, parse_model_name

        self.cfg = cfg
        library, name = parse_model_name(cfg.model)
        self.backbone = build_backbone(cfg.model)
        if cfg.mean is None or cfg.std is None:
            preset = input_config(self.backbone, library, name)
            cfg.mean, cfg.std = list(preset["mean"]), list(preset["std"])
        low, fixed = _size_limits(self.backbone, library, name)
        if fixed and cfg.input_size != fixed:
            raise ValueError(f"{cfg.model} takes only {fixed}x{fixed} images, but image_size is {cfg.input_size}; "
                             f"set image_size: {fixed}")
        if cfg.input_size < low:
            raise ValueError(f"{cfg.model} needs images of at least {low}x{low} pixels, but image_size is "
                             f"{cfg.input_size}; set image_size: {low} or more, or pick another architecture")
        self.backbone.to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            was = self.backbone.training
            self.backbone.eval()
            self.out_dim = int(self.backbone(torch.zeros(1, 3, cfg.input_size, cfg.input_size)).shape[1])
            self.backbone.train(was)
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(self.out_dim, cfg.num_classes)
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.tensor(list(cfg.mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(cfg.std), dtype=torch.float32).view(1, 3, 1, 1))
        if cfg.freeze:
            self.backbone.requires_grad_(False)

    def load_backbone_weights(self, path: str) -> None:
        """Start the backbone from a local weights file (classifier keys of the file are dropped)."""
        from pretrain.backbones import load_weights

        load_weights(self.backbone, path, self.cfg.model)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.cfg.freeze:
            self.backbone.train(False)
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        if self.cfg.freeze:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(f))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def build_classifier(spec, num_classes: int, image_size: int, dropout: float,
                     channels: Sequence[int], norm: str = "batch") -> SmallCNN | BackboneClassifier:
    """The trainable classifier of an arm: the small CNN, or the arm's `BackboneSpec` (from scratch or
    from its local weights file, with the pretrained preset's normalisation)."""
    if spec is None:
        return SmallCNN(CNNConfig(channels=channels, num_classes=num_classes, dropout=dropout,
                                  input_size=image_size, norm=norm))
    model = BackboneClassifier(BackboneConfig(spec.model, num_classes, dropout, image_size, spec.weights,
                                              spec.freeze))
    if spec.weights:
        model.load_backbone_weights(spec.weights)
    return model


def classifier_from_config(kind: str, config: dict) -> SmallCNN | BackboneClassifier:
    """Rebuild a checkpoint's classifier from its recorded config (kind "small_cnn" or "backbone")."""
    return BackboneClassifier(BackboneConfig(**config)) if kind == "backbone" else SmallCNN(CNNConfig(**config))
