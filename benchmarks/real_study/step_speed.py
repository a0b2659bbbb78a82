"""Training-step cost of the WBC CNN on this CPU: image size, widths and memory layout, side by side.

    .venv/bin/python benchmarks/real_study/step_speed.py [--repeats 3] [--steps 20]

Each configuration does batch-64 AdamW steps with the package's augmentation on random images
(the cost does not depend on the pixels); configurations alternate over `--repeats` rounds and the
median ms/step is printed, with its ratio to the old default (64 px, widths 32-64-128-192-256).
This is what chose the real study's 48 px, widths 16-32-64-128-256 and channels_last.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fusion.speed import ms_per_step  # noqa: E402

CASES = [  # (label, image size, widths, channels_last)
    ("old default: 64 px, 32-64-128-192-256, NCHW", 64, [32, 64, 128, 192, 256], False),
    ("48 px, 32-64-128-192-256, NCHW", 48, [32, 64, 128, 192, 256], False),
    ("48 px, 16-32-64-128-256, NCHW", 48, [16, 32, 64, 128, 256], False),
    ("new default: 48 px, 16-32-64-128-256, channels_last", 48, [16, 32, 64, 128, 256], True),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    times: dict[str, list[float]] = {c[0]: [] for c in CASES}
    for _ in range(args.repeats):
        for label, size, widths, cl in CASES:
            times[label].append(ms_per_step(size, widths, cl, args.steps))
    base = statistics.median(times[CASES[0][0]])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch 64, median of {args.repeats}")
    print("| configuration | ms/step | time vs old default |\n|---|---|---|")
    for label, *_ in CASES:
        m = statistics.median(times[label])
        print(f"| {label} | {m:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
