"""Why does scratch miss the 10% target? Validation-only probes of the scratch arm at one fraction.

    .venv/bin/python benchmarks/real_study/scratch_probe.py [--fraction 0.1] [--seeds 0 1 2] [--out runs/scratch_probe]

Each variant changes one thing from the package defaults; runs use `--eval-test false`, so the test
split is never evaluated. Prints a markdown table of validation macro-F1 per seed, its mean, and seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusion.train import RunConfig, train_run  # noqa: E402

VARIANTS = {  # name -> RunConfig overrides
    "defaults (48 px, 400 steps at 10%)": {},
    "twice the steps (min_steps 800)": {"min_steps": 800},
    "64 px": {"image_size": 64},
    "wider CNN (32-64-128-192-256)": {"cnn_channels": [32, 64, 128, 192, 256]},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc-wbc"))
    p.add_argument("--split", default=str(ROOT / "benchmarks" / "real_study" / "split.json.gz"))
    p.add_argument("--fraction", type=float, default=0.1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "runs" / "scratch_probe"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"SKIP: {args.data} is absent")
        return
    print(f"scratch, fraction {args.fraction}, validation macro-F1 (test never evaluated)\n")
    print("| variant | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | s/run |")
    print("|---|" + "---|" * (len(args.seeds) + 2))
    for name, over in VARIANTS.items():
        vals, secs = [], []
        for s in args.seeds:
            tag = "".join(c if c.isalnum() else "_" for c in name)[:30]
            cfg = RunConfig(data=args.data, split=args.split, fraction=args.fraction, arm="scratch", seed=s,
                            out=f"{args.out}/{tag}_s{s}", eval_test=False, progress=False, curves=False, **over)
            r = train_run(cfg)
            vals.append(r["val_macro_f1"])
            secs.append(r["seconds"])
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in vals) + f" | {np.mean(vals):.4f} | "
              f"{np.mean(secs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
