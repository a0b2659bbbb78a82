"""Honest test metrics of the CAM16 ResNet on the 89 real Camelyon16 patches, split by slide.

The patches come from 4 slides (tumor_001: 24 tumor; tumor_004: 7 normal; tumor_064: 22 normal + 4 tumor;
tumor_073: 16 normal + 16 tumor). With 4 slides the honest protocol is leave-one-slide-out: each slide is
the test slide once, one other slide is validation (chosen by `split_by_slide` to hold both classes when
possible) and the rest train. Per fold we report accuracy, AUC (only defined on tumor_064 and tumor_073,
the slides holding both classes), F1 and the confusion matrix; then pooled over folds (each patch
predicted by the model that never saw its slide). A colour-statistics baseline (logistic regression on
per-channel mean/std, same folds) shows how much of the signal is stain rather than morphology.

    .venv/bin/python benchmarks/cam16_real/run.py [--data ../shared/data/cam16-patches] [--seeds 0 1 2]
        [--image-size 96] [--epochs 15] [--out runs/bench_cam16_real]

Writes per-fold run folders under --out and `--out/summary.json`; paste the printed table into RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from pretrain.cam16_split import binary_metrics, describe_split, split_by_slide  # noqa: E402
from pretrain.patches import open_patch_dataset  # noqa: E402
from pretrain.train_cam16 import Cam16Config, fit_cam16  # noqa: E402


def default_data() -> Path:
    shared = Path(os.environ.get("WBC_SHARED_DATA", ROOT.parent / "shared" / "data"))
    return shared / "cam16-patches"


def colour_baseline(images: np.ndarray, labels: np.ndarray, split: dict[str, np.ndarray]) -> np.ndarray:
    """Tumor probabilities on split["test"] from logistic regression on per-channel mean and std."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = images.reshape(len(images), -1, 3).astype(np.float64) / 255.0
    feats = np.concatenate([x.mean(1), x.std(1)], axis=1)  # (N, 6)
    train = np.concatenate([split["train"], split["val"]])
    clf = make_pipeline(StandardScaler(), LogisticRegression(class_weight="balanced", max_iter=1000))
    clf.fit(feats[train], labels[train])
    return clf.predict_proba(feats[split["test"]])[:, 1]


def fmt(m: dict) -> str:
    auc = "  n/a" if m["auc"] is None else f"{m['auc']:.3f}"
    return f"acc {m['accuracy']:.3f} | AUC {auc} | F1 {m['f1']:.3f} | CM {m['confusion_matrix']}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(default_data()))
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_cam16_real"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if not Path(args.data).exists():
        sys.exit(f"real patches not found at {args.data}; pass --data or set WBC_SHARED_DATA")

    ds = open_patch_dataset(args.data)  # decoded once, reused by every fold
    labels, slides = ds.labels, ds.slide_ids
    images = np.stack([ds.read_image(i) for i in range(len(ds))])  # (N, P, P, 3) uint8
    print(f"{len(ds)} patches {ds.patch_size}px from {args.data}")
    for s in np.unique(slides):
        sel = slides == s
        print(f"  {s}: {int((labels[sel] == 0).sum())} normal, {int((labels[sel] == 1).sum())} tumor")

    out = Path(args.out)
    rows, pooled = [], {}
    t_all = time.perf_counter()
    for seed in args.seeds:
        for test_slide in np.unique(slides):
            split = split_by_slide(slides, labels, seed=seed, val=0.25, test=[str(test_slide)])
            parts = describe_split(split, slides, labels)["parts"]
            name = f"test_{test_slide}_seed{seed}"
            cfg = Cam16Config(data=args.data, out=str(out / name / "cam16.pt"), run_dir=str(out / name),
                              arch=args.arch, image_size=args.image_size, epochs=args.epochs,
                              batch_size=args.batch_size, seed=seed, device=args.device,
                              val_slides=parts["val"]["slides"], test_slides=[str(test_slide)], progress=False)
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                m = fit_cam16(cfg, dataset=ds)
            pred = np.load(Path(cfg.run_dir) / "test_predictions.npz")
            base_prob = colour_baseline(images, labels, split)
            base = binary_metrics(labels[split["test"]], base_prob)
            row = {"seed": seed, "test_slide": str(test_slide), "val_slides": parts["val"]["slides"],
                   "train_slides": parts["train"]["slides"], "test": m["test"], "best_epoch": m["best_epoch"],
                   "seconds": round(time.perf_counter() - t0, 1), "colour_baseline": base}
            rows.append(row)
            p = pooled.setdefault(seed, {"y": [], "p": [], "pb": []})
            p["y"].append(pred["labels"])
            p["p"].append(pred["prob_tumor"])
            p["pb"].append(base_prob)
            print(f"seed {seed} test {test_slide} (val {parts['val']['slides']}, train {parts['train']['slides']}, "
                  f"best epoch {m['best_epoch']}, {row['seconds']}s)\n"
                  f"   ResNet : {fmt(m['test'])}\n   colour : {fmt(base)}")
    summary = {"rows": rows, "pooled": {}}
    for seed, p in pooled.items():
        y = np.concatenate(p["y"])
        summary["pooled"][seed] = {"resnet": binary_metrics(y, np.concatenate(p["p"])),
                                   "colour_baseline": binary_metrics(y, np.concatenate(p["pb"]))}
        print(f"seed {seed} pooled over folds ({len(y)} patches)\n"
              f"   ResNet : {fmt(summary['pooled'][seed]['resnet'])}\n"
              f"   colour : {fmt(summary['pooled'][seed]['colour_baseline'])}")
    import torch

    summary["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                          "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    summary["args"] = vars(args)
    summary["seconds"] = round(time.perf_counter() - t_all, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"machine: {summary['machine']}; total {summary['seconds']}s; summary in {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
