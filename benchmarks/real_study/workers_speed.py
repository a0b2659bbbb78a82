"""Wall time of the same small real sweep run one at a time (2 threads) and with two 1-thread workers.

    .venv/bin/python benchmarks/real_study/workers_speed.py [--fraction 0.1] [--seeds 0 1 2 3] [--out runs/workers_speed]

Scratch runs on the real PBC images with the study's split and the package defaults; each layout gets a
fresh folder, and the in-process layout runs first. Prints the wall time of each and their ratio, and
the largest metric difference between the layouts (thread count changes the floating-point sums).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusion.sweep import SweepConfig, run_sweep  # noqa: E402
from pretrain.utils import read_jsonl  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc-wbc"))
    p.add_argument("--split", default=str(ROOT / "benchmarks" / "real_study" / "split.json.gz"))
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out", default=str(ROOT / "runs" / "workers_speed"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"SKIP: {args.data} is absent")
        return
    rows, secs = {}, {}
    for name, kw in (("1 process, 2 threads", {}), ("2 workers, 1 thread each", {"workers": 2, "worker_threads": 1})):
        out = Path(args.out) / name.split(",")[0].replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        cfg = SweepConfig(data=args.data, split=args.split, fractions=[args.fraction], arms=["scratch"],
                          seeds=args.seeds, out=str(out), curves=False, progress=False, **kw)
        t0 = time.perf_counter()
        rows[name] = {r["run"]: r for r in read_jsonl(run_sweep(cfg))}
        secs[name] = time.perf_counter() - t0
    (a, ta), (b, tb) = secs.items()
    diff = max(abs(rows[a][k]["macro_f1"] - rows[b][k]["macro_f1"]) for k in rows[a])
    print(f"\n{len(args.seeds)} scratch runs at fraction {args.fraction}, real PBC images, package defaults\n")
    print("| layout | wall s | vs one process |\n|---|---|---|")
    print(f"| {a} | {ta:.0f} | 1.00 |\n| {b} | {tb:.0f} | {tb / ta:.2f} |")
    print(f"\nLargest test macro-F1 difference between the layouts, same run: {diff:.4f}")


if __name__ == "__main__":
    main()
