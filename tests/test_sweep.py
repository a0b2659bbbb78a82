"""Sweep: run list, bad configs, restart equals an uninterrupted sweep, a NaN run does not stop it."""

from __future__ import annotations

import pytest
import yaml
from fusion_fakes import nest, strip_timing, tiny_checkpoints, use_tiny_cam16, write_wbc_folder

import fusion.sweep as sweep
from fusion.sweep import SweepConfig, run_specs, run_sweep
from pretrain.config import parse_config
from pretrain.utils import read_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    return {"ckpt": tiny_checkpoints(root / "ck"), "nan": tiny_checkpoints(root / "nan", nan=True),
            "wbc": write_wbc_folder(root / "wbc", 8, 16)}


@pytest.fixture
def env(files, monkeypatch):
    use_tiny_cam16(monkeypatch)
    return files


def _cfg(env, out, **kw) -> SweepConfig:
    base = dict(data=str(env["wbc"]), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8],
                epochs=1, min_steps=2, max_steps=0, evals=1, batch_size=16, early_stop=0,
                prcc_checkpoint=str(env["ckpt"]["prcc"]), cam16_checkpoint=str(env["ckpt"]["cam16"]),
                fractions=[1.0], arms=["scratch", "random"], modes=["sum"], seeds=[0, 1], out=str(out),
                progress=False, device="cpu", curves=False)
    return SweepConfig(**nest(**{**base, **kw}))


def test_run_list_is_deterministic_and_scratch_runs_once_per_seed(env, tmp_path):
    cfg = _cfg(env, tmp_path, fractions=[0.5, 1.0], arms=["scratch", "prcc+cam16", "random"],
               modes=["sum", "gated"], seeds=[0, 1])
    names = [s.out.rsplit("/", 1)[-1] for s in run_specs(cfg)]
    assert len(names) == 2 * 2 * (1 + 2 + 2) and len(set(names)) == len(names)
    assert names[:3] == ["f0.5_scratch_s0", "f0.5_prcc+cam16_sum_s0", "f0.5_prcc+cam16_gated_s0"]
    assert names == [s.out.rsplit("/", 1)[-1] for s in run_specs(cfg)]


@pytest.mark.parametrize("key,value,match", [("arms", ["scratch", "imagenet"], "valid arms"),
                                             ("modes", ["sum", "attention"], "valid modes")])
def test_bad_sweep_config_lists_valid_names(tmp_path, key, value, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": "x", key: value}))
    with pytest.raises(ValueError, match=match) as e:
        parse_config(SweepConfig, ["--config", str(path)])
    assert ("prcc+cam16" if key == "arms" else "concat") in str(e.value)


def test_missing_encoder_checkpoint_is_reported_before_training(env, tmp_path):
    with pytest.raises(FileNotFoundError, match="cam16_checkpoint"):
        run_sweep(_cfg(env, tmp_path / "s", cam16_checkpoint=str(tmp_path / "none.pt")))


def test_restarted_sweep_skips_finished_runs_and_matches_uninterrupted(env, tmp_path, monkeypatch, capsys):
    full = run_sweep(_cfg(env, tmp_path / "full"))
    expected = strip_timing(read_jsonl(full))
    assert len(expected) == 4 and all(r["status"] == "ok" for r in expected)
    assert "ETA" in capsys.readouterr().out

    real_run_one, calls = sweep.run_one, []

    def stop_after_two(spec, ctx=None):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(spec.out)
        return real_run_one(spec, ctx)

    monkeypatch.setattr(sweep, "run_one", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(_cfg(env, tmp_path / "part"))
    assert len(read_jsonl(tmp_path / "part" / "results.jsonl")) == 2
    monkeypatch.setattr(sweep, "run_one", real_run_one)
    capsys.readouterr()
    resumed = run_sweep(_cfg(env, tmp_path / "part"))
    assert "2 already finished, 2 to go" in capsys.readouterr().out
    assert strip_timing(read_jsonl(resumed)) == expected


def test_nan_run_is_marked_failed_and_the_sweep_goes_on(env, tmp_path):
    res = run_sweep(_cfg(env, tmp_path / "nan", arms=["scratch", "cam16"], seeds=[0],
                         cam16_checkpoint=str(env["nan"]["cam16"])))
    rows = {r["run"]: r for r in read_jsonl(res)}
    assert rows["f1.0_scratch_s0"]["status"] == "ok"
    assert rows["f1.0_cam16_sum_s0"]["status"] == "failed" and "non-finite" in rows["f1.0_cam16_sum_s0"]["reason"]


def test_two_worker_processes_give_the_same_runs_as_one_process_at_the_same_thread_count(env, tmp_path):
    """workers=2 (spawned, 1 thread each) must equal an in-process sweep on 1 thread, run for run."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = read_jsonl(run_sweep(_cfg(env, tmp_path / "serial", arms=["scratch"], seeds=[0, 1, 2])))
    finally:
        torch.set_num_threads(n)
    parallel = read_jsonl(run_sweep(_cfg(env, tmp_path / "parallel", arms=["scratch"], seeds=[0, 1, 2],
                                         workers=2, worker_threads=1)))
    assert len(parallel) == 3 and {r["torch_threads"] for r in parallel} == {1}
    assert strip_timing(parallel) == strip_timing(serial)
    with pytest.raises(ValueError, match="workers"):
        _cfg(env, tmp_path / "bad", workers=0)


def test_eta_weighs_runs_by_the_images_they_train_on(env, tmp_path):
    from fusion.data import load_wbc
    from fusion.sweep import planned_work
    from fusion.train import plan_steps, prepare_split

    cfg = _cfg(env, tmp_path / "s", fractions=[0.5, 1.0], epochs=3, seeds=[0])
    data = load_wbc(cfg.data, cfg.image_size, None, progress=False)
    split = prepare_split(cfg, data, tmp_path / "split.json", cfg.fractions)
    specs = run_specs(cfg)
    specs[-1].val_run = str(tmp_path / "pilot_run")  # tested from the pilot's weights: no training
    work = planned_work(specs, split, data)
    n_train = {0.5: 10, 1.0: 20}  # 40 images, 25% validation and 25% test
    for spec in specs[:-1]:
        bs, steps, evals = plan_steps(n_train[spec.fraction], spec)
        assert work[spec.out.split("/")[-1]] == bs * steps * evals
    assert work["f1.0_scratch_s0"] > 2 * work["f0.5_scratch_s0"] and work[specs[-1].out.split("/")[-1]] == 0
