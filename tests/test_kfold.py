"""Stratified k-fold cross-validation as a mode of any sweep."""

from __future__ import annotations

import shutil

import pytest
from fusion_fakes import nest, write_wbc_folder

from fusion.data import load_wbc
from fusion.report import load_results, summarise
from fusion.splits import SplitError, make_kfold_splits
from fusion.sweep import SweepConfig, run_sweep
from pretrain.utils import read_jsonl


@pytest.fixture(scope="module")
def wbc(tmp_path_factory):
    root = write_wbc_folder(tmp_path_factory.mktemp("kfold") / "wbc", 9, 16)
    shutil.copy(root / "basophil" / "img000.png", root / "basophil" / "copy.png")  # a duplicate group
    return root


def test_folds_cover_every_image_once_and_keep_duplicates_together(wbc):
    data = load_wbc(wbc, 16, cache_dir=None, progress=False)
    splits = make_kfold_splits(data, 3, val=0.2, fractions=(0.5, 1.0), seed=0)
    tests = [set(s["parts"]["test"]) for s in splits]
    assert set().union(*tests) == set(data.ids) and sum(map(len, tests)) == len(data)  # each image once
    for s in splits:
        where = {i: p for p, ids in s["parts"].items() for i in ids}
        assert all(len({where[i] for i in g}) == 1 for g in s["duplicate_groups"])
        assert all(s["counts"]["test"][c] >= 3 for c in data.classes)  # stratified: 9-10 per class / 3
    with pytest.raises(SplitError, match="smallest class has 9.*folds <= 9"):
        make_kfold_splits(data, 10, seed=0)


def test_kfold_sweep_reports_over_folds_and_seeds(wbc, tmp_path):
    cfg = SweepConfig(**nest(data=str(wbc), cache_dir="", val=0.2, image_size=16, cnn_channels=[8], epochs=1,
                             min_steps=2, max_steps=0, evals=1, batch_size=16, fractions=[1.0], arms=["scratch"],
                             seeds=[0, 1], folds=3, out=str(tmp_path / "cv"), progress=False, device="cpu",
                             curves=False))
    rows = read_jsonl(run_sweep(cfg))
    assert sorted(r["run"] for r in rows) == sorted(f"f1.0_scratch_s{s}_k{k}" for s in (0, 1) for k in range(3))
    assert sorted({r["fold"] for r in rows}) == [0, 1, 2]
    assert sum(r["n_test"] for r in rows if r["seed"] == 0) == 5 * 9 + 1  # every image tested once per seed
    summary = summarise(load_results(tmp_path / "cv"))
    assert len(summary.cells[(1.0, "scratch")]) == 6  # mean ± CI over 3 folds x 2 seeds
    assert len(read_jsonl(run_sweep(cfg))) == 6  # resumed: nothing trained again
