"""Images/s of the fusion training step and of frozen-feature extraction, per runtime option (issue 20).

    .venv/bin/python benchmarks/gpu/steps.py [--device cuda] [--steps 200] [--out benchmarks/gpu/record]

On the real PBC images (48 px, 1% run of the fused arm prcc+cam16): optimizer steps of `RunState.train_epoch`
(augmentation on the device, batches from the images held on the device) for fp32 / bf16 autocast and
eager / torch.compile, at batch 64 and 256; and `compute_features` over all 8,232 images for both encoders.
Side by side in one invocation; writes steps.json and steps.md under --out.
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

from fusion.data import load_wbc  # noqa: E402
from fusion.encoders import compute_features, images_to_tensor, load_arm_encoders  # noqa: E402
from fusion.splits import load_split  # noqa: E402
from fusion.study import machine_info  # noqa: E402
from fusion.train import RunConfig, setup_run  # noqa: E402
from pretrain.utils import get_device  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "pbc-wbc"
CKPT = ROOT / "runs" / "real_study" / "checkpoints"
SOURCES = {"prcc_checkpoint": str(CKPT / "prcc_autoencoder.pt"), "cam16_checkpoint": str(CKPT / "cam16_resnet.pt")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_rate(data, split, device: torch.device, steps: int, batch: int, amp: bool, compiled: bool, tmp: Path) -> float:
    cfg = RunConfig(data=str(DATA), fraction=0.01, arm="prcc+cam16", out=str(tmp / f"r{batch}{amp}{compiled}"),
                    optim={"min_steps": steps, "max_steps": steps, "evals": 2, "batch_size": batch},
                    runtime={"device": str(device), "amp": amp, "compile": compiled, "progress": False}, **SOURCES)
    st = setup_run(cfg, data, split=split)
    st.train_epoch(1)  # warm-up (and compilation)
    _sync(device)
    t = time.perf_counter()
    st.train_epoch(2)
    _sync(device)
    return st.steps * st.batch_size / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "record"))
    args = p.parse_args()
    device = get_device(args.device)
    data = load_wbc(DATA, 48, ROOT / "data" / "cache", progress=False)
    split = load_split(ROOT / "benchmarks" / "real_study" / "split.json.gz")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (64, 256):
            for amp in ((False, True) if device.type == "cuda" else (False,)):
                for compiled in (False, True):
                    r = step_rate(data, split, device, args.steps, batch, amp, compiled, Path(tmp))
                    rows.append({"what": "train step", "batch": batch, "bf16": amp, "compile": compiled,
                                 "images_per_s": round(r, 1)})
                    print(rows[-1], flush=True)
    images = images_to_tensor(data.images)
    enc = load_arm_encoders("prcc+cam16", {"prcc": SOURCES["prcc_checkpoint"], "cam16": SOURCES["cam16_checkpoint"]})
    for bs in (256, 1024):
        compute_features(enc, images[:bs], device, bs)  # warm-up
        _sync(device)
        t = time.perf_counter()
        compute_features(enc, images, device, bs)
        _sync(device)
        rows.append({"what": "features (both encoders)", "batch": bs, "images_per_s": round(len(images) / (time.perf_counter() - t), 1)})
        print(rows[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "machine": machine_info(), "steps": args.steps, "rows": rows}
    (out / "steps.json").write_text(json.dumps(info, indent=1) + "\n")
    md = [f"# Step and feature throughput on {info['gpu'] or device} (recorded output)", "",
          f"Command: `python benchmarks/gpu/steps.py {' '.join(sys.argv[1:])}`", "",
          "| what | batch | bf16 | compile | images/s |", "|---|---|---|---|---|"]
    md += [f"| {r['what']} | {r['batch']} | {r.get('bf16', '')} | {r.get('compile', '')} | {r['images_per_s']:.0f} |"
           for r in rows]
    (out / "steps.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
