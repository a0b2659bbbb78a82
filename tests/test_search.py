"""Hyperparameter search on validation only (issue 18, item 7): the LR range test, the Optuna search, its
resume, its best config as a sweep, and proofs that the test split is never used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from fusion_fakes import synthetic_wbc

import fusion.train as train_mod
from fusion.search import LRFindConfig, SearchConfig, lr_range_test, parse_space, run_search
from fusion.splits import load_split, split_indices
from fusion.sweep import SweepConfig
from pretrain.config import config_from_dict

FAST = {"epochs": 1, "min_steps": 6, "max_steps": 6, "evals": 3, "batch_size": 16}


def _sweep_yaml(tmp_path, **extra) -> str:
    cfg = {"data": "/synthetic", "cache_dir": "", "image_size": 16, "split": str(tmp_path / "split.json"),
           "val": 0.25, "test": 0.25, "fractions": [1.0], "arms": ["scratch"], "seeds": [0], "probes": [],
           "model": {"cnn_channels": [8]}, "optim": FAST, "runtime": {"device": "cpu", "progress": False},
           "out": str(tmp_path / "sweep"), **extra}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _search(tmp_path, out="search", trials=4, **kw) -> SearchConfig:
    return SearchConfig(sweep=_sweep_yaml(tmp_path), out=str(tmp_path / out), trials=trials, startup_trials=2,
                        space={"optim.lr": [1e-4, 1e-1, "log"], "model.dropout": [0.0, 0.5],
                               "augment.color": {"low": 0.0, "high": 0.3}}, **kw)


def test_search_writes_trials_and_a_best_config_that_a_sweep_uses_and_resumes(tmp_path, capsys):
    data = synthetic_wbc(8, 16)
    s = run_search(_search(tmp_path), data=data)
    assert s["trials"] == 4 and s["complete"] + s["pruned"] == 4 and s["complete"] >= 1
    rows = (tmp_path / "search" / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,val_macro_f1") and len(rows) == 5
    assert (tmp_path / "search" / "search.png").stat().st_size > 0
    best = yaml.safe_load((tmp_path / "search" / "best_sweep.yaml").read_text())
    tuned = config_from_dict(SweepConfig, best)  # the best trial is a sweep config as it is
    assert tuned.optim.lr == pytest.approx(s["best_params"]["optim.lr"]) and tuned.out.endswith("sweep_tuned")
    assert tuned.model.dropout == pytest.approx(s["best_params"]["model.dropout"])
    assert tuned.optim.epochs == FAST["epochs"]  # everything else is the sweep's
    capsys.readouterr()
    again = run_search(_search(tmp_path, trials=5), data=data)  # resumes: one more trial only
    assert "4 trials already finished, 1 to go" in capsys.readouterr().out and again["trials"] == 5


def test_search_never_uses_a_test_image_and_ignores_test_labels(tmp_path, monkeypatch):
    data = synthetic_wbc(8, 16)
    first = run_search(_search(tmp_path, out="a", trials=3, prune=False), data=data)
    test = set(split_indices(load_split(tmp_path / "split.json"), data, "test").tolist())
    seen: list[int] = []
    real_eval, real_step, real_calib = train_mod._eval, train_mod._Feeder.step, train_mod.recalibrate_bn
    monkeypatch.setattr(train_mod, "_eval", lambda m, im, f, rows, *a: (seen.extend(np.asarray(rows).tolist()),
                                                                       real_eval(m, im, f, rows, *a))[1])
    monkeypatch.setattr(train_mod._Feeder, "step", lambda self, m, rows, d: (seen.extend(rows.tolist()),
                                                                            real_step(self, m, rows, d))[1])
    monkeypatch.setattr(train_mod, "recalibrate_bn", lambda c, im, rows, *a: (seen.extend(rows.tolist()),
                                                                             real_calib(c, im, rows, *a))[1])
    scrambled = synthetic_wbc(8, 16)
    rows = np.array(sorted(test))
    scrambled.labels[rows] = (scrambled.labels[rows] + 1 + np.arange(len(rows)) % 4) % 5  # every test label wrong
    second = run_search(_search(tmp_path, out="b", trials=3, prune=False), data=scrambled)
    assert seen and not test & set(seen)  # no test row was trained on, recalibrated on or evaluated
    a = json.loads((tmp_path / "a" / "search.json").read_text())
    assert second["best_params"] == first["best_params"] == a["best_params"]
    assert second["best_val_macro_f1"] == first["best_val_macro_f1"]
    assert (tmp_path / "a" / "trials.csv").read_text() == (tmp_path / "b" / "trials.csv").read_text()


@pytest.mark.parametrize("space, message", [
    ({}, "the search space is empty"),
    ({"optim.lr": [1e-2, 1e-4, "log"]}, r"optim.lr: low 0.01 >= high 0.0001 \(inverted; swap them\)"),
    ({"model.dropout": [0.3, 0.3]}, r"low 0.3 >= high 0.3 \(an empty range\)"),
    ({"optim.lr": {"low": 0, "high": 1, "log": True}}, "a log range needs low > 0"),
    ({"lr": [1e-4, 1e-2]}, r"'lr' is not a tunable field; tunable: augment.color"),
    ({"optim.sampler": [0, 1]}, "the field is str, not a number; use {choices"),
    ({"optim.sampler": {"choices": []}}, "choices is empty"),
])
def test_bad_search_spaces_are_refused_by_name(space, message):
    with pytest.raises(ValueError, match=message):
        parse_space(space)


def test_kfold_sweeps_are_refused_for_search(tmp_path):
    cfg = SearchConfig(sweep=_sweep_yaml(tmp_path, folds=3), out=str(tmp_path / "s"))
    with pytest.raises(ValueError, match="3-fold sweep: every image is a test image in some fold"):
        run_search(cfg, data=synthetic_wbc(8, 16))


def test_lr_range_test_suggests_a_rate_inside_the_range_from_training_images_only(tmp_path, monkeypatch):
    data = synthetic_wbc(8, 16)
    cfg = LRFindConfig(data="/synthetic", cache_dir="", image_size=16, val=0.25, test=0.25, lr_steps=40,
                       lr_start=1e-5, lr_end=10.0, out=str(tmp_path / "lr"), model={"cnn_channels": [8]},
                       runtime={"device": "cpu", "progress": False})
    seen: list[int] = []
    real_step = train_mod._Feeder.step
    monkeypatch.setattr(train_mod._Feeder, "step", lambda self, m, rows, d: (seen.extend(rows.tolist()),
                                                                            real_step(self, m, rows, d))[1])
    r = lr_range_test(cfg, data=data)
    assert 1e-5 <= r["suggested_lr"] <= 10 and 10 < r["steps"] <= 40
    train = set(split_indices(load_split(tmp_path / "lr" / "split.json"), data, "train").tolist())
    assert set(seen) <= train
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 0
    assert len((tmp_path / "lr" / "lr_find.csv").read_text().splitlines()) == r["steps"] + 1
    with pytest.raises(ValueError, match="lr_start 1.0 and lr_end 0.1 must satisfy"):
        LRFindConfig(lr_start=1.0, lr_end=0.1)
