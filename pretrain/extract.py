"""Whole-slide tiling of one slide: tissue grid, labels from annotations, and reading the patches.

Per slide (`plan_slide`): open it, choose the level, detect tissue on a thumbnail, lay a grid of
patches over it, keep those with enough tissue, and label each from the ASAP XML outlines
(tumor when at least `tumor_threshold` of its central region lies in tumor). Then the patches are
read (`read_patches`): into memory (`extract_slide`, `iter_tissue_tiles`), or appended to one HDF5
store (schema in `pretrain.store`) by the multi-slide job in `pretrain.extract_job`.

`check_slide` is the cheap part of `plan_slide` (header, level, patch fit), run on every slide
before any tiling; `slide_summary` is the per-slide result the job reports.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

from .annotations import SlideAnnotations, check_within_slide, parse_asap_xml, rasterize
from .raytasks import check_launcher
from .store import check_store_suffix
from .tissue import box_fractions, slide_thumbnail, tissue_mask
from .wsi import SlideError, choose_level, open_slide, read_region_rgb, slide_mpp


class PatchTooLargeError(ValueError):
    """The requested patch does not fit in the chosen pyramid level of a slide."""


def _finite_above(v, low: float, or_equal: bool = False) -> bool:
    """`v` is a finite real number > low (>= low with `or_equal`); NaN, inf and text are not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return False
    return v >= low if or_equal else v > low


@dataclass
class ExtractConfig:
    """Patch extraction settings. Give at most one of mpp, level, downsample (none: level 0)."""

    slides: list[str] = field(default_factory=list, metadata={"help": "slide files or folders of slides"})
    annotations: str | None = field(default=None, metadata={"help": "folder of ASAP XML files <slide>.xml"})
    out: str = field(default="patches.h5", metadata={"help": "output HDF5 patch store"})
    patch_size: int = field(default=256, metadata={"help": "patch side in output pixels"})
    mpp: float | None = field(default=None, metadata={"help": "target µm per pixel (picks the level)"})
    level: int | None = field(default=None, metadata={"help": "pyramid level to read"})
    downsample: float | None = field(default=None, metadata={"help": "target downsample from level 0"})
    stride: int | None = field(default=None, metadata={"help": "grid step in output pixels (default: patch size)"})
    tissue_threshold: float = field(default=0.5, metadata={"help": "minimum tissue fraction of a patch"})
    tumor_threshold: float = field(default=0.5, metadata={"help": "tumor fraction of the centre region for label 1"})
    centre_fraction: float = field(default=0.5, metadata={"help": "side of the labelled centre region / patch side"})
    save_masks: bool = field(default=False, metadata={"help": "store a (P, P) tumor mask per patch"})
    workers: int = field(default=1, metadata={"help": "slides processed in parallel processes"})
    launcher: str = field(default="local", metadata={
        "help": "local: this process or `workers` processes; ray: one Ray task per slide (`workers` unused)"})
    ray_address: str = field(default="", metadata={
        "help": "Ray cluster for --launcher ray: auto, HOST:6379; empty: $RAY_ADDRESS, else a local instance"})
    ray_cpus: float = field(default=1.0, metadata={"help": "CPUs each Ray task (slide) reserves"})
    compression: str = field(default="none", metadata={"help": "image compression: none, lzf or gzip"})
    thumbnail_size: int = field(default=512, metadata={"help": "minimum long side of the tissue-mask thumbnail (px)"})
    min_tissue_area: float = field(default=0.25, metadata={"help": "drop tissue blobs smaller than this many patch areas"})
    overlays: bool = field(default=True, metadata={"help": "write an overlay PNG per slide"})
    overlay_dir: str | None = field(default=None, metadata={"help": "default: <out>_overlays/ beside the store"})

    def __post_init__(self) -> None:
        given = [k for k in ("mpp", "level", "downsample") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give only one of --mpp, --level, --downsample; got {given}")
        if self.mpp is not None and not _finite_above(self.mpp, 0):
            raise ValueError(f"--mpp must be a positive number of µm per output pixel (e.g. 0.5), got {self.mpp}")
        if self.downsample is not None and not _finite_above(self.downsample, 0):
            raise ValueError(f"--downsample must be a positive number of level-0 px per output px (e.g. 4), "
                             f"got {self.downsample}")
        if self.level is not None and (not isinstance(self.level, int) or self.level < 0):
            raise ValueError(f"--level must be a whole number >= 0 (0 = full resolution), got {self.level}")
        if not isinstance(self.patch_size, int) or self.patch_size < 2:
            raise ValueError(f"--patch-size must be a whole number >= 2 px, got {self.patch_size}")
        if self.stride is not None and (not isinstance(self.stride, int) or self.stride < 1):
            raise ValueError(f"--stride must be a whole number >= 1 px (default: the patch size), got {self.stride}")
        for k in ("tissue_threshold", "tumor_threshold"):
            if not _finite_above(getattr(self, k), 0, or_equal=True) or getattr(self, k) > 1:
                raise ValueError(f"--{k.replace('_', '-')} must lie in [0, 1], got {getattr(self, k)}")
        if not _finite_above(self.centre_fraction, 0) or self.centre_fraction > 1:
            raise ValueError(f"--centre-fraction must lie in (0, 1], got {self.centre_fraction}")
        if self.compression not in ("none", "lzf", "gzip"):
            raise ValueError(f"--compression must be none, lzf or gzip; got {self.compression!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers must be a whole number >= 1, got {self.workers}")
        check_launcher(self.launcher)
        if self.ray_cpus < 0:
            raise ValueError(f"--ray-cpus must be >= 0, got {self.ray_cpus}")
        if not isinstance(self.thumbnail_size, int) or self.thumbnail_size < 16:
            raise ValueError(f"--thumbnail-size must be a whole number >= 16 px, got {self.thumbnail_size}")
        if not _finite_above(self.min_tissue_area, 0, or_equal=True):
            raise ValueError(f"--min-tissue-area must be a number >= 0 (patch areas), got {self.min_tissue_area}")
        check_store_suffix(self.out)

    @property
    def label_rule(self) -> str:
        return (f"tumor (1) when >= {self.tumor_threshold:g} of the central {self.centre_fraction:g} x "
                f"{self.centre_fraction:g} region of the patch lies inside tumor outlines (_0/_1) and outside "
                f"exclusion outlines (_2); else normal (0)")


@dataclass
class SlidePlan:
    """Where to read one slide's patches. Coordinates are level-0 (x, y) of each patch's top-left."""

    path: str
    name: str
    level: int
    downsample: float  # level-0 px per output px
    read_size: int  # px read at `level` per patch (resized to patch_size when different)
    mpp: float | None  # µm per output pixel, when known
    note: str
    coords: np.ndarray  # (N, 2) int64
    tissue: np.ndarray  # (N,) float32 tissue fraction
    tumor: np.ndarray  # (N,) float32 tumor fraction of the centre region
    labels: np.ndarray  # (N,) int8
    grid_size: int  # patches in the full grid before the tissue filter
    tissue_fraction: float  # of the whole slide
    thumb: np.ndarray  # (h, w, 3) uint8
    mask: np.ndarray  # (h, w) bool tissue
    scale: tuple[float, float]  # level-0 px per thumbnail px (x, y)
    annotations: SlideAnnotations | None
    warnings: list[str] = field(default_factory=list)


def _label_patches(ann: SlideAnnotations | None, coords: np.ndarray, footprint: float,
                   cfg: ExtractConfig, grid: int = 16) -> np.ndarray:
    """Tumor fraction of each patch's centre region; (N,) float32. Bounding boxes reject most patches."""
    frac = np.zeros(len(coords), np.float32)
    if ann is None or not ann.tumor or not len(coords):
        return frac
    c = cfg.centre_fraction * footprint
    x0 = coords[:, 0] + (footprint - c) / 2
    y0 = coords[:, 1] + (footprint - c) / 2
    boxes = np.array([a.bbox for a in ann.tumor])  # (A, 4)
    hit = ((x0[:, None] < boxes[None, :, 2]) & (x0[:, None] + c > boxes[None, :, 0])
           & (y0[:, None] < boxes[None, :, 3]) & (y0[:, None] + c > boxes[None, :, 1])).any(1)
    for i in np.nonzero(hit)[0]:
        frac[i] = rasterize(ann, (x0[i], y0[i]), (grid, grid), downsample=c / grid).mean()
    return frac


def _thumbnail_side(w0: int, h0: int, footprint: float, cfg: ExtractConfig) -> int:
    """Long side of the tissue-mask thumbnail: ~16 mask px per patch side, but at least
    `cfg.thumbnail_size` px (coarser is pointless) and at most 8192 px (memory, time)."""
    long = max(w0, h0)
    scale = max(1.0, min(footprint / 16, long / cfg.thumbnail_size), long / 8192)
    return max(1, round(long / scale))


def _level_and_read_size(slide, path: str | os.PathLike, cfg: ExtractConfig) -> tuple[int, float, str, int]:
    """(level, downsample, note, px read per patch at that level); raises ValueError naming the slide."""
    try:
        level, ds, note = choose_level(slide, mpp=cfg.mpp, downsample=cfg.downsample, level=cfg.level)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    lw, lh = slide.level_dimensions[level]
    read = max(1, round(cfg.patch_size * ds / float(slide.level_downsamples[level])))
    if read > lw or read > lh:
        raise PatchTooLargeError(
            f"{path}: a {cfg.patch_size} px patch at downsample {ds:.4g} needs {read}x{read} px of level "
            f"{level}, which is only {lw}x{lh} px; use a smaller --patch-size or a finer level/mpp")
    return level, ds, note, read


def check_slide(path: str | os.PathLike, cfg: ExtractConfig) -> None:
    """The cheap part of `plan_slide`: the file opens (one tiny probe read), the level exists and the
    patch fits in it. Run on every slide before any tiling, so that a bad --level or --patch-size
    stops the job at once instead of after hours of other slides. Raises what `plan_slide` would."""
    with open_slide(path) as slide:
        _level_and_read_size(slide, path, cfg)


def plan_slide(path: str | os.PathLike, annotation_xml: str | os.PathLike | None, cfg: ExtractConfig,
               slide=None) -> SlidePlan:
    """Level, tissue mask, tissue grid and labels for one slide (reads only the thumbnail).

    Raises:
        SlideError: OpenSlide cannot open or decode the file.
        PatchTooLargeError: the patch is larger than the chosen level.
        AnnotationError: malformed or empty annotation XML.
    """
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        own = slide is None
        slide = open_slide(path) if own else slide
        try:
            level, ds, note, read = _level_and_read_size(slide, path, cfg)
            w0, h0 = slide.dimensions
            thumb, sx, sy = slide_thumbnail(slide, _thumbnail_side(w0, h0, cfg.patch_size * ds, cfg))
            base_mpp = slide_mpp(slide)
        except (openslide.OpenSlideError, OSError) as e:  # tiles that fail to decode in the thumbnail
            raise SlideError(path, f"thumbnail could not be read ({e})") from e
        finally:
            if own:
                slide.close()
        fp = cfg.patch_size * ds  # footprint in level-0 px
        step = (cfg.stride or cfg.patch_size) * ds
        min_area = max(1, round(cfg.min_tissue_area * fp * fp / (sx * sy)))
        mask, _ = tissue_mask(thumb, min_area=min_area)
        xs = np.arange(0, w0 - fp + 1e-6, step)
        ys = np.arange(0, h0 - fp + 1e-6, step)
        gx, gy = np.meshgrid(xs, ys)
        coords = np.stack([gx.ravel(), gy.ravel()], 1).round().astype(np.int64)
        boxes = np.stack([coords[:, 0] / sx, coords[:, 1] / sy, (coords[:, 0] + fp) / sx,
                          (coords[:, 1] + fp) / sy], 1)
        tissue = box_fractions(mask, boxes).astype(np.float32) if len(coords) else np.zeros(0, np.float32)
        keep = tissue >= max(cfg.tissue_threshold, 1e-9)
        ann = None
        if annotation_xml is not None:
            ann = parse_asap_xml(annotation_xml)
            check_within_slide(ann, w0, h0, path.name)
        tumor = _label_patches(ann, coords[keep], fp, cfg)
        if not keep.any():
            warnings.warn(f"{path}: no patch has >= {cfg.tissue_threshold:g} tissue (slide tissue fraction "
                          f"{mask.mean():.3f}); 0 patches from this slide", stacklevel=2)
    return SlidePlan(
        path=str(path), name=path.stem, level=level, downsample=ds, read_size=read,
        mpp=base_mpp * ds if base_mpp else None, note=note, coords=coords[keep], tissue=tissue[keep],
        tumor=tumor, labels=(tumor >= cfg.tumor_threshold).astype(np.int8) if ann else np.zeros(keep.sum(), np.int8),
        grid_size=len(coords), tissue_fraction=float(mask.mean()), thumb=thumb, mask=mask, scale=(sx, sy),
        annotations=ann,
        warnings=[str(w.message) for w in caught])


def read_patches(plan: SlidePlan, cfg: ExtractConfig, batch: int = 64, slide=None,
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray | None]]:
    """Yield (start, images uint8 (B, P, P, 3), masks uint8 (B, P, P) or None) in plan order."""
    own = slide is None
    slide = open_slide(plan.path) if own else slide
    P, r = cfg.patch_size, plan.read_size
    try:
        for s in range(0, len(plan.coords), batch):
            cs = plan.coords[s:s + batch]
            imgs = np.empty((len(cs), P, P, 3), np.uint8)
            for k, (x, y) in enumerate(cs):
                a = read_region_rgb(slide, (int(x), int(y)), plan.level, (r, r), plan.path)
                if r != P:
                    a = np.asarray(Image.fromarray(a).resize((P, P), Image.Resampling.BOX if r > P
                                                              else Image.Resampling.BILINEAR))
                imgs[k] = a
            masks = None
            if cfg.save_masks:
                masks = np.zeros((len(cs), P, P), np.uint8)
                if plan.annotations is not None:
                    for k, (x, y) in enumerate(cs):
                        masks[k] = rasterize(plan.annotations, (x, y), (P, P), plan.downsample)
            yield s, imgs, masks
    finally:
        if own:
            slide.close()


def slide_summary(plan: SlidePlan | None, path: str | os.PathLike, seconds: float, error: str | None = None,
                  overlay: str | None = None) -> dict:
    base = {"slide": Path(path).stem, "path": str(path)}
    if plan is None:
        return {**base, "status": "failed", "error": error, "patches": 0, "tumor_patches": 0,
                "seconds": round(seconds, 3)}
    return {**base, "status": "ok", "patches": int(len(plan.coords)), "tumor_patches": int(plan.labels.sum()),
            "grid_patches": plan.grid_size, "tissue_fraction": round(plan.tissue_fraction, 4),
            "level": plan.level, "downsample": round(plan.downsample, 4), "read_size": plan.read_size,
            "mpp": round(plan.mpp, 4) if plan.mpp else None, "level_note": plan.note,
            "annotations": plan.annotations.path if plan.annotations else None, "warnings": plan.warnings,
            "overlay": overlay, "seconds": round(seconds, 3)}


def extract_slide(path: str | os.PathLike, annotation_xml: str | os.PathLike | None, cfg: ExtractConfig,
                  ) -> tuple[dict[str, np.ndarray], dict]:
    """All patches of one slide in memory (small slides, tests): arrays images (N,P,P,3) uint8,
    labels (N,) int8, coords (N,2) int64, tissue/tumor (N,) float32 [, masks (N,P,P) uint8]; and its summary."""
    t0 = time.time()
    with open_slide(path) as slide:
        plan = plan_slide(path, annotation_xml, cfg, slide=slide)
        arrays = _read_all(plan, cfg, slide)
    return arrays, slide_summary(plan, path, time.time() - t0)


def _read_all(plan: SlidePlan, cfg: ExtractConfig, slide) -> dict[str, np.ndarray]:
    n, P = len(plan.coords), cfg.patch_size
    out = {"images": np.empty((n, P, P, 3), np.uint8), "labels": plan.labels, "coords": plan.coords,
           "tissue": plan.tissue, "tumor": plan.tumor}
    if cfg.save_masks:
        out["masks"] = np.empty((n, P, P), np.uint8)
    for s, imgs, masks in read_patches(plan, cfg, slide=slide):
        out["images"][s:s + len(imgs)] = imgs
        if masks is not None:
            out["masks"][s:s + len(imgs)] = masks
    return out


def iter_tissue_tiles(slide_path: str | os.PathLike, size: int = 256, mpp: float | None = None,
                      level: int | None = None, tissue_threshold: float = 0.5, stride: int | None = None,
                      shuffle: bool = False, seed: int = 0) -> Iterator[np.ndarray]:
    """Unlabelled tissue tiles of one slide, uint8 (size, size, 3), for self-supervised pretraining.

    Grid order, or a seeded random order with `shuffle`. A slide without tissue yields nothing (and warns).
    """
    cfg = ExtractConfig(patch_size=size, mpp=mpp, level=level, tissue_threshold=tissue_threshold,
                        stride=stride, overlays=False)
    with open_slide(slide_path) as slide:
        plan = plan_slide(slide_path, None, cfg, slide=slide)
        for m in plan.warnings:
            warnings.warn(m, stacklevel=2)
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(plan.coords))
            plan.coords, plan.labels = plan.coords[order], plan.labels[order]
        for _, imgs, _ in read_patches(plan, cfg, batch=16, slide=slide):
            yield from imgs

