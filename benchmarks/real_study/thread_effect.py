"""How far the study's numbers move when only the arithmetic changes (no training, no data needed).

    python benchmarks/real_study/thread_effect.py [--a workers2/results.jsonl --a-paired workers2/paired.csv] \
        [--b results.jsonl --b-paired paired.csv] > benchmarks/real_study/THREAD_EFFECT.md
    python benchmarks/real_study/thread_effect.py --a one_go_2/results.jsonl --a-paired one_go_2/paired.csv \
        --title "Another CPU (AVX-512) against the record (AVX2)" > benchmarks/real_study/CPU_EFFECT.md

Both records train the same runs (same seeds, data, batches, steps). By default one used 1 torch
thread per run and the other 2; with --title, any two such records (for example, the same config on
two CPUs whose kernels differ). Either way only the order and width of floating-point sums changes,
so the differences printed here are pure numerical noise: a yardstick for how small a difference
between arms can mean anything. Files are looked up in `benchmarks/real_study/` unless given as paths.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))

from pretrain.utils import read_jsonl  # noqa: E402


def _jsonl(path: Path) -> dict[str, dict]:
    return {r["run"]: r for r in read_jsonl(path) if r.get("status") == "ok"}


def _paired(path: Path) -> dict[tuple, dict]:
    with open(path, newline="") as fh:
        return {(float(r["fraction"]), r["arm"], r["versus"]): r for r in csv.DictReader(fh)}


def _excludes_zero(r: dict) -> str:
    lo, hi = float(r["macro_f1_lo"]), float(r["macro_f1_hi"])
    return "below 0" if hi < 0 else "above 0" if lo > 0 else "contains 0"


def _threads(rows: dict[str, dict]) -> str:
    return "/".join(str(t) for t in sorted({r.get("torch_threads", 2) for r in rows.values()}))


def compare(a: dict[str, dict], b: dict[str, dict], pa: dict, pb: dict) -> list[str]:
    same = sorted(n for n in set(a) & set(b) if a[n]["steps"] == b[n]["steps"] and a[n]["seed"] == b[n]["seed"])
    if not same:
        raise ValueError("the two records share no run with the same seed and step count")
    ident = sum(a[n]["confusion"] == b[n]["confusion"] for n in same)
    out = [f"{len(same)} runs in both records with the same seed and step count "
           f"(threads per run: {_threads(a)} vs {_threads(b)}); {ident} of them have identical test confusion "
           "matrices.", "",
           "| fraction | runs | mean abs Δ test macro-F1, one run | max abs Δ, one run | max abs Δ, cell mean of the "
           "seeds | max abs Δ, val macro-F1 |", "|---|---|---|---|---|---|"]
    by_f = defaultdict(list)
    for n in same:
        by_f[a[n]["fraction"]].append(n)
    for f, names in sorted(by_f.items()):
        d = np.array([a[n]["macro_f1"] - b[n]["macro_f1"] for n in names])
        dv = np.array([a[n]["val_macro_f1"] - b[n]["val_macro_f1"] for n in names])
        cells = defaultdict(list)
        for n, x in zip(names, d, strict=True):
            cells[(a[n]["arm"], a[n]["mode"])].append(x)
        cell_max = max(abs(np.mean(v)) for v in cells.values())
        out.append(f"| {f * 100:g}% | {len(names)} | {np.abs(d).mean():.4f} | {np.abs(d).max():.4f} | "
                   f"{cell_max:.4f} | {np.abs(dv).max():.4f} |")
    keys = sorted(set(pa) & set(pb))
    flips = [k for k in keys if _excludes_zero(pa[k]) != _excludes_zero(pb[k])]
    out += ["", f"Paired differences (macro-F1, paired Student-t 95% CI): {len(keys)} comparisons in both records; "
            f"{len(keys) - len(flips)} fall on the same side of 0 (below / contains / above) in both, "
            f"{len(flips)} change side:", ""]
    if flips:
        out += ["| fraction | arm | versus | record A: Δ [CI] | record B: Δ [CI] |", "|---|---|---|---|---|"]
        for k in flips:
            cell = [f"{float(p[k]['macro_f1_diff']):+.3f} [{float(p[k]['macro_f1_lo']):+.3f}, "
                    f"{float(p[k]['macro_f1_hi']):+.3f}]" for p in (pa, pb)]
            out.append(f"| {k[0] * 100:g}% | {k[1]} | {k[2]} | {cell[0]} | {cell[1]} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", default="workers2/results.jsonl", help="record A (here: 2 workers x 1 thread)")
    p.add_argument("--a-paired", default="workers2/paired.csv")
    p.add_argument("--b", default="results.jsonl", help="record B (here: 1 process x 2 threads)")
    p.add_argument("--b-paired", default="paired.csv")
    p.add_argument("--title", default="Thread count alone", help="what differs between the two records")
    args = p.parse_args(argv)
    path = {k: Path(v) if Path(v).is_file() else HERE / v for k, v in vars(args).items() if k != "title"}
    show = {k: v.relative_to(HERE) if v.is_relative_to(HERE) else v for k, v in path.items()}
    print(f"# {args.title}: {show['a']} against {show['b']}\n")
    cmd = " ".join(["python benchmarks/real_study/thread_effect.py", *(f"'{a}'" if " " in a else a
                                                                       for a in (argv or sys.argv[1:]))])
    print(f"Command: `{cmd}` (reads the recorded files only).\n")
    print("\n".join(compare(_jsonl(path["a"]), _jsonl(path["b"]), _paired(path["a_paired"]),
                            _paired(path["b_paired"]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
