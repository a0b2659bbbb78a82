"""Pretrain the PRCC convolutional autoencoder: config dataclass and `fit_prcc(cfg) -> metrics`.

Run folder (`cfg.run_dir`): config.yaml, log.jsonl (one JSON line per epoch), last.pt (the training
state, every epoch), best.pt (best on validation so far), loss_curve.png, reconstructions.png and,
last, metrics.json. Rerunning a killed run resumes it exactly; a finished one is reused; `cfg.out`
gets a copy of best.pt at the end unless it holds a better model (see `pretrain.resume`). Under
`torchrun` the run is data-parallel and `batch_size` the global batch (see `pretrain.distributed`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from . import distributed
from .autoencoder import AEConfig, ConvAutoencoder
from .checkpoint import save_checkpoint
from .engine import evaluate, fit, train_one_epoch
from .plots import image_grid, plot_curves
from .prcc import (
    ImageSet,
    RandomCropDataset,
    concat_image_sets,
    default_augment,
    fixed_crops,
    load_image_folder,
    load_slide_tiles,
    mean_image_mse,
    split_by_image,
)
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
from .utils import count_parameters, seed_everything, seed_worker

KIND = "prcc_autoencoder"
# Besides NEUTRAL_FIELDS, the bad-file threshold does not change the weights once a run has started:
# the data themselves are checked by fingerprint. `num_workers` does change them although each crop
# is seeded by (seed, epoch, index): the progress bar (tqdm.auto) opens and drops one loader iterator
# per epoch, whose workers prefetch and so draw the shuffle order from the generator early.
RESUME_NEUTRAL = (*NEUTRAL_FIELDS, "max_bad_fraction")


@dataclass
class PRCCConfig:
    """Everything that defines one autoencoder pretraining run (saved as run_dir/config.yaml)."""

    data: str = "data/demo/prcc"  # folder searched recursively for images ("" when only slides are used)
    slides: list[str] = field(default_factory=list)  # whole-slide images (files or folders) to tile too
    tile_mpp: float | None = None  # slide tiles at this um/px (None: level 0); tiles are image_size * 2 px
    tiles_per_slide: int = 200  # tissue tiles drawn per slide (seeded random order over the tissue grid)
    tissue_threshold: float = 0.5  # minimum tissue fraction of a slide tile
    out: str = "checkpoints/prcc_autoencoder.pt"  # best-on-validation checkpoint
    run_dir: str = "runs/prcc"  # logs, plots, metrics
    image_size: int = 64  # crop size S in pixels
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    val_fraction: float = 0.15  # fraction of IMAGES held out
    crops_per_image: int = 16  # random training crops per image and epoch
    val_crops_per_image: int = 8  # fixed validation crops per held-out image
    group_regex: str = ""  # images whose names share this regex match stay on one side of the split
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    base_width: int = 32
    depth: int = 3
    latent_channels: int = 64
    augment: bool = True
    plateau_patience: int = 3
    early_stop: int = 0  # stop after this many epochs without improvement; 0 = off
    amp: bool = True  # bfloat16 autocast on CUDA only
    max_bad_fraction: float = 0.5  # error when more than this fraction of files cannot be decoded
    progress: bool = True
    overwrite: bool = False  # replace `out` whatever it holds; start over a run folder of another config

    def __post_init__(self) -> None:
        for name in ("image_size", "epochs", "batch_size", "crops_per_image", "val_crops_per_image"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"PRCCConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"PRCCConfig.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ValueError(f"PRCCConfig.lr must be positive, got {self.lr}")
        if self.num_workers < 0:
            raise ValueError(f"PRCCConfig.num_workers must be >= 0, got {self.num_workers}")
        if not self.data and not self.slides:
            raise ValueError("PRCCConfig: give --data (a folder of images) and/or --slides (whole-slide images)")

    def model_config(self) -> AEConfig:
        return AEConfig(base_width=self.base_width, depth=self.depth, latent_channels=self.latent_channels,
                        input_size=self.image_size)


def _mse_step(model, batch, device):
    """uint8 (B, 3, S, S) -> MSE between reconstruction and input, both in [0, 1]."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    x = x.to(device, non_blocking=True).float().div_(255.0)
    loss = F.mse_loss(model(x).float(), x)
    return loss, x.shape[0], {}


def _ratio(mse: float, baseline: float) -> float:
    return mse / baseline if baseline > 0 else float("nan")  # constant images: no baseline to beat


def _grid(model: ConvAutoencoder, crops: np.ndarray, device: torch.device, path: Path, n: int = 8) -> None:
    """PNG of validation inputs (top row) over their reconstructions (bottom row)."""
    idx = np.linspace(0, len(crops) - 1, min(n, len(crops))).round().astype(int)
    x = torch.from_numpy(crops[idx]).permute(0, 3, 1, 2).float().div(255.0).to(device)
    model.eval()
    with torch.no_grad():
        r = model(x).float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    image_grid([crops[idx], r], path, row_titles=["input", "reconstruction"],
               title="PRCC autoencoder, validation crops")


def load_training_images(cfg: PRCCConfig) -> ImageSet:
    """Decode the folder `cfg.data` and/or cut tissue tiles from `cfg.slides`, once, into memory.

    Slide tiles are 2 x image_size px so that random crops still vary; their names carry the slide
    (`<slide>@k`) and, unless `group_regex` is set, the split keeps each slide on one side.
    """
    sets = []
    if cfg.data:
        sets.append(load_image_folder(cfg.data, min_size=cfg.image_size, max_bad_fraction=cfg.max_bad_fraction))
    if cfg.slides:
        sets.append(load_slide_tiles(cfg.slides, size=2 * cfg.image_size, mpp=cfg.tile_mpp,
                                     max_per_slide=cfg.tiles_per_slide, tissue_threshold=cfg.tissue_threshold,
                                     seed=cfg.seed))
    return concat_image_sets(sets)


def fit_prcc(cfg: PRCCConfig, images: ImageSet | None = None) -> dict:
    """Train the autoencoder on random crops of `images` (default: every image under `cfg.data`).

    Returns the final metrics: best val_mse and its epoch, the mean-image baseline MSE on the same
    fixed validation crops, their ratio, counts, seconds and the checkpoint path. A run folder with
    the state of a killed run of the same config resumes it; a finished one returns its metrics.

    Under torchrun every rank trains on its share of each global batch of `cfg.batch_size`; only
    rank 0 writes, and every rank returns the same metrics (see `pretrain.distributed`).

    Raises:
        RunMismatchError: `cfg.run_dir` holds a run of another config or data (and not `cfg.overwrite`).
        ValueError: under torchrun, `cfg.batch_size` is not a multiple of the number of processes.
    """
    with distributed.session(cfg.device) as device:
        return _fit_prcc(cfg, images, device)


def _fit_prcc(cfg: PRCCConfig, images: ImageSet | None, device: torch.device) -> dict:
    seed_everything(cfg.seed)
    main, world = distributed.is_main(), distributed.world_size()
    progress = cfg.progress and main
    local_batch = distributed.per_rank_batch(cfg.batch_size)
    model_cfg = cfg.model_config()  # validates image_size vs depth before any decoding
    run_dir = distributed.on_main(check_config, cfg.run_dir, cfg, RESUME_NEUTRAL)
    log_path = run_dir / "log.jsonl"

    if images is None:
        images = load_training_images(cfg)  # on every rank: each one needs the pixels
    status, prior = distributed.on_main(open_run, run_dir, cfg, images.fingerprint, device, world_size=world)
    if status == "done":
        return distributed.on_main(finish_run, run_dir, cfg, prior, kind=KIND, metric="val_mse", mode="min",
                                   reused=True)
    group_regex = cfg.group_regex or (r"^[^@]+@" if cfg.slides else "")  # slide tiles: split by slide
    train_idx, val_idx = split_by_image(images.names, cfg.val_fraction, cfg.seed, group_regex)
    train_arrays = [images.arrays[i] for i in train_idx]
    val_arrays = [images.arrays[i] for i in val_idx]

    val_crops = fixed_crops(val_arrays, cfg.image_size, cfg.val_crops_per_image, seed=cfg.seed + 1)
    ref_crops = fixed_crops(train_arrays, cfg.image_size, cfg.val_crops_per_image, seed=cfg.seed + 2)
    baseline, val_var = mean_image_mse(ref_crops, val_crops)

    train_ds = RandomCropDataset(train_arrays, cfg.image_size, cfg.crops_per_image, seed=cfg.seed,
                                 augment=default_augment() if cfg.augment else None)
    g = torch.Generator().manual_seed(cfg.seed)
    sampler = distributed.train_sampler(train_ds, cfg.seed)  # None alone: the loader shuffles with g
    train_dl = DataLoader(train_ds, batch_size=local_batch, shuffle=sampler is None, sampler=sampler, generator=g,
                          num_workers=cfg.num_workers, worker_init_fn=seed_worker,
                          pin_memory=device.type == "cuda", drop_last=len(train_ds) > cfg.batch_size)
    val_dl = DataLoader(TensorDataset(torch.from_numpy(val_crops).permute(0, 3, 1, 2).contiguous()),
                        batch_size=max(cfg.batch_size, 64), shuffle=False, sampler=distributed.eval_shard(len(val_crops)))

    net = distributed.wrap(ConvAutoencoder(model_cfg).to(device), device)  # trained through; DDP under torchrun
    model = distributed.unwrap(net)  # saved, evaluated and copied
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data_info = {**images.data_info(), "n_train_images": len(train_idx), "n_val_images": len(val_idx),
                 "val_images": [images.names[i] for i in val_idx]}
    amp = cfg.amp and device.type == "cuda"
    if progress:
        tqdm.write(f"prcc: {len(images)} images ({len(train_idx)} train, {len(val_idx)} val), "
                   f"{len(train_ds)} crops/epoch, {count_parameters(model):,} parameters, device {device}"
                   + (f" x {world} processes" if world > 1 else "") + ", "
                   f"mean-image baseline MSE {baseline:.5f}")

    def train_epoch(epoch: int) -> dict:
        train_ds.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        return train_one_epoch(net, train_dl, _mse_step, opt, device, amp=amp, desc=f"epoch {epoch}",
                               progress=progress, reduce=distributed.reduce_meter)

    def validate(epoch: int) -> dict:
        distributed.sync_buffers(model)  # every rank evaluates the weights rank 0 saves
        m = evaluate(model, val_dl, _mse_step, device, amp=amp, reduce=distributed.reduce_meter)
        return {"loss": m["loss"], "mse_over_baseline": _ratio(m["loss"], baseline)}

    def on_best(epoch: int, row: dict) -> None:
        if not main:
            return
        save_checkpoint(run_dir / "best.pt", kind=KIND, config=model_cfg, model=model,
                        input_spec=model.input_spec(), data=data_info, train=cfg,
                        metrics={"epoch": epoch, "val_mse": row["val_loss"], "train_mse": row["train_loss"],
                                 "baseline_mse": baseline, "val_variance": val_var})

    def on_epoch(epoch: int, row: dict) -> None:
        if progress:
            tqdm.write(json.dumps(row))

    def on_state(state: dict) -> None:
        rngs = distributed.gather_object(rng_state(g)) if world > 1 else None
        if main:
            save_state(run_dir / "last.pt", state, cfg=cfg, fingerprint=images.fingerprint, device=device,
                       model=model, optimizer=opt, generator=g, rank_rngs=rngs)

    resume = None
    if status == "resume":
        if main:
            rewrite_log(log_path, prior["fit"]["history"])
        # last: everything above drew the same random numbers
        resume = restore_state(prior, model, opt, g, rank=distributed.rank())
        if progress:
            tqdm.write(f"prcc: resuming {run_dir} after epoch {resume['epoch']}")
    res = fit(model, epochs=cfg.epochs, train_epoch=train_epoch, validate=validate, optimizer=opt,
              monitor="val_loss", plateau_patience=cfg.plateau_patience,
              early_stop=cfg.early_stop or None, log_path=log_path if main else None, on_best=on_best,
              on_epoch=on_epoch, progress=progress, resume=resume, on_state=on_state)
    if res.best_state is None:
        raise ValueError(f"prcc: val_loss was never finite in {len(res.history)} epochs (see {log_path}); "
                         f"nothing to save: lower --lr or check the images")

    model.load_state_dict(res.best_state)
    on_best(res.best_epoch, res.best)  # best.pt from the kept weights, whatever happened to the file
    if main:
        plot_curves(res.history, run_dir / "loss_curve.png", metrics=("loss",), logy=True,
                    title=f"PRCC autoencoder MSE (mean-image baseline {baseline:.4f})")
        _grid(model, val_crops, device, run_dir / "reconstructions.png")
    best_mse = float(res.best["val_loss"])
    metrics = {
        "best_epoch": res.best_epoch,
        "val_mse": best_mse,
        "train_mse": float(res.best["train_loss"]),
        "baseline_mse": baseline,
        "val_variance": val_var,
        "mse_over_baseline": _ratio(best_mse, baseline),
        "epochs_run": len(res.history),
        "stopped_early": res.stopped_early,
        "seconds": round(res.seconds, 2),
        "n_images": len(images),
        "n_train_images": len(train_idx),
        "n_val_images": len(val_idx),
        "n_val_crops": int(len(val_crops)),
        "parameters": count_parameters(model),
        "device": str(device),
        "fingerprint": images.fingerprint,
    }
    if world > 1:
        metrics["processes"] = world
    return distributed.on_main(finish_run, run_dir, cfg, metrics, kind=KIND, metric="val_mse", mode="min")
