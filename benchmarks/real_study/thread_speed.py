"""Would two sweep runs at once (one thread each) beat one run on two threads? Training throughput.

    .venv/bin/python benchmarks/real_study/thread_speed.py [--repeats 3] [--steps 60]

Each layout does batch-64 AdamW steps of the default WBC CNN (48 px, widths 16-32-64-128-256,
channels_last) with the package's augmentation, as in `step_speed.py`. Layouts alternate over
`--repeats` rounds: one process with all threads, and N processes with one thread each started
together. Prints the median steps per second of the whole machine for each, and the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _steps(threads: int, steps: int, start, out) -> None:
    import torch

    torch.set_num_threads(threads)
    from fusion.speed import ms_per_step

    start.wait()
    t0 = time.perf_counter()
    ms_per_step(48, [16, 32, 64, 128, 256], True, steps)
    out.put(time.perf_counter() - t0)


def throughput(procs: int, threads: int, steps: int) -> float:
    """Steps per second of `procs` processes with `threads` threads each, started together."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(procs + 1), ctx.Queue()
    ps = [ctx.Process(target=_steps, args=(threads, steps, start, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    for p in ps:
        p.join()
    wall = time.perf_counter() - t0
    return procs * (steps + 3) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    args = p.parse_args()
    cores = os.cpu_count() or 1
    layouts = {f"1 process x {cores} threads": (1, cores), f"{cores} processes x 1 thread": (cores, 1)}
    rates: dict[str, list[float]] = {k: [] for k in layouts}
    for _ in range(args.repeats):
        for name, (procs, threads) in layouts.items():
            rates[name].append(throughput(procs, threads, args.steps))
    base = statistics.median(rates[next(iter(layouts))])
    print(f"{cores} cores, batch 64, 48 px default CNN, {args.steps} steps per process, median of {args.repeats}")
    print("| layout | steps/s, whole machine | vs one process |\n|---|---|---|")
    for name in layouts:
        m = statistics.median(rates[name])
        print(f"| {name} | {m:.1f} | {m / base:.2f} |")


if __name__ == "__main__":
    main()
