"""Metrics: values against scikit-learn and hand counts, zero-division, bad input, intervals."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score

from fusion.data import CLASSES
from fusion.metrics import classification_metrics, holm, mean_ci, paired_t_p


def test_perfect_predictions():
    y = np.array([0, 1, 2, 3, 4, 4])
    m = classification_metrics(y, y)
    assert m["accuracy"] == m["balanced_accuracy"] == m["macro_f1"] == m["weighted_f1"] == 1.0
    assert m["confusion"] == np.diag([1, 1, 1, 1, 2]).tolist() and m["n"] == 6
    assert list(m["per_class"]) == list(CLASSES)


def test_hand_computed_case():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 3, 4, 4])
    y_pred = np.array([0, 0, 1, 2, 1, 1, 2, 4, 4, 4])
    m = classification_metrics(y_true, y_pred)
    assert m["accuracy"] == pytest.approx(0.7)
    pc = m["per_class"]
    assert pc["basophil"] == pytest.approx({"recall": 0.5, "precision": 1.0, "f1": 2 / 3, "support": 4})
    assert pc["eosinophil"]["precision"] == pytest.approx(2 / 3)
    assert pc["monocyte"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 1}
    assert m["confusion"][0] == [2, 1, 1, 0, 0] and m["confusion"][3] == [0, 0, 0, 0, 1]  # rows = true
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(f1_score(y_true, y_pred, average="weighted"))


def test_random_against_sklearn():
    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 5, 300), rng.integers(0, 5, 300)
    m = classification_metrics(y_true, y_pred)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert np.array(m["confusion"]).sum() == 300


def test_absent_and_never_predicted_classes_without_warnings():
    y_true = np.array([0, 0, 1, 1])  # classes 2-4 absent; class 1 never predicted
    y_pred = np.array([0, 0, 0, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y_true, y_pred)
    assert m["per_class"]["eosinophil"] == {"recall": 0.0, "precision": 0.0, "f1": 0.0, "support": 2}
    assert m["balanced_accuracy"] == pytest.approx(0.5)  # mean recall over the 2 classes present
    assert m["per_class"]["neutrophil"]["support"] == 0


def test_custom_classes():
    m = classification_metrics([0, 1, 1], [0, 1, 0], classes=("normal", "tumor"))
    assert set(m["per_class"]) == {"normal", "tumor"} and np.array(m["confusion"]).shape == (2, 2)


@pytest.mark.parametrize("y_true, y_pred, match", [
    ([0, 1], [0], "must match"),
    ([], [], "empty"),
    ([0, 5], [0, 1], "outside 0..4"),
    ([0, -1], [0, 1], "outside 0..4"),
    ([0.0, 1.0], [0, 1], "integer class indices"),
])
def test_bad_inputs(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(np.asarray(y_true), np.asarray(y_pred))


def test_mean_ci_is_a_t_interval():
    v = [0.70, 0.72, 0.75, 0.71, 0.69]
    mean, half = mean_ci(v)
    lo, hi = stats.t.interval(0.95, df=4, loc=np.mean(v), scale=stats.sem(v))
    assert mean == pytest.approx(np.mean(v)) and half == pytest.approx((hi - lo) / 2)
    m1, h1 = mean_ci([0.9])
    assert m1 == 0.9 and math.isnan(h1)


def test_paired_t_p_matches_the_t_interval():
    from scipy import stats

    d = [-0.001, -0.006, -0.011]
    assert paired_t_p(d) == pytest.approx(stats.ttest_1samp(d, 0.0).pvalue)
    mean, hw = mean_ci(d)
    assert (paired_t_p(d) < 0.05) == (mean + hw < 0 or mean - hw > 0)  # the same test as the interval
    assert paired_t_p([-0.01, -0.012, -0.011]) < 0.05
    assert paired_t_p([0.002, 0.002, 0.002]) == 0.0 and paired_t_p([0.0, 0.0]) == 1.0
    assert math.isnan(paired_t_p([0.01]))


def test_holm_adjusts_in_order_and_keeps_nan():
    # sorted 0.01, 0.02, 0.04 of m=3 -> 0.03, 0.04, 0.04 (monotone); NaN is not counted in m
    assert holm([0.04, 0.01, float("nan"), 0.02]) == pytest.approx([0.04, 0.03, float("nan"), 0.04], nan_ok=True)
    assert holm([0.5, 0.9]) == [1.0, 1.0]
    assert holm([]) == []
