"""Print the markdown tables of RESULTS.md from the recorded study outputs (no training, no data needed).

    python benchmarks/real_study/tables.py [benchmarks/real_study] > /tmp/tables.md

Reads results.csv, paired.csv (and the replicates' results.csv and paired.csv: workers2/, one thread per
run; one_go_2/, another CPU), per_class.csv,
results.jsonl and timings.json, so RESULTS.md can be
refreshed by copying sections after a rerun instead of retyping numbers.
"""
from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from pretrain.utils import read_jsonl  # noqa: E402

# The original study's validation numbers (its data differ): fraction -> (acc without, acc with, F1 without, F1 with)
ORIGINAL = {0.01: (63.5, 74.1, 0.545, 0.699), 0.1: (78.7, 84.0, 0.784, 0.843),
            0.5: (90.0, 91.1, 0.901, 0.899), 1.0: (90.3, 93.0, 0.899, 0.900)}
TARGETS = {0.01: 0.90, 0.1: 0.97, 1.0: 0.985}
MAIN_ARMS = ("scratch", "prcc+cam16 (sum)", "random (sum)")


def pct(f: float) -> str:
    return f"{f * 100:g}%"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _arms(res: list[dict]) -> list[str]:
    """The arms of results.csv rows in the tables' column order: scratch, prcc, cam16, prcc+cam16, random."""
    order = ["scratch", "prcc", "cam16", "prcc+cam16", "random"]
    return sorted(dict.fromkeys(r["arm"] for r in res), key=lambda a: (order.index(a.split(" ")[0]), a))


def main_tables(rec: Path) -> list[str]:
    res = read_csv(rec / "results.csv")
    cells = {(float(r["fraction"]), r["arm"]): r for r in res}
    fractions = sorted({f for f, _ in cells})
    arms = _arms(res)
    out = []
    for metric, title in (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")):
        out += [f"{title}:", "", "| fraction | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
        for f in fractions:
            vals = [f"{float(cells[f, a][metric + '_mean']):.3f} ± {float(cells[f, a][metric + '_ci95']):.3f}"
                    for a in arms]
            out.append(f"| {pct(f)} | " + " | ".join(vals) + " |")
        out.append("")
    out += ["| fraction | original accuracy, without → with | ours: accuracy, scratch → prcc+cam16 (sum) "
            "| original macro-F1, without → with | ours: macro-F1, scratch → prcc+cam16 (sum) |",
            "|---|---|---|---|---|"]
    for f in fractions:
        a0, a1, f0, f1 = ORIGINAL[f]
        s, p = cells[f, "scratch"], cells[f, "prcc+cam16 (sum)"]
        out.append(f"| {pct(f)} | {a0}% → {a1}% | {float(s['accuracy_mean']) * 100:.1f}% → "
                   f"{float(p['accuracy_mean']) * 100:.1f}% | {f0:.3f} → {f1:.3f} | "
                   f"{float(s['macro_f1_mean']):.3f} → {float(p['macro_f1_mean']):.3f} |")
    return out + [""]


def _p(x: str) -> str:
    return "—" if not x or x == "nan" else f"{float(x):.3f}" if float(x) >= 0.001 else "<0.001"


def paired_table(rec: Path) -> list[str]:
    out = ["| fraction | arm | versus | Δ macro-F1 [95% CI] | p | p, Holm | Δ accuracy [95% CI] |",
           "|---|---|---|---|---|---|---|"]
    for r in read_csv(rec / "paired.csv"):
        cis = [f"{float(r[m + '_diff']):+.3f} [{float(r[m + '_lo']):+.3f}, {float(r[m + '_hi']):+.3f}]"
               for m in ("macro_f1", "accuracy")]
        excl = float(r["macro_f1_lo"]) > 0 or float(r["macro_f1_hi"]) < 0
        out.append(f"| {pct(float(r['fraction']))} | {r['arm']} | {r['versus']} | "
                   f"{'**' + cis[0] + '**' if excl else cis[0]} | {_p(r['macro_f1_p'])} | "
                   f"{_p(r['macro_f1_p_holm'])} | {cis[1]} |")
    return out + ["", "(bold: the macro-F1 interval excludes 0)", ""]


# Replicates of the record: (folder, column label). Same config and seeds; only the arithmetic differs.
REPLICATES = (("workers2", "1 thread (AVX2)"), ("one_go_2", "AVX-512 CPU (2 threads)"))


def _side(r: dict) -> int:
    return 1 if float(r["macro_f1_lo"]) > 0 else -1 if float(r["macro_f1_hi"]) < 0 else 0


def replicate_table(rec: Path, replicates: tuple = REPLICATES) -> list[str]:
    """Macro-F1 paired differences of the record (AVX2, 2 threads) beside each replicate's, and whether each
    interval falls on the same side of 0 in every record that ran the comparison."""
    reps = [(label, {(r["fraction"], r["arm"], r["versus"]): r for r in read_csv(rec / folder / "paired.csv")})
            for folder, label in replicates if (rec / folder / "paired.csv").is_file()]
    if not reps:
        return ["(no replicate recorded)", ""]

    def cell(r: dict | None) -> str:
        if r is None:
            return "—"
        c = f"{float(r['macro_f1_diff']):+.3f} [{float(r['macro_f1_lo']):+.3f}, {float(r['macro_f1_hi']):+.3f}]"
        return f"**{c}**" if _side(r) else c

    out = ["| fraction | arm | versus | the record (AVX2, 2 threads) | " + " | ".join(lb for lb, _ in reps)
           + " | same side of 0 in all? |", "|---" * (len(reps) + 5) + "|"]
    for r in read_csv(rec / "paired.csv"):
        key = (r["fraction"], r["arm"], r["versus"])
        others = [rows.get(key) for _, rows in reps]
        same = "yes" if len({_side(x) for x in [r, *others] if x is not None}) == 1 else "**no**"
        out.append(f"| {pct(float(r['fraction']))} | {r['arm']} | {r['versus']} | {cell(r)} | "
                   + " | ".join(cell(x) for x in others) + f" | {same} |")
    return out + ["", "(bold: the macro-F1 interval excludes 0; —: not run in that replicate)", ""]


def replicate_cells(rec: Path, replicates: tuple = REPLICATES) -> list[str]:
    """Each replicate's test macro-F1 cells (mean ± 95% CI over its seeds), in the record's column order."""
    arms = _arms(read_csv(rec / "results.csv"))
    out = ["| fraction, replicate | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for folder, label in replicates:
        if not (rec / folder / "results.csv").is_file():
            continue
        cells = {(float(r["fraction"]), r["arm"]): r for r in read_csv(rec / folder / "results.csv")}
        for f in sorted({f for f, _ in cells}):
            out.append(f"| {pct(f)}, {label} | " + " | ".join(
                f"{float(cells[f, a]['macro_f1_mean']):.3f} ± {float(cells[f, a]['macro_f1_ci95']):.3f}"
                if (f, a) in cells else "—" for a in arms) + " |")
    return out + [""]


def per_class_table(rec: Path) -> list[str]:
    rows = read_csv(rec / "per_class.csv")
    classes = [k[:-len("_accuracy")] for k in rows[0] if k.endswith("_accuracy")]
    out = ["| fraction | arm | " + " | ".join(classes) + " |", "|---" * (len(classes) + 2) + "|"]
    for r in rows:
        if r["arm"] in MAIN_ARMS:
            out.append(f"| {pct(float(r['fraction']))} | {r['arm']} | " +
                       " | ".join(f"{float(r[c + '_accuracy']):.3f}" for c in classes) + " |")
    return out + [""]


def baseline_and_gap(rec: Path) -> list[str]:
    runs = read_jsonl(rec / "results.jsonl")
    scratch = defaultdict(list)
    for r in sorted(runs, key=lambda r: r["seed"]):
        if r["arm"] == "scratch":
            scratch[r["fraction"]].append(r)
    out = ["| fraction | target | scratch test macro-F1 (per seed) | mean | validation mean | met? |",
           "|---|---|---|---|---|---|"]
    for f, rs in sorted(scratch.items()):
        test = np.mean([r["macro_f1"] for r in rs])
        t = TARGETS.get(f)
        met = "—" if t is None else ("**yes**" if test >= t else f"**no**, by {t - test:.4f}")
        seeds = ", ".join(f"{r['macro_f1']:.4f}" for r in rs)
        out.append(f"| {pct(f)} | {'≥ ' + str(t) if t else '—'} | {seeds} "
                   f"| {test:.4f} | {np.mean([r['val_macro_f1'] for r in rs]):.4f} | {met} |")
    gap = np.array([r["val_macro_f1"] - r["macro_f1"] for r in runs])
    last = np.array([r["val_macro_f1"] - r["macro_f1"] for r in runs if r["best_epoch"] == r["epochs_run"]])
    out += ["", f"Validation above test in {int((gap > 0).sum())} of {len(gap)} runs; mean gap {gap.mean():.4f}. "
            f"Runs whose best check was the last: {len(last)}, mean gap "
            f"{last.mean() if len(last) else float('nan'):.4f}.", ""]
    return out


STAGES = {"prcc_autoencoder": "PRCC autoencoder (389 images, 8 epochs)",
          "cam16_resnet": "CAM16 ResNet-18 (56 training patches, 15 epochs)",
          "pilot": "fusion-mode pilot (4 validation-only runs; decodes the 8,232 images into the cache)"}
FIRST_RUN = ("results_min_steps_400.jsonl", "timings_min_steps_400.json")  # the 2026-11-22 record


def _column(stages: dict, runs: list[dict], fractions: list[float], n_per_f: dict) -> tuple[list[str], float]:
    """Stage seconds, then run seconds per fraction (scaled up from the measured runs where some were
    reused from another record, marked est.), and the total."""
    cells, total = [], 0.0
    for k in STAGES:
        total += stages[k]["seconds"]
        cells.append(f"{stages[k]['seconds']:,.0f}")
    for f in fractions:
        rs = [r for r in runs if r["fraction"] == f]
        sec = sum(r["seconds"] for r in rs)
        est = ""
        if rs and len(rs) < n_per_f[f]:
            sec, est = sec / len(rs) * n_per_f[f], f" (est. from {len(rs)} runs)"
        total += sec
        cells.append(f"{sec:,.0f}{est}")
    return cells + [f"**{total:,.0f} = {total / 60:.1f} min**"], total


def timing_table(rec: Path) -> list[str]:
    """Wall time per stage: stages from timings.json plus the sum of run seconds measured in this record
    (rows with a `source` were reused from an earlier record and are not counted), beside the first run."""
    runs = read_jsonl(rec / "results.jsonl")
    fresh = [r for r in runs if "source" not in r]
    fractions = sorted({r["fraction"] for r in runs})
    n_per_f = {f: sum(r["fraction"] == f for r in runs) for f in fractions}
    steps = {f: int(np.median([r["steps"] for r in runs if r["fraction"] == f])) for f in fractions}
    names = list(STAGES.values()) + [f"sweep {pct(f)}: {n_per_f[f]} runs, {steps[f]} steps" for f in fractions]
    now, total = _column(json.loads((rec / "timings.json").read_text()), fresh, fractions, n_per_f)
    first = rec / FIRST_RUN[0]
    if not first.is_file():
        return ["| stage | seconds |", "|---|---|"] + [f"| {n} | {c} |" for n, c in zip(names + ["**total**"], now,
                                                                                       strict=True)] + [""]
    old = read_jsonl(first)
    then, total_then = _column(json.loads((rec / FIRST_RUN[1]).read_text()), old, fractions, n_per_f)
    old_by = {r["run"]: r for r in old}
    same = [r for r in fresh if r["run"] in old_by and r["steps"] == old_by[r["run"]]["steps"]]
    out = ["| stage | this record, s | first run (`min_steps 400`), s |", "|---|---|---|"]
    out += [f"| {n} | {a} | {b} |" for n, a, b in zip(names + ["**total**"], now, then, strict=True)]
    if same:
        ratio = sum(r["seconds"] for r in same) / sum(old_by[r["run"]]["seconds"] for r in same)
        out += ["", f"Identical work on both days ({len(same)} runs with the same step budget) took {ratio:.2f}x as "
                f"long in this record. At the first run's machine speed, this record's total would be about "
                f"{total / ratio / 60:.0f} min."]
    return out + [""]


def main() -> None:
    rec = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)
    for title, fn in (("Table", main_tables), ("Paired", paired_table), ("Replicate", replicate_table),
                      ("Replicate cells", replicate_cells),
                      ("Per class", per_class_table),
                      ("Baseline", baseline_and_gap), ("Timings", timing_table)):
        print(f"<!-- {title} -->\n" + "\n".join(fn(rec)))


if __name__ == "__main__":
    main()
