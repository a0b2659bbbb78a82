"""Frozen-feature probes: how much a frozen encoder's features alone say about the WBC class.

Two probes, as the patch evaluations of UNI and eva do them, run on cached features
(`fusion.encoders.FeatureCache` / `compute_features`), never on images:

- `linear_probe`: multinomial logistic regression (L-BFGS) on features standardised with the TRAIN
  mean and std; the inverse regularisation C is chosen on VALIDATION macro-F1 (ties -> smaller C) and
  the model fitted on train with that C is scored once on test. No refit on train + val.
- `knn_probe`: k-NN (k = min(20, n_train), uniform votes) by cosine similarity of train-centred,
  L2-normalised features. It has no hyper-parameter to choose, so it does not see validation.

`run_probes` runs the probes named in `PROBES` for every source of a feature dict on one split
(the train rows of one label fraction) and returns one flat result row per (probe, source).

Labels are integer indices into `classes`. A class missing from the training rows is never
predicted (both probes only predict labels they were trained on) but still counts in macro F1.
A training set of a single class gives a constant predictor of that class (logistic regression has
nothing to separate; k-NN votes are unanimous), with `n_train_classes == 1` and, for the linear
probe, `C = None`, so a sweep over tiny label fractions does not stop; filter such rows by
`n_train_classes` if they should not count.

Everything is deterministic: L-BFGS and brute-force k-NN have no randomness (the seed is passed on
for solvers that would) and float64 is used throughout.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from .metrics import classification_metrics

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MAX_ITER = 1000

Array = np.ndarray | torch.Tensor
Split = tuple[np.ndarray, np.ndarray]  # (x (n, D) float64, y (n,) int64)


def _features(x: Array, name: str) -> np.ndarray:
    """(n, D) float64 array of `x`; a torch tensor is detached and moved to CPU."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (n, D) features, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values (NaN or inf); recompute the features")
    return x


def _split(x: Array, y: Sequence[int] | np.ndarray, name: str, n_classes: int) -> Split:
    """Validated (x (n, D) float64, y (n,) int64) of one split called `name`."""
    x = _features(x, f"{name}_x")
    y = np.asarray(y).reshape(-1)
    if len(x) != len(y):
        raise ValueError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)} labels; they must match")
    if len(y) == 0:
        raise ValueError(f"the {name} split is empty (0 rows); a probe needs at least one {name} example")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name}_y must hold integer class indices, got dtype {y.dtype}")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"{name}_y holds class index {int(y.min() if y.min() < 0 else y.max())}, "
                         f"outside 0..{n_classes - 1} for {n_classes} classes")
    return x, y.astype(np.int64)


def _same_dim(train: Split, *others: tuple[Split, str]) -> None:
    for (x, _), name in others:
        if x.shape[1] != train[0].shape[1]:
            raise ValueError(f"{name}_x has {x.shape[1]} feature dims but train_x has {train[0].shape[1]}")


def _macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


class _Constant:
    """Predicts one class for every row: the probe of a single-class training set."""

    def __init__(self, label: int) -> None:
        self.label = int(label)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.label, dtype=np.int64)


def _fit_logreg(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> tuple[LogisticRegression, bool]:
    """L-BFGS logistic regression (multinomial for > 2 classes) and whether it converged."""
    model = LogisticRegression(C=C, solver="lbfgs", max_iter=MAX_ITER, random_state=seed)
    with warnings.catch_warnings():
        # Recorded as `converged` in the result row instead of a warning per fit in the sweep log.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)
    return model, bool(np.all(model.n_iter_ < MAX_ITER))


def select_c(train: Split, val: Split, Cs: Sequence[float], n_classes: int,
             seed: int = 0) -> tuple[float, LogisticRegression, bool, list[list[float]]]:
    """Choose C on validation macro-F1; the only place a C is chosen, and it never sees test.

    Args:
        train, val: (x (n, D), y (n,)) already standardised with the train statistics.
        Cs: candidate inverse regularisation strengths (> 0).
    Returns:
        (C, model fitted on train with C, converged, [[C, val macro-F1] for every C in ascending order]).
        Ties go to the smaller C (the stronger regularisation).
    """
    best = None
    curve = []
    for C in sorted(float(c) for c in Cs):
        model, converged = _fit_logreg(train[0], train[1], C, seed)
        f1 = _macro_f1(val[1], model.predict(val[0]), n_classes)
        curve.append([C, f1])
        if best is None or f1 > best[0]:
            best = (f1, C, model, converged)
    _, C, model, converged = best
    return C, model, converged, curve


def linear_probe(train_x: Array, train_y: Sequence[int] | np.ndarray, val_x: Array,
                 val_y: Sequence[int] | np.ndarray, test_x: Array, test_y: Sequence[int] | np.ndarray,
                 classes: Sequence[str], Cs: Sequence[float] = DEFAULT_CS, seed: int = 0) -> dict:
    """Logistic-regression probe, C chosen on validation macro-F1, scored on test.

    Args:
        train_x, val_x, test_x: (n_split, D) features (numpy or torch).
        train_y, val_y, test_y: (n_split,) integer indices into `classes`.
        Cs: grid of inverse regularisation strengths, each > 0.
        seed: passed to scikit-learn (L-BFGS itself is deterministic).
    Returns:
        `classification_metrics` of test (accuracy, balanced_accuracy, macro_f1, per_class, confusion, ...)
        plus "classes", "val_macro_f1" (of the chosen C), "C" (None for a single-class train set),
        "val_curve" ([[C, val macro-F1]]), "converged" (L-BFGS within 1,000 iterations),
        "n_train", "n_train_classes".
    """
    k = len(classes)
    train = _split(train_x, train_y, "train", k)
    val = _split(val_x, val_y, "val", k)
    test = _split(test_x, test_y, "test", k)
    _same_dim(train, (val, "val"), (test, "test"))
    Cs = list(Cs)
    if not Cs or any(not np.isfinite(c) or c <= 0 for c in Cs):
        raise ValueError(f"Cs must be a non-empty grid of positive finite numbers, got {Cs}")
    present = np.unique(train[1])
    scaler = StandardScaler().fit(train[0])  # train statistics only: val and test never shape the scale
    tr, va, te = (scaler.transform(s[0]) for s in (train, val, test))
    if len(present) == 1:
        model, C, converged, curve = _Constant(present[0]), None, True, []
    else:
        C, model, converged, curve = select_c((tr, train[1]), (va, val[1]), Cs, k, seed)
    out = classification_metrics(test[1], model.predict(te).astype(np.int64), classes)
    out.update(classes=list(classes), val_macro_f1=_macro_f1(val[1], model.predict(va), k), C=C,
               val_curve=curve, converged=converged, n_train=len(train[1]), n_train_classes=len(present))
    return out


def _centre_normalise(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    x = x - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_probe(train_x: Array, train_y: Sequence[int] | np.ndarray, test_x: Array,
              test_y: Sequence[int] | np.ndarray, classes: Sequence[str], k: int = 20) -> dict:
    """Cosine k-NN probe on train-centred, L2-normalised features, scored on test.

    Euclidean distance between unit vectors ranks neighbours exactly as cosine similarity does.
    Args:
        train_x, test_x: (n_split, D) features (numpy or torch).
        train_y, test_y: (n_split,) integer indices into `classes`.
        k: neighbours (>= 1); capped at n_train. Votes are uniform; a tied vote goes to the lower
            class index (scikit-learn's order).
    Returns:
        `classification_metrics` of test plus "classes", "k" (as used), "n_train", "n_train_classes".
    """
    n_classes = len(classes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    train = _split(train_x, train_y, "train", n_classes)
    test = _split(test_x, test_y, "test", n_classes)
    _same_dim(train, (test, "test"))
    mean = train[0].mean(axis=0)
    k_used = int(min(k, len(train[1])))
    model = KNeighborsClassifier(n_neighbors=k_used, weights="uniform", algorithm="brute", metric="euclidean")
    model.fit(_centre_normalise(train[0], mean), train[1])
    pred = model.predict(_centre_normalise(test[0], mean)).astype(np.int64)
    out = classification_metrics(test[1], pred, classes)
    out.update(classes=list(classes), k=k_used, n_train=len(train[1]),
               n_train_classes=len(np.unique(train[1])))
    return out


def _run_linear(train: Split, val: Split, test: Split, classes: Sequence[str], seed: int, **opts) -> dict:
    return linear_probe(*train, *val, *test, classes, seed=seed, **opts)


def _run_knn(train: Split, val: Split, test: Split, classes: Sequence[str], seed: int, **opts) -> dict:
    return knn_probe(*train, *test, classes, **opts)


# name -> fn(train, val, test, classes, seed, **options) -> result dict; a new probe is one entry.
PROBES: dict[str, Callable[..., dict]] = {"linear": _run_linear, "knn": _run_knn}
SPLITS = ("train", "val", "test")


def _rows(rows: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    missing = [s for s in SPLITS if s not in rows]
    if missing:
        raise ValueError(f"rows lacks split(s) {missing}; it needs integer row indices for {list(SPLITS)}")
    out = {}
    for s in SPLITS:
        r = np.asarray(rows[s]).reshape(-1)
        if r.size and not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"rows['{s}'] must hold integer row indices, got dtype {r.dtype}")
        if r.size and (r.min() < 0 or r.max() >= n):
            raise ValueError(f"rows['{s}'] holds row {int(r.min() if r.min() < 0 else r.max())}, "
                             f"outside 0..{n - 1} of the {n} labelled images")
        out[s] = r.astype(np.int64)
    return out


def run_probes(features: Mapping[str, Array], labels: Sequence[int] | np.ndarray,
               rows: Mapping[str, np.ndarray], classes: Sequence[str],
               probes: Sequence[str] = ("linear", "knn"), seed: int = 0,
               options: Mapping[str, Mapping] | None = None) -> list[dict]:
    """Every probe in `probes` on every source of `features`, on one split.

    Args:
        features: {source: (N, D_source) features of the whole image set} (numpy or torch).
        labels: (N,) integer indices into `classes`.
        rows: {"train", "val", "test": integer row indices into the image set}; "train" holds the
            rows of one label fraction.
        probes: names from `PROBES`, run in this order.
        options: {probe: keyword arguments}, e.g. {"linear": {"Cs": [0.1, 1]}, "knn": {"k": 10}}.
    Returns:
        One row per (probe, source), probes outer, sources in `features` order:
        {"probe", "source", "seconds"} plus the probe's result (accuracy, macro_f1, balanced_accuracy,
        per_class, confusion, classes, n_train, n_train_classes, and "C", "val_macro_f1", "val_curve",
        "converged" for linear, "k" for knn). All but "seconds" are the same for the same inputs.
    """
    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown probe(s) {unknown}; known probes: {sorted(PROBES)}")
    options = dict(options or {})
    stray = [p for p in options if p not in probes]
    if stray:
        raise ValueError(f"options given for probe(s) {stray} that are not run; probes run: {list(probes)}")
    if not features:
        raise ValueError("features is empty; pass {source: (N, D) features}")
    labels = np.asarray(labels).reshape(-1)
    idx = _rows(rows, len(labels))
    data = {}
    for source, x in features.items():
        x = _features(x, f"features['{source}']")
        if len(x) != len(labels):
            raise ValueError(f"features['{source}'] has {len(x)} rows but labels has {len(labels)}; "
                             f"they must describe the same image set")
        data[source] = {s: (x[idx[s]], labels[idx[s]]) for s in SPLITS}
    results = []
    for probe in probes:
        for source, split in data.items():
            t0 = time.perf_counter()
            res = PROBES[probe](split["train"], split["val"], split["test"], classes, seed,
                                **options.get(probe, {}))
            results.append({"probe": probe, "source": source, **res,
                            "seconds": round(time.perf_counter() - t0, 3)})
    return results
