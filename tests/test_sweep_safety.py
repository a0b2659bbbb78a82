"""A sweep never reuses a run made with other settings, survives torn logs and SIGKILL, and is locked."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fusion_fakes import nest, strip_timing, tiny_checkpoints, use_tiny_cam16, write_wbc_folder

from fusion.sweep import LOCK, SweepConfig, run_sweep
from fusion.train import RunConfig, SettingsChangedError, train_run
from pretrain.utils import FolderLockedError, append_jsonl, folder_lock, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep_safety")
    return {"ckpt": tiny_checkpoints(root / "ck"), "wbc": write_wbc_folder(root / "wbc", 8, 16)}


@pytest.fixture
def env(files, monkeypatch):
    use_tiny_cam16(monkeypatch)
    return files


def _base(env, out) -> dict:
    return dict(data=str(env["wbc"]), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8],
                epochs=1, min_steps=2, max_steps=0, evals=1, batch_size=16, early_stop=0,
                prcc_checkpoint=str(env["ckpt"]["prcc"]), cam16_checkpoint=str(env["ckpt"]["cam16"]),
                fractions=[1.0], arms=["scratch"], modes=["sum"], seeds=[0, 1], out=str(out),
                progress=False, device="cpu", curves=False)


def _cfg(env, out, **kw) -> SweepConfig:
    return SweepConfig(**nest(**{**_base(env, out), **kw}))


def test_resume_with_other_settings_names_them_and_keeps_the_folder_as_it_was(env, tmp_path):
    out = tmp_path / "s"
    run_sweep(_cfg(env, out))
    before = (out / "config.yaml").read_text()
    with pytest.raises(SettingsChangedError, match=r"2 of 2 finished runs.*optim\.lr: 0\.002 -> 0\.001.*--rerun-changed"):
        run_sweep(_cfg(env, out, lr=1e-3))
    assert (out / "config.yaml").read_text() == before  # the folder does not claim settings its runs lack
    assert not (out / LOCK).exists()
    # a field that does not change the numbers may differ
    run_sweep(_cfg(env, out, eval_batch_size=7, progress_runs=True))


def test_rerun_changed_trains_those_runs_again_and_logs_each_once(env, tmp_path):
    out = tmp_path / "s"
    run_sweep(_cfg(env, out))
    res = run_sweep(_cfg(env, out, lr=1e-3, rerun_changed=True))
    rows = read_jsonl(res)
    assert sorted(r["run"] for r in rows) == ["f1.0_scratch_s0", "f1.0_scratch_s1"]
    fresh = read_jsonl(run_sweep(_cfg(env, tmp_path / "fresh", lr=1e-3)))
    assert strip_timing(rows) == strip_timing(fresh)
    assert yaml.safe_load((out / "runs" / "f1.0_scratch_s0" / "config.yaml").read_text())["optim"]["lr"] == 1e-3


def test_single_run_reuse_checks_settings_too(env, tmp_path):
    base = {k: v for k, v in _base(env, tmp_path / "one").items()
            if k not in ("fractions", "arms", "modes", "seeds")}
    train_run(RunConfig(**nest(**base)))
    with pytest.raises(SettingsChangedError, match="image_size: 16 -> 24"):
        train_run(RunConfig(**nest(**{**base, "image_size": 24})))


def test_a_split_made_for_another_seed_is_not_reused_silently(env, tmp_path):
    out = tmp_path / "s"
    run_sweep(_cfg(env, out, seeds=[0]))
    with pytest.raises(SettingsChangedError, match="split_seed"):
        run_sweep(_cfg(env, out, seeds=[0], split_seed=3, rerun_changed=True))


def test_torn_last_line_does_not_swallow_the_next_row(tmp_path):
    p = tmp_path / "r.jsonl"
    append_jsonl(p, {"run": "a"})
    with open(p, "a") as f:
        f.write('{"run": "b", "macro')  # killed mid-line
    append_jsonl(p, {"run": "c"})
    assert [r["run"] for r in read_jsonl(p)] == ["a", "c"]
    assert p.read_text().endswith('{"run": "c"}\n')


def test_torn_results_line_is_recovered_on_resume(env, tmp_path):
    out = tmp_path / "s"
    expected = strip_timing(read_jsonl(run_sweep(_cfg(env, out))))
    text = (out / "results.jsonl").read_text()
    (out / "results.jsonl").write_text(text[: len(text) - 40])  # the last row torn by a kill
    assert strip_timing(read_jsonl(run_sweep(_cfg(env, out)))) == expected


def test_second_sweep_on_the_same_folder_is_refused(env, tmp_path):
    out = tmp_path / "s"
    with folder_lock(out, LOCK):
        with pytest.raises(FolderLockedError, match=f"in use by another process \\(pid {os.getpid()}"):
            run_sweep(_cfg(env, out))
    assert not (out / LOCK).exists()
    run_sweep(_cfg(env, out, seeds=[0]))  # free again


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from pretrain.utils import folder_lock\n"
            "with folder_lock(sys.argv[2]):\n    print('locked', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(FolderLockedError):
        with folder_lock(tmp_path):
            pass
    p.kill()
    p.wait()
    with folder_lock(tmp_path):  # the kernel dropped the dead holder's lock
        pass


def _sweep_cmd(cfg_path: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--config", str(cfg_path)]


@pytest.mark.slow
def test_sigkill_at_a_random_point_then_rerun_equals_an_uninterrupted_sweep(files, tmp_path):
    """A real `scripts/sweep.py` process killed with SIGKILL mid-sweep, then run again."""
    base = {**_base(files, tmp_path / "x"), "arms": ["scratch", "prcc"], "twins": False, "fractions": [0.5, 1.0],
            "min_steps": 400, "threads": 1}
    cfgs = {}
    for name in ("full", "killed"):
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(nest(**{**base, "out": str(tmp_path / name)})))
    subprocess.run(_sweep_cmd(cfgs["full"]), check=True, capture_output=True, cwd=ROOT)
    expected = strip_timing(read_jsonl(tmp_path / "full" / "results.jsonl"))
    assert len(expected) == 8

    delay = random.Random(0).uniform(0.0, 1.5)
    p = subprocess.Popen(_sweep_cmd(cfgs["killed"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         cwd=ROOT)
    results = tmp_path / "killed" / "results.jsonl"
    t0 = time.time()
    while not (results.exists() and read_jsonl(results)) and time.time() - t0 < 120:
        time.sleep(0.05)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = len(read_jsonl(results))
    assert 1 <= n_before < 8, n_before  # killed mid-sweep

    out = subprocess.run(_sweep_cmd(cfgs["killed"]), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert strip_timing(read_jsonl(results)) == expected
    left = [p for p in (tmp_path / "killed").rglob("*") if p.name.endswith(".tmp") or p.name == LOCK]
    assert left == []


def test_a_retrained_encoder_at_the_same_path_is_not_reused_silently(env, tmp_path):
    import shutil

    ck = tmp_path / "prcc.pt"
    shutil.copy(env["ckpt"]["prcc"], ck)
    out = tmp_path / "s"
    run_sweep(_cfg(env, out, arms=["prcc"], twins=False, seeds=[0], prcc_checkpoint=str(ck)))
    other = tiny_checkpoints(tmp_path / "other", size=16)["prcc"]  # same architecture, other weights
    import torch

    state = torch.load(other, weights_only=True)
    state["model"] = {k: v + 1 for k, v in state["model"].items()}
    torch.save(state, ck)
    with pytest.raises(SettingsChangedError, match="source prcc: .*prcc.pt changed since the run was trained"):
        run_sweep(_cfg(env, out, arms=["prcc"], twins=False, seeds=[0], prcc_checkpoint=str(ck)))
