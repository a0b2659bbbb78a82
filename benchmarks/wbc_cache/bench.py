"""Time decoding the WBC folder once (cold, into a fresh cache) and re-loading it from the cache.

    .venv/bin/python benchmarks/wbc_cache/bench.py --data ../shared/data/pbc-wbc --sizes 32 48 64

Also times a full JPEG decode (no libjpeg draft mode) on a sample, to show what draft mode saves.
Writes one JSON line per measurement to stdout; results.md records a run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from fusion.data import class_folders, load_wbc, square_resize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "pbc-wbc"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 48, 64])
    ap.add_argument("--sample", type=int, default=300, help="files for the full-decode comparison")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    env = {"cpus": os.cpu_count(), "threads": min(8, os.cpu_count() or 1)}
    with tempfile.TemporaryDirectory() as cache:
        for size in args.sizes:
            t0 = time.perf_counter()
            data = load_wbc(args.data, size, cache_dir=cache, progress=False)
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_wbc(args.data, size, cache_dir=cache, progress=False)
            warm = time.perf_counter() - t0
            mb = sum(f.stat().st_size for f in Path(cache).glob(f"*_{size}.npz")) / 2**20
            print(json.dumps({"size": size, "n": len(data), "cold_s": round(cold, 2), "warm_s": round(warm, 3),
                              "cold_ms_per_img": round(1000 * cold / len(data), 3), "cache_mb": round(mb, 1),
                              **env}))
    files = [p for _, _, fs in class_folders(args.data) for p in fs][:: max(1, 8232 // args.sample)][: args.sample]
    for size in args.sizes[-1:]:
        t0 = time.perf_counter()
        for p in files:
            with Image.open(p) as im:
                im.load()
                square_resize(im, size)
        full = (time.perf_counter() - t0) / len(files)
        t0 = time.perf_counter()
        from fusion.data import decode_file

        arrs = [decode_file(p, size)[0] for p in files]
        draft = (time.perf_counter() - t0) / len(files)
        ref = []
        for p in files[:50]:
            with Image.open(p) as im:
                ref.append(square_resize(im, size))
        diff = np.abs(np.stack(ref).astype(float) - np.stack(arrs[:50]).astype(float)).mean()
        print(json.dumps({"size": size, "one_thread_full_decode_ms": round(1000 * full, 2),
                          "one_thread_draft_decode_ms": round(1000 * draft, 2),
                          "mean_abs_diff_0_255": round(float(diff), 2)}))


if __name__ == "__main__":
    main()
