"""How fast this machine is right now, in training steps of the WBC CNN.

Shared CPUs change speed from day to day (1.5x on the study's machine), so a wall time means little
without the machine's speed beside it. `ms_per_step` times batch-64 AdamW steps of `SmallCNN` with the
package's augmentation on random images (the cost does not depend on the pixels); the real study
records it when it starts and when it ends (`speed.json`); `benchmarks/real_study/NOTES.md` has the
layouts it was first used to compare.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .augment import AugConfig, augment
from .models import CNNConfig, SmallCNN


def ms_per_step(size: int = 48, widths: list[int] | tuple[int, ...] = (16, 32, 64, 128, 256),
                channels_last: bool = True, steps: int = 20, batch: int = 64, warmup: int = 3) -> float:
    """Wall milliseconds per training step (augment, forward, backward, AdamW) after `warmup` steps."""
    torch.manual_seed(0)
    model = SmallCNN(CNNConfig(channels=list(widths), input_size=size))
    if not channels_last:  # SmallCNN is channels_last by default; undo it for the comparison
        model.features.to(memory_format=torch.contiguous_format)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    opt = torch.optim.AdamW(model.parameters(), 2e-3)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 5, (batch,))
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        xa = augment(x, AugConfig(), g)
        feats = model.features(((xa - model.mean) / model.std).contiguous(memory_format=fmt))
        loss = F.cross_entropy(model.head(feats.mean(dim=(2, 3))), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000


def speed_probe(size: int = 48, widths: list[int] | tuple[int, ...] = (16, 32, 64, 128, 256),
                repeats: int = 3, steps: int = 20) -> dict:
    """{"ms_per_step": median over `repeats`, "all": each repeat, "image_size", "widths", "threads", "when"}."""
    times = [ms_per_step(size, widths, True, steps) for _ in range(repeats)]
    return {"ms_per_step": round(statistics.median(times), 1), "all": [round(t, 1) for t in times],
            "image_size": size, "widths": list(widths), "batch": 64, "threads": torch.get_num_threads(),
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
