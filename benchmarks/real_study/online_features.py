"""Are the 1% losses an artefact of precomputed features? The 1% fused arms again (both modes), with
the frozen encoders run on every augmented training batch instead of once on each un-augmented image.

    .venv/bin/python benchmarks/real_study/online_features.py [--checkpoints runs/real_study/checkpoints] \
        > benchmarks/real_study/ONLINE_FEATURES.md

In the study (`encoder_features: precompute`) each image's frozen features are computed once, without
augmentation, so at 1% the fused head sees the same 59 feature vectors for 800 steps while the CNN sees
freshly augmented images. A plausible reading of the 1% losses is that the head overfits those fixed
vectors. Here the same runs (same seeds, split, batches, augmentations, steps, thread count) use
`encoder_features: online`: the encoders see the augmented batch, as the CNN does. Scratch and the
precomputed runs are the record's rows (`results.jsonl`; bit-identical from one invocation to the
next, `ONE_GO.md`), so only the online runs are trained. Finished runs are skipped on a rerun.
Nothing is chosen from these numbers; they test one explanation and are reported whatever they show.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusion.data import load_wbc  # noqa: E402
from fusion.metrics import mean_ci, paired_t_p  # noqa: E402
from fusion.splits import load_split  # noqa: E402
from fusion.study import study_checkpoints  # noqa: E402
from fusion.sweep import run_name  # noqa: E402
from fusion.train import RunConfig, train_run  # noqa: E402
from pretrain.utils import read_jsonl  # noqa: E402

ARMS = ("cam16", "prcc+cam16", "random")  # the arms below scratch at 1% in the record, and the control


def _ci(d: list[float]) -> str:
    m, hw = mean_ci(d)
    return f"{m:+.4f} [{m - hw:+.4f}, {m + hw:+.4f}], p {paired_t_p(d):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc-wbc"))
    p.add_argument("--split", default=str(ROOT / "benchmarks" / "real_study" / "split.json.gz"))
    p.add_argument("--record", default=str(ROOT / "benchmarks" / "real_study" / "results.jsonl"))
    p.add_argument("--checkpoints", default=str(ROOT / "runs" / "real_study" / "checkpoints"),
                   help="the study's prcc_autoencoder.pt and cam16_resnet.pt (python benchmarks/real_study/run.py)")
    p.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--modes", nargs="+", default=["sum", "concat"])
    p.add_argument("--out", default=str(ROOT / "runs" / "online_features"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"SKIP: {args.data} is absent")
        return
    try:
        ck = study_checkpoints(args.checkpoints)
    except FileNotFoundError as e:
        sys.exit(str(e))
    rec = {r["run"]: r for r in read_jsonl(args.record)}
    data = load_wbc(args.data, 48, args.cache_dir, progress=False)
    split = load_split(args.split)
    online: dict[str, dict] = {}
    t0 = time.perf_counter()
    runs = [(mode, s, arm) for mode in args.modes for s in args.seeds for arm in ARMS]
    for mode, s, arm in runs:
        name = run_name(0.01, arm, mode, s)
        out = Path(args.out) / name
        cfg = RunConfig(data=args.data, split=args.split, fraction=0.01, arm=arm, mode=mode, seed=s,
                        encoder_features="online", prcc_checkpoint=str(ck["prcc"]),
                        cam16_checkpoint=str(ck["cam16"]), out=str(out), progress=False,
                        curves=False)
        online[name] = (json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file()
                        else train_run(cfg, data=data, split=split))
        print(f"  {name}: online macro-F1 {online[name]['macro_f1']:.4f} "
              f"({online[name]['seconds']:.0f} s)", file=sys.stderr, flush=True)

    print(f"1% of the labels (59 images), modes {args.modes}, seeds {args.seeds}; test macro-F1. "
          f"Online runs: {sum(r['seconds'] for r in online.values()) / 60:.1f} min "
          f"({(time.perf_counter() - t0) / 60:.1f} min in this invocation).\n")
    print("| arm | features | " + " | ".join(f"seed {s}" for s in args.seeds)
          + " | mean | Δ vs scratch [95% CI], p | Δ vs random, same features [95% CI], p |")
    print("|---|---|" + "---|" * (len(args.seeds) + 3))
    scratch = [rec[run_name(0.01, "scratch", "sum", s)]["macro_f1"] for s in args.seeds]
    print("| scratch | — | " + " | ".join(f"{v:.4f}" for v in scratch) + f" | {np.mean(scratch):.4f} | | |")
    for mode in args.modes:
        for arm in ARMS:
            for label, rows in (("precomputed (record)", rec), ("online", online)):
                v = [rows[run_name(0.01, arm, mode, s)]["macro_f1"] for s in args.seeds]
                ctl = [rows[run_name(0.01, "random", mode, s)]["macro_f1"] for s in args.seeds]
                vs_ctl = "" if arm == "random" else _ci([a - b for a, b in zip(v, ctl, strict=True)])
                print(f"| {arm} ({mode}) | {label} | " + " | ".join(f"{x:.4f}" for x in v) + f" | {np.mean(v):.4f} | "
                      f"{_ci([a - b for a, b in zip(v, scratch, strict=True)])} | {vs_ctl} |")
    print("\nOnline minus precomputed, same arm and seed (test macro-F1), and validation macro-F1 (the model "
          "choice), mean over seeds:\n")
    for mode in args.modes:
        for arm in ARMS:
            names = [run_name(0.01, arm, mode, s) for s in args.seeds]
            d = [online[n]["macro_f1"] - rec[n]["macro_f1"] for n in names]
            print(f"- {arm} ({mode}): test {_ci(d)}; validation precomputed "
                  f"{np.mean([rec[n]['val_macro_f1'] for n in names]):.4f}, online "
                  f"{np.mean([online[n]['val_macro_f1'] for n in names]):.4f}")


if __name__ == "__main__":
    main()
