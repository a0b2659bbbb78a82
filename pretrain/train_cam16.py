"""Pretrain the Camelyon16 ResNet tumor classifier: config dataclass and `fit_cam16(cfg) -> metrics`.

Patches come from `pretrain.patches.open_patch_dataset` (our HDF5 store, PatchCamelyon, or a folder
with normal/ and tumor/), are split by slide (`split_by_slide`), decoded once into memory when they
fit (`in_memory_gb`), augmented with flips, 90-degree rotations and mild stain-like colour jitter.

Run folder (`cfg.run_dir`): config.yaml, split.json, log.jsonl (one JSON line per epoch), last.pt
(the training state, every epoch), best.pt (best on validation so far; at the end with its test
metrics), curves.png (loss + accuracy), confusion.png, test_predictions.npz and, last, metrics.json.
Test metrics are computed once, at the end, with the best weights. Rerunning a killed run resumes it
exactly; a finished one is reused; `cfg.out` gets a copy of best.pt at the end unless it holds a
better model (see `pretrain.resume`). Under `torchrun` the run is data-parallel and `batch_size` the
global batch (see `pretrain.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, get_worker_info
from tqdm.auto import tqdm

from . import distributed
from .cam16_split import CLASSES, LeakySplitWarning, binary_metrics, describe_split, split_by_slide
from .checkpoint import save_checkpoint
from .engine import evaluate, fit, train_one_epoch
from .plots import plot_curves, save_figure
from .resnet import Cam16ResNet, ResNetConfig
from .resume import (
    NEUTRAL_FIELDS,
    check_config,
    finish_run,
    open_run,
    restore_state,
    rewrite_log,
    rng_state,
    save_state,
)
from .utils import (
    atomic_write_json,
    count_parameters,
    fingerprint_files,
    seed_everything,
    seed_worker,
)

KIND = "cam16_resnet"
# Besides NEUTRAL_FIELDS: in memory or streamed, a patch goes through the same resize. `num_workers`
# is compared: each worker draws its own augmentation stream.
RESUME_NEUTRAL = (*NEUTRAL_FIELDS, "in_memory_gb")
__all__ = ["CLASSES", "Cam16Config", "LeakySplitWarning", "PatchTransform", "binary_metrics", "describe_split",
           "fit_cam16", "split_by_slide"]


@dataclass
class Cam16Config:
    """Everything that defines one CAM16 ResNet training run (saved as run_dir/config.yaml)."""

    data: str = "data/demo/cam16/patches.h5"  # patch store .h5, PCam file/folder, or normal/+tumor/ folder
    out: str = "checkpoints/cam16_resnet.pt"  # best-on-validation checkpoint
    run_dir: str = "runs/cam16"  # logs, plots, metrics
    arch: str = "resnet18"  # resnet18 | resnet34 | resnet50
    norm: str = "batch"  # batch | group | layer: the ResNet's normalisation layers
    image_size: int = 96  # patches are resized to S x S pixels (once, when held in memory)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4  # Adam's L2 penalty
    val_fraction: float = 0.15  # fraction of SLIDES held out for validation (>= 1 slide)
    test_fraction: float = 0.15  # fraction of SLIDES held out for test (>= 1 slide)
    val_slides: list[str] = field(default_factory=list)  # explicit validation slides (override the fraction)
    test_slides: list[str] = field(default_factory=list)  # explicit test slides (override the fraction)
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    weights_path: str | None = None  # local torchvision ResNet state dict or cam16 checkpoint; never downloaded
    max_patches_per_slide: int = 0  # 0 = all; else a seeded random subset per slide
    augment: bool = True
    class_weighted: bool = True  # cross-entropy weighted by inverse class frequency in train
    monitor: str = "val_loss"  # val_loss (min) or val_acc (max)
    plateau_patience: int = 2
    early_stop: int = 0  # stop after this many epochs without improvement; 0 = off
    in_memory_gb: float = 4.0  # decode patches once into RAM when they take less than this
    amp: bool = True  # bfloat16 autocast on CUDA only
    progress: bool = True
    overwrite: bool = False  # replace `out` whatever it holds; start over a run folder of another config

    def __post_init__(self) -> None:
        for name in ("image_size", "epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Cam16Config.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.image_size < 32:
            raise ValueError(f"Cam16Config.image_size must be >= 32 for a ResNet, got {self.image_size}")
        if self.monitor not in ("val_loss", "val_acc"):
            raise ValueError(f"Cam16Config.monitor must be 'val_loss' or 'val_acc', got {self.monitor!r}")
        if self.lr <= 0:
            raise ValueError(f"Cam16Config.lr must be positive, got {self.lr}")
        self.model_config()  # unknown arch -> ValueError listing the valid ones

    def model_config(self) -> ResNetConfig:
        return ResNetConfig(arch=self.arch, num_classes=len(CLASSES), input_size=self.image_size,
                            weights_path=self.weights_path or None, norm=self.norm)


class PatchTransform:
    """uint8 (P, P, 3) -> float32 tensor (3, S, S) in [0, 1]; resized when P != S; optionally augmented.

    Augmentation (albumentations): horizontal and vertical flips, 90-degree rotations (patches have
    no canonical orientation), and mild hue/saturation/brightness/contrast jitter standing in for
    stain and scanner variation.
    """

    def __init__(self, size: int, augment: bool, seed: int = 0) -> None:
        self.size = size
        ops = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=1.0),
               A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=8, p=0.5),
               A.RandomBrightnessContrast(brightness_limit=0.1, contrast_limit=0.1, p=0.5)]
        self.compose = A.Compose(ops, seed=seed) if augment else None

    def reseed(self, seed: int) -> None:
        if self.compose is not None:
            self.compose.set_random_seed(seed)

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        img = resize_patch(img, self.size)
        if self.compose is not None:
            img = self.compose(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


def resize_patch(img: np.ndarray, size: int) -> np.ndarray:
    """uint8 (P, P, 3) -> (size, size, 3); area interpolation when shrinking."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    interp = cv2.INTER_AREA if img.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(img, (size, size), interpolation=interp)


class _Patches(Dataset):
    """Indices into a source (an in-memory uint8 array (N, S, S, 3) or a patch dataset) + transform."""

    def __init__(self, source, labels: np.ndarray, transform: PatchTransform,
                 indices: np.ndarray | None = None) -> None:
        self.source, self.labels, self.transform, self.indices = source, labels, transform, indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.source[i] if self.indices is None else self.source.read_image(int(self.indices[i]))
        return self.transform(img), int(self.labels[i])


def _worker_init(worker_id: int) -> None:
    """Different augmentation streams per DataLoader worker (each holds a copy of the same seed)."""
    seed_worker(worker_id)
    info = get_worker_info()
    tf = getattr(info.dataset, "transform", None) if info is not None else None
    if isinstance(tf, PatchTransform):
        tf.reseed(torch.initial_seed() % (2**32))


def _subsample_per_slide(slide_ids: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Indices keeping at most `k` random patches of each slide (all when k <= 0)."""
    if k <= 0:
        return np.arange(len(slide_ids))
    rng = np.random.default_rng(seed)
    keep = [rng.permutation(np.flatnonzero(slide_ids == s))[:k] for s in np.unique(slide_ids)]
    return np.sort(np.concatenate(keep))


def _h5_fingerprint(path: Path, content: bool) -> str:
    """An HDF5 patch store's datasets (names, shapes, dtypes and, under 1 GB, their bytes), not the file's
    bytes: a store extracted again from the same slides is the same data, though its file holds a new
    creation time and timings."""
    import hashlib

    import h5py

    h = hashlib.sha256()
    with h5py.File(path, "r") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        for name in sorted(names):
            d = f[name]
            h.update(f"{name}:{d.shape}:{d.dtype}".encode())
            if content:
                step = max(1, (64 << 20) // max(1, d.dtype.itemsize * int(np.prod(d.shape[1:], dtype=np.int64))))
                for i in range(0, d.shape[0] if d.shape else 1, step):
                    block = np.asarray(d[i:i + step] if d.shape else d[()])
                    if block.dtype == object:  # variable-length strings: their values, not object pointers
                        block = np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in block.ravel()])
                    h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()[:16]


def _data_fingerprint(path: Path) -> str:
    if path.is_file() and path.suffix.lower() in (".h5", ".hdf5"):
        return _h5_fingerprint(path, content=path.stat().st_size < (1 << 30))
    if path.is_file():
        return fingerprint_files([path], content=path.stat().st_size < (1 << 30))
    files = [p for p in path.rglob("*") if p.is_file()]
    return fingerprint_files(files, root=path, content=False)


def _ce_step(weight: torch.Tensor | None, several: bool = False):
    """Cross-entropy step, class-weighted by `weight` (2,) when given.

    `several` (data-parallel processes): the weighted loss is divided by the ranks' mean weight sum,
    not this rank's, so that DDP's mean of the ranks' gradients is the global batch's weighted mean
    (F.cross_entropy divides each rank's batch by its own weight sum).
    """
    def step(model, batch, device):
        x, y = batch
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x).float()  # (B, 2)
        if weight is not None and several:
            w = weight.to(device)[y]  # (B,)
            loss = (F.cross_entropy(logits, y, reduction="none") * w).sum() / distributed.mean_over_ranks(w.sum())
        else:
            loss = F.cross_entropy(logits, y, weight=None if weight is None else weight.to(device))
        return loss, len(y), {"acc": (logits.argmax(1) == y).float().mean().item()}
    return step


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Tumor probabilities (N,) and true labels (N,) over `loader`, in eval mode."""
    model.eval()
    probs, ys = [], []
    for x, y in loader:
        probs.append(torch.softmax(model(x.to(device)).float(), dim=1)[:, 1].cpu())
        ys.append(y)
    if not probs:  # a data-parallel rank's share of a tiny test set can be empty
        return np.empty(0, np.float32), np.empty(0, np.int64)
    return torch.cat(probs).numpy(), torch.cat(ys).numpy()


def plot_confusion(cm: list[list[int]], path: Path, title: str = "") -> None:
    """Confusion matrix (rows = truth, columns = prediction) with counts and row percentages."""
    import matplotlib.pyplot as plt

    cm_a = np.asarray(cm, dtype=float)
    rows = cm_a.sum(1, keepdims=True)
    frac = np.divide(cm_a, rows, out=np.zeros_like(cm_a), where=rows > 0)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm_a):
        ax.text(j, i, f"{int(v)}\n{frac[i, j]:.0%}", ha="center", va="center",
                color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(CLASSES)), CLASSES)
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    save_figure(fig, path)


def fit_cam16(cfg: Cam16Config, dataset=None) -> dict:
    """Train the ResNet on the train slides, keep the best on validation, report test metrics once.

    Args:
        cfg: the run's configuration.
        dataset: optional patch dataset (attributes `labels`, `slide_ids`, `patch_size`, `source`,
            `read_image(i)`) used instead of opening `cfg.data` (tests, notebooks).

    Returns:
        metrics.json's content: {"test": binary_metrics(...), "best_epoch", "best_val", "split",
        "checkpoint", "seconds", ...}. A run folder with the state of a killed run of the same
        config resumes it; a finished one returns its metrics without training.

    Under torchrun every rank trains on its share of each global batch of `cfg.batch_size` and
    predicts its share of validation and test; only rank 0 writes, and every rank returns the same
    metrics (see `pretrain.distributed`).

    Raises:
        RunMismatchError: `cfg.run_dir` holds a run of another config or data (and not `cfg.overwrite`).
        ValueError: under torchrun, `cfg.batch_size` is not a multiple of the number of processes.
    """
    with distributed.session(cfg.device) as device:
        return _fit_cam16(cfg, dataset, device)


def _fit_cam16(cfg: Cam16Config, dataset, device: torch.device) -> dict:
    seed_everything(cfg.seed)
    main, world, rank = distributed.is_main(), distributed.world_size(), distributed.rank()
    progress = cfg.progress and main
    local_batch = distributed.per_rank_batch(cfg.batch_size)
    model_cfg = cfg.model_config()
    run_dir = distributed.on_main(check_config, cfg.run_dir, cfg, RESUME_NEUTRAL)
    log_path = run_dir / "log.jsonl"
    fingerprint = distributed.on_main(lambda: _data_fingerprint(Path(cfg.data)) if Path(cfg.data).exists() else "")
    metric, mode = cfg.monitor, "min" if cfg.monitor == "val_loss" else "max"
    status, prior = distributed.on_main(open_run, run_dir, cfg, fingerprint, device, world_size=world)
    if status == "done":
        return distributed.on_main(finish_run, run_dir, cfg, prior, kind=KIND, metric=metric, mode=mode,
                                   reused=True)

    if dataset is None:
        from .patches import open_patch_dataset

        dataset = open_patch_dataset(cfg.data)
    labels_all = np.asarray(dataset.labels, dtype=np.int64)
    slides_all = np.asarray(dataset.slide_ids).astype(str)
    keep = _subsample_per_slide(slides_all, cfg.max_patches_per_slide, cfg.seed)
    split_local = split_by_slide(slides_all[keep], labels_all[keep], seed=cfg.seed,
                                 val=list(cfg.val_slides) or cfg.val_fraction,
                                 test=list(cfg.test_slides) or cfg.test_fraction)
    split = {p: keep[idx] for p, idx in split_local.items()}  # indices into `dataset`
    info = describe_split(split, slides_all, labels_all)
    for part in ("train", "val", "test"):
        if len(split[part]) == 0:
            raise ValueError(f"{cfg.data}: the {part} part is empty ({info['parts']}); give more slides "
                             f"or adjust val/test fractions or slide lists")
    if main:
        atomic_write_json(run_dir / "split.json", {**info, "seed": cfg.seed,
                                                   "method": "patch-level (LEAKS)" if info["leaks"] else "by slide",
                                                   "indices": {p: v.tolist() for p, v in split.items()}})
    missing = [f"{p} has no {c}" for p, d in info["parts"].items() for c in CLASSES if d[c] == 0]
    if missing and progress:
        tqdm.write(f"cam16: note: {'; '.join(missing)} (the slides do not allow better)")

    nbytes = len(keep) * cfg.image_size ** 2 * 3
    in_memory = nbytes < cfg.in_memory_gb * 2**30
    train_tf = PatchTransform(cfg.image_size, cfg.augment, seed=cfg.seed + rank)  # each rank its own stream
    eval_tf = PatchTransform(cfg.image_size, augment=False)

    def part(idx: np.ndarray, tf: PatchTransform) -> _Patches:
        if in_memory:  # decode once, resized; epochs never touch the source again
            arr = np.stack([resize_patch(dataset.read_image(int(i)), cfg.image_size)
                            for i in tqdm(idx, desc="loading patches", leave=False, disable=not progress)])
            return _Patches(arr, labels_all[idx], tf)
        return _Patches(dataset, labels_all[idx], tf, indices=idx)

    train_ds, val_ds, test_ds = part(split["train"], train_tf), part(split["val"], eval_tf), part(split["test"], eval_tf)
    loader_kw = dict(num_workers=cfg.num_workers, worker_init_fn=_worker_init, pin_memory=device.type == "cuda")
    g = torch.Generator().manual_seed(cfg.seed + rank)
    sampler = distributed.train_sampler(train_ds, cfg.seed)  # None alone: the loader shuffles with g
    n_local = len(train_ds) if sampler is None else len(sampler)
    # workers start afresh every epoch, seeded from `g` (training) or torch's RNG: persistent ones would
    # carry augmentation streams that last.pt cannot capture, and a resumed run would see other patches
    train_dl = DataLoader(train_ds, batch_size=local_batch, shuffle=sampler is None, sampler=sampler, generator=g,
                          drop_last=n_local % local_batch == 1, **loader_kw)  # no batch of 1 for BN
    val_dl = DataLoader(val_ds, batch_size=cfg.batch_size * 2, sampler=distributed.eval_shard(len(val_ds)),
                        **loader_kw)
    test_dl = DataLoader(test_ds, batch_size=cfg.batch_size * 2, sampler=distributed.eval_shard(len(test_ds)),
                         **loader_kw)

    net = distributed.wrap(Cam16ResNet(model_cfg).to(device), device)  # trained through; DDP under torchrun
    model = distributed.unwrap(net)  # saved, evaluated and copied
    weight = None
    if cfg.class_weighted:
        counts = np.bincount(train_ds.labels, minlength=len(CLASSES)).astype(np.float64)
        w = np.where(counts > 0, counts.sum() / (len(CLASSES) * np.maximum(counts, 1)), 0.0)
        weight = torch.tensor(w, dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp = cfg.amp and device.type == "cuda"
    data_info = {"source": getattr(dataset, "source", cfg.data), "path": str(cfg.data),
                 "patch_size": int(dataset.patch_size), "n_patches": int(len(keep)),
                 "split": info["parts"], "split_leaks": info["leaks"]}
    if fingerprint:
        data_info["fingerprint"] = fingerprint
    if progress:
        p = info["parts"]
        tqdm.write(f"cam16: {len(keep)} patches from {len(np.unique(slides_all[keep]))} slides; "
                   + ", ".join(f"{k} {v['patches']} ({v['normal']} normal / {v['tumor']} tumor, "
                               f"{len(v['slides'])} slides)" for k, v in p.items())
                   + f"; {cfg.arch} {count_parameters(model):,} parameters at {cfg.image_size}px, "
                     f"device {device}" + (f" x {world} processes" if world > 1 else "")
                   + f", {'in memory' if in_memory else 'streamed'}")

    def save(metrics: dict) -> None:
        if not main:
            return
        save_checkpoint(run_dir / "best.pt", kind=KIND, config=model_cfg, model=model,
                        input_spec=model.input_spec(), metrics=metrics, data=data_info, train=cfg)

    def on_state(state: dict) -> None:
        rngs = distributed.gather_object(rng_state(g, train_tf.compose)) if world > 1 else None
        if main:
            save_state(run_dir / "last.pt", state, cfg=cfg, fingerprint=fingerprint, device=device, model=model,
                       optimizer=opt, generator=g, augment=train_tf.compose, rank_rngs=rngs)

    resume = None
    if status == "resume":
        if main:
            rewrite_log(log_path, prior["fit"]["history"])
        # last: everything above drew the same random numbers as in the first start
        resume = restore_state(prior, model, opt, g, augment=train_tf.compose, rank=rank)
        if progress:
            tqdm.write(f"cam16: resuming {run_dir} after epoch {resume['epoch']}")
    train_step, eval_step = _ce_step(weight, several=world > 1), _ce_step(None)

    def train_epoch(epoch: int) -> dict:
        if sampler is not None:
            sampler.set_epoch(epoch)
        return train_one_epoch(net, train_dl, train_step, opt, device, amp=amp, desc=f"epoch {epoch}",
                               progress=progress, reduce=distributed.reduce_meter)

    def validate(epoch: int) -> dict:
        distributed.sync_buffers(model)  # every rank evaluates the weights rank 0 saves
        return evaluate(model, val_dl, eval_step, device, amp=amp, reduce=distributed.reduce_meter)

    res = fit(model, epochs=cfg.epochs, train_epoch=train_epoch, validate=validate,
              optimizer=opt, monitor=metric, mode=mode,
              plateau_patience=cfg.plateau_patience, early_stop=cfg.early_stop or None,
              log_path=log_path if main else None, on_best=lambda e, row: save({"best_epoch": e, **row}),
              progress=progress, desc="cam16", resume=resume, on_state=on_state)
    if res.best_state is None:
        raise ValueError(f"cam16: {cfg.monitor} was never finite in {len(res.history)} epochs "
                         f"(see {log_path}); nothing to save: lower --lr or check the patches")
    model.load_state_dict(res.best_state)

    prob, y = predict(model, test_dl, device)  # this rank's share of the test set
    prob, y = distributed.gather_shards(prob), distributed.gather_shards(y)
    test = binary_metrics(y, prob)
    if main:
        np.savez(run_dir / "test_predictions.npz", index=split["test"], labels=y, prob_tumor=prob,
                 slide_ids=slides_all[split["test"]])
    metrics = {"test": test, "best_epoch": res.best_epoch, "best_val": {k: v for k, v in res.best.items()
                                                                         if k.startswith("val_")},
               "epochs_run": len(res.history), "stopped_early": res.stopped_early,
               "seconds": round(res.seconds, 1), "split": info["parts"], "split_leaks": info["leaks"],
               "arch": cfg.arch, "image_size": cfg.image_size, "device": str(device), "fingerprint": fingerprint}
    if world > 1:
        metrics["processes"] = world
    save({"best_epoch": res.best_epoch, **res.best, "test": test})
    auc = "n/a" if test["auc"] is None else f"{test['auc']:.3f}"
    if main:
        plot_curves(res.history, run_dir / "curves.png", metrics=("loss", "acc"),
                    title=f"CAM16 {cfg.arch} ({cfg.image_size}px)")
        plot_confusion(test["confusion_matrix"], run_dir / "confusion.png",
                       title=f"test: acc {test['accuracy']:.3f}, AUC {auc}, F1 {test['f1']:.3f}")
    if progress:
        tqdm.write(f"cam16: best epoch {res.best_epoch} ({cfg.monitor} {res.best.get(cfg.monitor, float('nan')):.4f}); "
                   f"test on {test['n']} patches: accuracy {test['accuracy']:.3f}, AUC {auc}, F1 {test['f1']:.3f}, "
                   f"confusion {test['confusion_matrix']}" + (f" ({test['auc_note']})" if "auc_note" in test else "")
                   + f"; run folder {run_dir}")
    return distributed.on_main(finish_run, run_dir, cfg, metrics, kind=KIND, metric=metric, mode=mode)
