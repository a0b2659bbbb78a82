"""Report from a results.jsonl: tables, CSVs, PNGs, paired differences and honest verdicts."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fusion.data import CLASSES
from fusion.metrics import mean_ci
from fusion.report import load_results, make_report, summarise


def _row(fraction, arm, seed, f1, mode="sum"):
    rng = np.random.default_rng(seed)
    cm = np.diag([10, 10, 10, 10, 10]) + rng.integers(0, 2, (5, 5))
    return {"run": f"f{fraction}_{arm}_{mode}_s{seed}", "status": "ok", "fraction": fraction, "arm": arm,
            "mode": mode, "seed": seed, "accuracy": f1 + 0.01, "macro_f1": f1, "confusion": cm.tolist(),
            "per_class": {c: {"recall": f1, "precision": f1, "f1": f1, "support": 10} for c in CLASSES}}


def _write(tmp_path, rows):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def _sweep(seeds, gain_pre, gain_random):
    rows = []
    for f in (0.01, 1.0):
        for s in seeds:
            base = 0.6 + 0.3 * f + 0.01 * s
            noise = 0.002 * ((s * 7) % 3 - 1)
            rows += [_row(f, "scratch", s, base), _row(f, "random", s, base + gain_random + noise),
                     _row(f, "prcc+cam16", s, base + gain_pre - noise)]
    return rows


def test_report_files_and_table(tmp_path):
    out = _write(tmp_path, _sweep(range(5), 0.05, 0.0) + [{"run": "bad", "status": "failed", "arm": "prcc",
                                                           "mode": "sum", "fraction": 1.0, "seed": 0,
                                                           "reason": "non-finite loss"}])
    path = make_report(out)
    text = path.read_text()
    for name in ("results.csv", "per_class.csv", "paired.csv", "metric_vs_fraction.png",
                 "confusion_0.01_scratch.png", "confusion_1_prcc+cam16.png"):
        assert (out / name).is_file(), name
    assert "| 1% |" in text and "| 100% |" in text and "±" in text
    assert "helped beyond the control" in text and "Failed runs" in text and "non-finite" in text
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["arm"] for r in rows} == {"scratch", "random", "prcc+cam16"} and rows[0]["n_seeds"] == "5"
    paired = list(csv.DictReader(open(out / "paired.csv")))
    assert {(p["arm"], p["versus"]) for p in paired} == {("random", "scratch"), ("prcc+cam16", "scratch"),
                                                          ("prcc+cam16", "random")}


@pytest.mark.parametrize("gain_pre,gain_random,word", [(0.05, 0.0, "helped beyond the control"),
                                                       (0.05, 0.05, "no measurable benefit"),
                                                       (-0.05, 0.0, "hurt")])
def test_verdicts(tmp_path, gain_pre, gain_random, word):
    s = summarise(load_results(_write(tmp_path, _sweep(range(5), gain_pre, gain_random))))
    for f in s.fractions:
        assert f"prcc+cam16 {word}" in s.verdicts[f]
    if word != "helped beyond the control":
        assert "did not measurably help" in s.verdicts[1.0]


def test_few_seeds_are_called_undetermined(tmp_path):
    out = _write(tmp_path, _sweep(range(2), 0.05, 0.0))
    s = summarise(load_results(out))
    assert "undetermined (2 seeds" in s.verdicts[0.01]
    assert "Caution" in make_report(out).read_text()


def test_missing_results_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="results.jsonl does not exist"):
        load_results(tmp_path)


def test_paired_ci_is_a_t_interval_so_three_same_sign_pairs_are_not_enough(tmp_path):
    """Three differences of one sign but wide spread (-0.001, -0.006, -0.011): a percentile bootstrap of 3
    values would exclude 0 and call it "hurt"; the paired t interval includes 0."""
    rows = []
    for s, d in enumerate((-0.001, -0.006, -0.011)):
        rows += [_row(0.01, "scratch", s, 0.90 + 0.01 * s), _row(0.01, "random", s, 0.90 + 0.01 * s),
                 _row(0.01, "prcc", s, 0.90 + 0.01 * s + d)]
    s = summarise(load_results(_write(tmp_path, rows)))
    p = next(p for p in s.paired if p["arm"] == "prcc" and p["versus"] == "scratch")
    mean, hw = mean_ci([-0.001, -0.006, -0.011])
    assert p["macro_f1_diff"] == pytest.approx(-0.006) and p["n_pairs"] == 3
    assert (p["macro_f1_lo"], p["macro_f1_hi"]) == pytest.approx((mean - hw, mean + hw))
    assert p["macro_f1_lo"] < 0 < p["macro_f1_hi"] and p["macro_f1_p"] > 0.05
    assert p["macro_f1_p"] <= p["macro_f1_p_holm"] <= 1  # adjusted over the sweep's 3 comparisons
    assert "prcc no measurable benefit" in s.verdicts[0.01]


def test_forest_plot_draws_paired_rows_as_read_from_paired_csv(tmp_path):
    """Strings as csv.DictReader gives them, one comparison without a CI (2 pairs): one PNG, not empty."""
    from fusion.report_plots import forest_plot

    rows = [{"fraction": f, "arm": arm, "versus": versus, "n_pairs": "3", "macro_f1_diff": d,
             "macro_f1_lo": lo, "macro_f1_hi": hi}
            for f in ("0.01", "1.0")
            for arm, versus, d, lo, hi in (("prcc (sum)", "scratch", "-0.010", "-0.018", "-0.002"),
                                           ("prcc (sum)", "random (sum)", "0.002", "-0.004", "0.008"),
                                           ("random (sum)", "scratch", "0.001", "nan", "nan"))]
    path = forest_plot(rows, tmp_path / "forest.png")
    assert path == str(tmp_path / "forest.png") and (tmp_path / "forest.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no paired rows"):
        forest_plot([], tmp_path / "empty.png")
