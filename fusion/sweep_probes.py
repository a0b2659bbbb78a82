"""Frozen probes of a sweep: a linear probe and k-NN per source and label fraction, on the same cached
features the fused arms use, so a report says at once how much each source separates the classes with
no CNN at all.

Rows go to `<sweep>/probes.jsonl`, one per (probe, source, weights, fraction): the pretrained
weights once (probes are deterministic), and each random twin once per sweep seed (its weights depend
on the seed), the twin rows being the random-feature baseline. A restarted sweep skips rows it has.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pretrain.utils import append_jsonl, get_device, read_jsonl

from .encoders import FeatureCache, images_key, images_to_tensor
from .probes import PROBES, run_probes
from .sources import load_source, twin_seed
from .splits import split_indices

PROBES_FILE = "probes.jsonl"


def probe_targets(cfg) -> list[tuple[str, bool, int]]:
    """(source, twin?, seed) to probe: every source the grid's arms use, pretrained once (seed 0), and
    its twin per seed when the grid has a twin using it."""
    reg = cfg.registry()
    arms = [reg.arm(a) for a in cfg.arms]
    pretrained = sorted({s for a in arms if not a.random for s in a.sources})
    twins = sorted({s for a in arms if a.random for s in a.sources})
    return [(s, False, 0) for s in pretrained] + [(s, True, int(seed)) for s in twins for seed in cfg.seeds]


def _key(row: dict) -> tuple:
    return row["probe"], row["source"], bool(row["twin"]), int(row["seed"]), float(row["fraction"])


def run_sweep_probes(cfg, out: Path, features: FeatureCache, load: Callable[[], tuple]) -> Path | None:
    """Append the probe rows the sweep folder lacks; return the file (None when no probe is asked).
    `load()` gives (data, split), called only when there is something to probe."""
    if not cfg.probes:
        return None
    unknown = [p for p in cfg.probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; valid probes: {sorted(PROBES)}")
    path = out / PROBES_FILE
    done = {_key(r) for r in read_jsonl(path)}
    targets = probe_targets(cfg)
    todo = [(t, f) for t in targets for f in cfg.fractions
            if any((p, t[0], t[1], t[2], float(f)) not in done for p in cfg.probes)]
    if not todo:
        return path
    data, split = load()
    reg, device = cfg.registry(), get_device(cfg.runtime.device)
    images = images_to_tensor(data.images)
    key = images_key(data.hashes, data.image_size)
    labels = np.asarray(data.labels)
    rows = {p: split_indices(split, data, p) for p in ("val", "test")}
    t0 = time.perf_counter()
    loaded: dict[tuple, dict] = {}  # one encoder load and feature lookup per target, not per fraction
    for (source, twin, seed), f in todo:
        if (source, twin, seed) not in loaded:
            enc = load_source(reg.sources[source], random_init=twin, seed=twin_seed(source, seed) if twin else None)
            loaded[(source, twin, seed)] = features.get({source: enc}, images, key, device, seed=seed,
                                                        batch_size=cfg.runtime.eval_batch_size,
                                                        encoder_resize=cfg.model.encoder_resize)
        feats = loaded[(source, twin, seed)]
        part = {**rows, "train": split_indices(split, data, "train", f)}
        try:
            with torch.inference_mode():
                results = run_probes(feats, labels, part, data.classes, probes=tuple(cfg.probes), seed=seed)
        except ValueError as e:  # e.g. an encoder giving NaN features: the probe fails, the sweep goes on
            print(f"probes of {source} at fraction {f}: FAILED ({e})")
            results = [{"probe": p, "source": source, "status": "failed", "reason": str(e)} for p in cfg.probes]
        for r in results:
            row = {**r, "twin": twin, "seed": seed, "fraction": float(f),
                   "label": f"{r['probe']}:{'random:' if twin else ''}{source}"}
            if _key(row) not in done:
                append_jsonl(path, row)
    print(f"probes: {len(todo)} (source, fraction) pairs in {time.perf_counter() - t0:.1f} s -> {path}")
    return path


def probe_table(run_dir: Path, fmt_cell, fmt_pct) -> list[str]:
    """Markdown table of probe test macro-F1: rows probe:source (twins: mean ± CI over seeds), columns
    fractions. Empty when the sweep ran no probes."""
    rows = [r for r in read_jsonl(Path(run_dir) / PROBES_FILE) if r.get("status", "ok") == "ok"]
    if not rows:
        return []
    fractions = sorted({float(r["fraction"]) for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in sorted(rows, key=lambda r: (r["twin"], r["probe"], r["source"]))))
    cells: dict[tuple[str, float], list[float]] = {}
    for r in rows:
        cells.setdefault((r["label"], float(r["fraction"])), []).append(r["macro_f1"])
    lines = ["## Frozen probes (test macro-F1; no CNN)", "",
             "A logistic-regression probe (C chosen on validation) and a k-NN probe (k = 20, cosine) on each "
             "source's frozen features of the same training images. `random:` rows are the random twin's "
             "features (mean ± 95% CI over seeds): how much the architecture alone separates the classes.", "",
             "| probe:source | " + " | ".join(fmt_pct(f) for f in fractions) + " |",
             "|---|" + "---|" * len(fractions)]
    for lab in labels:
        lines.append(f"| {lab} | " + " | ".join(fmt_cell(cells.get((lab, f), [])) for f in fractions) + " |")
    return lines + [""]
