"""Train one run: fraction x arm x mode x seed -> metrics on the test split.

A run folder holds `config.yaml` (resolved RunConfig), `log.jsonl` (one line per epoch), `curves.png`
(train/val loss, accuracy, val macro-F1), `best.pt` (the best-on-validation weights, kind "wbc_fusion",
rebuildable from the file alone) and `metrics.json`, written LAST and atomically: its presence marks a
finished run, which a restart skips.

Training is step-based: a run takes `epochs` passes over its training images, but never fewer than
`min_steps` optimizer steps (a 1% run samples its few images repeatedly, each time freshly augmented)
and never more than `max_steps`. The learning rate warms up linearly, then follows a cosine to zero;
the run is validated `evals` times at even intervals and the best-on-validation weights (macro-F1) are
the ones tested. Why (measured on real PBC validation data, see benchmarks/real_study/NOTES.md, "Tuning"):
epoch-counted early stopping with ReduceLROnPlateau stopped 10% runs after ~400 noisy steps.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.config import config_from_dict, start_run, to_plain
from pretrain.engine import FitResult, NonFiniteLossError, autocast, fit, train_one_epoch
from pretrain.plots import plot_curves
from pretrain.utils import (
    atomic_write_json,
    count_parameters,
    eval_batches,
    get_device,
    make_run_dir,
    read_jsonl,
    seed_everything,
)

from .augment import AugConfig, augment
from .data import WBCData, load_wbc
from .encoders import FeatureCache, fusion_sources_config, images_key, images_to_tensor, load_arm_encoders
from .metrics import classification_metrics
from .models import BackboneClassifier, FusionModel, SmallCNN, build_classifier, check_mode
from .preprocess import check_ops
from .sources import Registry, build_registry
from .splits import SplitMismatchError, load_split, make_split, save_split, split_indices

ENCODER_FEATURES = ("precompute", "online")
SAMPLERS = ("uniform", "balanced")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")


@dataclass
class ModelConfig:
    """The small CNN and how frozen encoders meet it (`model:` in YAML, `--model.*` flags)."""

    cnn_channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256],
                                    metadata={"help": "width of each conv block (~0.39M params by default)"})
    dropout: float = 0.2
    norm: str = field(default="batch", metadata={"help": "normalisation layer of the small CNN: batch, group or "
                                                          "layer (no batch statistics)"})
    encoder_resize: bool = field(default=True, metadata={"help": "resize images to each encoder's input size"})
    encoder_features: str = field(default="precompute", metadata={
        "help": "precompute: frozen features of each un-augmented image once; online: encoders run on "
                "every augmented batch"})

    def __post_init__(self) -> None:
        from .models import NORMS

        if self.norm not in NORMS:
            raise ValueError(f"model.norm must be one of {list(NORMS)}, got {self.norm!r}")
        if self.encoder_features not in ENCODER_FEATURES:
            raise ValueError(f"model.encoder_features must be one of {ENCODER_FEATURES}, "
                             f"got {self.encoder_features!r}")


@dataclass
class OptimConfig:
    """Optimisation: the step budget, AdamW and its schedule, the loss (`optim:`, `--optim.*`)."""

    epochs: int = field(default=20, metadata={"help": "passes over the training images (then clamped to "
                                                      "[min_steps, max_steps] optimizer steps)"})
    min_steps: int = field(default=800, metadata={
        "help": "train at least this many steps (small fractions; 400 left 10%% runs under-trained, "
                "benchmarks/real_study/NOTES.md, 'Scratch at 10%%')"})
    max_steps: int = field(default=1500, metadata={"help": "train at most this many steps (0 = no cap)"})
    evals: int = field(default=10, metadata={"help": "validations per run, evenly spaced; the best is kept"})
    batch_size: int = 64
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    warmup: float = field(default=0.05, metadata={"help": "share of the steps with a linear lr warm-up"})
    weight_decay: float = field(default=0.05, metadata={"help": "weight decay (decoupled for AdamW, L2 for SGD)"})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, or sgd (with momentum, the related "
                                                               "studies' recipe)"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    schedule: str = field(default="cosine", metadata={"help": "cosine: warm-up then cosine to 0; step: warm-up, "
                                                               "then x step_gamma at each of step_at"})
    step_at: list[float] = field(default_factory=lambda: [0.5, 0.75], metadata={
        "help": "step decay points, as shares of the run's steps"})
    step_gamma: float = field(default=0.1, metadata={"help": "step decay factor"})
    progressive: list[int] = field(default_factory=list, metadata={
        "help": "progressive resizing: image sides to train at before image_size, growing, the run's steps "
                "split evenly over them and image_size (e.g. [24, 32] at image_size 48); [] = off"})
    class_weights: bool = field(default=True, metadata={"help": "inverse-frequency class weights in the loss"})
    label_smoothing: float = 0.05
    early_stop: int = field(default=0, metadata={"help": "validations without a better val macro-F1 before "
                                                        "stopping; 0 = off (the cosine schedule runs out)"})
    bn_recalibrate: int = field(default=1024, metadata={
        "help": "before each validation, re-estimate BatchNorm statistics on up to this many UN-augmented "
                "training images (0 = keep the running averages of augmented batches)"})

    loss: str = field(default="ce", metadata={"help": "ce (cross-entropy) or focal (Lin et al. 2017: down-weights "
                                                       "easy examples, for imbalanced classes)"})
    focal_gamma: float = field(default=2.0, metadata={"help": "focusing exponent of the focal loss"})
    sampler: str = field(default="uniform", metadata={
        "help": "uniform: consecutive random permutations of the training images; balanced: each class drawn "
                "equally often (with replacement)"})

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"optim.loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"optim.sampler must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        if any(not 0 < float(t) < 1 for t in self.step_at) or list(self.step_at) != sorted(self.step_at):
            raise ValueError(f"optim.step_at must be increasing shares in (0, 1), got {self.step_at}")
        if list(self.progressive) != sorted(set(self.progressive)) or any(int(v) < 1 for v in self.progressive):
            raise ValueError(f"optim.progressive must list growing image sides, got {self.progressive}")
        if self.focal_gamma < 0:
            raise ValueError(f"optim.focal_gamma must be >= 0, got {self.focal_gamma}")
        if not 0 <= float(self.warmup) < 1:
            raise ValueError(f"optim.warmup must be in [0, 1), got {self.warmup}")
        for name in ("epochs", "batch_size", "evals"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"optim.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class AugmentConfig:
    """Training-time augmentation of the CNN's view (`augment:`, `--augment.*`)."""

    enabled: bool = True
    scale_min: float = field(default=1.0, metadata={"help": "smallest crop area of the random resized crop "
                                                              "(1.0: no zoom; the cell stays whole)"})
    rotate: float = field(default=180.0, metadata={"help": "max rotation in degrees"})
    color: float = field(default=0.15, metadata={"help": "brightness/contrast/saturation jitter"})
    hed: float = field(default=0.0, metadata={"help": "stain jitter in HED space (Tellez 2018): densities x "
                                                       "U(1-hed, 1+hed) + U(-hed, hed); e.g. 0.05; 0 = off"})


@dataclass
class RuntimeConfig:
    """Where and how a run executes; changes speed, not the recipe (`runtime:`, `--runtime.*`)."""

    device: str = "auto"
    amp: bool = field(default=False, metadata={"help": "bfloat16 autocast on CUDA"})
    eval_batch_size: int = field(default=128, metadata={
        "help": "images per batch for validation, test and frozen features (the same numbers at any size; "
                "128 is about twice as fast as 512 on a CPU, benchmarks/real_study/NOTES.md)"})
    eval_test: bool = field(default=True, metadata={"help": "evaluate the test split at the end; false for "
                                                           "tuning runs, which must see validation only"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 = torch default"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the classifier (in place: checkpoints keep their keys); the first steps are slow "
                "while it compiles, so it pays off on long GPU runs"})
    progress: bool = True
    curves: bool = field(default=True, metadata={"help": "write curves.png (about a second per run on CPU)"})



@dataclass
class RunConfig:
    """One fusion training run (also the per-run defaults of a sweep): the data and what this run is
    (fraction, arm, mode, seed, sources) at the top, the recipe in sections."""

    data: str = field(default="data/demo/wbc", metadata={"help": "WBC folder of class folders or bloodmnist*.npz"})
    classes: list[str] | dict | str = field(default_factory=list, metadata={"help": "class set: the folder names by default (the five WBC classes in their usual order); a list, or name -> aliases in YAML ({neutrophil: [SNE, BNE]}); 'all' keeps BloodMNIST's 8 classes"})
    preprocess: list[str] = field(default_factory=list, metadata={
        "help": "steps applied once to every original image in the decode-once cache, in order: crop_border, "
                "equalize, clahe (fusion/preprocess.py); evaluate/predict repeat them"})
    split: str = field(default="", metadata={"help": "split JSON; made once (and saved) if missing; "
                                                     "'' = <out>/split.json"})
    val: float = field(default=0.15, metadata={"help": "val share of all images when the split is made"})
    test: float = field(default=0.15, metadata={"help": "test share of all images when the split is made"})
    split_seed: int = field(default=0, metadata={"help": "seed of the split when it is made"})
    image_size: int = field(default=48, metadata={"help": "WBC image side in pixels"})
    cache_dir: str = field(default="data/cache", metadata={"help": "decoded-image cache; '' for none"})
    fraction: float = field(default=1.0, metadata={"help": "label fraction of train, in (0, 1]"})
    arm: str = field(default="scratch", metadata={"help": "an arm of `arm_sets` (default: scratch, prcc, cam16, "
                                                          "prcc+cam16), its twin random:<arm>, or random"})
    mode: str = field(default="sum", metadata={"help": "fusion mode: sum, concat or gated"})
    seed: int = field(default=0, metadata={"help": "CNN init, batch order and augmentation seed"})
    prcc_checkpoint: str = "checkpoints/prcc_autoencoder.pt"
    cam16_checkpoint: str = "checkpoints/cam16_resnet.pt"
    sources: dict = field(default_factory=dict, metadata={
        "help": "more encoder sources, name -> checkpoint path, 'timm:<model>'/'torchvision:<model>' or "
                "{model, weights, input_size, mean, std} (see fusion/sources.py); YAML only"})
    arm_sets: dict = field(default_factory=dict, metadata={
        "help": "more arms, name -> list of source names (YAML only); each gets its twin random:<name>"})
    out: str = field(default="runs/run", metadata={"help": "run folder"})
    val_run: str = field(default="", metadata={
        "help": "folder of a finished validation-only run (eval_test false) of this same config, e.g. the "
                "study's pilot: its chosen weights are tested instead of training again ('' = train)"})
    overwrite: bool = field(default=False, metadata={"help": "empty an existing run folder first"})
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        self.registry().arm(self.arm)
        check_mode(self.mode)
        if not 0 < float(self.fraction) <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        check_ops(self.preprocess)
        if int(self.image_size) < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        for name, section in (("model", ModelConfig), ("optim", OptimConfig), ("augment", AugmentConfig),
                              ("runtime", RuntimeConfig)):
            if isinstance(getattr(self, name), dict):  # built in code from a nested dict
                setattr(self, name, config_from_dict(section, getattr(self, name), prefix=f"{name}."))
        if self.optim.progressive and int(self.optim.progressive[-1]) >= int(self.image_size):
            raise ValueError(f"optim.progressive sides {self.optim.progressive} must all be below image_size "
                             f"{self.image_size} (the last stage trains at image_size)")

    def registry(self) -> Registry:
        """The run's sources and arms: the original two from their checkpoint fields, plus config."""
        return build_registry(self.sources, self.arm_sets, {"prcc_checkpoint": self.prcc_checkpoint,
                                                            "cam16_checkpoint": self.cam16_checkpoint})


def prepare_split(cfg: RunConfig, data: WBCData, default_path: Path, fractions: Sequence[float] = (),
                  parts: Sequence[str] = ("train", "val", "test")) -> dict:
    """Load the split file, or make it from `data` once and save it (so later runs reuse it).

    `fractions` (default: the run's own) are stored in a new file; others are derived on demand,
    reproducibly, from the file's stored training order. An existing file is checked against the images
    and labels of `parts` (a search checks only train and val: it never looks at the test part).
    """
    path = Path(cfg.split) if cfg.split else default_path
    if path.is_file():
        split = load_split(path)
        if not cfg.split and split.get("seed") != cfg.split_seed:  # our own file, made for another seed
            raise SettingsChangedError(f"{path} was made with split_seed {split.get('seed')}, but split_seed "
                                       f"{cfg.split_seed} is requested; use another --out, or give --split "
                                       f"{path} to keep that split")
        try:  # name the file when it was made for other images
            for part in parts:
                split_indices(split, data, part)
        except SplitMismatchError as e:
            raise SplitMismatchError(f"split file {path} does not fit the images: {e}") from e
        return split
    split = make_split(data, val=cfg.val, test=cfg.test, fractions=tuple(fractions) or (cfg.fraction,),
                       seed=cfg.split_seed)
    save_split(split, path)
    return split


def class_weight_tensor(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (C,), mean 1 over present classes; absent classes get 0."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    w = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / max((counts > 0).sum(), 1), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def plan_steps(n_train: int, cfg: RunConfig) -> tuple[int, int, int]:
    """(batch size, steps between validations, validations): `epochs` passes over the training images,
    clamped to [min_steps, max_steps] steps in all, split into `evals` equal chunks."""
    bs = max(1, min(cfg.optim.batch_size, n_train))
    total = max(cfg.optim.min_steps, cfg.optim.epochs * math.ceil(n_train / bs))
    if cfg.optim.max_steps > 0:
        total = min(total, cfg.optim.max_steps)
    evals = max(1, min(cfg.optim.evals, total))
    return bs, math.ceil(total / evals), evals


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup: float):
    """Per-step LambdaLR: linear warm-up over `warmup` of the steps, then cosine from the peak to 0."""
    w = int(round(warmup * total_steps))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        t = (step - w) / max(1, total_steps - w)
        return 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (the default), or SGD with momentum (the related studies' recipe)."""
    params = [p for p in params if p.requires_grad]
    if optim.optimizer == "sgd":
        return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, optim: OptimConfig):
    """Per-step schedule: warm-up then cosine (`warmup_cosine`), or warm-up then step decay at `step_at`."""
    if optim.schedule == "cosine":
        return warmup_cosine(optimizer, total_steps, optim.warmup)
    w = int(round(optim.warmup * total_steps))
    marks = [int(round(t * total_steps)) for t in optim.step_at]

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return optim.step_gamma ** sum(step >= m for m in marks)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batches(n: int, bs: int, steps: int, g: torch.Generator, labels: torch.Tensor | None = None):
    """`steps` batches of `bs` rows of range(n): consecutive random permutations, or, given the rows'
    `labels` (the balanced sampler), rows drawn with replacement so that every class is equally likely."""
    need = bs * steps
    if labels is not None:
        counts = torch.bincount(labels).double()
        w = 1.0 / counts[labels]
        return list(torch.multinomial(w, need, replacement=True, generator=g).view(steps, bs))
    perm = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(need / n))])[:need]
    return list(perm.view(steps, bs))


def focal_loss(logits: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None = None, gamma: float = 2.0,
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Focal loss (Lin et al. 2017): per-sample cross-entropy scaled by (1 - p_true)^gamma, so that easy,
    well-classified images count less; (B, C) logits, (B,) labels -> scalar. gamma = 0 is cross-entropy."""
    ce = F.cross_entropy(logits, y, weight=weight, label_smoothing=label_smoothing, reduction="none")
    p_true = torch.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
    scaled = (1.0 - p_true).clamp(min=0).pow(gamma) * ce
    return scaled.sum() / (weight[y].sum() if weight is not None else len(y))


LOSSES = {"ce": None, "focal": focal_loss}  # None: F.cross_entropy, the default path


class _Feeder:
    """Turns rows of the run's image tensor into model inputs (augmented when training)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, feats: dict[str, torch.Tensor],
                 aug: AugConfig | None, g: torch.Generator, loss_weight: torch.Tensor | None,
                 label_smoothing: float, focal_gamma: float | None = None) -> None:
        self.images, self.labels, self.feats = images, labels, feats
        self.aug, self.g = aug, g
        self.loss_weight, self.smoothing = loss_weight, label_smoothing
        self.focal_gamma = focal_gamma  # None: cross-entropy
        self.size: int | None = None  # progressive resizing: the side training batches are resized to

    def batch(self, rows: torch.Tensor, device: torch.device, training: bool):
        """Images (B, 3, S, S) float in [0, 1] (augmented and resized when `training`), labels (B,) and the
        precomputed source features {source: (B, D)} of `rows`, on `device`."""
        x = self.images[rows].to(device, non_blocking=True).float().div_(255)
        if self.aug is not None and training:
            x = augment(x, self.aug, self.g)
        if self.size is not None and training and self.size != x.shape[-1]:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        return x, self.labels[rows].to(device), {s: f[rows].to(device) for s, f in self.feats.items()}

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The run's loss of (B, C) logits: weighted, smoothed cross-entropy, or the focal loss."""
        w = self.loss_weight.to(logits.device) if self.loss_weight is not None else None
        if self.focal_gamma is None:
            return F.cross_entropy(logits.float(), y, weight=w, label_smoothing=self.smoothing)
        return focal_loss(logits.float(), y, weight=w, gamma=self.focal_gamma, label_smoothing=self.smoothing)

    def step(self, model: FusionModel, rows: torch.Tensor, device: torch.device):
        x, y, feats = self.batch(rows, device, model.training)
        logits = model(x, feats or None)
        loss = self.loss(logits, y)
        return loss, len(rows), {"acc": (logits.argmax(1) == y).float().mean().item()}


@torch.no_grad()
def predict(model: FusionModel, images: torch.Tensor, feats: dict[str, torch.Tensor], rows: np.ndarray,
            device: torch.device, batch_size: int, amp: bool = False) -> tuple[torch.Tensor, dict | None]:
    """Logits (N, C) float32 CPU for `rows`, and the mean gate weights (gated mode) over them."""
    model.eval()
    out, gates, n = [], None, 0
    for i, j in eval_batches(len(rows), batch_size):  # no lone last image: the same logits at any batch size
        r = torch.as_tensor(rows[i:j])
        x = images[r].to(device).float().div_(255)
        with autocast(device, amp):
            logits = model(x, {s: f[r].to(device) for s, f in feats.items()} or None)
        out.append(logits.float().cpu())
        gw = model.gate_weights
        if gw is not None:
            gates = {k: (gates or {}).get(k, 0.0) + v * len(r) for k, v in gw.items()}
        n += len(r)
    logits = torch.cat(out) if out else torch.zeros(0, model.num_classes)
    return logits, ({k: v / n for k, v in gates.items()} if gates else None)


@torch.no_grad()
def recalibrate_bn(cnn: SmallCNN, images: torch.Tensor, rows: torch.Tensor, device: torch.device,
                   batch_size: int, limit: int) -> None:
    """Replace BatchNorm running statistics by exact averages over up to `limit` un-augmented images.

    The running averages come from augmented, ever-changing batches; validation and test images are
    neither, and the mismatch made validation swing from one check to the next (benchmarks/real_study).
    """
    # a frozen backbone's BatchNorm (no trainable affine) keeps its pretrained statistics
    bns = [m for m in cnn.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
           and any(p.requires_grad for p in m.parameters(recurse=False))]
    if not bns or limit <= 0:
        return
    was_training = cnn.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    cnn.train()
    rows = rows[:limit]
    for i in range(0, len(rows), batch_size):
        cnn.forward_features(images[rows[i:i + batch_size]].to(device).float().div_(255))
    for m, mom in zip(bns, momenta, strict=True):
        m.momentum = mom
    cnn.train(was_training)


def _eval(model, images, feats, rows, labels, device, cfg, loss_weight, classes) -> dict:
    logits, gates = predict(model, images, feats, rows, device, cfg.runtime.eval_batch_size, cfg.runtime.amp)
    y = labels[torch.as_tensor(rows)]
    m = classification_metrics(y.numpy(), logits.argmax(1).numpy(), classes)
    loss = F.cross_entropy(logits, y, weight=loss_weight).item()
    return {"loss": loss, "acc": m["accuracy"], "macro_f1": m["macro_f1"], "metrics": m, "gates": gates,
            "logits": logits}


def _finished(run_dir: Path) -> dict | None:
    import json

    p = run_dir / "metrics.json"
    if p.is_file():
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:
            return None
    return None


# result fields that measure the machine, not the run: they differ between identical runs
TIMING_FIELDS = ("seconds", "train_seconds", "train_images_per_s", "val_run_seconds", "group_seconds")
# fields that may differ between a validation-only run and the run that reuses it (`val_run`)
_TWIN_FREE = ("out", "runtime.eval_test", "runtime.progress", "runtime.curves", "overwrite", "val_run")
# fields that do not change a finished run's numbers: a run may be reused when only these differ
# (eval_batch_size gives the same numbers at any size, benchmarks/real_study/NOTES.md)
RESULT_FREE = ("out", "runtime.progress", "runtime.curves", "overwrite", "val_run", "runtime.eval_batch_size",
               "cache_dir")


def flat(d: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}: config sections as dotted keys, to compare field by field."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k in ("model", "optim", "augment", "runtime"):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class SettingsChangedError(ValueError):
    """A finished run's recorded settings differ from the requested ones."""


def settings_diff(cfg: RunConfig, run_dir: str | os.PathLike) -> list[str]:
    """Fields (not in `RESULT_FREE`) whose value in `run_dir/config.yaml` differs from `cfg`, as
    'name: old -> new'; ['config.yaml missing'] when the run recorded no settings."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    try:
        old = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return [f"{path.name} missing or unreadable"]
    old, new = flat(old), flat(to_plain(cfg))
    defaults = flat(to_plain(type(cfg)()))  # a field added since the run was made counts as its default
    keys = sorted((set(old) | set(new)) - set(RESULT_FREE))
    diff = [f"{k}: {old.get(k, defaults.get(k))!r} -> {new.get(k)!r}" for k in keys
            if old.get(k, defaults.get(k)) != new.get(k)]
    return diff + _changed_sources(cfg, Path(run_dir))


def _changed_sources(cfg: RunConfig, run_dir: Path) -> list[str]:
    """Encoder files that changed since the run was trained (same path, other weights, e.g. a retrained
    encoder): the run's best.pt records each source's sha256. Runs without sources, or from before
    sources were recorded, have nothing to compare."""
    from .sources import file_sha256

    if not cfg.registry().arm(cfg.arm).sources or not (run_dir / "best.pt").is_file():
        return []
    try:
        recorded = load_checkpoint(run_dir / "best.pt", kind="wbc_fusion")["config"].get("sources") or {}
    except (ValueError, OSError):
        return ["best.pt unreadable"]
    reg, out = cfg.registry(), []
    for name, spec in recorded.items():
        path = reg.sources[name].path if name in reg.sources else ""
        if spec.get("sha256") and path and Path(path).is_file() and file_sha256(path) != spec["sha256"]:
            out.append(f"source {name}: {path} changed since the run was trained")
    return out


def _val_only_twin(cfg: RunConfig, run_dir: Path) -> FitResult | None:
    """The training outcome of `cfg.val_run`, when it is a finished validation-only run of the same config
    (every field but `_TWIN_FREE`); its log is copied into `run_dir`. None (train as usual) otherwise."""
    src = Path(cfg.val_run)
    done = _finished(src)
    if done is None or done.get("status") != "val_only" or not (src / "best.pt").is_file():
        print(f"{run_dir.name}: {src} holds no finished validation-only run; training it")
        return None
    ckpt = load_checkpoint(src / "best.pt", kind="wbc_fusion")
    mine = {k: v for k, v in flat(to_plain(cfg)).items() if k not in _TWIN_FREE}
    theirs = {k: v for k, v in flat(ckpt.get("train", {})).items() if k not in _TWIN_FREE}
    if mine != theirs:
        diff = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        print(f"{run_dir.name}: {src} was trained with other settings ({', '.join(diff)}); training it")
        return None
    shutil.copyfile(src / "log.jsonl", run_dir / "log.jsonl")
    history = read_jsonl(run_dir / "log.jsonl")
    return FitResult(best_epoch=done["best_epoch"], best={"val_macro_f1": done["val_macro_f1"],
                                                          "val_acc": done["val_acc"]},
                     history=history, best_state=ckpt["model"], stopped_early=done["stopped_early"],
                     seconds=done["seconds"])


def aug_config(a: AugmentConfig) -> AugConfig | None:
    """The batched augmentation of a run's `augment:` section (None when disabled)."""
    return AugConfig(scale=(a.scale_min, 1.0), rotate=a.rotate, color=a.color, hed=a.hed) if a.enabled else None


@dataclass
class Trainer:
    """What a run trains: the model (classifier + frozen encoders), the batch feeder and the data it reads."""

    model: FusionModel
    feeder: _Feeder
    images: torch.Tensor  # (N, 3, S, S) uint8, on the device when it is a GPU
    labels: torch.Tensor  # (N,) int64
    feats: dict[str, torch.Tensor]  # precomputed frozen features per source ({} when computed online)
    loss_weight: torch.Tensor | None
    g: torch.Generator  # batches and augmentations


def shared_images(data: WBCData, device: torch.device) -> torch.Tensor:
    """The (N, 3, S, S) uint8 images of `data`, on `device` when it is a GPU (else on the CPU), made once per
    data set and device and shared by every run trained on it: a sweep uploads them once, and a batched group
    of N runs holds one copy, not N. Never written to (batches are copies)."""
    store = data.__dict__.setdefault("_image_tensors", {})
    key = str(device) if device.type == "cuda" else "cpu"
    if key not in store:
        t = images_to_tensor(data.images)
        store[key] = t.to(device) if device.type == "cuda" else t
    return store[key]


def build_trainer(cfg: RunConfig, data: WBCData, train_rows: np.ndarray, device: torch.device,
                  features: FeatureCache | None = None) -> Trainer:
    """The run's model, seeded by `cfg.seed` (same seed -> same CNN init, batches and augmentations in every
    arm: paired comparisons), and its feeder; used by `train_run` and the learning-rate range test."""
    encoders = load_arm_encoders(cfg.arm, cfg.registry(), cfg.seed, cfg.image_size, cfg.model.encoder_resize)
    images = shared_images(data, device)  # (N, 3, S, S) uint8
    labels = torch.from_numpy(np.asarray(data.labels, dtype=np.int64))
    feats: dict[str, torch.Tensor] = {}
    if encoders and cfg.model.encoder_features == "precompute":
        cache = features if features is not None else FeatureCache()
        feats = cache.get(encoders, images, images_key(data.hashes, data.image_size), device, seed=cfg.seed,
                          batch_size=cfg.runtime.eval_batch_size, encoder_resize=cfg.model.encoder_resize)
    if device.type == "cuda":
        feats = {s: f.to(device) for s, f in feats.items()}

    seed_everything(cfg.seed)
    n_classes = len(data.classes)
    arm = cfg.registry().arm(cfg.arm)
    cnn = build_classifier(arm.backbone, n_classes, cfg.image_size, cfg.model.dropout, cfg.model.cnn_channels,
                           cfg.model.norm)
    if cfg.optim.progressive and arm.backbone is not None:  # the smallest stage must fit the architecture
        with torch.random.fork_rng(devices=[]):
            build_classifier(arm.backbone, n_classes, int(cfg.optim.progressive[0]), cfg.model.dropout, ())
    model = FusionModel(cnn, encoders, cfg.mode, n_classes, cfg.model.encoder_resize, cfg.model.dropout).to(device)
    if cfg.runtime.compile:  # the model's calls (training, validation, test) run compiled
        model.compile()
    g = torch.Generator().manual_seed(cfg.seed)
    loss_weight = class_weight_tensor(data.labels[train_rows], n_classes) if cfg.optim.class_weights else None
    aug = aug_config(cfg.augment)
    feeder = _Feeder(images, labels, feats, aug, g, loss_weight, cfg.optim.label_smoothing,
                     cfg.optim.focal_gamma if cfg.optim.loss == "focal" else None)
    return Trainer(model, feeder, images, labels, feats, loss_weight, g)


@dataclass
class RunState:
    """A run set up for training (`setup_run`): its model, data rows, step plan, optimizer and schedule.

    `train_epoch` and `validate` are what `fit` calls; `finish` tests the chosen weights and writes the run's
    files. A batched group of runs (fusion/batched.py) drives the same objects, several at once.
    """

    cfg: RunConfig
    run_dir: Path
    data: WBCData
    trainer: Trainer
    device: torch.device
    train_rows: np.ndarray
    val_rows: np.ndarray
    test_rows: np.ndarray
    batch_size: int
    steps: int  # optimizer steps between validations
    epochs: int  # validations
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    base: dict  # what the run is, for its result
    t0: float
    on_validate: Callable[[int, dict], None] | None = None

    def __post_init__(self) -> None:
        # the un-augmented training images BatchNorm statistics are re-estimated on: a fixed order per seed
        rows = torch.as_tensor(self.train_rows)
        self.calib_rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.cfg.seed))]

    @property
    def model(self) -> FusionModel:
        return self.trainer.model

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """The rows of each training batch of `epoch`, drawn from the run's generator; sets the progressive
        resizing stage of the feeder for that epoch."""
        cfg, tr = self.cfg, self.trainer
        stages = [*map(int, cfg.optim.progressive), cfg.image_size]
        tr.feeder.size = (stages[min(len(stages) - 1, (epoch - 1) * len(stages) // self.epochs)]
                          if len(stages) > 1 else None)
        train_t = torch.as_tensor(self.train_rows)
        balanced = tr.labels[train_t] if cfg.optim.sampler == "balanced" else None
        return [train_t[b] for b in _batches(len(self.train_rows), self.batch_size, self.steps, tr.g, balanced)]

    def with_train_size(self, out: dict) -> dict:
        """An epoch's training means, plus the side trained at under progressive resizing."""
        return {**out, "train_size": self.trainer.feeder.size or self.cfg.image_size} if self.cfg.optim.progressive \
            else out

    def train_epoch(self, epoch: int) -> dict:
        batches = self.epoch_batches(epoch)
        out = train_one_epoch(self.model, batches, self.trainer.feeder.step, self.optimizer, self.device,
                              amp=self.cfg.runtime.amp, desc=f"epoch {epoch}", progress=False,
                              scheduler=self.scheduler)
        return self.with_train_size(out)

    def validate(self, epoch: int) -> dict:
        tr, cfg = self.trainer, self.cfg
        recalibrate_bn(self.model.cnn, tr.images, self.calib_rows, self.device, self.batch_size,
                       cfg.optim.bn_recalibrate)
        r = _eval(self.model, tr.images, tr.feats, self.val_rows, tr.labels, self.device, cfg, tr.loss_weight,
                  self.data.classes)
        out = {k: r[k] for k in ("loss", "acc", "macro_f1")}
        if self.on_validate is not None:
            self.on_validate(epoch, out)
        return out

    def fit(self) -> FitResult:
        cfg = self.cfg
        return fit(self.model, epochs=self.epochs, train_epoch=self.train_epoch, validate=self.validate,
                   optimizer=self.optimizer, monitor="val_macro_f1", mode="max", plateau_patience=None,
                   early_stop=cfg.optim.early_stop or None, log_path=self.run_dir / "log.jsonl",
                   progress=cfg.runtime.progress, desc=f"{cfg.arm}/{cfg.mode} f={cfg.fraction} s={cfg.seed}")

    def fail(self, error: Exception) -> dict:
        result = {**self.base, "status": "failed", "reason": f"non-finite loss: {error}",
                  "seconds": round(time.perf_counter() - self.t0, 2)}
        atomic_write_json(self.run_dir / "metrics.json", result)
        return result

    def finish(self, res: FitResult, twin: bool = False, extra: dict | None = None) -> dict:
        """Test the best-on-validation weights once, write plots, `best.pt` and (last) `metrics.json`."""
        cfg, model, data, tr, run_dir = self.cfg, self.model, self.data, self.trainer, self.run_dir
        model.load_state_dict(res.best_state)
        base = {**self.base, **({"val_run": cfg.val_run} if twin else {})}
        bs, steps = self.batch_size, self.steps
        result = {**base, "status": "ok", "best_epoch": res.best_epoch, "val_macro_f1": res.best.get("val_macro_f1"),
                  "val_acc": res.best.get("val_acc"), "epochs_run": len(res.history),
                  "steps": len(res.history) * steps, "batch_size": bs, "stopped_early": res.stopped_early,
                  "train_seconds": round(res.seconds, 2),
                  "train_images_per_s": round(len(res.history) * steps * bs / max(res.seconds, 1e-9), 1),
                  **(extra or {})}
        if cfg.runtime.eval_test:  # once, with the weights chosen on validation
            test = _eval(model, tr.images, tr.feats, self.test_rows, tr.labels, self.device, cfg, tr.loss_weight,
                         data.classes)
            m = test["metrics"]
            result.update({"accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                           "balanced_accuracy": m.get("balanced_accuracy"), "weighted_f1": m.get("weighted_f1"),
                           "per_class": m["per_class"], "confusion": to_plain(m["confusion"]),
                           "classes": list(data.classes), "test_loss": test["loss"], "gate_weights": test["gates"]})
            # the test probabilities, for ensembles of runs (fusion/ensemble.py)
            np.savez_compressed(run_dir / "test_probs.npz", rows=self.test_rows,
                                ids=np.asarray(data.ids)[self.test_rows],
                                labels=tr.labels[torch.as_tensor(self.test_rows)].numpy(),
                                probs=torch.softmax(test["logits"], 1).numpy().astype(np.float32),
                                classes=np.asarray(list(data.classes)))
        else:
            result.update({"status": "val_only", "accuracy": None, "macro_f1": None})
        if cfg.runtime.curves:
            plot_curves(res.history, run_dir / "curves.png", metrics=("loss", "acc", "macro_f1"),
                        title=f"{cfg.arm} ({cfg.mode}), fraction {cfg.fraction}, seed {cfg.seed}")
        save_checkpoint(run_dir / "best.pt", kind="wbc_fusion", config=fusion_model_config(model, cfg, data.classes),
                        model=res.best_state, input_spec={"size": cfg.image_size, "channels": 3, "range": [0, 1],
                                                          "mean": list(model.cnn.cfg.mean),
                                                          "std": list(model.cnn.cfg.std)},
                        metrics={k: result[k] for k in ("accuracy", "macro_f1", "val_macro_f1", "best_epoch")},
                        data={"source": data.root, "n_train": len(self.train_rows), "fraction": cfg.fraction},
                        train=cfg)
        # this call only: a reused run's training time belongs to the pilot, and is not counted twice
        result["seconds"] = round(time.perf_counter() - self.t0, 2)
        if twin:
            result["val_run_seconds"] = round(res.seconds, 2)
        result["torch_threads"] = torch.get_num_threads()  # CPU numbers depend on it (summation order)
        atomic_write_json(run_dir / "metrics.json", to_plain(result))
        return result


def setup_run(cfg: RunConfig, data: WBCData | None = None, run_dir: str | os.PathLike | None = None,
              split: dict | None = None, features: FeatureCache | None = None,
              on_validate: Callable[[int, dict], None] | None = None) -> RunState | dict:
    """Prepare one run for training (arguments as `train_run`): its folder (restarted from scratch), data
    rows, seeded model and feeder, optimizer and schedule. A finished run's result dict is returned instead."""
    t0 = time.perf_counter()
    run_dir = Path(run_dir or cfg.out)
    if not cfg.overwrite and (done := _finished(run_dir)) is not None:
        if diff := settings_diff(cfg, run_dir):
            raise SettingsChangedError(
                f"{run_dir} holds a finished run made with other settings ({'; '.join(diff)}); "
                f"give --overwrite true to train it again with the new ones, or use another --out")
        return done
    run_dir = make_run_dir(run_dir.parent, run_dir.name, overwrite=cfg.overwrite)
    start_run(run_dir, cfg, stale=("log.jsonl", "best.pt", "curves.png"))  # a killed run restarts from scratch
    if cfg.runtime.threads > 0:
        torch.set_num_threads(cfg.runtime.threads)
    device = get_device(cfg.runtime.device)
    if data is None:
        data = load_wbc(cfg.data, cfg.image_size, cfg.cache_dir or None, progress=cfg.runtime.progress,
                        preprocess=cfg.preprocess, classes=cfg.classes)
    if data.image_size != cfg.image_size:
        raise ValueError(f"data {data.root} was loaded at {data.image_size}px but the run asks for "
                         f"image_size {cfg.image_size}; load it at the run's size")
    if split is None:
        split = prepare_split(cfg, data, run_dir / "split.json")
    train_rows = split_indices(split, data, "train", cfg.fraction)
    val_rows = split_indices(split, data, "val")
    # a validation-only run (a search trial) never looks up the test rows
    test_rows = split_indices(split, data, "test") if cfg.runtime.eval_test else np.zeros(0, dtype=np.int64)
    if len(val_rows) == 0 or (cfg.runtime.eval_test and len(test_rows) == 0):
        raise ValueError(f"the split has {len(val_rows)} val and {len(test_rows)} test images; both are "
                         f"needed (early stopping on val, metrics on test)")

    tr = build_trainer(cfg, data, train_rows, device, features)
    arm = cfg.registry().arm(cfg.arm)
    bs, steps, epochs = plan_steps(len(train_rows), cfg)
    optimizer = make_optimizer(tr.model.parameters(), cfg.optim)
    scheduler = make_schedule(optimizer, steps * epochs, cfg.optim)
    base = {"run": run_dir.name, "arm": cfg.arm, "sources": list(arm.sources), "twin_of": arm.twin_of,
            "backbone": arm.backbone.model if arm.backbone else "small_cnn",
            "backbone_pretrained": bool(arm.backbone and arm.backbone.weights),
            "backbone_frozen": bool(arm.backbone and arm.backbone.freeze),
            **({"fold": int(split["fold"]["index"])} if "fold" in split else {}),
            "mode": cfg.mode, "fraction": float(cfg.fraction),
            "seed": int(cfg.seed), "n_train": int(len(train_rows)), "n_val": int(len(val_rows)),
            "n_test": int(len(test_rows)), "trainable_params": count_parameters(tr.model, trainable_only=True),
            "params": count_parameters(tr.model),
            "image_size": cfg.image_size, "encoder_features": cfg.model.encoder_features}
    return RunState(cfg, run_dir, data, tr, device, train_rows, val_rows, test_rows, bs, steps, epochs, optimizer,
                    scheduler, base, t0, on_validate)


def train_run(cfg: RunConfig, data: WBCData | None = None, run_dir: str | os.PathLike | None = None,
              split: dict | None = None, features: FeatureCache | None = None,
              on_validate: Callable[[int, dict], None] | None = None) -> dict:
    """Train one run and return its result dict (also written to `run_dir/metrics.json`).

    `data`, `split` and `features` let a sweep load the images, the split and the frozen features
    once for all its runs. `on_validate(epoch, val_metrics)` is called after each validation (a
    hyperparameter search reports to its pruner there, and may raise to stop the run). With
    `runtime.eval_test` false the test rows of the split are never looked up. A run folder that already
    holds `metrics.json` is not trained again (its result is returned) unless `cfg.overwrite`. A NaN/inf
    loss stops the run; the result then has status "failed" and a reason, and the caller goes on.

    Returns:
        {"status": "ok"|"failed", "arm", "mode", "fraction", "seed", "accuracy", "macro_f1",
         "balanced_accuracy", "per_class", "confusion", "best_epoch", "val_macro_f1", "epochs_run",
         "steps", "seconds", "gate_weights" (gated mode), "reason" (failed), ...}
    """
    st = setup_run(cfg, data, run_dir, split, features, on_validate)
    if isinstance(st, dict):
        return st
    twin = _val_only_twin(cfg, st.run_dir) if cfg.val_run else None
    try:
        res = twin or st.fit()
    except NonFiniteLossError as e:
        return st.fail(e)
    return st.finish(res, twin=twin is not None)


def fusion_model_config(model: FusionModel, cfg: RunConfig, classes: Sequence[str]) -> dict:
    """Plain-dict config that `build_fusion_model` turns back into the same FusionModel."""
    reg = cfg.registry()
    return {"cnn": to_plain(model.cnn.cfg), "classifier": "backbone" if isinstance(model.cnn, BackboneClassifier)
            else "small_cnn", "mode": model.mode, "num_classes": model.num_classes,
            "encoder_resize": model.encoder_resize, "dropout": cfg.model.dropout, "arm": cfg.arm, "seed": cfg.seed,
            "sources": fusion_sources_config(reg, cfg.arm), "twin": reg.arm(cfg.arm).random,
            "classes": list(classes)}


def run(cfg: RunConfig) -> dict:
    """`scripts/train_fusion.py` entry: train one run into `cfg.out` and print its test metrics."""
    r = train_run(cfg)
    if r["status"] == "val_only":
        print(f"{cfg.out}: validation accuracy {r['val_acc']:.4f}, macro-F1 {r['val_macro_f1']:.4f} "
              f"(test not evaluated; {r['seconds']:.1f} s)")
    elif r["status"] == "ok":
        print(f"{cfg.out}: test accuracy {r['accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f} "
              f"(best epoch {r['best_epoch']}, {r['seconds']:.1f} s)")
    else:
        print(f"{cfg.out}: FAILED: {r['reason']}")
    return r
