"""Patch labels versus the demo generator's true tumor polygons (manifest.json).

    python benchmarks/extraction_speed/label_agreement.py --demo data/demo --patch-size 256

Extracts the demo slides with their ASAP XML, then recomputes every patch's label independently
from the manifest's polygons (matplotlib point-in-polygon on a 16 x 16 lattice over the labelled
centre region, same threshold) and reports the agreement, per slide and overall.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from pretrain.extract import ExtractConfig  # noqa: E402
from pretrain.extract_job import extract_patches  # noqa: E402
from pretrain.patches import open_patch_dataset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="data/demo", help="folder written by scripts/make_demo_data.py")
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--stride", type=int, default=None)
    ap.add_argument("--mpp", type=float, default=None, help="target µm/px (default: level 0)")
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    demo = Path(args.demo)
    manifest = json.loads((demo / "manifest.json").read_text())
    cfg = ExtractConfig(patch_size=args.patch_size, stride=args.stride, mpp=args.mpp, overlays=False)
    out = Path(tempfile.mkdtemp()) / "demo.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_patches([demo / "cam16" / "slides"], demo / "cam16" / "annotations", out, cfg, workers=args.workers)
    ds = open_patch_dataset(out)
    P = cfg.patch_size * float(ds.attrs["downsample"])  # patch footprint in level-0 px
    c = cfg.centre_fraction * P
    g = (np.arange(16) + 0.5) / 16 * c + (P - c) / 2
    offs = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    print(f"patch {cfg.patch_size} px at downsample {ds.attrs['downsample']:g} (level {ds.attrs['level']})")
    print(f"{'slide':<16} {'patches':>7} {'tumor (ours)':>12} {'tumor (truth)':>13} {'agreement':>9}")
    agree_all = []
    for info in manifest["cam16"]["slides_info"]:
        sel = np.nonzero(ds.slide_ids == info["name"])[0]
        pts = (ds.coords[sel][:, None, :] + offs[None]).reshape(-1, 2)
        inside = np.zeros(len(pts), bool)
        for poly in info["tumor_polygons"]:
            inside |= MplPath(np.asarray(poly)).contains_points(pts)
        truth = inside.reshape(len(sel), -1).mean(1) >= cfg.tumor_threshold
        ours = ds.labels[sel].astype(bool)
        agree_all.append(truth == ours)
        print(f"{info['name']:<16} {len(sel):>7} {ours.sum():>12} {truth.sum():>13} {(truth == ours).mean():>9.2%}")
    a = np.concatenate(agree_all)
    print(f"{'all':<16} {len(a):>7} {'':>12} {'':>13} {a.mean():>9.2%}")


if __name__ == "__main__":
    main()
