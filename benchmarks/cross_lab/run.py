"""Cross-lab robustness on real cells (issue 19): PBC-trained runs of every variant scored on bccd-wbc,
then few-shot adaptation of the best variant's scratch model.

    .venv/bin/python benchmarks/cross_lab/run.py [--variants base cell_crop ...] [--skip-fewshot]

Resumable (finished runs, external scores and few-shot rows are reused). Writes
benchmarks/cross_lab/record/: summary.md, results.jsonl and external.jsonl of every variant (one file
each, a "variant" key per row), fewshot.md / fewshot.png / adapt.jsonl.
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

from fusion.adapt import AdaptConfig, run_adapt  # noqa: E402
from fusion.metrics import mean_ci, paired_t_p  # noqa: E402
from fusion.report import load_results, make_report  # noqa: E402
from fusion.study import machine_info  # noqa: E402
from fusion.sweep import SweepConfig, run_sweep  # noqa: E402
from pretrain.config import config_from_dict, load_yaml  # noqa: E402
from pretrain.utils import read_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent


def ensure_encoders() -> None:
    """The real study's two encoders in runs/real_study/checkpoints/: its `prcc` and `cam16` stages
    (benchmarks/real_study/config.yaml), run here when the files are missing (about 20 min on 2 cores)."""
    from fusion.study import _resolve
    from pretrain.train_cam16 import Cam16Config, fit_cam16
    from pretrain.train_prcc import PRCCConfig, fit_prcc

    study = load_yaml(ROOT / "benchmarks" / "real_study" / "config.yaml")
    work = Path("runs/real_study").resolve()
    study = _resolve(copy.deepcopy(study), {"shared": str(Path(study["shared"]).resolve()), "work": str(work)})
    ck = work / "checkpoints"
    if not (ck / "prcc_autoencoder.pt").is_file():
        fit_prcc(config_from_dict(PRCCConfig, {**study["prcc"], "out": str(ck / "prcc_autoencoder.pt"),
                                               "run_dir": str(work / "prcc")}))
    if not (ck / "cam16_resnet.pt").is_file():
        fit_cam16(config_from_dict(Cam16Config, {**study["cam16"], "out": str(ck / "cam16_resnet.pt"),
                                                 "run_dir": str(work / "cam16")}))


def merge(base: dict, change: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in change.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def cell(rows: list[dict], key: str) -> str:
    m, hw = mean_ci([r[key] for r in rows])
    return f"{m:.3f}" + ("" if np.isnan(hw) else f" ± {hw:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--skip-fewshot", action="store_true")
    p.add_argument("--fractions", nargs="*", type=float, default=None, help="run only these fractions first")
    args = p.parse_args()
    cfg = load_yaml(HERE / "config.yaml")
    work = Path(cfg["work"])
    names = args.variants or list(cfg["variants"])
    t0 = time.perf_counter()
    ensure_encoders()
    res, ext = {}, {}
    for name in names:
        d = merge(cfg["base"], cfg["variants"][name])
        d["out"] = str(work / name)
        if args.fractions:
            d["fractions"] = args.fractions
        t = time.perf_counter()
        run_sweep(config_from_dict(SweepConfig, d, source=f"variant {name}"))
        make_report(work / name)
        print(f"variant {name}: {(time.perf_counter() - t) / 60:.1f} min", flush=True)
        res[name] = [r for r in load_results(work / name) if r.get("status") == "ok"]
        ext[name] = {r["run"]: r for r in read_jsonl(work / name / "external.jsonl")}
    rec = HERE / "record"
    rec.mkdir(exist_ok=True)
    for fname, src in (("results.jsonl", res), ("external.jsonl", ext)):
        with open(rec / fname, "w") as fh:
            for name in names:
                for r in (src[name] if isinstance(src[name], list) else src[name].values()):
                    fh.write(json.dumps({"variant": name, **r}) + "\n")
    arms = list(dict.fromkeys(r["arm"] for r in res[names[0]]))
    fractions = sorted({float(r["fraction"]) for r in res[names[0]]})
    md = ["# Cross-lab: trained on PBC, scored on bccd-wbc (recorded output)", "",
          f"Command: `.venv/bin/python benchmarks/cross_lab/run.py` ({(time.perf_counter() - t0) / 60:.1f} min for "
          f"what was not yet done). Machine: {json.dumps(machine_info())}", "",
          "bccd-wbc is a development set (options chosen on it): its numbers are optimistic.", "",
          "| variant | fraction | arm | seeds | PBC test macro-F1 | bccd macro-F1 | bccd balanced acc. | "
          "Δ bccd macro-F1 vs base [95% CI] |", "|---|---|---|---|---|---|---|---|"]
    best = None
    for f in fractions:
        for arm in arms:
            for name in names:
                rows = [r for r in res[name] if float(r["fraction"]) == f and r["arm"] == arm]
                e = [ext[name][r["run"]] for r in rows if r["run"] in ext[name]]
                if not e:
                    continue
                diff = ""
                if name != "base" and "base" in ext:
                    pairs = [(ext[name][r["run"]]["macro_f1"], ext["base"][r["run"]]["macro_f1"])
                             for r in rows if r["run"] in ext[name] and r["run"] in ext["base"]]
                    d = [a - b for a, b in pairs]
                    m, hw = mean_ci(d)
                    diff = (f"{m:+.3f} [{m - hw:+.3f}, {m + hw:+.3f}] (p {paired_t_p(d):.3f})" if len(d) > 1
                            else f"{m:+.3f}")
                md.append(f"| {name} | {f * 100:g}% | {arm} | {len(e)} | {cell(rows, 'macro_f1')} | "
                          f"{cell(e, 'macro_f1')} | {cell(e, 'balanced_accuracy')} | {diff} |")
                score = float(np.mean([x["macro_f1"] for x in e]))
                if arm == "scratch" and f == max(fractions) and (best is None or score > best[1]):
                    best = (name, score)
    md += ["", "## Per-class recall on bccd (mean over seeds), 100%", ""]
    classes = next(iter(ext[names[0]].values()))["macro_f1_over"]
    md += ["| variant | arm | " + " | ".join(classes) + " |", "|---|---|" + "---|" * len(classes)]
    for name in names:
        for arm in arms:
            e = [x for x in ext[name].values() if x["arm"] == arm and float(x["fraction"]) == max(fractions)]
            if e:
                md.append(f"| {name} | {arm} | " + " | ".join(
                    f"{np.mean([x['per_class'][c]['recall'] for x in e]):.3f}" for c in classes) + " |")
    if not args.skip_fewshot and best is not None:
        fs = cfg["fewshot"]
        run = work / best[0] / "runs" / f"f{max(fractions):g}_scratch_s0"
        run = run if run.is_dir() else next((work / best[0] / "runs").glob(f"f{max(fractions)}*_scratch_s0"))
        out = work / f"fewshot_{best[0]}"
        run_adapt(AdaptConfig(checkpoint=str(run), data=cfg["base"]["external"]["bccd"], out=str(out),
                              shots=fs["shots"], seeds=fs["seeds"]))
        for f in ("fewshot.md", "fewshot.png", "adapt.jsonl"):
            shutil.copyfile(out / f, rec / f)
        md += ["", f"## Few-shot adaptation on bccd: variant `{best[0]}` (best scratch at 100% on bccd), run "
               f"`{run.name}`", "", (out / "fewshot.md").read_text()]
    (rec / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
