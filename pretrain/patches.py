"""One patch-dataset interface over the three Camelyon16 patch sources.

- our HDF5 store written by `pretrain.extract_job` (format attr "wbc-fusion-patches");
- PatchCamelyon files `camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`
  (`x`: (N, 96, 96, 3) uint8, `y`: (N, 1, 1, 1)); PCam has no slide ids, so every patch of a split
  gets the slide id "pcam-<split>" (grouping by slide id then keeps the official splits apart);
- a folder with `normal/` and `tumor/` subfolders of patch images, decoded once into memory.

`open_patch_dataset(path)` picks the right one. HDF5 files are opened lazily, once per process, on
the first `__getitem__`: an h5py handle opened in the parent and inherited by forked DataLoader
workers is not safe to share, and a handle cannot be pickled for spawned workers.

Patches come out as uint8 whatever the file stores: uint16 and float datasets (float in [0, 1] or
[0, 255]) are scaled by one factor per dataset, decided when it is opened from its dtype and a sample
of patches (`pretrain.images.pixel_scale`), never per patch; a patch read later outside that range,
and any other dtype, is refused naming the dataset.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .images import find_images, load_images, pixel_scale, to_uint8

STORE_FORMAT = "wbc-fusion-patches"
STORE_DATASETS = ("images", "labels", "coords", "slide_index", "slide_names")
PCAM_RE = re.compile(r"^camelyonpatch_level_2_split_(train|valid|test)_([xy])\.h5$")
PCAM_SPLITS = ("train", "valid", "test")
CLASS_DIRS = ("normal", "tumor")  # label 0, label 1
_SLIDE_FROM_NAME = re.compile(r"^(?P<slide>.+?)_(?P<x>\d+)_(?P<y>\d+)$")


class PatchDataset(torch.utils.data.Dataset):
    """Patches with binary labels (0 normal, 1 tumor) and the slide each came from.

    `ds[i]` -> (image uint8 np.ndarray (P, P, 3), label int), or (transform(image), label) when a
    `transform` callable was given.

    Attributes:
        labels: (N,) int64.
        slide_ids: (N,) str, one per patch.
        patch_size: P in pixels.
        source: where the patches came from (a path, with the kind of source).
    """

    labels: np.ndarray
    slide_ids: np.ndarray
    patch_size: int
    source: str

    def __init__(self, transform: Callable[[np.ndarray], Any] | None = None) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def read_image(self, i: int) -> np.ndarray:
        """Patch `i` as uint8 (P, P, 3), without the transform."""
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Any, int]:
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"patch index {i} out of range for {n} patches in {self.source}")
        i = int(i) % n
        img = self.read_image(i)
        label = int(self.labels[i])
        if self.transform is not None:
            return self.transform(img), label
        return img, label

    def subset(self, indices: Sequence[int] | np.ndarray) -> PatchSubset:
        """A view on `indices` with the same interface (labels, slide_ids, patch_size, source)."""
        return PatchSubset(self, indices)

    def class_counts(self) -> dict[str, int]:
        return {name: int((self.labels == k).sum()) for k, name in enumerate(CLASS_DIRS)}

    def __repr__(self) -> str:
        c = self.class_counts()
        return (f"{type(self).__name__}({len(self)} patches {self.patch_size}px, normal={c['normal']}, "
                f"tumor={c['tumor']}, slides={len(np.unique(self.slide_ids))}, source={self.source!r})")


class PatchSubset(PatchDataset):
    """`parent` restricted to `indices` (like torch Subset, but keeping labels/slide_ids)."""

    def __init__(self, parent: PatchDataset, indices: Sequence[int] | np.ndarray) -> None:
        super().__init__(parent.transform)
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(parent) or idx.max() >= len(parent)):
            raise IndexError(f"subset indices must lie in [0, {len(parent)}) for {parent.source}; "
                             f"got min {idx.min()}, max {idx.max()}")
        self.parent = parent
        self.indices = idx % max(len(parent), 1)
        self.labels = parent.labels[self.indices]
        self.slide_ids = parent.slide_ids[self.indices]
        self.patch_size = parent.patch_size
        self.source = parent.source

    def read_image(self, i: int) -> np.ndarray:
        return self.parent.read_image(int(self.indices[i]))


class ArrayPatchDataset(PatchDataset):
    """Patches held in memory: images (N, P, P, 3) uint8."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, slide_ids: Sequence[str] | np.ndarray,
                 source: str, transform: Callable[[np.ndarray], Any] | None = None) -> None:
        super().__init__(transform)
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(f"{source}: expected images of shape (N, P, P, 3), got {images.shape}")
        self.images = to_uint8(images, source)
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.slide_ids = np.asarray(slide_ids, dtype=str).reshape(-1)
        if not len(self.images) == len(self.labels) == len(self.slide_ids):
            raise ValueError(f"{source}: {len(self.images)} images, {len(self.labels)} labels and "
                             f"{len(self.slide_ids)} slide ids; expected equal counts")
        self.patch_size = int(images.shape[1])
        self.source = source

    def read_image(self, i: int) -> np.ndarray:
        return self.images[i]


class _LazyH5:
    """Per-process lazily opened h5py handles; never pickled (each worker opens its own)."""

    def __init__(self) -> None:
        self._files: dict[str, h5py.File] = {}
        self._pid = os.getpid()

    def get(self, path: str) -> h5py.File:
        if self._pid != os.getpid():  # inherited through fork: do not reuse the parent's handle
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = h5py.File(path, "r")
        return f

    def is_open(self) -> bool:
        return bool(self._files) and self._pid == os.getpid()

    def close(self) -> None:
        if self._pid == os.getpid():
            for f in self._files.values():
                f.close()
        self._files = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _h5_contents(f: h5py.File) -> str:
    items = []
    f.visititems(lambda name, obj: items.append(
        f"{name} {obj.shape} {obj.dtype}" if isinstance(obj, h5py.Dataset) else f"{name}/"))
    return ", ".join(items) if items else "nothing (empty file)"


def _dataset_scale(d: h5py.Dataset, name: str) -> float:
    """Pixel scale of an HDF5 image dataset, decided once from its dtype and (floats) up to 256 patches
    spread over it, so that every patch of one dataset is scaled the same way (never one by one)."""
    if d.dtype == np.uint8:
        return 1.0
    n = d.shape[0]
    idx = np.unique(np.linspace(0, n - 1, min(n, 256)).astype(np.int64)) if n else []
    return pixel_scale(d[idx] if n else np.zeros(0, d.dtype), name)


def _open_h5(path: Path) -> h5py.File:
    if path.suffix == ".gz":
        raise ValueError(f"{path} is gzip-compressed; unpack it first (gunzip {path}) and pass the .h5 file")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise ValueError(f"{path}: cannot open as HDF5 ({e})") from e


class H5PatchDataset(PatchDataset):
    """Our store: datasets images (N,P,P,3) uint8, labels (N,), coords (N,2), slide_index, slide_names."""

    def __init__(self, path: str | os.PathLike, transform: Callable[[np.ndarray], Any] | None = None) -> None:
        super().__init__(transform)
        self.path = str(Path(path))
        with _open_h5(Path(path)) as f:
            missing = [k for k in STORE_DATASETS if k not in f]
            if missing:
                raise ValueError(f"{path}: not a complete patch store; missing dataset(s) {missing}; "
                                 f"the file has: {_h5_contents(f)}")
            shape = f["images"].shape
            if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
                raise ValueError(f"{path}: dataset 'images' has shape {shape}; expected (N, P, P, 3)")
            self.labels = f["labels"][:].astype(np.int64)
            names = np.asarray([s.decode() if isinstance(s, bytes) else str(s) for s in f["slide_names"][:]])
            sidx = f["slide_index"][:].astype(np.int64)
            self.slide_ids = names[sidx] if len(names) else np.asarray([], dtype=str)
            self.coords = f["coords"][:].astype(np.int64)
            self._scale = _dataset_scale(f["images"], f"{path}:/images")
            self.has_masks = "masks" in f
            self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        if len(self.labels) != shape[0]:
            raise ValueError(f"{path}: {shape[0]} images but {len(self.labels)} labels")
        self.patch_size = int(shape[1])
        self.source = f"patch store {self.path}"
        self._h5 = _LazyH5()

    def read_image(self, i: int) -> np.ndarray:
        return to_uint8(self._h5.get(self.path)["images"][i], f"{self.path}:/images[{i}]", self._scale)

    def read_mask(self, i: int) -> np.ndarray:
        """Tumor mask of patch `i`, uint8 (P, P) with 1 = tumor; only when extracted with masks."""
        if not self.has_masks:
            raise ValueError(f"{self.path} holds no 'masks' dataset; re-extract with --save-masks true")
        return self._h5.get(self.path)["masks"][i]


class PCamDataset(PatchDataset):
    """One PatchCamelyon split: `x` file (N, 96, 96, 3) uint8 + `y` file (N, 1, 1, 1) labels."""

    def __init__(self, x_path: str | os.PathLike, y_path: str | os.PathLike, split: str,
                 transform: Callable[[np.ndarray], Any] | None = None) -> None:
        super().__init__(transform)
        self.x_path, self.y_path = str(x_path), str(y_path)
        with _open_h5(Path(x_path)) as fx:
            if "x" not in fx:
                raise ValueError(f"{x_path}: PCam image file lacks dataset 'x'; the file has: {_h5_contents(fx)}")
            shape = fx["x"].shape
            self._scale = _dataset_scale(fx["x"], f"{x_path}:/x")
        with _open_h5(Path(y_path)) as fy:
            if "y" not in fy:
                raise ValueError(f"{y_path}: PCam label file lacks dataset 'y'; the file has: {_h5_contents(fy)}")
            self.labels = fy["y"][:].reshape(-1).astype(np.int64)
        if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
            raise ValueError(f"{x_path}: dataset 'x' has shape {shape}; expected (N, 96, 96, 3)")
        if shape[0] != len(self.labels):
            raise ValueError(f"{x_path} has {shape[0]} images but {y_path} has {len(self.labels)} labels")
        # PCam carries no slide ids; the split name stands in for one (its splits are slide-disjoint).
        self.slide_ids = np.full(len(self.labels), f"pcam-{split}")
        warnings.warn(f"{x_path}: PatchCamelyon has no slide ids; all {len(self.labels)} patches of the "
                      f"{split} split get slide id 'pcam-{split}' (keep PCam's own splits for train/val/test)",
                      stacklevel=3)
        self.patch_size = int(shape[1])
        self.split = split
        self.source = f"PatchCamelyon {split} {self.x_path}"
        self._h5 = _LazyH5()

    def read_image(self, i: int) -> np.ndarray:
        return to_uint8(self._h5.get(self.x_path)["x"][i], f"{self.x_path}:/x[{i}]", self._scale)


class ConcatPatchDataset(PatchDataset):
    """Several patch datasets of the same patch size, one after the other."""

    def __init__(self, parts: Sequence[PatchDataset], source: str,
                 transform: Callable[[np.ndarray], Any] | None = None) -> None:
        super().__init__(transform)
        sizes = {p.patch_size for p in parts}
        if len(sizes) != 1:
            raise ValueError(f"{source}: parts have different patch sizes {sorted(sizes)}")
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in parts])
        self.labels = np.concatenate([p.labels for p in parts])
        self.slide_ids = np.concatenate([p.slide_ids.astype(str) for p in parts])
        self.patch_size = sizes.pop()
        self.source = source

    def read_image(self, i: int) -> np.ndarray:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        return self.parts[k].read_image(i - int(self.offsets[k]))


def slide_id_from_name(path: str | os.PathLike) -> str:
    """`tumor_001_12345_6789.png` -> "tumor_001" (name `<slide>_<x>_<y>`); otherwise the file stem."""
    stem = Path(path).stem
    m = _SLIDE_FROM_NAME.match(stem)
    return m.group("slide") if m else stem


def _find_class_dir(root: Path, name: str) -> Path | None:
    for p in root.iterdir():
        if p.is_dir() and p.name.lower() == name:
            return p
    return None


def load_patch_folder(root: str | os.PathLike, transform: Callable[[np.ndarray], Any] | None = None,
                      ) -> ArrayPatchDataset:
    """Decode `root/normal/*` (label 0) and `root/tumor/*` (label 1) once into memory.

    Raises:
        ValueError: a class folder is missing, or the images do not all have one square size.
    """
    root = Path(root)
    images, labels, slides, paths = [], [], [], []
    for label, name in enumerate(CLASS_DIRS):
        d = _find_class_dir(root, name)
        if d is None:
            raise ValueError(f"{root}: expected subfolders {list(CLASS_DIRS)} of patch images; "
                             f"found {sorted(p.name for p in root.iterdir() if p.is_dir())}")
        arrays, kept = load_images(find_images(d), what=f"{name} patches")
        images += arrays
        paths += kept
        labels += [label] * len(arrays)
        slides += [slide_id_from_name(p) for p in kept]
    shapes = {a.shape for a in images}
    if len(shapes) != 1 or images[0].shape[0] != images[0].shape[1]:
        first = {}
        for a, p in zip(images, paths, strict=True):
            first.setdefault(a.shape, p)
        desc = "; ".join(f"{s[1]}x{s[0]} e.g. {p}" for s, p in first.items())
        raise ValueError(f"{root}: patches must all share one square size; found {desc}")
    return ArrayPatchDataset(np.stack(images), np.asarray(labels), slides,
                             source=f"patch folder {root}", transform=transform)


def _pcam_pair(path: Path) -> tuple[Path, Path, str]:
    m = PCAM_RE.match(path.name)
    assert m is not None
    split = m.group(1)
    x = path.with_name(f"camelyonpatch_level_2_split_{split}_x.h5")
    y = path.with_name(f"camelyonpatch_level_2_split_{split}_y.h5")
    for p in (x, y):
        if not p.is_file():
            raise FileNotFoundError(f"PatchCamelyon {split} split needs both {x.name} and {y.name} "
                                    f"in {path.parent}; {p.name} is missing")
    return x, y, split


def open_patch_dataset(path: str | os.PathLike, transform: Callable[[np.ndarray], Any] | None = None,
                       split: str | None = None) -> PatchDataset:
    """Open any supported patch source as a `PatchDataset`.

    Args:
        path: our HDF5 store (.h5/.hdf5 with attr format="wbc-fusion-patches"); a PCam `_x.h5` or
            `_y.h5` file; a folder holding PCam files (all splits found are concatenated unless
            `split` names one); or a folder with `normal/` and `tumor/` image subfolders.
        transform: applied to each uint8 (P, P, 3) image; its output is returned instead.
        split: for a PCam folder, "train", "valid" or "test".
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"patch source {path} does not exist")
    if path.is_dir():
        pcam = {}
        for p in sorted(path.iterdir()):
            m = PCAM_RE.match(p.name)
            if m:
                pcam[m.group(1)] = p
            elif p.name.startswith("camelyonpatch_") and p.name.endswith(".h5.gz"):
                warnings.warn(f"{p} is gzip-compressed and is ignored; gunzip it to use it", stacklevel=2)
        if pcam:
            if split is not None and split not in pcam:
                raise FileNotFoundError(f"{path}: no PatchCamelyon {split!r} split; found {sorted(pcam)}")
            splits = [split] if split else [s for s in PCAM_SPLITS if s in pcam]
            parts = [PCamDataset(*_pcam_pair(pcam[s]), transform=transform) for s in splits]
            if len(parts) == 1:
                return parts[0]
            return ConcatPatchDataset(parts, source=f"PatchCamelyon {'+'.join(splits)} in {path}",
                                      transform=transform)
        return load_patch_folder(path, transform=transform)
    if PCAM_RE.match(path.name):
        return PCamDataset(*_pcam_pair(path), transform=transform)
    if path.suffix.lower() in (".h5", ".hdf5", ".gz"):
        with _open_h5(path) as f:
            fmt = f.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt != STORE_FORMAT:
                have = _h5_contents(f)
                raise ValueError(f"{path}: not a recognised patch file (no attribute format={STORE_FORMAT!r}, "
                                 f"name not camelyonpatch_level_2_split_<split>_x.h5); expected datasets "
                                 f"{list(STORE_DATASETS)} or PCam 'x'/'y'; the file has: {have}")
        return H5PatchDataset(path, transform=transform)
    raise ValueError(f"{path}: unsupported patch source; give an .h5 patch store, a PatchCamelyon "
                     f"file or folder, or a folder with normal/ and tumor/ subfolders")
