"""The related small-data studies' methods on the real PBC images (issue 18), small CNN, all side by side:

- defaults at 1% and 10% (3 seeds): the baseline;
- the class-balanced sampler and CLAHE at 1% (3 seeds), paired with the baseline by seed;
- 5-fold stratified cross-validation at 10% (seed 0): mean ± CI over the folds;
- an Optuna search (TPE, median pruning) of lr, weight decay, dropout and augmentation on the
  validation split at 1%, then its best config run as a sweep at 1% and 10% (3 seeds), paired with
  the baseline on the test split.

    .venv/bin/python benchmarks/related_methods/run.py [--trials 20] [--work runs/related]

Resumable (every step reuses finished runs and trials). Writes benchmarks/related_methods/record/:
summary.md (the tables), results.jsonl (every sweep's rows, with a "sweep" key; a sweep's report: scripts/report.py runs/related/<name>), the search's trials.csv, search.json,
search.png and best_sweep.yaml.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from fusion.metrics import mean_ci, paired_t_p  # noqa: E402
from fusion.report import load_results, make_report  # noqa: E402
from fusion.search import SearchConfig, run_search  # noqa: E402
from fusion.study import machine_info  # noqa: E402
from fusion.sweep import SweepConfig, run_sweep  # noqa: E402
from pretrain.config import config_from_dict, load_yaml  # noqa: E402

HERE = Path(__file__).resolve().parent


def sweep(base: dict, work: Path, name: str, **change) -> Path:
    d = copy.deepcopy(base)
    for k, v in change.items():
        if isinstance(v, dict):
            d.setdefault(k, {}).update(v)
        else:
            d[k] = v
    d["out"] = str(work / name)
    t0 = time.perf_counter()
    run_sweep(config_from_dict(SweepConfig, d, source=f"{name} sweep"))
    make_report(work / name)
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return work / name


def rows(folder: Path) -> dict[tuple[float, int, int], dict]:
    return {(float(r["fraction"]), int(r["seed"]), int(r.get("fold", -1))): r for r in load_results(folder)
            if r.get("status") == "ok"}


def paired(variant: Path, baseline: Path, label: str) -> list[str]:
    a, b = rows(variant), rows(baseline)
    out = []
    for f in sorted({k[0] for k in a}):
        keys = sorted(k for k in a if k[0] == f and k in b)
        d = [a[k]["macro_f1"] - b[k]["macro_f1"] for k in keys]
        m, hw = mean_ci(d)
        va, vb = mean_ci([a[k]["macro_f1"] for k in keys]), mean_ci([b[k]["macro_f1"] for k in keys])
        out.append(f"| {label} | {f * 100:g}% | {len(keys)} | {vb[0]:.4f} ± {vb[1]:.4f} | {va[0]:.4f} ± {va[1]:.4f} | "
                   f"{m:+.4f} [{m - hw:+.4f}, {m + hw:+.4f}] | {paired_t_p(d):.3f} |")
    return out


def per_class(folders: dict[str, Path], fraction: float) -> list[str]:
    lines = []
    for label, folder in folders.items():
        rs = [r for k, r in rows(folder).items() if k[0] == fraction]
        classes = rs[0]["classes"]
        rec = [np.mean([r["per_class"][c]["recall"] for r in rs]) for c in classes]
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in rec) + " |")
    head = "| variant | " + " | ".join(classes) + " |"
    return [head, "|---|" + "---|" * len(classes), *lines]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/related")
    p.add_argument("--trials", type=int, default=20)
    args = p.parse_args()
    work = Path(args.work)
    base_path = HERE / "base.yaml"
    base = load_yaml(base_path)
    t0 = time.perf_counter()
    default = sweep(base, work, "default")
    balanced = sweep(base, work, "balanced", fractions=[0.01], optim={"sampler": "balanced"})
    clahe = sweep(base, work, "clahe", fractions=[0.01], preprocess=["clahe"])
    kfold = sweep({k: v for k, v in base.items() if k != "split"}, work, "kfold5", fractions=[0.1], seeds=[0], folds=5)
    t_search = time.perf_counter()
    s = run_search(SearchConfig(sweep=str(base_path.relative_to(ROOT)), out=str(work / "search"), trials=args.trials, fraction=0.01,
                                seed=0, sampler_seed=0))
    search_s = time.perf_counter() - t_search
    tuned_cfg = yaml.safe_load((work / "search" / "best_sweep.yaml").read_text())
    tuned = sweep(tuned_cfg, work, "tuned")

    rec = HERE / "record"
    rec.mkdir(exist_ok=True)
    with open(rec / "results.jsonl", "w") as fh:  # every sweep's rows, with the sweep's name
        for folder in (default, balanced, clahe, kfold, tuned):
            fh.writelines(json.dumps({"sweep": folder.name, **r}) + "\n" for r in load_results(folder))
    for f in ("trials.csv", "search.json", "search.png", "best_sweep.yaml"):
        shutil.copyfile(work / "search" / f, rec / f"search_{f}")
    kf = [r["macro_f1"] for r in rows(kfold).values()]
    m, hw = mean_ci(kf)
    md = ["# Related methods on the real PBC images: recorded output", "",
          f"Command: `.venv/bin/python benchmarks/related_methods/run.py --trials {args.trials}` "
          f"({(time.perf_counter() - t0) / 60:.1f} min in all, search {search_s / 60:.1f} min). Machine: "
          f"{json.dumps(machine_info())}", "",
          "## Paired with the defaults (same seed, same split), test macro-F1", "",
          "| variant | fraction | pairs | defaults | variant | Δ [95% CI] | p |", "|---|---|---|---|---|---|---|",
          *paired(balanced, default, "balanced sampler"), *paired(clahe, default, "CLAHE"),
          *paired(tuned, default, "Optuna best"), "",
          "## Per-class recall at 1% (mean over 3 seeds)", "",
          *per_class({"defaults": default, "balanced sampler": balanced, "CLAHE": clahe, "Optuna best": tuned}, 0.01),
          "", f"## 5-fold stratified CV, small CNN at 10% (seed 0; fold test sets cover all {sum(r['n_test'] for r in rows(kfold).values())} images)", "",
          f"macro-F1 per fold: {', '.join(f'{v:.4f}' for v in kf)}; mean {m:.4f} ± {hw:.4f} (t 95% CI over folds)", "",
          "## Optuna search (validation only, fraction 1%, seed 0)", "",
          f"{s['trials']} trials: {s['complete']} complete, {s['pruned']} pruned, {s['failed']} failed. Best: trial "
          f"{s['best_trial']}, validation macro-F1 {s['best_val_macro_f1']:.4f}, "
          f"{json.dumps(s['best_params'])}.", ""]
    (rec / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
