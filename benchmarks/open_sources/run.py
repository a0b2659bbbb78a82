"""Plumbing check of the open sources on the real PBC images: a torchvision ResNet-18 and a timm
ResNet-10t, each loaded from a local weights file that this script writes itself, fused (concat) and
probed at 1% and 100% of the labels beside scratch and their random twins; then the 100% scratch and
ResNet-18 runs are evaluated on another lab's cells (bccd-wbc).

    .venv/bin/python benchmarks/open_sources/run.py [--work runs/open_sources] [--seeds 0]

No pretrained weights can be fetched here: the "weights files" hold seeded random initialisations,
so a source and its twin differ only in their random draw. The numbers check the plumbing (local
weights of both libraries, YAML sources, twins, probes, report, evaluate), NOT whether ImageNet
features help. Recorded outputs: benchmarks/open_sources/record/ and README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402

from fusion.commands import evaluate, sweep  # noqa: E402
from fusion.report import make_report  # noqa: E402
from fusion.study import machine_info  # noqa: E402
from pretrain.cli import cli  # noqa: E402


def write_weights(folder: Path) -> dict[str, Path]:
    """Seeded random-init weights of both backbones, in two of the formats users bring."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(weights=None)
    torch.save({"state_dict": {f"module.{k}": v for k, v in r18.state_dict().items()}}, folder / "resnet18.pth")
    torch.manual_seed(1)
    tm = timm.create_model("resnet10t", pretrained=False)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, str(folder / "resnet10t.safetensors"))
    return {"r18": folder / "resnet18.pth", "tm": folder / "resnet10t.safetensors"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="runs/open_sources")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--record", default=str(Path(__file__).with_name("record")))
    args = p.parse_args()
    shared = Path(os.environ.get("WBC_SHARED_DATA", ROOT.parent / "shared" / "data"))
    if not (shared / "pbc-wbc").is_dir():
        print(f"SKIP: real data not found at {shared}")
        return 0
    work, record = Path(args.work).resolve(), Path(args.record)
    t0 = time.perf_counter()
    weights = write_weights(work / "weights")
    cfg = {
        "data": str(shared / "pbc-wbc"), "split": str(ROOT / "benchmarks/real_study/split.json.gz"),
        "cache_dir": str(ROOT / "data/cache"), "image_size": 48,
        "sources": {"r18": {"model": "torchvision:resnet18", "weights": str(weights["r18"]), "input_size": 64},
                    "tm": {"model": "timm:resnet10t", "weights": str(weights["tm"]), "input_size": 64}},
        "arms": {"scratch": [], "r18": ["r18"], "tm": ["tm"]}, "twins": True, "modes": ["concat"],
        "fractions": [0.01, 1.0], "seeds": args.seeds, "out": str(work / "sweep"),
        "runtime": {"curves": False, "progress": False},
    }
    (work / "sweep.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert cli(sweep, ["--config", str(work / "sweep.yaml")]) == 0
    make_report(work / "sweep")
    sweep_s = time.perf_counter() - t0
    evals = {}
    for arm in ("scratch", "r18_concat"):
        run = work / "sweep" / "runs" / f"f1.0_{arm}_s{args.seeds[0]}"
        out = work / "eval" / arm
        assert cli(evaluate, ["--checkpoint", str(run / "best.pt"), "--data", str(shared / "bccd-wbc"),
                              "--out", str(out), "--progress", "false"]) == 0
        evals[arm] = json.loads((out / "metrics.json").read_text())
    record.mkdir(parents=True, exist_ok=True)
    for name in ("report.md", "results.jsonl", "probes.jsonl", "paired.csv", "results.csv", "per_class.csv"):
        shutil.copy2(work / "sweep" / name, record / name)
    shutil.copy2(work / "sweep.yaml", record / "sweep.yaml")
    for arm in evals:
        shutil.copy2(work / "eval" / arm / "metrics.json", record / f"eval_bccd_{arm}.json")
    (record / "run.json").write_text(json.dumps({"command": " ".join(sys.argv), "seconds_sweep": round(sweep_s, 1),
                                                 "seconds_total": round(time.perf_counter() - t0, 1),
                                                 "machine": machine_info()}, indent=2) + "\n")
    print("\nbccd-wbc (another lab), trained on 100% of PBC:")
    print("| run | accuracy | balanced accuracy | macro-F1 |")
    for arm, m in evals.items():
        print(f"| {arm} | {m['accuracy']:.3f} | {m['balanced_accuracy']:.3f} | {m['macro_f1']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
