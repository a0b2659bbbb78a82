"""Sweep report: tables with 95% CIs over seeds, paired differences, verdicts, plots.

    python scripts/report.py runs/demo_sweep

Reads `<sweep>/results.jsonl` (one line per finished run; the last line of a run wins) and writes
`report.md`, `results.csv` (the study table), `per_class.csv`, `paired.csv`,
`metric_vs_fraction.png` and `confusion_<fraction>_<arm>.png` into the sweep folder.

Statistics: a cell is mean ± the half width of the Student-t 95% CI over seeds. A paired difference
compares two arms run with the same seed (same label fraction of the same split, same CNN
initialisation, same batches and augmentations); its CI is the Student-t 95% interval of the mean of
the per-seed differences (a paired t interval), with the paired t-test's p-value and its Holm
adjustment over all the sweep's comparisons. With the 3-5 seeds a sweep affords, a percentile
bootstrap of those few differences can take only a handful of values, is narrower than the t interval
and under-covers, so it would call chance differences real. An arm "helped beyond the control" at a
fraction only when its macro-F1 CI excludes 0 in its favour both against `scratch` and against
`random` (the frozen random encoders).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.utils import atomic_path, atomic_write_text, read_jsonl

from .data import CLASSES
from .ensemble import ensemble_table
from .metrics import holm, mean_ci, paired_t_p
from .report_plots import plot_confusion, plot_metric_vs_fraction
from .sources import DEFAULT_ARMS, LEGACY_TWINS, TWIN_PREFIX
from .sweep_probes import probe_table

METRICS = ("accuracy", "macro_f1")
MIN_SEEDS_FOR_CI = 3


@dataclass
class ReportConfig:
    """`scripts/report.py`: summarise a finished (or partial) sweep folder."""

    run_dir: str = field(default="runs/demo_sweep", metadata={"help": "sweep folder holding results.jsonl"})


def load_results(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of `results.jsonl`, one per run (the last line of a run wins)."""
    path = Path(run_dir) / "results.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a sweep folder, or no run has "
                                f"finished yet; run scripts/sweep.py --config FILE first")
    rows = {}
    for r in read_jsonl(path):
        rows[r.get("run", len(rows))] = r
    if not rows:
        raise ValueError(f"{path} holds no finished run yet")
    return list(rows.values())


def arm_label(row: dict, modes: list[str]) -> str:
    """`scratch`, or the arm with its fusion mode when the sweep has several modes."""
    if row["arm"] == "scratch" or len(modes) <= 1:
        return row["arm"]
    return f"{row['arm']} ({row['mode']})"


SMALL_CNN = "small_cnn"


def structure(row: dict) -> tuple[tuple[str, ...], str | None, str]:
    """(sources, twin_of, classifier) of a result row (classifier: `small_cnn` or the backbone with
    `+weights`/`+frozen`); rows written before sources were config are read by name."""
    classifier = row.get("backbone", SMALL_CNN) + ("+weights" if row.get("backbone_pretrained") else "") \
        + ("+frozen" if row.get("backbone_frozen") else "")
    if "sources" in row:
        return tuple(row["sources"]), row.get("twin_of"), classifier
    arm = row["arm"]
    base = LEGACY_TWINS.get(arm) or (arm[len(TWIN_PREFIX):] if arm.startswith(TWIN_PREFIX) else None)
    return tuple(DEFAULT_ARMS.get(base or arm, ())), base, classifier


def _labels(rows: list[dict]) -> tuple[list[str], list[str], list[float]]:
    modes = sorted({r["mode"] for r in rows if r["arm"] != "scratch"}) or ["sum"]
    order = {a: i for i, a in enumerate([*DEFAULT_ARMS, *LEGACY_TWINS])}
    first = {}
    for r in rows:
        first.setdefault(r["arm"], len(first))
    pairs = sorted({(r["arm"], r["mode"] if r["arm"] != "scratch" else "", structure(r)[1] is not None)
                    for r in rows},
                   key=lambda am: (am[2], order.get(am[0], 50 + first[am[0]]), am[1]))
    labels = list(dict.fromkeys(arm_label({"arm": a, "mode": m}, modes) for a, m, _ in pairs))
    fractions = sorted({float(r["fraction"]) for r in rows})
    return labels, modes, fractions


def fmt_pct(f: float) -> str:
    return f"{f * 100:g}%"


def fmt_p(p: float) -> str:
    return "—" if not math.isfinite(p) else f"{p:.3f}" if p >= 0.001 else "<0.001"


def fmt_cell(values: list[float]) -> str:
    if not values:
        return "—"
    m, hw = mean_ci(values)
    return f"{m:.3f} (n=1)" if math.isnan(hw) else f"{m:.3f} ± {hw:.3f}"


@dataclass
class Summary:
    """Everything the report shows, as plain data (also handy in tests)."""

    labels: list[str]
    modes: list[str]
    fractions: list[float]
    # (fraction, label) -> {(fold, seed): row}; fold -1 without k-fold
    cells: dict[tuple[float, str], dict[int, dict]]
    failed: list[dict]
    paired: list[dict]
    verdicts: dict[float, str]
    classes: tuple[str, ...] = CLASSES  # of the data the sweep was trained on (from its rows)


def summarise(rows: list[dict]) -> Summary:
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") != "ok"]
    labels, modes, fractions = _labels(ok or rows)
    cells: dict[tuple[float, str], dict[int, dict]] = defaultdict(dict)
    for r in ok:
        cells[(float(r["fraction"]), arm_label(r, modes))][(int(r.get("fold", -1)), int(r["seed"]))] = r
    # each arm against scratch and against its own random twin (same sources, same mode), by structure
    struct = {arm_label(r, modes): structure(r) for r in ok}
    twin_label = {}
    for lab, (srcs, twin_of, clf) in struct.items():
        if twin_of is not None:
            base_lab = next((b for b, (bs, bt, bc) in struct.items() if bt is None and bs == srcs and bc == clf
                             and b.split(" (")[0] == twin_of and b.partition(" (")[2] == lab.partition(" (")[2]), None)
            if base_lab is not None:
                twin_label[base_lab] = lab
    paired = []
    for f in fractions:
        for lab in labels:
            srcs, twin_of, clf = struct.get(lab, ((), None, SMALL_CNN))
            if lab == "scratch" or (not srcs and clf == SMALL_CNN):
                continue
            # an architecture arm without sources is a comparison of classifiers, not of pretraining
            kind0 = "scratch" if srcs else "architecture"
            refs = [("scratch", kind0)] + ([(twin_label[lab], "twin")] if lab in twin_label else [])
            for ref, kind in refs:
                a, b = cells.get((f, lab), {}), cells.get((f, ref), {})
                seeds = sorted(set(a) & set(b))
                if not seeds:
                    continue
                row = {"fraction": f, "arm": lab, "versus": ref, "kind": kind, "n_pairs": len(seeds)}
                for m in METRICS:
                    d = [a[s][m] - b[s][m] for s in seeds]
                    mean, hw = mean_ci(d)  # paired t interval; one or two pairs: report no CI
                    lo, hi = (mean - hw, mean + hw) if len(d) >= MIN_SEEDS_FOR_CI else (math.nan, math.nan)
                    p = paired_t_p(d) if len(d) >= MIN_SEEDS_FOR_CI else math.nan
                    row.update({f"{m}_diff": mean, f"{m}_lo": lo, f"{m}_hi": hi, f"{m}_p": p})
                paired.append(row)
    for m in METRICS:  # every paired comparison of the sweep is one family
        for row, adj in zip(paired, holm([r[f"{m}_p"] for r in paired]), strict=True):
            row[f"{m}_p_holm"] = adj
    verdicts = {f: verdict(f, [p for p in paired if p["fraction"] == f], labels) for f in fractions}
    for f in fractions:
        if arch := architecture_verdict(f, [p for p in paired if p["fraction"] == f and p["kind"] == "architecture"]):
            no_sources = verdicts[f].endswith("nothing to judge.")  # an architecture-only sweep
            verdicts[f] = arch if no_sources else f"{verdicts[f]} {arch}"
    classes = tuple(next((r["classes"] for r in ok if r.get("classes")), CLASSES))
    return Summary(labels, modes, fractions, dict(cells), failed, paired, verdicts, classes)


def architecture_verdict(fraction: float, paired: list[dict]) -> str:
    """One sentence on the standard architectures against the small CNN (`scratch`) at `fraction`."""
    parts = []
    for p in paired:
        if p["n_pairs"] < MIN_SEEDS_FOR_CI:
            word = f"undetermined ({p['n_pairs']} seed{'s' if p['n_pairs'] != 1 else ''})"
        elif p["macro_f1_lo"] > 0:
            word = "better than the small CNN"
        elif p["macro_f1_hi"] < 0:
            word = "worse than the small CNN"
        else:
            word = "no measurable difference from the small CNN"
        parts.append(f"{p['arm']} {word} ({p['macro_f1_diff']:+.3f} macro-F1)")
    return f"Architectures at {fmt_pct(fraction)}: " + "; ".join(parts) + "." if parts else ""


def verdict(fraction: float, paired: list[dict], labels: list[str]) -> str:
    """One plain sentence per fraction on whether pretraining helped beyond each arm's random twin."""
    pre = sorted({p["arm"] for p in paired if p["kind"] == "scratch"} - {p["versus"] for p in paired
                                                                        if p["kind"] == "twin"},
                 key=labels.index)
    if not pre:
        return f"At {fmt_pct(fraction)}: no pretrained arm in this sweep, so nothing to judge."
    has_twin = any(p["kind"] == "twin" for p in paired)
    parts, helped = [], []
    for lab in pre:
        vs = {p["kind"]: p for p in paired if p["arm"] == lab}
        if "scratch" not in vs:  # an architecture arm: judged by architecture_verdict
            continue
        s, r = vs["scratch"], vs.get("twin")
        n = s["n_pairs"]
        few = n < MIN_SEEDS_FOR_CI
        beats = s["macro_f1_lo"] > 0 and (r is not None and r["macro_f1_lo"] > 0)
        hurt = s["macro_f1_hi"] < 0
        diffs = f"{s['macro_f1_diff']:+.3f} vs scratch" + (f", {r['macro_f1_diff']:+.3f} vs {r['versus']}"
                                                            if r is not None else "")
        if few:
            word = f"undetermined ({n} seed{'s' if n != 1 else ''}: too few for a meaningful CI)"
        elif beats:
            word = "helped beyond the control"
            helped.append(lab)
        elif hurt:
            word = "hurt"
        else:
            word = "no measurable benefit"
        parts.append(f"{lab} {word} (macro-F1 {diffs})")
    if not parts:
        return f"At {fmt_pct(fraction)}: no paired runs against scratch."
    head = (f"At {fmt_pct(fraction)}, pretraining helped beyond the random control for {', '.join(helped)}"
            if helped else f"At {fmt_pct(fraction)}, pretraining did not measurably help beyond the control")
    tail = "" if has_twin else (" (this sweep has no random twin of any arm, so no control: any gain may be "
                                "extra parameters)")
    return f"{head}{tail}: " + "; ".join(parts) + "."


def _table(summary: Summary, metric: str) -> list[str]:
    lines = ["| fraction | " + " | ".join(summary.labels) + " |",
             "|---|" + "---|" * len(summary.labels)]
    for f in summary.fractions:
        cells = [fmt_cell([r[metric] for r in summary.cells.get((f, lab), {}).values()]) for lab in summary.labels]
        lines.append(f"| {fmt_pct(f)} | " + " | ".join(cells) + " |")
    return lines


def cost_table(summary: Summary) -> list[str]:
    """Per arm: classifier, parameter count, training time per run and training images per second."""
    by: dict[str, list[dict]] = defaultdict(list)
    for (_, lab), runs in summary.cells.items():
        by[lab] += list(runs.values())
    if not any("train_seconds" in r for rs in by.values() for r in rs):
        return []
    md = ["## Cost per run (training on this machine)", "",
          "| arm | classifier | trainable params | seconds per run (median) | train images/s (median) |",
          "|---|---|---|---|---|"]
    for lab in summary.labels:
        rs = [r for r in by.get(lab, []) if "train_seconds" in r]
        if rs:
            md.append(f"| {lab} | {structure(rs[0])[2]} | {rs[0]['trainable_params']:,} | "
                      f"{np.median([r['train_seconds'] for r in rs]):.1f} | "
                      f"{np.median([r['train_images_per_s'] for r in rs]):.0f} |")
    return md + [""]


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def write_tables(summary: Summary, out: Path) -> None:
    rows = []
    for f in summary.fractions:
        for lab in summary.labels:
            runs = summary.cells.get((f, lab), {})
            if not runs:
                continue
            row = [f, lab, len(runs)]
            for m in METRICS:
                mean, hw = mean_ci([r[m] for r in runs.values()])
                row += [round(mean, 6), None if math.isnan(hw) else round(hw, 6)]
            rows.append(row)
    _write_csv(out / "results.csv", ["fraction", "arm", "n_seeds", "accuracy_mean", "accuracy_ci95",
                                     "macro_f1_mean", "macro_f1_ci95"], rows)
    pc = []
    for f in summary.fractions:
        for lab in summary.labels:
            runs = list(summary.cells.get((f, lab), {}).values())
            if runs:
                pc.append([f, lab, len(runs)] + [round(float(np.mean([r["per_class"][c]["recall"] for r in runs])), 6)
                                                 for c in summary.classes])
    _write_csv(out / "per_class.csv", ["fraction", "arm", "n_seeds"] + [f"{c}_accuracy" for c in summary.classes], pc)
    keys = ["fraction", "arm", "versus", "n_pairs"] + [f"{m}_{k}" for m in METRICS
                                                       for k in ("diff", "lo", "hi", "p", "p_holm")]
    _write_csv(out / "paired.csv", keys, [[p[k] for k in keys] for p in summary.paired])


def _diff_ci(p: dict, m: str) -> str:
    lo, hi = p[f"{m}_lo"], p[f"{m}_hi"]
    ci = (f"[{lo:+.3f}, {hi:+.3f}]" if np.isfinite(lo) and np.isfinite(hi)
          else f"[no CI: {p['n_pairs']} pair{'s' if p['n_pairs'] != 1 else ''}]")
    return f"{p[f'{m}_diff']:+.3f} {ci}"


def _paired_lines(summary: Summary) -> list[str]:
    md = ["| fraction | arm | versus | pairs | Δ macro-F1 [95% CI] | p | p, Holm | Δ accuracy [95% CI] |",
          "|---|---|---|---|---|---|---|---|"]
    for p in summary.paired:
        md.append(f"| {fmt_pct(p['fraction'])} | {p['arm']} | {p['versus']} | {p['n_pairs']} | "
                  f"{_diff_ci(p, 'macro_f1')} | {fmt_p(p['macro_f1_p'])} | {fmt_p(p['macro_f1_p_holm'])} | "
                  f"{_diff_ci(p, 'accuracy')} |")
    return md


def external_sections(run_dir: Path) -> list[str]:
    """One section per external set of the sweep (another lab's cells): the in-distribution tables again."""
    from .external import external_rows

    md = []
    for name, rows in sorted(external_rows(run_dir).items()):
        s = summarise(rows)
        absent = sorted({c for r in rows for c in r.get("absent_classes", [])})
        md += [f"## External set `{name}` ({rows[0]['data']}, {rows[0]['n']} images scored)", "",
               "Every run's weights (chosen on PBC validation) scored on another lab's cells, no target labels "
               "used. Macro-F1 over the classes the set holds" + (f"; it lacks {', '.join(absent)}" if absent else "")
               + ".", "", "### Verdict per fraction", "", *[f"- {s.verdicts[f]}" for f in s.fractions], "",
               "### Macro-F1 (mean ± 95% CI over seeds)", "", *_table(s, "macro_f1"), "",
               "### Balanced accuracy", "", *_table(s, "balanced_accuracy"), "",
               "### Paired differences (same seed)", "", *_paired_lines(s), "",
               "### Per-class recall, mean over seeds", ""]
        present = [c for c in s.classes if c not in absent]
        md += ["| fraction | arm | " + " | ".join(present) + " |", "|---|---|" + "---|" * len(present)]
        for f in s.fractions:
            for lab in s.labels:
                runs = list(s.cells.get((f, lab), {}).values())
                if runs:
                    md.append(f"| {fmt_pct(f)} | {lab} | " + " | ".join(
                        f"{np.mean([r['per_class'][c]['recall'] for r in runs]):.3f}" for c in present) + " |")
        md.append("")
    return md


def render_markdown(summary: Summary, run_dir: Path, figures: list[str]) -> str:
    n_seeds = sorted({len(v) for v in summary.cells.values()})
    try:  # a path relative to the working directory, so recorded reports do not carry this machine's paths
        shown = Path(run_dir).resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = Path(run_dir)
    md = [f"# Fusion sweep report: `{shown}`", "",
          f"Arms: {', '.join(summary.labels)}. Fractions: {', '.join(fmt_pct(f) for f in summary.fractions)}. "
          f"Runs per cell (seeds, times folds in k-fold mode): {', '.join(map(str, n_seeds))}. Metrics on the held-out test split, model chosen "
          f"on validation macro-F1.", ""]
    if max(n_seeds, default=0) < MIN_SEEDS_FOR_CI:
        md += [f"**Caution:** with fewer than {MIN_SEEDS_FOR_CI} seeds per cell the 95% intervals are very wide "
               f"(2 seeds) or undefined (1 seed); no difference below can be called real.", ""]
    md += ["## Verdict per fraction", ""] + [f"- {summary.verdicts[f]}" for f in summary.fractions] + [""]
    for m, title in (("accuracy", "Test accuracy"), ("macro_f1", "Test macro-F1")):
        md += [f"## {title} (mean ± 95% CI over seeds)", ""] + _table(summary, m) + [""]
    md += cost_table(summary)
    md += ensemble_table(Path(run_dir), summary.cells, summary.labels, summary.fractions, fmt_pct)
    md += probe_table(run_dir, fmt_cell, fmt_pct)
    md += ["## Paired differences (same seed), macro-F1 and accuracy, paired Student-t 95% CI", "",
           f"p: paired t-test of the macro-F1 difference; Holm: adjusted over all {len(summary.paired)} "
           f"comparisons of this sweep (family-wise error).", "", *_paired_lines(summary)]
    md += ["", "## Per-class accuracy (recall), mean over seeds", "",
           "| fraction | arm | " + " | ".join(summary.classes) + " |", "|---|---|" + "---|" * len(summary.classes)]
    for f in summary.fractions:
        for lab in summary.labels:
            runs = list(summary.cells.get((f, lab), {}).values())
            if runs:
                vals = [np.mean([r["per_class"][c]["recall"] for r in runs]) for c in summary.classes]
                md.append(f"| {fmt_pct(f)} | {lab} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    md += ["", *external_sections(Path(run_dir))]
    gated = [r for runs in summary.cells.values() for r in runs.values() if r.get("gate_weights")]
    if gated:
        md += ["", "## Mean gate weights (gated mode, test set)", "", "| fraction | arm | weights |", "|---|---|---|"]
        by = defaultdict(list)
        for r in gated:
            by[(float(r["fraction"]), r["arm"])].append(r["gate_weights"])
        for (f, arm), ws in sorted(by.items()):
            mean = {k: np.mean([w[k] for w in ws]) for k in ws[0]}
            md.append(f"| {fmt_pct(f)} | {arm} | " + ", ".join(f"{k} {v:.2f}" for k, v in mean.items()) + " |")
    if summary.failed:
        md += ["", "## Failed runs", ""] + [f"- `{r.get('run')}`: {r.get('reason', r.get('status'))}"
                                            for r in summary.failed]
    md += ["", "## Files", "", "- `results.csv` (table), `per_class.csv`, `paired.csv`"]
    md += [f"- ![{Path(p).stem}]({p})" if p.startswith("metric") else f"- `{p}`" for p in figures]
    return "\n".join(md) + "\n"


def make_report(run_dir: str | os.PathLike) -> Path:
    """Write report.md, CSVs and PNGs into `run_dir`; return the path of report.md."""
    out = Path(run_dir)
    summary = summarise(load_results(out))
    write_tables(summary, out)
    figures = [plot_metric_vs_fraction(summary, out / "metric_vs_fraction.png")]
    for (f, lab), runs in sorted(summary.cells.items()):
        figures.append(plot_confusion([r["confusion"] for r in runs.values()], summary.classes,
                                      out / f"confusion_{f:g}_{lab.replace(' ', '').replace('(', '-').strip(')')}.png",
                                      title=f"{lab}, {fmt_pct(f)}, {len(runs)} seed(s) summed"))
    path = out / "report.md"
    atomic_write_text(path, render_markdown(summary, out, [Path(p).name for p in figures]))
    return path


def run_report(cfg: ReportConfig) -> Path:
    """`scripts/report.py` entry: write the report, print its headline table and its path."""
    path = make_report(cfg.run_dir)
    summary = summarise(load_results(cfg.run_dir))
    print("\n".join(["Test macro-F1 (mean ± 95% CI over seeds):"] + _table(summary, "macro_f1")))
    print("\n".join(["", "Test accuracy:"] + _table(summary, "accuracy")))
    print("")
    print("\n".join(summary.verdicts[f] for f in summary.fractions))
    print(f"\nreport: {path}")
    return path
