"""Generate the whole demo set (WBC JPEG folders, PRCC PNG regions, CAM16 pyramidal TIFF slides + ASAP XML).

Every image draws from its own generator seeded by (seed, source, index), so the same seed gives the
same pixels whatever else changes, and the files are written atomically. Layout under `out`:

    wbc/<class>/<class>_<i>.jpg
    prcc/region_<i>.png
    cam16/slides/demo_slide_<i>.tif      cam16/annotations/demo_slide_<i>.xml
    manifest.json                        seed, sizes, counts, tumor polygons per slide (level-0 px)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..utils import atomic_write_json
from .prcc import write_prcc_regions
from .slides import write_slide
from .wbc import CLASSES, DEFAULT_COUNTS, SMALL_COUNTS, write_wbc_images

#: Bump when the drawing code changes, so cached demo folders are regenerated.
DEMO_VERSION = 2
_SOURCES = {"wbc": 1, "prcc": 2, "cam16": 3}


@dataclass
class DemoSpec:
    """Sizes and counts of a demo set (px; slide sizes at level 0)."""

    wbc_size: int = 128
    wbc_counts: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_COUNTS))
    prcc_count: int = 24
    prcc_size: int = 384
    slide_count: int = 4
    slide_width: int = 4096
    slide_height: int = 3072
    slide_levels: int = 3
    slide_tile: int = 256
    slide_mpp: float = 0.5

    @classmethod
    def small(cls) -> DemoSpec:
        """The tiny set tests use (a few seconds)."""
        return cls(wbc_counts=dict(SMALL_COUNTS), prcc_count=6, prcc_size=160, slide_count=2,
                   slide_width=1024, slide_height=768)


@dataclass
class DemoConfig:
    """Command-line config of `scripts/make_demo_data.py`."""

    out: str = field(default="data/demo", metadata={"help": "target folder (git-ignored data/ by default)"})
    seed: int = field(default=0, metadata={"help": "same seed -> same images"})
    small: bool = field(default=False, metadata={"help": "the tiny test-sized set"})
    force: bool = field(default=False, metadata={"help": "regenerate even if an identical set exists"})
    wbc_size: int = field(default=128, metadata={"help": "edge of the WBC images in px (real PBC: ~360)"})
    workers: int = field(default=0, metadata={"help": "processes; 0 = auto"})


def make_demo_data(cfg: DemoConfig) -> dict[str, Path]:
    """Run `ensure_demo_data` for a DemoConfig, printing what was done and where."""
    spec = DemoSpec.small() if cfg.small else DemoSpec()
    spec.wbc_size = cfg.wbc_size
    t0 = time.perf_counter()
    paths, generated = ensure_demo_data(cfg.out, seed=cfg.seed, small=cfg.small, force=cfg.force, spec=spec,
                                        workers=cfg.workers)
    if generated:
        print(f"wrote demo data (seed {cfg.seed}{', small' if cfg.small else ''}) to {paths['root']} "
              f"in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"{paths['manifest']} already describes this demo set (seed {cfg.seed}, same sizes); "
              f"kept it (pass --force to regenerate)")
    for k in ("wbc", "prcc", "slides", "annotations", "manifest"):
        print(f"  {k:12s} {paths[k]}")
    return paths


def demo_paths(out: str | os.PathLike) -> dict[str, Path]:
    """The folders/files of a demo set rooted at `out` (whether or not they exist yet)."""
    out = Path(out)
    return {"root": out, "wbc": out / "wbc", "prcc": out / "prcc", "slides": out / "cam16" / "slides",
            "annotations": out / "cam16" / "annotations", "manifest": out / "manifest.json"}


def _jobs(paths: dict[str, Path], seed: int, spec: DemoSpec) -> list[tuple]:
    """(function, args) per unit of work, longest first; each seeds its own generators from (seed, source, index)."""
    jobs: list[tuple] = [
        (write_slide, (paths["root"] / "cam16", f"demo_slide_{i}", np.random.default_rng([seed, _SOURCES["cam16"], i]),
                       spec.slide_width, spec.slide_height, spec.slide_levels, spec.slide_tile, spec.slide_mpp))
        for i in range(spec.slide_count)]
    items = [(c, i) for c in CLASSES for i in range(spec.wbc_counts.get(c, 0))]
    for k in range(0, len(items), 100):
        jobs.append((write_wbc_images, (paths["wbc"], (seed, _SOURCES["wbc"]), items[k:k + 100], spec.wbc_size)))
    for k in range(0, spec.prcc_count, 8):
        idx = list(range(k, min(k + 8, spec.prcc_count)))
        jobs.append((write_prcc_regions, (paths["prcc"], (seed, _SOURCES["prcc"]), idx, spec.prcc_size)))
    return jobs


def _call(job: tuple):
    fn, args = job
    return fn(*args)


def generate_demo_data(out: str | os.PathLike, seed: int = 0, small: bool = False,
                       spec: DemoSpec | None = None, workers: int = 0) -> dict[str, Path]:
    """Write a synthetic demo set under `out` (created if missing) and return `demo_paths(out)`.

    Args:
        out: target folder; existing files of the same names are overwritten.
        seed: same seed -> identical PNG/XML bytes and identical decoded JPEG pixels.
        small: the tiny test set (`DemoSpec.small()`), ignored when `spec` is given.
        spec: explicit sizes/counts.
        workers: processes to draw in; 0 = one for `small`, else up to 4 (one per CPU core).
            The output does not depend on it.
    """
    spec = spec or (DemoSpec.small() if small else DemoSpec())
    unknown = sorted(set(spec.wbc_counts) - set(CLASSES))
    if unknown:
        raise ValueError(f"DemoSpec.wbc_counts has unknown class(es) {unknown}; expected a subset of {CLASSES}")
    paths = demo_paths(out)
    jobs = _jobs(paths, seed, spec)
    workers = workers or (1 if small else min(4, os.cpu_count() or 1))
    if workers <= 1:
        results = [_call(j) for j in jobs]
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_call, jobs))
    slides = results[:spec.slide_count]
    manifest = {
        "generator": "pretrain.demo", "version": DEMO_VERSION, "seed": int(seed), "small": bool(small),
        "spec": dataclasses.asdict(spec),
        "counts": {"wbc": {c: int(spec.wbc_counts.get(c, 0)) for c in CLASSES}, "prcc": spec.prcc_count,
                   "cam16_slides": spec.slide_count},
        "wbc": {"root": "wbc", "classes": list(CLASSES), "size": spec.wbc_size, "format": "jpg"},
        "prcc": {"root": "prcc", "size": spec.prcc_size, "format": "png"},
        "cam16": {"slides": "cam16/slides", "annotations": "cam16/annotations", "slides_info": slides},
        "note": "synthetic demo data: exercises the pipeline, its numbers are not science",
    }
    atomic_write_json(paths["manifest"], manifest)
    return paths


def _same_params(manifest: Path, seed: int, small: bool, spec: DemoSpec) -> bool:
    try:
        m = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return (m.get("generator") == "pretrain.demo" and m.get("version") == DEMO_VERSION and m.get("seed") == seed
            and m.get("spec") == json.loads(json.dumps(dataclasses.asdict(spec))))


def ensure_demo_data(out: str | os.PathLike, seed: int = 0, small: bool = False, force: bool = False,
                     spec: DemoSpec | None = None, workers: int = 0) -> tuple[dict[str, Path], bool]:
    """Generate the demo set at `out` unless an identical one is already there.

    The set is built in a temporary sibling folder and renamed onto `out` at the end, so an
    interrupted run never leaves a half set behind. Returns (paths, generated) where `generated`
    is False when an existing set with the same seed/spec/version was kept.

    Raises:
        FileExistsError: `out` exists, is not empty and is not a demo set (pass force=True to replace it).
    """
    out = Path(out)
    spec = spec or (DemoSpec.small() if small else DemoSpec())
    paths = demo_paths(out)
    if not force and _same_params(paths["manifest"], seed, small, spec):
        return paths, False
    if out.exists() and any(out.iterdir()) and not force and not paths["manifest"].exists():
        raise FileExistsError(f"{out} exists, is not empty and holds no demo manifest.json; choose another "
                              f"--out or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o755)
    try:
        generate_demo_data(tmp, seed=seed, small=small, spec=spec, workers=workers)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return paths, True
