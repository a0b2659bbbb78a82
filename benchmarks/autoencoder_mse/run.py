"""Does the PRCC autoencoder really learn? Validation MSE vs the mean-image baseline.

    python benchmarks/autoencoder_mse/run.py [--cases demo cam16] [--device cpu] [--cam16-epochs 12]

Cases:
  demo   the `make demo` settings (configs/demo_prcc.yaml) on generated demo PRCC regions
         (pretrain.demo.generate_demo_data, seed 0, written to a temporary folder unless --demo-dir).
  cam16  real H&E: ../shared/data/cam16-patches (89 PNG, 256x256 RGBA -> RGB) used as unlabelled
         histology, default PRCCConfig model (64 px crops, depth 3, width 32, latent 64); the split
         holds out whole SLIDES (file names tumor_NNN_x_y), because neighbouring patches overlap.

Baseline: the MSE of predicting the mean training crop for every fixed validation crop (pixels in
[0, 1]); target: best validation MSE < 0.5 x baseline. Writes results.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pretrain.config import load_yaml  # noqa: E402
from pretrain.train_prcc import PRCCConfig, fit_prcc  # noqa: E402

SHARED = Path(os.environ.get("WBC_SHARED_DATA", ROOT.parent / "shared" / "data"))
TARGET = 0.5


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def run_case(name: str, cfg: PRCCConfig) -> dict:
    t0 = time.perf_counter()
    m = fit_prcc(cfg)
    wall = time.perf_counter() - t0
    row = {"case": name, "data": cfg.data, "image_size": cfg.image_size, "epochs": cfg.epochs,
           "depth": cfg.depth, "base_width": cfg.base_width, "latent_channels": cfg.latent_channels,
           "group_regex": cfg.group_regex, "val_mse": m["val_mse"], "baseline_mse": m["baseline_mse"],
           "val_variance": m["val_variance"], "ratio": m["mse_over_baseline"], "best_epoch": m["best_epoch"],
           "n_train_images": m["n_train_images"], "n_val_images": m["n_val_images"],
           "n_val_crops": m["n_val_crops"], "parameters": m["parameters"], "device": m["device"],
           "train_seconds": m["seconds"], "wall_seconds": round(wall, 1),
           "passed": bool(m["mse_over_baseline"] < TARGET)}
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["demo", "cam16"], choices=["demo", "cam16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--demo-dir", default=None, help="existing demo set (its prcc/ folder is used)")
    p.add_argument("--cam16-epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=None, help="folder for run dirs and checkpoints (default: a temp dir)")
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_ae_"))
    rows = []
    if "demo" in args.cases:
        demo = Path(args.demo_dir) if args.demo_dir else work / "demo"
        if not (demo / "prcc").is_dir():
            from pretrain.demo import generate_demo_data

            generate_demo_data(demo, seed=0)
        d = load_yaml(ROOT / "configs" / "demo_prcc.yaml")
        d.update(data=str(demo / "prcc"), out=str(work / "demo.pt"), run_dir=str(work / "run_demo"),
                 device=args.device, seed=args.seed, progress=False)
        rows.append(run_case("demo", PRCCConfig(**d)))
    if "cam16" in args.cases:
        data = SHARED / "cam16-patches"
        if not data.is_dir():
            print(f"skipping cam16: {data} not found (set WBC_SHARED_DATA)", file=sys.stderr)
        else:
            cfg = PRCCConfig(data=str(data), out=str(work / "cam16.pt"), run_dir=str(work / "run_cam16"),
                             epochs=args.cam16_epochs, group_regex=r"tumor_\d{3}", device=args.device,
                             seed=args.seed, progress=False)
            rows.append(run_case("cam16", cfg))
    result = {"command": "python " + " ".join([str(Path(sys.argv[0]))] + (argv or sys.argv[1:])),
              "machine": machine(), "target": f"val_mse < {TARGET} x baseline_mse", "work": str(work),
              "results": rows}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| case | val MSE | mean-image baseline | ratio | target < 0.5 | train s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['val_mse']:.5f} | {r['baseline_mse']:.5f} | {r['ratio']:.3f} | "
              f"{'pass' if r['passed'] else 'FAIL'} | {r['train_seconds']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
