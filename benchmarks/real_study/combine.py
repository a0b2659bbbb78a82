"""Report a study from today's runs plus an earlier run's rows whose training budget is unchanged.

    python benchmarks/real_study/combine.py --previous OLD_results.jsonl \
        [--today runs/real_study/sweep] [--out runs/real_study/combined] [--record benchmarks/real_study]

Why: raising `min_steps` only changes runs whose planned step count was below it (here 1% and 10%);
50% and 100% runs plan more steps than the floor and train exactly as before. An earlier row is
reused only when the current config plans the very same batch size and step count for it, and the
runs present in both are compared metric by metric (with fixed seeds they should be identical).
Writes `combined.json` (what was reused, what was compared, any mismatch) and the usual report.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusion.report import make_report  # noqa: E402
from fusion.study import machine_info, record_sweep  # noqa: E402
from fusion.train import RunConfig, plan_steps  # noqa: E402
from pretrain.utils import atomic_write_json, read_jsonl  # noqa: E402

COMPARED = ("accuracy", "macro_f1", "val_macro_f1", "confusion", "steps", "batch_size", "best_epoch")


def planned(row: dict, cfg: RunConfig) -> tuple[int, int]:
    bs, per_eval, evals = plan_steps(row["n_train"], cfg)
    return bs, per_eval * evals


def combine(today_dir: Path, previous: Path, out: Path, record: Path) -> dict:
    sweep_cfg = yaml.safe_load((today_dir / "config.yaml").read_text())
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    cfg = RunConfig(**{k: v for k, v in sweep_cfg.items() if k in fields})
    today = {r["run"]: r for r in read_jsonl(today_dir / "results.jsonl") if r.get("status") == "ok"}
    old = {r["run"]: r for r in read_jsonl(previous) if r.get("status") == "ok"}

    both = sorted(set(today) & set(old))
    unchanged = [n for n in both if planned(old[n], cfg) == (old[n]["batch_size"], old[n]["steps"])]
    mismatch = [n for n in unchanged if any(today[n][k] != old[n][k] for k in COMPARED)]
    reused = sorted(n for n in set(old) - set(today)
                    if planned(old[n], cfg) == (old[n]["batch_size"], old[n]["steps"]))
    skipped = sorted(set(old) - set(today) - set(reused))  # budget changed and not rerun: left out

    rows = list(today.values()) + [{**old[n], "source": f"reused from {previous.name}"} for n in reused]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "config.yaml").write_text((today_dir / "config.yaml").read_text())
    make_report(out)
    record_sweep(out, record)
    summary = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "previous": str(previous.name),
        "runs_today": len(today), "runs_reused": len(reused), "runs_left_out": skipped,
        "seconds_today": round(sum(r["seconds"] for r in today.values()), 1),
        "seconds_reused": round(sum(old[n]["seconds"] for n in reused), 1),
        "compared_unchanged_budget": len(unchanged), "identical": len(unchanged) - len(mismatch),
        "mismatches": {n: {k: [today[n][k], old[n][k]] for k in COMPARED if k != "confusion"
                           and today[n][k] != old[n][k]} for n in mismatch},
        "reused": reused,
    }
    atomic_write_json(record / "combined.json", summary)
    atomic_write_json(record / "machine.json", machine_info())
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--previous", required=True, type=Path, help="an earlier run's results.jsonl")
    p.add_argument("--today", default=ROOT / "runs/real_study/sweep", type=Path)
    p.add_argument("--out", default=ROOT / "runs/real_study/combined", type=Path)
    p.add_argument("--record", default=Path(__file__).parent, type=Path)
    a = p.parse_args(argv)
    s = combine(a.today, a.previous, a.out, a.record)
    print(f"{s['runs_today']} runs today, {s['runs_reused']} reused; of {s['compared_unchanged_budget']} runs "
          f"with an unchanged budget in both, {s['identical']} identical; left out: {s['runs_left_out'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
