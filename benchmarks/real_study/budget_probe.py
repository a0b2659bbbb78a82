"""Could a smaller step budget fit the study in 120 minutes? Validation-only probes of the scratch arm.

    .venv/bin/python benchmarks/real_study/budget_probe.py [--seeds 0 1 2] [--out runs/budget_probe] \
        > benchmarks/real_study/BUDGET_PROBE.md

Each variant cuts the budget of one fraction; runs use `--eval-test false`, so the test split is never
evaluated. The defaults' validation macro-F1 and seconds come from the same runs in the record
(`results.jsonl`): with the same seed and thread count they are bit-identical from one invocation to
the next (`ONE_GO.md`), so they are not rerun. Run-second ratios are only comparable within one session.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusion.train import RunConfig, train_run  # noqa: E402
from pretrain.utils import read_jsonl  # noqa: E402

VARIANTS = [  # (fraction, label, RunConfig overrides)
    (0.01, "min_steps 600 (default 800)", {"min_steps": 600}),
    (0.1, "min_steps 600 (default 800)", {"min_steps": 600}),
    (1.0, "max_steps 1000 (default 1500)", {"max_steps": 1000}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc-wbc"))
    p.add_argument("--split", default=str(ROOT / "benchmarks" / "real_study" / "split.json.gz"))
    p.add_argument("--record", default=str(ROOT / "benchmarks" / "real_study" / "one_go" / "results.jsonl"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=str(ROOT / "runs" / "budget_probe"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"SKIP: {args.data} is absent")
        return
    rec = {(r["fraction"], r["seed"]): r for r in read_jsonl(args.record) if r["arm"] == "scratch"}
    print("scratch, validation macro-F1 (test never evaluated); defaults from the record\n")
    print("| fraction | budget | steps | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | s/run |")
    print("|---|---|---|" + "---|" * (len(args.seeds) + 2))
    for fraction, label, over in VARIANTS:
        base = [rec[(fraction, s)] for s in args.seeds]
        print(f"| {fraction:g} | defaults | {base[0]['steps']} | "
              + " | ".join(f"{r['val_macro_f1']:.4f}" for r in base)
              + f" | {np.mean([r['val_macro_f1'] for r in base]):.4f} | {np.mean([r['seconds'] for r in base]):.0f} |")
        vals, secs, steps = [], [], 0
        for s in args.seeds:
            cfg = RunConfig(data=args.data, split=args.split, fraction=fraction, arm="scratch", seed=s,
                            out=f"{args.out}/f{fraction:g}_s{s}", overwrite=True, eval_test=False,
                            progress=False, curves=False, **over)
            r = train_run(cfg)
            vals.append(r["val_macro_f1"])
            secs.append(r["seconds"])
            steps = r["steps"]
        print(f"| {fraction:g} | {label} | {steps} | " + " | ".join(f"{v:.4f}" for v in vals)
              + f" | {np.mean(vals):.4f} | {np.mean(secs):.0f} |", flush=True)


if __name__ == "__main__":
    main()
