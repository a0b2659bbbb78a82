"""Ensembles of finished runs: the mean of their test-set class probabilities.

Every tested run writes `test_probs.npz` (image ids, labels, softmax probabilities, class names), so an
ensemble costs no forward pass: the seeds of one arm, or runs of different architectures, are averaged
on the images they were all tested on (the same split), and scored like a run.

    python scripts/ensemble.py --runs runs/architectures/runs/f1.0_*_s0 --out runs/ens_f1.0_s0

The sweep report adds a seed ensemble per cell (`ensemble_table`).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.utils import atomic_write_json

from .metrics import classification_metrics

PROBS = "test_probs.npz"


@dataclass
class EnsembleConfig:
    """`scripts/ensemble.py`: average the test probabilities of finished run folders."""

    runs: list[str] = field(default_factory=list, metadata={"help": "run folders or glob patterns (2 or more runs)"})
    out: str = field(default="", metadata={"help": "folder for ensemble.json ('' = print only)"})


def load_probs(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / PROBS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a finished, tested run (runs tested "
                                f"before ensembles existed have no {PROBS}; retrain them with --overwrite true)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def ensemble(run_dirs: list[str | os.PathLike]) -> dict:
    """Metrics of the mean probabilities of `run_dirs` and of each member.

    Raises:
        ValueError: fewer than two runs, or runs tested on other images or with other classes.
    """
    if len(run_dirs) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, got {len(run_dirs)}: {[str(r) for r in run_dirs]}")
    members = [load_probs(r) for r in run_dirs]
    ref = members[0]
    for r, m in zip(run_dirs[1:], members[1:], strict=True):
        if not np.array_equal(m["ids"], ref["ids"]) or list(m["classes"]) != list(ref["classes"]):
            raise ValueError(f"{r} was tested on other images or classes than {run_dirs[0]}; an ensemble needs "
                             f"runs of the same split and class set")
    classes = [str(c) for c in ref["classes"]]
    probs = np.mean([m["probs"] for m in members], axis=0)
    m = classification_metrics(ref["labels"], probs.argmax(1), classes)
    each = [classification_metrics(x["labels"], x["probs"].argmax(1), classes) for x in members]
    return {"runs": [str(r) for r in run_dirs], "n_test": int(len(ref["ids"])), "accuracy": m["accuracy"],
            "macro_f1": m["macro_f1"], "balanced_accuracy": m.get("balanced_accuracy"),
            "member_macro_f1": [e["macro_f1"] for e in each],
            "member_mean_macro_f1": float(np.mean([e["macro_f1"] for e in each])),
            "per_class": m["per_class"]}


def expand(patterns: list[str]) -> list[str]:
    """Run folders from paths and glob patterns, in order, without repeats."""
    out: list[str] = []
    for p in patterns:
        hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
        if not hits:
            raise FileNotFoundError(f"no run folder matches {p!r}")
        out += [h for h in hits if h not in out]
    return out


def run_ensemble(cfg: EnsembleConfig) -> dict:
    r = ensemble(expand(cfg.runs))
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        atomic_write_json(Path(cfg.out) / "ensemble.json", r)
    print(f"ensemble of {len(r['runs'])} runs on {r['n_test']} test images: macro-F1 {r['macro_f1']:.4f}, "
          f"accuracy {r['accuracy']:.4f} (members: macro-F1 {r['member_mean_macro_f1']:.4f} on average, "
          f"{min(r['member_macro_f1']):.4f}-{max(r['member_macro_f1']):.4f})")
    return r


def ensemble_table(sweep_dir: Path, cells: dict, labels: list[str], fractions: list[float], fmt_pct) -> list[str]:
    """Report lines: per (fraction, arm), the seed ensemble's macro-F1 beside the members' mean."""
    lines = []
    for f in fractions:
        for lab in labels:
            runs = list(cells.get((f, lab), {}).values())
            dirs = [sweep_dir / "runs" / r["run"] for r in runs]
            if len(dirs) < 2 or not all((d / PROBS).is_file() for d in dirs):
                continue
            try:
                e = ensemble(dirs)
            except ValueError:
                continue  # k-fold cells are tested on different images: no ensemble
            lines.append(f"| {fmt_pct(f)} | {lab} | {len(dirs)} | {e['member_mean_macro_f1']:.3f} | "
                         f"{e['macro_f1']:.3f} | {e['macro_f1'] - e['member_mean_macro_f1']:+.3f} |")
    if not lines:
        return []
    return ["## Seed ensembles (mean probabilities of a cell's runs)", "",
            "| fraction | arm | runs | mean of runs, macro-F1 | ensemble macro-F1 | gain |", "|---|---|---|---|---|---|",
            *lines, ""]
