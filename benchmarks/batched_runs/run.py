"""Batched runs (fusion/batched.py) against the same runs one at a time, on the real PBC images (issue 20).

    .venv/bin/python benchmarks/batched_runs/run.py [--sizes 3 9 27] [--steps 100] [--device auto]

1. Throughput: N scratch runs at 1% (seeds 0..N-1, short runs of `--steps` steps and one validation)
   trained as one group, against the same runs trained one after another in the same process; whole-run
   wall time (setup, training, validation), side by side in one invocation.
2. Equivalence: the package's default 1% runs (800 steps, 10 validations, test) for seeds 0-2, alone and
   as one group of 3: the per-run test macro-F1 and best validation step, and their differences.

Writes record/results.json and record/summary.md beside this file (a GPU run: `--record DIR`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fusion.batched import train_group  # noqa: E402
from fusion.data import load_wbc  # noqa: E402
from fusion.splits import load_split  # noqa: E402
from fusion.study import machine_info  # noqa: E402
from fusion.train import RunConfig, train_run  # noqa: E402
from pretrain.utils import get_device  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data" / "pbc-wbc"
SPLIT = ROOT / "benchmarks" / "real_study" / "split.json.gz"


def _spec(out: Path, seed: int, device: str, **optim) -> RunConfig:
    return RunConfig(data=str(DATA), split=str(SPLIT), fraction=0.01, arm="scratch", seed=seed, out=str(out / f"s{seed}"),
                     optim=optim, runtime={"progress": False, "curves": False, "device": device,
                                           "eval_test": "min_steps" not in optim})


def throughput(data, split, sizes: list[int], steps: int, device: str, tmp: Path) -> list[dict]:
    short = {"min_steps": steps, "max_steps": steps, "evals": 1}
    solo = []
    for s in range(max(sizes)):
        t = time.perf_counter()
        train_run(_spec(tmp / "solo", s, device, **short), data=data, split=split)
        solo.append(time.perf_counter() - t)
    rows = []
    for n in sizes:
        t = time.perf_counter()
        train_group([_spec(tmp / f"group{n}", s, device, **short) for s in range(n)], data, split)
        group = time.perf_counter() - t
        rows.append({"runs": n, "steps": steps, "solo_seconds": round(sum(solo[:n]), 2),
                     "group_seconds": round(group, 2), "speedup": round(sum(solo[:n]) / group, 2),
                     "solo_images_per_s": round(n * steps * 64 / sum(solo[:n]), 1),
                     "group_images_per_s": round(n * steps * 64 / group, 1)})
        print(rows[-1], flush=True)
    return rows


def equivalence(data, split, device: str, tmp: Path) -> list[dict]:
    alone = [train_run(_spec(tmp / "alone", s, device), data=data, split=split) for s in range(3)]
    group = train_group([_spec(tmp / "group", s, device) for s in range(3)], data, split)
    return [{"seed": a["seed"], "alone_macro_f1": round(a["macro_f1"], 4), "group_macro_f1": round(g["macro_f1"], 4),
             "diff": round(g["macro_f1"] - a["macro_f1"], 4), "alone_best_epoch": a["best_epoch"],
             "group_best_epoch": g["best_epoch"], "alone_seconds": a["seconds"], "group_seconds": g["group_seconds"]}
            for a, g in zip(alone, group, strict=True)]


def summary(res: dict) -> str:
    md = ["# Batched runs against one run at a time (recorded output)", "",
          f"Command: `{res['command']}`. Data: the real PBC images at 48 px, the real study's split, scratch arm, "
          f"1% of the labels. Device {res['device']}, {res['torch_threads']} torch threads. "
          f"Machine: {json.dumps(res['machine'])}", "",
          "## Throughput (whole short runs, side by side in one invocation)", "",
          "| runs N | steps each | one at a time, s | as one group, s | speed-up | images/s alone | images/s grouped |",
          "|---|---|---|---|---|---|---|"]
    md += [f"| {r['runs']} | {r['steps']} | {r['solo_seconds']:.1f} | {r['group_seconds']:.1f} | {r['speedup']:.2f}x | "
           f"{r['solo_images_per_s']:.0f} | {r['group_images_per_s']:.0f} |" for r in res["throughput"]]
    if res.get("equivalence"):
        md += ["", "## The same runs, alone and as one group of 3 (package defaults: 800 steps, 10 validations)", "",
               "| seed | test macro-F1 alone | grouped | difference | best validation alone | grouped |",
               "|---|---|---|---|---|---|"]
        md += [f"| {r['seed']} | {r['alone_macro_f1']:.4f} | {r['group_macro_f1']:.4f} | {r['diff']:+.4f} | "
               f"{r['alone_best_epoch']} | {r['group_best_epoch']} |" for r in res["equivalence"]]
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", type=int, default=[3, 9, 27])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-equivalence", action="store_true")
    p.add_argument("--record", default=str(HERE / "record"))
    args = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} is missing (the real PBC images); nothing to measure")
    data = load_wbc(DATA, 48, ROOT / "data" / "cache", progress=False)
    split = load_split(SPLIT)
    with tempfile.TemporaryDirectory() as tmp:
        res = {"command": "python benchmarks/batched_runs/run.py " + " ".join(sys.argv[1:]),
               "device": str(get_device(args.device)), "torch_threads": torch.get_num_threads(),
               "machine": machine_info(),
               "throughput": throughput(data, split, args.sizes, args.steps, args.device, Path(tmp))}
        if not args.skip_equivalence:
            res["equivalence"] = equivalence(data, split, args.device, Path(tmp))
    rec = Path(args.record)
    rec.mkdir(parents=True, exist_ok=True)
    (rec / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (rec / "summary.md").write_text(summary(res))
    print(summary(res))


if __name__ == "__main__":
    main()
