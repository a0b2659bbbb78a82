"""Frozen-feature probes on synthetic Gaussian blobs: separable -> ~1, random labels -> chance, C chosen
on validation only, determinism, single-class and missing-class training sets, run_probes rows, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusion import probes
from fusion.probes import DEFAULT_CS, PROBES, knn_probe, linear_probe, run_probes

C2, C3, C5 = ("a", "b"), ("a", "b", "c"), ("a", "b", "c", "d", "e")


def blobs(n: int, k: int, d: int = 16, sep: float = 8.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, d) Gaussian blobs around k well-separated means, labels (n,) cycling 0..k-1."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((k, d)) * sep
    y = np.arange(n) % k
    return means[y] + rng.standard_normal((n, d)), y


def splits(x: np.ndarray, y: np.ndarray) -> tuple:
    """60/20/20 consecutive split (labels cycle, so every split holds every class)."""
    a, b = int(0.6 * len(y)), int(0.8 * len(y))
    return x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:]


@pytest.mark.parametrize("classes", [C2, C3])
def test_separable_blobs_are_solved(classes):
    x, y = blobs(300, len(classes))
    lin = linear_probe(*splits(x, y), classes)
    tr_x, tr_y, _, _, te_x, te_y = splits(x, y)
    knn = knn_probe(tr_x, tr_y, te_x, te_y, classes)
    assert lin["macro_f1"] > 0.99 and lin["val_macro_f1"] > 0.99 and knn["macro_f1"] > 0.99
    assert lin["C"] in DEFAULT_CS and lin["converged"] and lin["n_train"] == 180
    assert knn["k"] == 20 and knn["n_train"] == 180
    assert np.array(lin["confusion"]).shape == (len(classes), len(classes))
    assert list(lin["per_class"]) == list(classes) == lin["classes"]


def test_random_labels_are_near_chance():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((1500, 32)), rng.integers(0, 3, 1500)
    lin = linear_probe(*splits(x, y), C3)
    knn = knn_probe(x[:900], y[:900], x[1200:], y[1200:], C3)
    for r in (lin, knn):
        assert abs(r["accuracy"] - 1 / 3) < 0.1 and r["macro_f1"] < 0.45


def _nuisance(n: int, coupled: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Feature 0 = class signal + nuisance; feature 1 = the same nuisance (coupled) or unrelated noise.

    Weak regularisation learns w ~ (1, -1), cancelling the nuisance: right when coupled, wrong when not.
    Strong regularisation shrinks towards the class-mean difference w ~ (1, 0): the reverse.
    """
    y = np.arange(n) % 2
    nz = rng.standard_normal(n)
    other = nz if coupled else 2 * rng.standard_normal(n)
    return np.stack([(2 * y - 1) + 0.3 * rng.standard_normal(n) + nz, other], 1), y


def test_c_is_chosen_on_validation_not_test():
    rng = np.random.default_rng(0)
    train, coupled, uncoupled = (_nuisance(200, c, rng) for c in (True, True, False))
    weak = linear_probe(*train, *coupled, *uncoupled, C2)  # validation rewards weak regularisation
    strong = linear_probe(*train, *uncoupled, *coupled, C2)  # and here strong
    assert weak["C"] >= 0.1 and strong["C"] == 1e-3
    for r in (weak, strong):  # the chosen C is the smallest of those with the best validation F1
        best = max(f for _, f in r["val_curve"])
        assert r["C"] == min(c for c, f in r["val_curve"] if f == best) and r["val_macro_f1"] == best
    # Same train set, so `strong`'s validation curve is `weak`'s test score per C: the C that test
    # would have preferred was not taken.
    test_by_c = dict(map(tuple, strong["val_curve"]))
    assert weak["macro_f1"] == pytest.approx(test_by_c[weak["C"]])
    assert weak["macro_f1"] < max(test_by_c.values()) - 0.05


def test_selection_only_sees_validation(monkeypatch):
    x, y = blobs(300, 3, sep=1.0)
    tr_x, tr_y, va_x, va_y, te_x, te_y = x[:150], y[:150], x[150:200], y[150:200], x[200:], y[200:]
    seen = []
    real = probes.select_c

    def spy(train, val, Cs, n_classes, seed=0):
        seen.append((train, val))
        return real(train, val, Cs, n_classes, seed)

    monkeypatch.setattr(probes, "select_c", spy)
    r = linear_probe(tr_x, tr_y, va_x, va_y, te_x, te_y, C3)
    (train, val), = seen
    assert np.array_equal(train[1], tr_y) and np.array_equal(val[1], va_y)
    assert len(train[0]) == 150 and len(val[0]) == 50  # no test rows (100 of them) reach the selection
    # Test labels change the reported test score only, never the choice.
    flipped = linear_probe(tr_x, tr_y, va_x, va_y, te_x, (te_y + 1) % 3, C3)
    assert (flipped["C"], flipped["val_macro_f1"], flipped["val_curve"]) == (r["C"], r["val_macro_f1"],
                                                                            r["val_curve"])
    assert flipped["macro_f1"] != r["macro_f1"]


def test_deterministic_and_torch_input_matches_numpy():
    x, y = blobs(400, 3, sep=0.7, seed=3)
    a = linear_probe(*splits(x, y), C3)
    assert linear_probe(*splits(x, y), C3) == a == linear_probe(*splits(torch.from_numpy(x), y), C3)
    tr_x, tr_y, _, _, te_x, te_y = splits(x, y)
    assert knn_probe(tr_x, tr_y, te_x, te_y, C3) == knn_probe(torch.from_numpy(tr_x), tr_y, te_x, te_y, C3)


def test_k_is_capped_by_n_train():
    x, y = blobs(60, 3)
    r = knn_probe(x[:6], y[:6], x[30:], y[30:], C3, k=20)
    assert r["k"] == 6 and r["n_train"] == 6
    assert knn_probe(x[:6], y[:6], x[30:], y[30:], C3, k=1)["macro_f1"] == 1.0


def test_missing_train_class_is_never_predicted():
    x, y = blobs(300, 3)
    keep = np.flatnonzero(y[:180] != 2)
    tr_x, tr_y, va_x, va_y, te_x, te_y = splits(x, y)
    lin = linear_probe(tr_x[keep], tr_y[keep], va_x, va_y, te_x, te_y, C3)
    knn = knn_probe(tr_x[keep], tr_y[keep], te_x, te_y, C3)
    for r in (lin, knn):
        assert r["n_train_classes"] == 2 and r["per_class"]["c"]["recall"] == 0.0
        assert sum(row[2] for row in r["confusion"]) == 0  # column "c": never predicted
        assert r["per_class"]["a"]["recall"] == r["per_class"]["b"]["recall"] == 1.0


def test_single_class_train_gives_a_constant_predictor():
    x, y = blobs(300, 3)
    tr_x, tr_y, va_x, va_y, te_x, te_y = splits(x, y)
    one = tr_y == 1
    lin = linear_probe(tr_x[one], tr_y[one], va_x, va_y, te_x, te_y, C3)
    knn = knn_probe(tr_x[one], tr_y[one], te_x, te_y, C3)
    for r in (lin, knn):
        assert r["n_train_classes"] == 1 and r["accuracy"] == pytest.approx(1 / 3)
        assert [row[1] for row in r["confusion"]] == [20, 20, 20]  # everything predicted "b"
    assert lin["C"] is None and lin["val_curve"] == []


def test_run_probes_rows():
    x, y = blobs(200, 3, d=8)
    rng = np.random.default_rng(0)
    feats = {"cnn": torch.from_numpy(x).float(), "noise": rng.standard_normal((200, 5))}
    rows = {"train": np.arange(0, 120), "val": np.arange(120, 160), "test": np.arange(160, 200)}
    out = run_probes(feats, y, rows, C3, options={"knn": {"k": 5}})
    assert [(r["probe"], r["source"]) for r in out] == [("linear", "cnn"), ("linear", "noise"),
                                                         ("knn", "cnn"), ("knn", "noise")]
    common = {"probe", "source", "accuracy", "macro_f1", "balanced_accuracy", "per_class", "confusion",
              "classes", "n_train", "seconds"}
    for r in out:
        assert common <= set(r) and r["n_train"] == 120 and r["seconds"] >= 0
        assert ({"val_macro_f1", "C"} <= set(r)) if r["probe"] == "linear" else (r["k"] == 5)
    assert out[0]["macro_f1"] > 0.99 and out[1]["macro_f1"] < 0.8
    again = run_probes(feats, y, rows, C3, probes=("knn",), options={"knn": {"k": 5}})
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in out[2:]]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in again] == strip
    assert set(PROBES) == {"linear", "knn"}


def _one_line_error(fn, *args, match: str, **kwargs) -> None:
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)


def test_bad_input():
    x, y = blobs(100, 3)
    tr_x, tr_y, va_x, va_y, te_x, te_y = splits(x, y)
    _one_line_error(linear_probe, tr_x, tr_y[:-1], va_x, va_y, te_x, te_y, C3, match="train_x has 60 rows")
    _one_line_error(knn_probe, tr_x[:0], tr_y[:0], te_x, te_y, C3, match="train split is empty")
    _one_line_error(linear_probe, tr_x, tr_y, va_x[:0], va_y[:0], te_x, te_y, C3, match="val split is empty")
    _one_line_error(knn_probe, tr_x, tr_y, te_x[:, :3], te_y, C3, match="3 feature dims")
    _one_line_error(knn_probe, tr_x, tr_y + 1, te_x, te_y, C3, match="class index 3")
    _one_line_error(knn_probe, tr_x, tr_y, te_x, te_y, C3, k=0, match="positive integer")
    _one_line_error(linear_probe, *splits(x, y), C3, Cs=(), match="Cs must be")
    rows = {"train": np.arange(60), "val": np.arange(60, 80), "test": np.arange(80, 100)}
    _one_line_error(run_probes, {"a": x}, y, rows, C3, probes=("linear", "svm"),
                    match=r"unknown probe\(s\) \['svm'\]; known probes: \['knn', 'linear'\]")
    _one_line_error(run_probes, {"a": x[:50]}, y, rows, C3, match="features\\['a'\\] has 50 rows")
    _one_line_error(run_probes, {"a": x}, y, {"train": rows["train"]}, C3, match="rows lacks")
    _one_line_error(run_probes, {"a": x}, y, {**rows, "test": np.array([100])}, C3, match="row 100")
    _one_line_error(run_probes, {"a": x}, y, {**rows, "train": rows["train"][:0]}, C3,
                    match="train split is empty")
    _one_line_error(run_probes, {"a": x}, y, rows, C3, probes=("knn",), options={"linear": {}},
                    match="not run")
    nan = x.copy()
    nan[0, 0] = np.nan
    _one_line_error(run_probes, {"a": nan}, y, rows, C3, match="non-finite")
