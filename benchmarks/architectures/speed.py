"""Training speed of the standard architectures beside the small CNN, side by side in one process.

    .venv/bin/python benchmarks/architectures/speed.py [--size 48] [--steps 5] [--rounds 3] [--threads 2]

Each architecture is built by the package (`fusion.models.build_classifier`) and trained for `steps`
AdamW steps of batch 64 on random 48 px images, the architectures interleaved for `rounds` rounds, so
a noisy machine slows all of them alike; the median step time of the rounds is reported, with the
ratio to the small CNN. Writes benchmarks/architectures/speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fusion.models import build_classifier  # noqa: E402
from fusion.sources import BackboneSpec  # noqa: E402
from fusion.study import machine_info  # noqa: E402
from fusion.train import OptimConfig, make_optimizer  # noqa: E402
from pretrain.utils import count_parameters  # noqa: E402

ARCHS = ["small_cnn", "resnet18", "mobilenet_v2", "vgg16", "densenet121", "resnet50", "squeezenet1_1",
         "mobilenet_v3_small"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {}
    for a in ARCHS:
        spec = None if a == "small_cnn" else BackboneSpec(f"torchvision:{a}")
        m = build_classifier(spec, 5, args.size, 0.2, [16, 32, 64, 128, 256])
        models[a] = (m, make_optimizer(m.parameters(), OptimConfig()))
    x = torch.rand(64, 3, args.size, args.size)
    y = torch.randint(0, 5, (64,))
    times = {a: [] for a in ARCHS}
    for _ in range(args.rounds):
        for a, (m, opt) in models.items():
            m.train()
            for i in range(args.steps + 1):
                if i == 1:  # the first step of a round warms the allocator and caches
                    t0 = time.perf_counter()
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[a].append((time.perf_counter() - t0) / args.steps)
    base = float(np.median(times["small_cnn"]))
    out = {"command": "python benchmarks/architectures/speed.py " + " ".join(sys.argv[1:]), "size": args.size,
           "batch": 64, "threads": torch.get_num_threads(), "machine": machine_info(), "archs": {}}
    print(f"{'architecture':20s} {'params':>12s} {'ms/step':>9s} {'img/s':>8s} {'x small CNN time':>17s}")
    for a in ARCHS:
        ms = float(np.median(times[a]))
        row = {"params": count_parameters(models[a][0]), "ms_per_step": round(ms * 1000, 1),
               "images_per_s": round(64 / ms, 1), "time_ratio_vs_small_cnn": round(ms / base, 2)}
        out["archs"][a] = row
        print(f"{a:20s} {row['params']:12,d} {row['ms_per_step']:9.1f} {row['images_per_s']:8.0f} "
              f"{row['time_ratio_vs_small_cnn']:17.2f}")
    (Path(__file__).parent / "speed.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
