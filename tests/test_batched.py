"""Batched runs (fusion/batched.py): a group of runs trained at once matches the same runs trained alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fusion_fakes import nest, strip_timing, tiny_checkpoints, use_tiny_cam16, write_wbc_folder

from fusion.batched import GroupedTrunk, group_key, make_units, train_group
from fusion.models import CNNConfig, SmallCNN
from fusion.sweep import SweepConfig, run_specs, run_sweep
from fusion.train import RunConfig, train_run
from pretrain.utils import read_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("batched")
    return {"ckpt": tiny_checkpoints(root / "ck"), "nan": tiny_checkpoints(root / "nan", nan=True),
            "wbc": write_wbc_folder(root / "wbc", 8, 16)}


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_grouped_trunk_computes_each_runs_features(norm):
    cnns = []
    for s in range(3):
        torch.manual_seed(s)
        cnns.append(SmallCNN(CNNConfig(channels=[8, 16], num_classes=5, input_size=16, norm=norm)))
    trunk = GroupedTrunk(cnns)
    xs = [torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for mode in (False, True):
        solo = copy.deepcopy(cnns)
        trunk.train(mode)
        for c in solo:
            c.train(mode)
        got = trunk(xs)
        for c, x, f in zip(solo, xs, got, strict=True):
            torch.testing.assert_close(f, c.forward_features(x), atol=1e-5, rtol=1e-5)
        if mode and norm == "batch":  # the running statistics moved as each run's own would
            back = copy.deepcopy(cnns)
            trunk.store(back)
            for c, b in zip(solo, back, strict=True):
                torch.testing.assert_close(b.features[1].running_mean, c.features[1].running_mean)


def _run_cfg(files, tmp_path, seed: int, **kw) -> RunConfig:
    base = dict(data=str(files["wbc"]), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8, 16],
                epochs=1, min_steps=24, max_steps=0, evals=3, batch_size=8, early_stop=0, dropout=0.3,
                prcc_checkpoint=str(files["ckpt"]["prcc"]), cam16_checkpoint=str(files["ckpt"]["cam16"]),
                arm="prcc", seed=seed, progress=False, device="cpu", curves=False, split=str(tmp_path / "split.json"))
    return RunConfig(**nest(**{**base, **kw}))


def _same_run(a: dict, b: dict, log_a: list[dict], log_b: list[dict]) -> None:
    assert a["status"] == b["status"] == "ok"
    assert a["best_epoch"] == b["best_epoch"] and a["confusion"] == b["confusion"]
    for k in ("macro_f1", "val_macro_f1", "accuracy", "test_loss"):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
    assert len(log_a) == len(log_b)
    for ra, rb in zip(log_a, log_b, strict=True):
        for k in ("train_loss", "train_acc", "val_loss", "lr"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), (ra["epoch"], k)


@pytest.mark.parametrize("arm,kw", [("prcc", {}), ("scratch", {"norm": "group", "sampler": "balanced"}),
                                    ("scratch", {"optimizer": "sgd", "progressive": [8], "hed": 0.05})])
def test_group_matches_runs_trained_alone(files, tmp_path, arm, kw):
    """Own init, batches, augmentations and dropout per run: the same losses, choices and test metrics."""
    alone = [train_run(_run_cfg(files, tmp_path, s, arm=arm, out=str(tmp_path / f"alone{s}"), **kw)) for s in range(3)]
    group = train_group([_run_cfg(files, tmp_path, s, arm=arm, out=str(tmp_path / f"group{s}"), **kw)
                         for s in range(3)])
    assert [r["batched"] for r in group] == [3, 3, 3]
    for s, (a, g) in enumerate(zip(alone, group, strict=True)):
        _same_run(a, g, read_jsonl(tmp_path / f"alone{s}" / "log.jsonl"), read_jsonl(tmp_path / f"group{s}" / "log.jsonl"))
    assert alone[0]["macro_f1"] != alone[1]["macro_f1"] or alone[0]["test_loss"] != alone[1]["test_loss"]
    again = train_group([_run_cfg(files, tmp_path, s, arm=arm, out=str(tmp_path / f"group{s}"), **kw)
                         for s in range(3)])  # finished: read back, not trained again
    assert [(r["run"], r["macro_f1"], r["test_loss"]) for r in again] == [(r["run"], r["macro_f1"], r["test_loss"])
                                                                          for r in group]


def test_early_stop_and_a_failing_run_inside_a_group(files, tmp_path, monkeypatch):
    use_tiny_cam16(monkeypatch)
    kw = dict(arm="cam16", cam16_checkpoint=str(files["nan"]["cam16"]))
    alone = train_run(_run_cfg(files, tmp_path, 0, out=str(tmp_path / "a"), **kw))
    group = train_group([_run_cfg(files, tmp_path, s, out=str(tmp_path / f"g{s}"), **kw) for s in range(2)])
    assert alone["status"] == "failed" and [r["status"] for r in group] == ["failed", "failed"]
    stop = dict(early_stop=1, min_steps=60, evals=6, lr=0.0)  # nothing improves after the first validation
    a = train_run(_run_cfg(files, tmp_path, 0, out=str(tmp_path / "sa"), **stop))
    g = train_group([_run_cfg(files, tmp_path, s, out=str(tmp_path / f"sg{s}"), **stop) for s in range(2)])
    assert a["stopped_early"] and a["epochs_run"] == 2
    assert [(r["stopped_early"], r["epochs_run"]) for r in g] == [(True, 2), (True, 2)]


def _sweep(files, out, **kw) -> SweepConfig:
    return SweepConfig(**nest(**{**dict(
        data=str(files["wbc"]), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8], epochs=1,
        min_steps=12, max_steps=0, evals=2, batch_size=8, early_stop=0, prcc_checkpoint=str(files["ckpt"]["prcc"]),
        fractions=[0.5, 1.0], arms=["scratch", "prcc"], twins=False, modes=["sum"], seeds=[0, 1, 2], probes=[],
        out=str(out), progress=False, device="cpu", curves=False), **kw}))


def test_units_group_only_runs_that_differ_by_seed(files, tmp_path):
    specs = run_specs(_sweep(files, tmp_path))
    units = make_units(specs, 2)
    names = [[s.out.rsplit("/", 1)[-1] for s in u] for u in units]
    assert names[:3] == [["f0.5_scratch_s0", "f0.5_scratch_s1"], ["f0.5_prcc_sum_s0", "f0.5_prcc_sum_s1"],
                         ["f0.5_scratch_s2"]]
    assert sorted(n for u in names for n in u) == sorted(s.out.rsplit("/", 1)[-1] for s in specs)
    assert all(len({group_key(s) for s in u}) == 1 for u in units)
    assert make_units(specs, 1) == [[s] for s in specs]
    online = run_specs(_sweep(files, tmp_path, encoder_features="online"))
    assert all(len(u) == 1 for u in make_units(online, 3) if u[0].arm == "prcc")


def test_sweep_with_batched_runs_gives_the_rows_of_the_plain_sweep(files, tmp_path):
    plain = strip_timing(read_jsonl(run_sweep(_sweep(files, tmp_path / "plain"))))
    batched = strip_timing(read_jsonl(run_sweep(_sweep(files, tmp_path / "batched", batch_runs=3))))
    assert {r.pop("batched") for r in batched} == {3}
    assert [r["run"] for r in plain] == [r["run"] for r in batched]
    for p, b in zip(plain, batched, strict=True):
        assert p["confusion"] == b["confusion"] and p["best_epoch"] == b["best_epoch"]
        np.testing.assert_allclose(p["test_loss"], b["test_loss"], rtol=1e-4)


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(files, tmp_path):
    """runtime.compile (torch.compile, inductor on CPU): same run, same choices, close numbers; keys unchanged."""
    eager = train_run(_run_cfg(files, tmp_path, 0, arm="scratch", out=str(tmp_path / "eager")))
    comp = train_run(_run_cfg(files, tmp_path, 0, arm="scratch", out=str(tmp_path / "compiled"), compile=True))
    assert comp["status"] == "ok" and comp["test_loss"] == pytest.approx(eager["test_loss"], rel=1e-2)
    state = torch.load(tmp_path / "compiled" / "best.pt", weights_only=True)["model"]
    assert not any("_orig_mod" in k for k in state)
