"""Any class set: a 3-class and a 2-class task run end to end (split, sweep, report) with the same code."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from fusion_fakes import nest, tiny_checkpoints
from PIL import Image

from fusion.report import make_report
from fusion.splits import load_split
from fusion.sweep import SweepConfig, run_sweep
from pretrain.utils import read_jsonl


def _folder(root, classes, n=10, size=16, seed=0):
    """One class folder per name; each class a disc of its own colour on a noisy field."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for k, c in enumerate(classes):
        colour = np.array([200 if k % 2 else 40, 40 + 80 * k, 200 - 60 * k]) % 256
        (root / c).mkdir(parents=True)
        for i in range(n):
            im = rng.integers(90, 160, (size, size, 3)).astype(float)
            disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.3) ** 2
            im[disc] = 0.7 * colour + 0.3 * im[disc]
            Image.fromarray(im.clip(0, 255).astype(np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("classes, spec", [
    (("Blast", "lymphocyte", "other"), []),  # classes from the folder names
    (("ALL", "hem"), {"leukaemic": ["ALL"], "normal": ["hem"]}),  # declared, with aliases
])
def test_sweep_and_report_on_any_class_set(tmp_path, classes, spec):
    data = _folder(tmp_path / "cells", classes)
    ck = tiny_checkpoints(tmp_path / "ck")
    cfg = SweepConfig(**nest(data=str(data), classes=spec, cache_dir="", val=0.2, test=0.2, image_size=16,
                      cnn_channels=[8], epochs=2, min_steps=4, max_steps=0, evals=1, batch_size=8,
                      prcc_checkpoint=str(ck["prcc"]), cam16_checkpoint=str(ck["cam16"]),
                      fractions=[0.5, 1.0], arms=["scratch", "prcc"], twins=True, seeds=[0, 1, 2],
                      out=str(tmp_path / "sweep"), progress=False, device="cpu", curves=False))
    rows = read_jsonl(run_sweep(cfg))
    expected = ["lymphocyte", "blast", "other"] if not spec else ["leukaemic", "normal"]  # WBC names first
    assert len(rows) == 2 * 3 * 3 and all(r["status"] == "ok" for r in rows)  # scratch, prcc, random:prcc
    assert {r["arm"] for r in rows} == {"scratch", "prcc", "random:prcc"}
    assert all(r["classes"] == expected and set(r["per_class"]) == set(expected) for r in rows)
    assert all(len(r["confusion"]) == len(expected) for r in rows)
    assert load_split(tmp_path / "sweep" / "split.json")["classes"] == expected
    report = make_report(tmp_path / "sweep").read_text()
    assert "| fraction | arm | " + " | ".join(expected) + " |" in report
    probes = read_jsonl(tmp_path / "sweep" / "probes.jsonl")  # prcc once, its twin per seed; 2 fractions, 2 probes
    assert len(probes) == (1 + 3) * 2 * 2 and all(set(p["per_class"]) == set(expected) for p in probes)
    assert "## Frozen probes" in report and "| linear:prcc |" in report and "| knn:random:prcc |" in report
    rerun = run_sweep(cfg)  # resumed: nothing trained or probed again
    assert len(read_jsonl(rerun)) == len(rows) and len(read_jsonl(tmp_path / "sweep" / "probes.jsonl")) == 16
    with open(tmp_path / "sweep" / "paired.csv") as f:
        paired = list(csv.DictReader(f))
    assert {(p["arm"], p["versus"]) for p in paired} == {("prcc", "scratch"), ("prcc", "random:prcc"),
                                                         ("random:prcc", "scratch")}
    header = (tmp_path / "sweep" / "per_class.csv").read_text().splitlines()[0]
    assert header == "fraction,arm,n_seeds," + ",".join(f"{c}_accuracy" for c in expected)
