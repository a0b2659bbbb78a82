"""Slide-level train/val/test splits and binary test metrics for Camelyon16 patches.

Neighbouring patches of one slide overlap and share stain, scanner and patient, so a patch-level
split leaks: every part here gets whole slides. `split_by_slide` is deterministic for a seed.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

CLASSES = ("normal", "tumor")  # label 0, label 1
PARTS = ("train", "val", "test")
PCAM_SLIDES = {"val": "pcam-valid", "test": "pcam-test", "train": "pcam-train"}
_MAX_ENUMERATE = 5000  # enumerate every slide assignment up to this many, else sample
_N_SAMPLES = 2000


class LeakySplitWarning(UserWarning):
    """Too few slides to split by slide: the split falls back to patches and leaks."""


def _n_slides(frac: float, n: int) -> int:
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"a val/test fraction must be in [0, 1), got {frac}")
    return max(1, round(frac * n)) if frac > 0 else 0


def _patch_level_split(labels: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified split of patches (per class: shuffle, cut test then val); LEAKS between slides."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {p: [] for p in PARTS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(test * len(idx))) if test > 0 and len(idx) >= 3 else 0
        n_val = max(1, round(val * len(idx))) if val > 0 and len(idx) >= 3 else 0
        out["test"] += idx[:n_test].tolist()
        out["val"] += idx[n_test:n_test + n_val].tolist()
        out["train"] += idx[n_test + n_val:].tolist()
    return {p: np.sort(np.asarray(v, dtype=np.int64)) for p, v in out.items()}


def _score(assign: dict[str, list[str]], counts: dict[str, np.ndarray], targets: dict[str, float],
           total: int) -> tuple[int, float]:
    """(parts holding every class, -distance of patch shares from targets): larger is better."""
    present = np.stack([c > 0 for c in counts.values()]).any(0)
    full, dev = 0, 0.0
    for part, names in assign.items():
        c = sum((counts[s] for s in names), np.zeros_like(present, dtype=np.int64))
        full += int(((c > 0) | ~present).all())
        dev += abs(c.sum() / max(total, 1) - targets[part])
    return full, -dev


def split_by_slide(slide_ids: Sequence[str] | np.ndarray, labels: Sequence[int] | np.ndarray, seed: int = 0,
                   val: float | Sequence[str] = 0.15, test: float | Sequence[str] = 0.15,
                   ) -> dict[str, np.ndarray]:
    """Split patches into train/val/test so that no slide lies in two parts.

    Args:
        slide_ids: (N,) slide of each patch.
        labels: (N,) int class of each patch (0 normal, 1 tumor).
        seed: picks among equally good assignments; the same seed gives the same split.
        val, test: a fraction of the SLIDES (at least one slide when > 0), or explicit slide names.

    Among all assignments with those slide counts, the chosen one keeps every class in every part
    when the slides allow it, then brings each part's share of patches closest to its target.
    PatchCamelyon (slide ids pcam-train/-valid/-test) keeps its official split unless told otherwise.
    With fewer than 3 slides it warns (`LeakySplitWarning`) and falls back to a stratified
    patch-level split, which leaks (test metrics are then optimistic).

    Returns:
        {"train", "val", "test"} -> sorted int64 patch indices.
    """
    slide_ids = np.asarray(slide_ids).astype(str).reshape(-1)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(slide_ids) != len(labels):
        raise ValueError(f"split_by_slide: {len(slide_ids)} slide ids but {len(labels)} labels")
    slides = [str(s) for s in np.unique(slide_ids)]
    given = {p: [str(s) for s in spec] for p, spec in (("val", val), ("test", test))
             if not isinstance(spec, (int, float))}
    fracs = {p: float(spec) for p, spec in (("val", val), ("test", test)) if isinstance(spec, (int, float))}
    for part, names in given.items():
        unknown = sorted(set(names) - set(slides))
        if unknown:
            raise ValueError(f"{part} slides {unknown} are not in the data; known slides: {slides}")
    if len(given) == 2 and set(given["val"]) & set(given["test"]):
        raise ValueError(f"slides {sorted(set(given['val']) & set(given['test']))} are both val and test slides")
    if not given and set(slides) == set(PCAM_SLIDES.values()):
        given = {"val": [PCAM_SLIDES["val"]], "test": [PCAM_SLIDES["test"]]}
        fracs = {}
    if len(slides) < 3 and not given:
        warnings.warn(
            f"only {len(slides)} slide(s) {slides}: cannot give train, val and test whole slides each; "
            f"falling back to a stratified PATCH-level split, which LEAKS (patches of one slide, often "
            f"overlapping neighbours, land in train and test), so test metrics will be optimistic. "
            f"Use data from >= 3 slides for honest numbers.", LeakySplitWarning, stacklevel=2)
        return _patch_level_split(labels, fracs.get("val", 0.0), fracs.get("test", 0.0), seed)

    free = [s for s in slides if s not in itertools.chain(*given.values())]
    need = {p: _n_slides(f, len(slides)) for p, f in fracs.items()}
    if len(free) - sum(need.values()) < 1:
        raise ValueError(f"cannot split {len(slides)} slides {slides} into train/val/test by slide with "
                         f"val={val!r}, test={test!r}: train would get no slide; lower the fractions "
                         f"or name fewer val/test slides")
    n_classes = int(labels.max()) + 1 if len(labels) else 1
    counts = {s: np.bincount(labels[slide_ids == s], minlength=n_classes) for s in slides}
    total = len(labels)
    targets = {"val": fracs.get("val", 0.0), "test": fracs.get("test", 0.0)}
    for p, names in given.items():
        targets[p] = sum(int(counts[s].sum()) for s in names) / max(total, 1)
    targets["train"] = 1.0 - targets["val"] - targets["test"]

    rng = np.random.default_rng(seed)
    order = list(need)  # parts to fill from `free`, e.g. ["val", "test"]
    n_ways = math.prod(math.comb(len(free) - sum(need[q] for q in order[:i]), need[p])
                       for i, p in enumerate(order))
    if n_ways <= _MAX_ENUMERATE:
        candidates = []
        def fill(i: int, left: list[str], acc: dict[str, list[str]]) -> None:
            if i == len(order):
                candidates.append(acc)
                return
            for pick in itertools.combinations(left, need[order[i]]):
                fill(i + 1, [s for s in left if s not in pick], {**acc, order[i]: list(pick)})
        fill(0, free, {})
        candidates = [candidates[k] for k in rng.permutation(len(candidates))]
    else:
        candidates = []
        for _ in range(_N_SAMPLES):
            perm = [free[k] for k in rng.permutation(len(free))]
            acc, at = {}, 0
            for p in order:
                acc[p], at = perm[at:at + need[p]], at + need[p]
            candidates.append(acc)
    best, best_score = None, None
    for cand in candidates:
        assign = {**given, **cand}
        taken = set(itertools.chain(*assign.values()))
        assign["train"] = [s for s in slides if s not in taken]
        score = _score(assign, counts, targets, total)
        if best_score is None or score > best_score:
            best, best_score = assign, score
    assert best is not None
    return {p: np.flatnonzero(np.isin(slide_ids, best.get(p, []))).astype(np.int64) for p in PARTS}


def describe_split(split: dict[str, np.ndarray], slide_ids: Sequence[str] | np.ndarray,
                   labels: Sequence[int] | np.ndarray) -> dict:
    """Slides and class counts per part, and whether any slide lies in two parts (`leaks`)."""
    slide_ids = np.asarray(slide_ids).astype(str)
    labels = np.asarray(labels).astype(np.int64)
    out: dict = {"parts": {}}
    seen: dict[str, str] = {}
    leaks = set()
    for part in PARTS:
        idx = np.asarray(split.get(part, []), dtype=np.int64)
        names = sorted({str(s) for s in slide_ids[idx]})
        for s in names:
            if s in seen:
                leaks.add(s)
            seen[s] = part
        out["parts"][part] = {"slides": names, "patches": int(len(idx)),
                              **{c: int((labels[idx] == k).sum()) for k, c in enumerate(CLASSES)}}
    out["leaks"] = bool(leaks)
    out["slides_in_several_parts"] = sorted(leaks)
    return out


def binary_metrics(y_true: np.ndarray, prob_tumor: np.ndarray, threshold: float = 0.5) -> dict:
    """Test metrics from true labels (N,) in {0, 1} and tumor probabilities (N,).

    Returns accuracy, balanced accuracy, AUC (None with `auc_note` when only one class is present),
    F1 of the tumor class and macro F1, the confusion matrix [[TN, FP], [FN, TP]] (rows = truth),
    per-class accuracy (recall) and counts.
    """
    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    prob = np.asarray(prob_tumor, dtype=np.float64).reshape(-1)
    pred = (prob >= threshold).astype(np.int64)
    cm = confusion_matrix(y_true, pred, labels=[0, 1])
    recall = {c: (float(cm[k, k] / cm[k].sum()) if cm[k].sum() else None) for k, c in enumerate(CLASSES)}
    present = [r for r in recall.values() if r is not None]
    out = {
        "n": int(len(y_true)),
        "accuracy": float((pred == y_true).mean()) if len(y_true) else float("nan"),
        "balanced_accuracy": float(np.mean(present)) if present else float("nan"),
        "auc": None,
        "f1": float(f1_score(y_true, pred, labels=[0, 1], pos_label=1, zero_division=0)),
        "f1_macro": float(f1_score(y_true, pred, labels=[0, 1], average="macro", zero_division=0)),
        "confusion_matrix": cm.tolist(),
        "per_class_accuracy": recall,
        "counts": {c: int((y_true == k).sum()) for k, c in enumerate(CLASSES)},
        "classes": list(CLASSES),
        "threshold": threshold,
    }
    if len(np.unique(y_true)) == 2:
        out["auc"] = float(roc_auc_score(y_true, prob))
    else:
        only = CLASSES[int(y_true[0])] if len(y_true) else "no"
        out["auc_note"] = (f"AUC undefined: the test part holds only {only} patches; "
                           f"F1 of the tumor class is {'0 or undefined' if only == 'normal' else 'meaningful'}")
    return out
