"""Extraction speed: the whole pipeline versus raw OpenSlide `read_region` for the same patches.

    python benchmarks/extraction_speed/run.py            # ~2-4 min on a 2-core laptop

For each slide, one run alternates (repeats times): (a) raw: open the slide and call
`read_region` for exactly the patches the pipeline keeps (same level, size, coordinates), nothing
else; (b) pipeline: `extract_patches` on that slide with one worker, timed end to end (open,
thumbnail, tissue mask, grid, labels, reads, RGBA->RGB, HDF5 write, rename; overlay on/off).
Median patches/s are reported; "plan s" is the fixed per-slide part (open, thumbnail,
tissue mask, grid, labels), which the pipeline pays and the raw loop does not. Then scaling: 8 slides with 1 and 2 worker processes, beside a
busy-loop control that shows the parallel CPU the machine actually grants (on a shared or
CPU-capped machine two processes may get no more CPU than one). Slides: the real ones in ../shared/data/wsi when present, plus a
full-size synthetic slide (4096 x 3072, 3 levels, written with the demo's TIFF writer) in a temp folder.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pretrain.extract import ExtractConfig, plan_slide  # noqa: E402
from pretrain.extract_job import _pool_context, extract_patches  # noqa: E402
from pretrain.wsi import open_slide  # noqa: E402

SHARED = Path(os.environ.get("WBC_SHARED_DATA", ROOT.parent / "shared" / "data"))


def raw_reads(path: Path, coords: np.ndarray, level: int, size: int) -> float:
    """Seconds for bare read_region calls (slide opened fresh, as the pipeline does)."""
    t = time.perf_counter()
    s = open_slide(path)
    for x, y in coords:
        s.read_region((int(x), int(y)), level, (size, size))
    s.close()
    return time.perf_counter() - t


def pipeline(paths: list[Path], cfg: ExtractConfig, out: Path, workers: int = 1) -> tuple[float, int]:
    """Seconds and patch count of one `extract_patches` run into a new file (a real run writes a new
    store; replacing a 100 MB one would add the cost of freeing it)."""
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = extract_patches(paths, None, out, cfg, workers=workers)
    return time.perf_counter() - t, sum(s["patches"] for s in summary)


def _spin(n: int) -> float:
    t = time.perf_counter()
    x = 0
    for i in range(n):
        x += i
    return time.perf_counter() - t


def busy_loop(processes: int, n: int = 10_000_000) -> float:
    """Seconds for `processes` processes to each run the same pure-Python loop at the same time
    (a CPU-capacity probe; the processes are started first and not timed)."""
    with cf.ProcessPoolExecutor(processes, mp_context=_pool_context()) as pool:
        list(pool.map(_spin, [1000] * processes))  # start the processes first
        return max(pool.map(_spin, [n] * processes))


def demo_slide(folder: Path, width: int = 4096, height: int = 3072) -> Path:
    """A full-size synthetic slide: textured pink/purple tissue blobs on glass, 3 levels, 256 px zlib tiles."""
    from scipy import ndimage

    from pretrain.demo.formats import write_pyramidal_tiff

    rng = np.random.default_rng(0)
    blobs = ndimage.zoom(rng.standard_normal((height // 128, width // 128)), 128, order=1)[:height, :width]
    tissue = blobs > -0.3
    tex = rng.integers(-25, 26, (height, width, 3))
    rgb = np.where(tissue[..., None], np.array([215, 140, 185]) + tex, np.array([242, 242, 242]) + tex // 8)
    return write_pyramidal_tiff(folder / "demo_slide.tif", np.clip(rgb, 0, 255).astype(np.uint8), levels=3,
                                tile=256, mpp=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--stride", type=int, default=128, help="overlapping grid: more patches per slide")
    ap.add_argument("--scaling-stride", type=int, default=128)
    ap.add_argument("--scaling-slides", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    slides = [SHARED / "wsi" / n for n in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs")
              if (SHARED / "wsi" / n).is_file()]
    if not slides:
        print(f"(real slides not found under {SHARED / 'wsi'}; demo slide only)")
    slides.append(demo_slide(tmp / "demo"))
    la = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    print(f"machine: {os.cpu_count()} CPUs, load average {la[0]:.2f} at start; patch {args.patch_size} px, "
          f"stride {args.stride} px, level 0, {args.repeats} repeats (median)\n")

    print(f"{'slide':<26} {'patches':>7} {'raw p/s':>8} {'pipe p/s':>8} {'ratio':>6} {'no-overlay':>10} "
          f"{'ratio':>6} {'lzf p/s':>8} {'plan s':>7}")
    for path in slides:
        cfg = ExtractConfig(patch_size=args.patch_size, stride=args.stride, overlays=True)
        plan = plan_slide(path, None, cfg)
        n = len(plan.coords)
        raw, full, bare, lzf, fixed = [], [], [], [], []
        for r in range(args.repeats + 1):  # first round warms the page cache, not counted
            t_raw = raw_reads(path, plan.coords, plan.level, plan.read_size)
            t_full, _ = pipeline([path], cfg, tmp / "p.h5")
            t_bare, _ = pipeline([path], ExtractConfig(patch_size=args.patch_size, stride=args.stride,
                                                       overlays=False), tmp / "p.h5")
            t_lzf, _ = pipeline([path], ExtractConfig(patch_size=args.patch_size, stride=args.stride,
                                                      overlays=False, compression="lzf"), tmp / "p.h5")
            t = time.perf_counter()
            plan_slide(path, None, cfg)
            t_plan = time.perf_counter() - t
            if r:
                fixed.append(t_plan)
                raw.append(n / t_raw)
                full.append(n / t_full)
                bare.append(n / t_bare)
                lzf.append(n / t_lzf)
        m = statistics.median
        print(f"{path.name[:26]:<26} {n:>7} {m(raw):>8.0f} {m(full):>8.0f} {m(full) / m(raw):>6.0%} "
              f"{m(bare):>10.0f} {m(bare) / m(raw):>6.0%} {m(lzf):>8.0f} {m(fixed):>7.2f}")
    sizes = {c: (tmp / f"{c}.h5") for c in ("none", "lzf")}
    for c, p in sizes.items():
        pipeline([slides[-1]], ExtractConfig(patch_size=args.patch_size, stride=args.stride, overlays=False,
                                             compression=c), p)
    print("store size for the demo slide: " + ", ".join(f"{c} {p.stat().st_size / 2**20:.1f} MiB"
                                                          for c, p in sizes.items()))

    # Scaling: the same slide under several names, processed by 1 and 2 worker processes, next to a
    # control that shows how much parallel CPU this machine really gives (a busy loop in 1 vs 2 processes).
    src = slides[-1]
    many = []
    for i in range(args.scaling_slides):
        link = tmp / "many" / f"copy_{i}{src.suffix}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src)
        many.append(link)
    cfg = ExtractConfig(patch_size=args.patch_size, stride=args.scaling_stride, overlays=False)
    print(f"\nscaling: {len(many)} slides x {len(plan_slide(src, None, cfg).coords)} patches ({src.name}, stride "
          f"{args.scaling_stride}), no overlays")
    t = time.perf_counter()
    with cf.ProcessPoolExecutor(2, mp_context=_pool_context()) as pool:
        list(pool.map(abs, [1, 2]))
    print(f"(starting 2 worker processes, which import pretrain and torch: {time.perf_counter() - t:.1f} s, "
          f"included below)")
    print(f"{'workers':>7} {'seconds':>8} {'patches/s':>9} {'speedup':>7} {'busy-loop control speedup':>26}")
    base = ctrl_base = None
    for w in (1, 2):
        t, n = pipeline(many, cfg, tmp / f"w{w}.h5", workers=w)
        c = busy_loop(w)
        base, ctrl_base = base or t, ctrl_base or c
        print(f"{w:>7} {t:>8.2f} {n / t:>9.0f} {base / t:>6.2f}x {w * ctrl_base / c:>25.2f}x")
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "")


if __name__ == "__main__":
    main()
