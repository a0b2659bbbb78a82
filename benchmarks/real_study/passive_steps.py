"""N bare training steps of the study's CNN in one process (for PASSIVE_WORKERS.md's layouts).

    .venv/bin/python benchmarks/real_study/passive_steps.py STEPS THREADS

Batch 64, 48 px, widths 16-32-64-128-256, the package's augmentation, AdamW, on random images (the cost
does not depend on the pixels). Run two at once, with or without OMP_WAIT_POLICY=PASSIVE, and time
the pair from outside; the step time itself goes to stderr.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fusion.augment import AugConfig, augment  # noqa: E402
from fusion.models import CNNConfig, SmallCNN  # noqa: E402


def main() -> None:
    steps, threads = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = SmallCNN(CNNConfig(channels=[16, 32, 64, 128, 256], input_size=48))
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    x, y = torch.rand(64, 3, 48, 48), torch.randint(0, 5, (64,))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(augment(x, AugConfig(scale=(1.0, 1.0)), g)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    print(f"{steps} steps {time.perf_counter() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
