"""Where one study run spends its time: training steps, augmentation, BatchNorm re-estimation,
validation checks, frozen features, checkpoint. Validation only (the test split is not evaluated).

    .venv/bin/python benchmarks/real_study/run_profile.py [--runs 0.1:scratch 1.0:scratch 1.0:prcc+cam16]

Wraps the functions `fusion.train.train_run` calls with wall-clock timers, then runs the study's
package defaults on the real PBC images with the study's split (seed 0, sum mode). Fused arms need
the study's encoder checkpoints in `runs/real_study/checkpoints` (from `make real-study`).
Prints one row per run: seconds per part and their share of the run.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import fusion.train as ft  # noqa: E402
from fusion.data import load_wbc  # noqa: E402
from fusion.splits import load_split  # noqa: E402

PARTS = {"train_one_epoch": "training epochs (all)", "augment": "of which augmentation",
         "recalibrate_bn": "BatchNorm re-estimation", "_eval": "validation checks",
         "compute_features": "frozen features", "save_checkpoint": "checkpoint"}
SPENT: dict[str, float] = defaultdict(float)


def _timed(name: str, fn):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            SPENT[name] += time.perf_counter() - t0
    return wrapper


def instrument() -> None:
    import fusion.encoders as fe

    for name in PARTS:
        mod = fe if name == "compute_features" else ft
        setattr(mod, name, _timed(name, getattr(mod, name)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc-wbc"))
    p.add_argument("--split", default=str(ROOT / "benchmarks" / "real_study" / "split.json.gz"))
    p.add_argument("--checkpoints", default=str(ROOT / "runs" / "real_study" / "checkpoints"))
    p.add_argument("--runs", nargs="+", default=["0.1:scratch", "1.0:scratch", "1.0:prcc+cam16"],
                   help="fraction:arm pairs")
    p.add_argument("--out", default=str(ROOT / "runs" / "run_profile"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"SKIP: {args.data} is absent")
        return
    instrument()
    data = load_wbc(args.data, 48, "data/cache", progress=False)
    split = load_split(args.split)
    ck = Path(args.checkpoints)
    print("| run | steps | run s | " + " | ".join(PARTS.values()) + " | other |")
    print("|---|---|---|" + "---|" * (len(PARTS) + 1))
    for spec in args.runs:
        frac, arm = spec.split(":")
        SPENT.clear()
        cfg = ft.RunConfig(data=args.data, split=args.split, fraction=float(frac), arm=arm, seed=0,
                           prcc_checkpoint=str(ck / "prcc_autoencoder.pt"), cam16_checkpoint=str(ck / "cam16_resnet.pt"),
                           out=f"{args.out}/{spec.replace(':', '_')}", eval_test=False, progress=False,
                           curves=False)
        r = ft.train_run(cfg, data=data, split=split)
        total = r["seconds"]
        other = total - sum(v for k, v in SPENT.items() if k != "augment")
        cells = [f"{SPENT[k]:.1f} ({SPENT[k] / total:.0%})" for k in PARTS] + [f"{other:.1f} ({other / total:.0%})"]
        print(f"| {float(frac) * 100:g}% {arm} | {r['steps']} | {total:.1f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
