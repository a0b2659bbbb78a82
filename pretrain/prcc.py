"""PRCC data for autoencoder pretraining: decoded images held once in memory, cropped per epoch.

Everything downstream of `load_image_folder` works on `ImageSet`, a list of uint8 (H, W, 3) arrays
plus names and a fingerprint, so other sources (e.g. tiles cut from whole-slide images) plug in by
building an `ImageSet` themselves.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from .images import find_images, load_images
from .utils import fingerprint_files


@dataclass
class ImageSet:
    """Decoded images of one source.

    Attributes:
        arrays: uint8 arrays (H, W, 3), any sizes at least the crop size.
        names: one id per array (relative file path, or slide + tile coordinates).
        fingerprint: short hash of the source (files' paths and contents).
        root: where the images came from (folder, slide list, ...).
    """

    arrays: list[np.ndarray]
    names: list[str]
    fingerprint: str = ""
    root: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.arrays) != len(self.names):
            raise ValueError(f"ImageSet: {len(self.arrays)} arrays but {len(self.names)} names")
        for a, n in zip(self.arrays, self.names, strict=True):
            if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3:
                raise ValueError(f"ImageSet: {n} must be a uint8 (H, W, 3) array, got {a.dtype} {a.shape}")

    def __len__(self) -> int:
        return len(self.arrays)

    def data_info(self) -> dict:
        """The checkpoint `data` entry."""
        return {"fingerprint": self.fingerprint, "n_images": len(self), "root": self.root, **self.info}


def load_image_folder(root: str | os.PathLike, min_size: int, max_bad_fraction: float = 0.5) -> ImageSet:
    """Decode every image under `root` once (recursively); skip bad or too-small files with warnings.

    Raises:
        NoImagesError: no image files under `root` (names the folder and the extensions looked for).
        TooManyBadImagesError: most files cannot be decoded.
        ValueError: every readable image is smaller than `min_size`.
    """
    root = Path(root)
    paths = find_images(root)
    arrays, kept = load_images(paths, min_size=min_size, max_bad_fraction=max_bad_fraction,
                               what=f"images under {root}", min_name="crop")
    return ImageSet(arrays=arrays, names=[str(p.relative_to(root)) for p in kept],
                    fingerprint=fingerprint_files(kept, root=root), root=str(root))


def split_by_image(names: Sequence[str], val_fraction: float, seed: int,
                   group_regex: str = "") -> tuple[list[int], list[int]]:
    """Indices of training and validation images; whole images (never crops) go to one side.

    `group_regex` (optional) keeps images whose names share the regex's first match (e.g. a slide id
    `^[a-z]+_\\d+`) on the same side, for sources whose neighbouring images overlap.

    Raises:
        ValueError: fewer than two images or groups, so no image would be left for one of the sides.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if group_regex:
        pat = re.compile(group_regex)
        keys = [(m.group(0) if (m := pat.search(n)) else n) for n in names]
    else:
        keys = list(names)
    groups = sorted(set(keys))
    if len(groups) < 2:
        raise ValueError(f"need at least 2 images (or groups) to hold some out for validation, got "
                         f"{len(groups)} ({groups[:3]}); add images to the data folder")
    rng = np.random.default_rng(seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    n_val = min(len(groups) - 1, max(1, round(val_fraction * len(groups))))
    val_groups = set(order[:n_val])
    train = [i for i, k in enumerate(keys) if k not in val_groups]
    val = [i for i, k in enumerate(keys) if k in val_groups]
    return train, val


def _crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape[:2]
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    return img[y:y + size, x:x + size]


def fixed_crops(arrays: Sequence[np.ndarray], size: int, per_image: int, seed: int) -> np.ndarray:
    """Deterministic random crops, `per_image` from each array -> uint8 (N * per_image, size, size, 3)."""
    rng = np.random.default_rng(seed)
    return np.stack([_crop(a, size, rng) for a in arrays for _ in range(per_image)])


def default_augment() -> A.Compose:
    """Flips, 90-degree rotations and mild colour jitter (stain and scanner variation)."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02, p=0.5),
    ])


class RandomCropDataset(Dataset):
    """`per_image` random crops of every array per epoch, augmented; items are uint8 (3, S, S) tensors.

    Each item's crop and augmentation are seeded from (seed, epoch, index), so the data do not depend
    on the number of DataLoader workers; call `set_epoch(e)` for fresh crops each epoch.
    """

    def __init__(self, arrays: Sequence[np.ndarray], size: int, per_image: int, seed: int = 0,
                 augment: A.Compose | None = None) -> None:
        for a in arrays:
            if min(a.shape[:2]) < size:
                raise ValueError(f"image of {a.shape[1]}x{a.shape[0]} px is smaller than the {size} px crop")
        self.arrays, self.size, self.per_image, self.seed = list(arrays), size, per_image, seed
        self.augment = augment
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.arrays) * self.per_image

    def __getitem__(self, i: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        crop = _crop(self.arrays[i // self.per_image], self.size, rng)
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2**31)))
            crop = self.augment(image=np.ascontiguousarray(crop))["image"]
        return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)  # (3, S, S) uint8


def mean_image_mse(train_crops: np.ndarray, val_crops: np.ndarray) -> tuple[float, float]:
    """Baselines in [0, 1] pixel space for uint8 crops (N, S, S, 3).

    Returns:
        (MSE of predicting the mean training crop for every validation crop,
         MSE of predicting the validation set's own mean crop, i.e. its per-pixel variance).
    """
    tr = train_crops.astype(np.float64) / 255.0
    va = val_crops.astype(np.float64) / 255.0
    return float(((va - tr.mean(0)) ** 2).mean()), float(((va - va.mean(0)) ** 2).mean())


def load_slide_tiles(slides: Sequence[str | os.PathLike], size: int, mpp: float | None = None,
                     level: int | None = None, max_per_slide: int = 200, tissue_threshold: float = 0.5,
                     seed: int = 0) -> ImageSet:
    """Unlabelled tissue tiles (size x size) cut from whole-slide images with the slide tiler.

    At most `max_per_slide` tiles per slide, drawn in a seeded random order over the tissue grid;
    names are `<slide>@<k>` so that `group_regex=r"^[^@]+"` keeps each slide on one side of the split.
    A slide that cannot be opened raises `SlideError` naming the file; one without tissue warns.
    """
    import itertools

    from .extract import iter_tissue_tiles
    from .wsi import find_slides

    paths = find_slides(list(slides))
    arrays: list[np.ndarray] = []
    names: list[str] = []
    per_slide = {}
    for p in paths:
        tiles = itertools.islice(iter_tissue_tiles(p, size=size, mpp=mpp, level=level,
                                                   tissue_threshold=tissue_threshold, shuffle=True,
                                                   seed=seed), max_per_slide)
        n0 = len(arrays)
        for k, t in enumerate(tiles):
            arrays.append(np.ascontiguousarray(t))
            names.append(f"{p.stem}@{k}")
        per_slide[p.name] = len(arrays) - n0
    if not arrays:
        raise ValueError(f"no tissue tiles of {size} px found in slides {[str(p) for p in paths]}; "
                         f"lower --tissue-threshold or the tile size")
    return ImageSet(arrays=arrays, names=names, root=", ".join(str(p) for p in paths),
                    fingerprint=fingerprint_files(paths, content=False),
                    info={"slides": per_slide, "tile_size": size, "tile_mpp": mpp})


def concat_image_sets(sets: Sequence[ImageSet]) -> ImageSet:
    """One ImageSet from several sources (e.g. a folder of regions plus slide tiles)."""
    if len(sets) == 1:
        return sets[0]
    import hashlib

    fp = hashlib.sha256("".join(s.fingerprint for s in sets).encode()).hexdigest()[:16]
    return ImageSet(arrays=[a for s in sets for a in s.arrays], names=[n for s in sets for n in s.names],
                    fingerprint=fp, root=" + ".join(s.root for s in sets),
                    info={"sources": [s.data_info() for s in sets]})
