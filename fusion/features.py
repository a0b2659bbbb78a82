"""Use a trained encoder checkpoint as a feature extractor for any folder of images -> HDF5.

    python scripts/extract_features.py --checkpoint checkpoints/prcc_ae.pt --images DIR --out features.h5

The HDF5 file holds:
    features  (N, D) float32   `encoder.encode(x)` for each readable image
    paths     (N,) str         path relative to `--images`
    labels    (N,) str         first folder below `--images` ("" for images directly in it)
    sha1      (N,) str         sha1 of the file bytes
    attrs     checkpoint, kind, input_size, out_dim, pretrained, images, n_skipped, skipped (JSON),
              resize, version
Images are resized exactly as the WBC loader does (`fusion.data.decode_bytes`: centre-crop to a
square, antialiased resize to the encoder's `input_size`).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from pretrain.checkpoint import load_encoder
from pretrain.images import find_images, warn_bad_files
from pretrain.utils import atomic_path, get_device

from .data import decode_file


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("wbc-fusion")
    except Exception:
        from pretrain import __version__

        return __version__


def extract_features(checkpoint: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                     batch_size: int = 64, device: str = "auto", kind: str | tuple[str, ...] | None = None,
                     workers: int | None = None, progress: bool = True) -> Path:
    """Encode every image under `images` (recursively) with the encoder in `checkpoint`; write `out`.

    Args:
        checkpoint: a checkpoint of any registered kind with `encode` (e.g. prcc_autoencoder,
            cam16_resnet); `kind` restricts the accepted kinds (None: any).
        images: folder of images (jpg/png/bmp/tif), optionally one sub-folder per class.
        out: HDF5 file to write (atomically: an interrupted run leaves no half file).
        batch_size: images per forward pass.
        device: "auto" (CUDA when present), "cpu", "cuda", ...
    Unreadable images are skipped, named in warnings and counted in the attrs.
    Returns the path written.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = get_device(device)
    encoder = load_encoder(checkpoint, kind=kind)  # type: ignore[arg-type]  # None: any kind with encode()
    encoder.to(dev)
    size = int(getattr(encoder, "input_size", 0))
    if size < 1:
        raise ValueError(f"{checkpoint}: the checkpoint's input spec has no image size; cannot resize to it")
    root = Path(images)
    files = find_images(root)
    workers = workers or min(8, os.cpu_count() or 1)
    kept_paths, labels, hashes, bad = [], [], [], []
    out = Path(out)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as h5, ThreadPoolExecutor(workers) as pool:
        feats = None
        bar = tqdm(total=len(files), desc=f"features {root.name}", unit="img", disable=not progress,
                   dynamic_ncols=True)
        for start in range(0, len(files), batch_size):
            chunk = files[start:start + batch_size]
            batch = []
            for p, (arr, digest, err) in zip(chunk, pool.map(lambda q: decode_file(q, size), chunk),
                                             strict=True):
                if arr is None:
                    bad.append((p, err))
                    continue
                rel = p.relative_to(root)
                batch.append(arr)
                kept_paths.append(rel.as_posix())
                labels.append(rel.parts[0] if len(rel.parts) > 1 else "")
                hashes.append(digest)
            bar.update(len(chunk))
            if not batch:
                continue
            x = torch.from_numpy(np.stack(batch)).to(dev).permute(0, 3, 1, 2).float().div_(255)  # (B, 3, S, S)
            with torch.inference_mode():
                z = encoder.encode(x).float().cpu().numpy()  # (B, D)
            if z.ndim != 2 or len(z) != len(batch):
                raise ValueError(f"{checkpoint}: encode returned shape {z.shape}, expected ({len(batch)}, D)")
            if feats is None:
                feats = h5.create_dataset("features", shape=(0, z.shape[1]), maxshape=(None, z.shape[1]),
                                          dtype="float32", chunks=(min(1024, max(len(files), 1)), z.shape[1]))
            n = feats.shape[0]
            feats.resize(n + len(z), axis=0)
            feats[n:] = z
        bar.close()
        warn_bad_files(bad, len(files), what=f"images under {root}")
        if feats is None:
            h5.create_dataset("features", shape=(0, int(encoder.out_dim)), dtype="float32")
        s = h5py.string_dtype()
        h5.create_dataset("paths", data=np.array(kept_paths, dtype=object), dtype=s)
        h5.create_dataset("labels", data=np.array(labels, dtype=object), dtype=s)
        h5.create_dataset("sha1", data=np.array(hashes, dtype=object), dtype=s)
        h5.attrs.update({
            "checkpoint": str(Path(checkpoint).resolve()), "kind": str(encoder.kind), "input_size": size,
            "out_dim": int(encoder.out_dim), "pretrained": bool(encoder.pretrained),
            "images": str(root.resolve()), "n_skipped": len(bad),
            "skipped": json.dumps([str(p.relative_to(root)) for p, _ in bad]),
            "resize": "centre-crop to square, antialiased Lanczos resize to input_size",
            "version": _package_version(),
        })
    return out


@dataclass
class FeatureConfig:
    """`scripts/extract_features.py`: encode a folder of images with a checkpoint -> HDF5."""

    checkpoint: str = field(default="", metadata={"help": "encoder checkpoint (.pt)"})
    images: str = field(default="", metadata={"help": "folder of images (class sub-folders optional)"})
    out: str = field(default="features.h5", metadata={"help": "HDF5 file to write"})
    batch_size: int = 64
    device: str = "auto"


def run_extract_features(cfg: FeatureConfig) -> Path:
    """Check the required paths are given, then call `extract_features` and print what was written."""
    if not cfg.checkpoint or not cfg.images:
        raise ValueError("pass both --checkpoint PT and --images DIR")
    out = extract_features(cfg.checkpoint, cfg.images, cfg.out, batch_size=cfg.batch_size, device=cfg.device)
    with h5py.File(out, "r") as h5:
        print(f"wrote {out}: features {h5['features'].shape} from {h5.attrs['kind']} "
              f"({h5.attrs['n_skipped']} unreadable images skipped)")
    return out
