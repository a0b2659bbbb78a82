"""Tiny synthetic slides and annotations for the WSI tests (written with the demo's real-format writers)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from pretrain.demo.formats import write_asap_xml, write_pyramidal_tiff

PINK = (230, 150, 190)  # "normal tissue": saturated pink
PURPLE = (120, 60, 160)  # "tumor": darker purple
GLASS = (245, 245, 245)

# Tumor square in level-0 px (x0, y0, x1, y1) of the default fake slide.
TUMOR_BOX = (128, 128, 256, 256)
TISSUE_BOX = (64, 64, 448, 320)


def fake_rgb(width: int = 512, height: int = 384, tissue: bool = True, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: glass with a pink tissue rectangle holding a purple tumor square."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.uint8)
    img[:] = GLASS
    if tissue:
        x0, y0, x1, y1 = TISSUE_BOX
        img[y0:y1, x0:x1] = PINK
        x0, y0, x1, y1 = TUMOR_BOX
        img[y0:y1, x0:x1] = PURPLE
    noise = rng.integers(-4, 5, img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def box_polygon(box: tuple[float, float, float, float]) -> np.ndarray:
    x0, y0, x1, y1 = box
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def write_fake_slide(folder: Path, name: str = "slide_a", tissue: bool = True, annotate: bool = True,
                     width: int = 512, height: int = 384, mpp: float | None = 0.5) -> tuple[Path, Path | None]:
    """Write `folder/slides/<name>.tif` (2 levels, 64 px tiles) and `folder/annotations/<name>.xml`."""
    slide = write_pyramidal_tiff(folder / "slides" / f"{name}.tif", fake_rgb(width, height, tissue),
                                 levels=2, tile=64, mpp=mpp, compression="none")
    xml = None
    if annotate:
        xml = write_asap_xml(folder / "annotations" / f"{name}.xml", [box_polygon(TUMOR_BOX)])
    return slide, xml


def write_patch_store(path: Path, n_per_slide: int = 6, size: int = 40, n_slides: int = 4) -> Path:
    """A tiny patch store in the project's HDF5 schema: tumor patches are redder."""
    rng = np.random.default_rng(0)
    n = n_per_slide * n_slides
    labels = np.arange(n) % 2
    images = rng.integers(90, 170, (n, size, size, 3), dtype=np.uint8)
    images[labels == 1, ..., 0] = 225
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "wbc-fusion-patches"
        f["images"] = images
        f["labels"] = labels
        f["coords"] = np.zeros((n, 2), dtype=np.int64)
        f["slide_index"] = np.repeat(np.arange(n_slides), n_per_slide)
        f["slide_names"] = np.asarray([f"slide_{i}" for i in range(n_slides)], dtype="S")
    return path
