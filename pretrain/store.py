"""The HDF5 patch store written by `pretrain.extract_job` and read by `pretrain.patches`.

Schema (N patches of P x P px):
    images       (N, P, P, 3) uint8, chunked (1, P, P, 3), optional lzf/gzip compression
    labels       (N,) int8          0 normal, 1 tumor
    masks        (N, P, P) uint8    optional, 1 = tumor pixel
    coords       (N, 2) int64       level-0 (x, y) of each patch's top-left corner
    slide_index  (N,) int32         index into slide_names
    slide_names  (S,) UTF-8 strings
    tissue       (N,) float32       tissue fraction of the patch (from the thumbnail mask)
    tumor        (N,) float32       tumor fraction of the patch's centre region
    attrs: format="wbc-fusion-patches", patch_size, level, downsample, mpp (-1 when not fixed),
           stride, tissue_threshold, tumor_threshold, label_rule, created, version, config (JSON),
           slides (JSON per-slide summary)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .patches import STORE_FORMAT

#: Suffixes of a patch store; `pretrain.patches.open_patch_dataset` reads our stores by these.
STORE_SUFFIXES = (".h5", ".hdf5")

_META = {"labels": np.int8, "coords": np.int64, "slide_index": np.int32, "tissue": np.float32,
         "tumor": np.float32}


class StoreWriter:
    """Append patches slide by slide; `rollback` drops a half-written slide; `finish` writes names and attrs."""

    def __init__(self, path: str | os.PathLike, patch_size: int, save_masks: bool = False,
                 compression: str = "none") -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = h5py.File(self.path, "w")
        P = patch_size
        comp = {} if compression == "none" else {"compression": compression}
        self.f.create_dataset("images", (0, P, P, 3), np.uint8, maxshape=(None, P, P, 3), chunks=(1, P, P, 3), **comp)
        if save_masks:
            self.f.create_dataset("masks", (0, P, P), np.uint8, maxshape=(None, P, P), chunks=(1, P, P),
                                  compression="lzf")
        for k, dt in _META.items():
            shape = (0, 2) if k == "coords" else (0,)
            self.f.create_dataset(k, shape, dt, maxshape=(None,) + shape[1:], chunks=(4096,) + shape[1:])
        self.n_images = 0  # images written so far
        self.n_committed = 0  # images whose metadata is written

    def _grow(self, name: str, data: np.ndarray, at: int) -> None:
        d = self.f[name]
        if d.shape[0] < at + len(data):
            d.resize(at + len(data), axis=0)
        d[at:at + len(data)] = data

    def append(self, images: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Images (B, P, P, 3) uint8 [and masks (B, P, P)] of the current slide."""
        self._grow("images", images, self.n_images)
        if "masks" in self.f and masks is not None:
            self._grow("masks", masks, self.n_images)
        self.n_images += len(images)

    def append_meta(self, labels: np.ndarray, coords: np.ndarray, slide_index: int,
                    tissue: np.ndarray, tumor: np.ndarray) -> None:
        """Close the current slide: one metadata row per image appended since the last slide."""
        n = self.n_images - self.n_committed
        if len(labels) != n:
            raise ValueError(f"{self.path}: {n} images appended for this slide but {len(labels)} labels")
        at = self.n_committed
        for k, v in (("labels", labels), ("coords", coords), ("tissue", tissue), ("tumor", tumor),
                     ("slide_index", np.full(n, slide_index))):
            self._grow(k, np.asarray(v, dtype=_META[k]), at)
        self.n_committed = self.n_images

    def rollback(self) -> None:
        """Forget images of a slide that failed half-way."""
        self.n_images = self.n_committed
        for k in ("images", "masks"):
            if k in self.f:
                self.f[k].resize(self.n_committed, axis=0)

    def merge(self, part: str | os.PathLike, slide_index: int, block: int = 256) -> None:
        """Append every patch of a per-slide part file (written by a worker) as slide `slide_index`."""
        with h5py.File(part, "r") as g:
            n = g["labels"].shape[0]
            names = [k for k in ("images", "masks") if k in g and k in self.f]
            if all(g[k].chunks == self.f[k].chunks and g[k].compression == self.f[k].compression for k in names):
                # raw chunk bytes, no decompression or numpy round trip: ~2x faster than reading and writing
                for k in names:
                    src, dst = g[k], self.f[k]
                    dst.resize(self.n_images + n, axis=0)
                    zeros = (0,) * (src.ndim - 1)
                    for i in range(n):
                        mask, data = src.id.read_direct_chunk((i, *zeros))
                        dst.id.write_direct_chunk((self.n_images + i, *zeros), data, mask)
                self.n_images += n
            else:
                for s in range(0, n, block):
                    e = min(n, s + block)
                    self.append(g["images"][s:e], g["masks"][s:e] if "masks" in g else None)
            self.append_meta(g["labels"][:], g["coords"][:], slide_index, g["tissue"][:], g["tumor"][:])

    def finish(self, slide_names: list[str], attrs: dict[str, Any]) -> None:
        self.rollback()
        self.f.create_dataset("slide_names", data=np.array(slide_names, dtype=object),
                              dtype=h5py.string_dtype("utf-8"))
        for k, v in attrs.items():
            self.f.attrs[k] = v

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _common(values: list, default: float) -> float:
    vals = {v for v in values if v is not None}
    return vals.pop() if len(vals) == 1 else default


def store_attrs(cfg: Any, summary: list[dict]) -> dict[str, Any]:
    """File attributes: requested parameters; level/downsample/mpp are -1 unless one value for all slides."""
    from .config import to_plain

    ok = [s for s in summary if s["status"] == "ok"]
    return {
        "format": STORE_FORMAT,
        "patch_size": int(cfg.patch_size),
        "level": int(cfg.level if cfg.level is not None else _common([s["level"] for s in ok], -1)),
        "downsample": float(cfg.downsample if cfg.downsample is not None
                            else _common([s["downsample"] for s in ok], -1.0)),
        "mpp": float(cfg.mpp if cfg.mpp is not None else _common([s.get("mpp") for s in ok], -1.0)),
        "stride": int(cfg.stride or cfg.patch_size),
        "tissue_threshold": float(cfg.tissue_threshold),
        "tumor_threshold": float(cfg.tumor_threshold),
        "label_rule": cfg.label_rule,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": __version__,
        "config": json.dumps(to_plain(cfg)),
        "slides": json.dumps(summary),
    }


def format_summary(summary: list[dict], out: str | os.PathLike | None = None) -> str:
    """Per-slide table: patches, tumor patches, tissue fraction, level, seconds; then the failures."""
    rows = [f"{'slide':<32} {'patches':>8} {'tumor':>6} {'tissue':>7} {'level':>5} {'ds':>6} {'sec':>7}"]
    for s in summary:
        if s["status"] == "ok":
            rows.append(f"{s['slide'][:32]:<32} {s['patches']:>8} {s['tumor_patches']:>6} "
                        f"{s['tissue_fraction']:>7.3f} {s['level']:>5} {s['downsample']:>6.3g} {s['seconds']:>7.2f}")
        else:
            rows.append(f"{s['slide'][:32]:<32} {'FAILED':>8}")
    n = sum(s["patches"] for s in summary)
    t = sum(s["tumor_patches"] for s in summary)
    bad = [s for s in summary if s["status"] != "ok"]
    rows.append(f"total: {n} patches ({t} tumor) from {len(summary) - len(bad)} of {len(summary)} slides"
                + (f" -> {out}" if out else ""))
    for s in summary:
        for note in (s.get("level_note"),):
            if note and ("no µm/px" in note or "implausible" in note or "finer than" in note):
                rows.append(f"note {s['slide']}: {note}")
    missing = [s for s in summary if s["status"] == "ok" and s.get("annotations_missing")]
    if missing and len(missing) == len(summary) - len(bad):
        rows.append(f"WARNING: no annotation XML for any slide (looked for {missing[0]['annotations_missing']} "
                    f"and the like); every patch is labelled normal (0)")
    elif missing:
        rows.append(f"note: no annotation XML for {len(missing)} slide(s), all their patches are normal: "
                    + ", ".join(s["slide"] for s in missing[:10]) + (" ..." if len(missing) > 10 else ""))
    if bad:
        rows.append(f"{len(bad)} slide(s) failed:")
        rows += [f"  {s['error']}" for s in bad]
    return "\n".join(rows)


# Output safety: a store is written under a temporary name beside `--out` and renamed onto it only when
# the run may replace it. Temporaries are `.<name>.<pid>.tmp` (files) and `.<name>.<pid>.parts` (folders):
# hidden, never ending in .h5 (no reader takes one for a store), unique per process (two runs never share
# one), and the pid tells a later run whether the writer is still alive or was killed.


def check_store_suffix(out: str | os.PathLike) -> None:
    if Path(out).suffix.lower() not in STORE_SUFFIXES:
        raise ValueError(f"--out {out}: a patch store must end in .h5 or .hdf5 (readers find stores by it); "
                         f"got suffix {Path(out).suffix or '(none)'!r}")


def temp_sibling(path: str | os.PathLike, kind: str = "tmp", pid: int | None = None) -> Path:
    """`.<name>.<pid>.<kind>` beside `path`; `kind` is "tmp" or "parts"."""
    path = Path(path)
    return path.with_name(f".{path.name}.{pid or os.getpid()}.{kind}")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, killed but not yet reaped, counts as gone)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:  # Linux: state field after the ")" that ends the command name
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def remove_path(p: Path) -> None:
    """Remove a file or folder; missing is fine."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def remove_stale(path: str | os.PathLike) -> list[Path]:
    """Remove temporaries of `path` whose writer is gone (a killed run); returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pat = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.(tmp|parts)")
    stale = [p for p in path.parent.iterdir()
             if (m := pat.fullmatch(p.name)) and not pid_alive(int(m.group(1)))]
    for p in stale:
        remove_path(p)
    return stale


def prepare_output(out: str | os.PathLike) -> Path:
    """Check that `out` can be written, remove stale temporaries of it, and create this run's temp file.

    Done before any slide work, so a bad `--out` costs nothing. Returns the temp file (empty).
    Raises (one line naming the path and what to do): ValueError for a suffix other than .h5/.hdf5;
    IsADirectoryError when `out` is a folder; OSError when its folder cannot be created or written.
    """
    out = Path(out)
    check_store_suffix(out)
    if out.is_dir():
        raise IsADirectoryError(f"--out {out} is a folder; give a file name ending in .h5")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(f"--out {out}: cannot create its folder {out.parent} ({e.strerror or e}); "
                      f"choose an --out in a writable folder") from e
    remove_stale(out)
    for old in (out.with_name(out.name + ".tmp"), out.with_name(out.name + ".parts")):  # older versions' names
        remove_path(old)
    tmp = temp_sibling(out)
    try:
        tmp.open("wb").close()
    except OSError as e:
        raise type(e)(f"--out {out}: cannot write in {out.parent} ({e.strerror or e}); "
                      f"choose an --out in a writable folder") from e
    return tmp
