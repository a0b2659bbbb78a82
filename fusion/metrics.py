"""Pure metric functions on arrays (scikit-learn underneath) and confidence intervals for the report."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

from .data import CLASSES


def classification_metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
                           classes: Sequence[str] = CLASSES) -> dict:
    """Accuracy, balanced accuracy, macro/weighted F1, per-class recall/precision/F1, confusion matrix.

    Args:
        y_true, y_pred: (N,) integer class indices into `classes`.
    Returns:
        {"n", "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1",
         "per_class": {cls: {"recall", "precision", "f1", "support"}},
         "confusion": [[int]] (rows: true class, columns: predicted class, in `classes` order)}.
    Undefined ratios (a class never predicted, or absent from `y_true`) count as 0 (`zero_division=0`);
    macro F1 averages over all `classes`. Balanced accuracy is the mean recall over the classes
    present in `y_true` (as scikit-learn's `balanced_accuracy_score`, without its warning).
    """
    yt = np.asarray(y_true).reshape(-1)
    yp = np.asarray(y_pred).reshape(-1)
    k = len(classes)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true has {yt.size} labels but y_pred has {yp.size}; they must match")
    if yt.size == 0:
        raise ValueError("no labels to score: y_true and y_pred are empty")
    for name, y in (("y_true", yt), ("y_pred", yp)):
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{name} must hold integer class indices, got dtype {y.dtype} "
                             f"(use logits.argmax(1) for predictions)")
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"{name} holds class index {int(y.min() if y.min() < 0 else y.max())}, outside "
                             f"0..{k - 1} for classes {list(classes)}")
    labels = list(range(k))
    prec, rec, f1, support = precision_recall_fscore_support(yt, yp, labels=labels, zero_division=0)
    present = support > 0
    return {
        "n": int(yt.size),
        "accuracy": float(accuracy_score(yt, yp)),
        "balanced_accuracy": float(rec[present].mean()),
        "macro_f1": float(f1_score(yt, yp, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(yt, yp, labels=labels, average="weighted", zero_division=0)),
        "per_class": {c: {"recall": float(rec[i]), "precision": float(prec[i]), "f1": float(f1[i]),
                          "support": int(support[i])} for i, c in enumerate(classes)},
        "confusion": confusion_matrix(yt, yp, labels=labels).astype(int).tolist(),
    }


def _values(values: Sequence[float] | np.ndarray) -> np.ndarray:
    v = np.asarray(values, dtype=float).reshape(-1)
    if v.size == 0:
        raise ValueError("no values to summarise (empty sequence)")
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite, got {v[~np.isfinite(v)][:3].tolist()} among them")
    return v


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half width) of the Student-t `confidence` interval: mean ± t * s / sqrt(n).

    With one value the spread is unknown, so the half width is NaN (print it as "n=1", not as ± 0).
    """
    v = _values(values)
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan
    sem = float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, float(stats.t.ppf(0.5 + confidence / 2, df=v.size - 1) * sem)


def paired_t_p(diffs: Sequence[float] | np.ndarray) -> float:
    """Two-sided p-value of the paired t-test that the mean of the per-seed differences is 0 (the test
    behind the paired t interval). NaN for fewer than 2 differences; with no spread, 0 or 1."""
    v = _values(diffs)
    if v.size < 2:
        return math.nan
    if float(v.std(ddof=1)) == 0.0:
        return 0.0 if float(v.mean()) != 0.0 else 1.0
    return float(stats.ttest_1samp(v, 0.0).pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (family-wise error over all the finite ones; NaN stays NaN):
    the k-th smallest of m is multiplied by m - k + 1, then made monotone and capped at 1."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * float(p[i])))
        out[i] = running
    return out.tolist()
