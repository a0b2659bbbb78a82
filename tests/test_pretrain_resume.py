"""Pretraining never loses a good checkpoint and resumes honestly.

Killed runs (SIGKILL of the real scripts, and interrupts inside fit) resume to the exact weights of
an uninterrupted run; finished runs are reused; a run folder of another config is refused; `--out`
is only replaced by a better model on comparable data; unreadable checkpoints give one-line errors.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from wsi_fakes import write_patch_store

import pretrain.engine as engine
from pretrain.checkpoint import CheckpointError, describe_load_error, load_checkpoint, save_checkpoint
from pretrain.resume import RunMismatchError, load_state
from pretrain.train_cam16 import Cam16Config, fit_cam16
from pretrain.train_prcc import PRCCConfig, fit_prcc
from pretrain.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
PRCC_TINY = dict(image_size=16, epochs=4, batch_size=8, crops_per_image=4, val_crops_per_image=2,
                 base_width=4, depth=2, latent_channels=4, device="cpu", progress=False)
CAM16_TINY = dict(arch="resnet18", image_size=32, epochs=4, batch_size=8, val_slides=["slide_2"],
                  test_slides=["slide_3"], device="cpu", progress=False)


def _images(folder: Path, n: int = 6, size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"img_{i}.png")
    return folder


def _prcc(tmp: Path, data: Path, **kw) -> PRCCConfig:
    return PRCCConfig(**{"data": str(data), "out": str(tmp / "out" / "ae.pt"), "run_dir": str(tmp / "run"),
                         **PRCC_TINY, **kw})


def _cam16(tmp: Path, data: Path, **kw) -> Cam16Config:
    return Cam16Config(**{"data": str(data), "out": str(tmp / "out" / "cam16.pt"), "run_dir": str(tmp / "run"),
                          **CAM16_TINY, **kw})


def _weights(path) -> dict:
    return load_checkpoint(path)["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rows(run_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_jsonl(Path(run_dir) / "log.jsonl")]


def _temp_files(*folders: Path) -> list[Path]:
    return [p for f in folders if f.exists() for p in f.glob(".*.tmp")]


def _interrupt_epoch(monkeypatch, epoch: int) -> None:
    """Ctrl-C at the start of training epoch `epoch` (after the earlier epochs were saved)."""
    real = engine.train_one_epoch
    seen = {"n": 0}

    def train_one_epoch(*a, **k):
        seen["n"] += 1
        if seen["n"] == epoch:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr("pretrain.train_prcc.train_one_epoch", train_one_epoch)
    monkeypatch.setattr("pretrain.train_cam16.train_one_epoch", train_one_epoch)


# ----------------------------------------------------------------------------- checkpoint messages

def test_zero_byte_checkpoint_is_a_one_line_error(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty \(0 bytes") as e:
        load_checkpoint(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    assert describe_load_error(EOFError()) == "EOFError (no message: the file is probably cut short)"


def test_weights_only_refusal_keeps_its_reason(tmp_path):
    p = tmp_path / "pickled.pt"
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1)}, p)  # a pickled object, not plain types
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg
    assert "contains Python objects that weights_only=True refuses to load" in msg
    assert "argparse.Namespace" in msg and "save_checkpoint" in msg


def test_unreadable_training_state_names_the_fix(tmp_path):
    p = tmp_path / "last.pt"
    p.write_bytes(b"not a state")
    with pytest.raises(CheckpointError, match="last.pt is not a loadable training state.*--overwrite true"):
        load_state(p)


# ----------------------------------------------------------------------------- resume inside Python

def test_prcc_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch):
    data = _images(tmp_path / "data")
    ref = _prcc(tmp_path / "ref", data)
    fit_prcc(ref)

    cfg = _prcc(tmp_path / "cut", data)
    _interrupt_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        fit_prcc(cfg)
    assert load_state(Path(cfg.run_dir) / "last.pt")["fit"]["epoch"] == 2 and not Path(cfg.out).exists()
    monkeypatch.undo()
    m = fit_prcc(cfg)
    assert _same(_weights(cfg.out), _weights(ref.out))
    assert _rows(cfg.run_dir) == _rows(ref.run_dir) and [r["epoch"] for r in _rows(cfg.run_dir)] == [1, 2, 3, 4]
    assert m["published"] and m["checkpoint"] == cfg.out and m["epochs_run"] == 4


@pytest.mark.parametrize("early_stop,lr,dies_at", [(0, 1e-3, 3), (1, 3e-2, 2)])
def test_prcc_killed_between_log_line_and_state_redoes_the_epoch(tmp_path, monkeypatch, early_stop, lr, dies_at):
    """The log gets epoch k's line, then the process dies before last.pt: epoch k is run again (and a
    run that stopped early at k stops there again)."""
    import pretrain.train_prcc as tp

    data = _images(tmp_path / "data")
    ref = _prcc(tmp_path / "ref", data, early_stop=early_stop, lr=lr)
    m_ref = fit_prcc(ref)
    assert m_ref["stopped_early"] == bool(early_stop) and m_ref["epochs_run"] >= dies_at
    real = tp.save_state

    def dies(path, state, **kw):
        if state["epoch"] == dies_at:
            raise KeyboardInterrupt
        real(path, state, **kw)

    cfg = _prcc(tmp_path / "cut", data, early_stop=early_stop, lr=lr)
    monkeypatch.setattr(tp, "save_state", dies)
    with pytest.raises(KeyboardInterrupt):
        fit_prcc(cfg)
    assert len(_rows(cfg.run_dir)) == dies_at
    monkeypatch.undo()
    m = fit_prcc(cfg)
    assert _rows(cfg.run_dir) == _rows(ref.run_dir)
    assert _same(_weights(cfg.out), _weights(ref.out))
    paths = ("seconds", "checkpoint", "out_note")
    assert {k: v for k, v in m.items() if k not in paths} == {k: v for k, v in m_ref.items() if k not in paths}


def test_killed_after_the_last_epoch_finishes_without_training(tmp_path, monkeypatch):
    import pretrain.train_prcc as tp

    data = _images(tmp_path / "data")
    cfg = _prcc(tmp_path, data, epochs=2)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tp, "finish_run", killed)
    with pytest.raises(KeyboardInterrupt):
        fit_prcc(cfg)
    assert not (Path(cfg.run_dir) / "metrics.json").exists() and not Path(cfg.out).exists()
    monkeypatch.undo()
    monkeypatch.setattr(tp, "train_one_epoch", killed)  # nothing is left to train
    m = fit_prcc(cfg)
    assert m["published"] and m["epochs_run"] == 2 and (Path(cfg.run_dir) / "metrics.json").is_file()


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_cam16_interrupted_run_resumes_to_identical_weights(tmp_path, monkeypatch, workers):
    """Augmentation streams (albumentations' own generators, or each epoch's workers seeded from the
    loader's generator) and the shuffle order are restored."""
    store = write_patch_store(tmp_path / "patches.h5")
    ref = _cam16(tmp_path / "ref", store, epochs=3, num_workers=workers)
    m_ref = fit_cam16(ref)
    cfg = _cam16(tmp_path / "cut", store, epochs=3, num_workers=workers)
    _interrupt_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit_cam16(cfg)
    monkeypatch.undo()
    m = fit_cam16(cfg)
    assert _same(_weights(cfg.out), _weights(ref.out))
    assert _rows(cfg.run_dir) == _rows(ref.run_dir)
    assert m["test"] == m_ref["test"]


# ----------------------------------------------------------------------------- reuse and refusal

def test_finished_run_is_reused_without_training(tmp_path, monkeypatch, capsys):
    data = _images(tmp_path / "data")
    cfg = _prcc(tmp_path, data)
    first = fit_prcc(cfg)

    def no_training(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("pretrain.train_prcc.train_one_epoch", no_training)
    capsys.readouterr()
    again = fit_prcc(_prcc(tmp_path, data, progress=True))  # progress does not change the result
    assert again == first
    assert "reused the finished run" in capsys.readouterr().err
    Path(cfg.out).unlink()  # a deleted --out is published again from the run's best.pt
    assert fit_prcc(cfg)["published"] and _same(_weights(cfg.out), _weights(Path(cfg.run_dir) / "best.pt"))


def test_other_config_in_the_run_folder_is_refused(tmp_path):
    data = _images(tmp_path / "data")
    fit_prcc(_prcc(tmp_path, data, epochs=2))
    with pytest.raises(RunMismatchError) as e:
        fit_prcc(_prcc(tmp_path, data, epochs=3, lr=2e-3))
    msg = str(e.value)
    assert "\n" not in msg and "epochs: 2 -> 3" in msg and "lr: 0.001 -> 0.002" in msg
    assert "--overwrite true" in msg and "--run-dir" in msg and "seed" not in msg
    m = fit_prcc(_prcc(tmp_path, data, epochs=3, lr=2e-3, overwrite=True))  # starts over
    assert m["epochs_run"] == 3 and [r["epoch"] for r in _rows(tmp_path / "run")] == [1, 2, 3]
    with pytest.raises(ValueError, match="one of the run folder's own files"):
        fit_prcc(_prcc(tmp_path, data, out=str(tmp_path / "run" / "best.pt")))


def test_changed_data_is_refused_on_resume(tmp_path, monkeypatch):
    data = _images(tmp_path / "data")
    cfg = _prcc(tmp_path, data)
    _interrupt_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        fit_prcc(cfg)
    monkeypatch.undo()
    _images(data, n=7, seed=1)  # same folder, other images
    with pytest.raises(RunMismatchError, match="data changed.*fingerprint.*--overwrite true"):
        fit_prcc(cfg)


# ----------------------------------------------------------------------------- publishing to --out

def test_a_better_out_is_kept_and_a_worse_one_replaced(tmp_path, capsys):
    data = _images(tmp_path / "data")
    first = _prcc(tmp_path / "a", data)
    fit_prcc(first)
    out = tmp_path / "shared" / "ae.pt"
    ck = load_checkpoint(first.out)

    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck["model"].items()}

    def plant(val_mse: float, **data_kw) -> None:  # a checkpoint of an earlier run (other weights) at --out
        save_checkpoint(out, kind=ck["kind"], config=ck["config"], model=other, input_spec=ck["input"],
                        metrics={**ck["metrics"], "val_mse": val_mse}, data={**ck["data"], **data_kw})

    plant(ck["metrics"]["val_mse"] / 2)  # better than this config can do
    before = out.read_bytes()
    m = fit_prcc(_prcc(tmp_path / "b", data, out=str(out)))
    assert out.read_bytes() == before
    assert not m["published"]
    assert m["checkpoint"] == str(tmp_path / "b" / "run" / "best.pt") and "kept" in m["out_note"]
    assert "kept" in capsys.readouterr().err

    plant(ck["metrics"]["val_mse"] / 2, fingerprint="0123456789abcdef")  # other data: not comparable
    m = fit_prcc(_prcc(tmp_path / "c", data, out=str(out)))
    assert not m["published"] and "not comparable" in m["out_note"]
    m = fit_prcc(_prcc(tmp_path / "c", data, out=str(out), overwrite=True))  # reused, and now published
    assert m["published"] and _same(_weights(out), _weights(first.out))

    plant(ck["metrics"]["val_mse"] * 2)  # worse: replaced
    m = fit_prcc(_prcc(tmp_path / "d", data, out=str(out)))
    assert m["published"] and "beats" in m["out_note"] and _same(_weights(out), _weights(first.out))

    out.write_text("not a checkpoint")  # never replaced without overwrite
    m = fit_prcc(_prcc(tmp_path / "e", data, out=str(out)))
    assert not m["published"] and out.read_text() == "not a checkpoint"


# ----------------------------------------------------------------------------- SIGKILL of the scripts

def _argv(script: str, cfg: dict) -> list[str]:
    argv = [sys.executable, str(ROOT / "scripts" / script)]
    for k, v in cfg.items():
        argv.append("--" + k.replace("_", "-"))
        argv += [str(x) for x in v] if isinstance(v, list) else [str(v).lower() if isinstance(v, bool) else str(v)]
    return argv


def _env() -> dict:
    n = str(torch.get_num_threads())  # the same arithmetic as this process, whose result is the reference
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONHASHSEED": "0"}


def _kill_during_training(argv: list[str], run_dir: Path, epochs: int, rng: random.Random) -> int:
    """Start the script, SIGKILL it at a random moment after epoch k (1 <= k <= epochs - 3) is logged."""
    k = rng.randint(1, epochs - 3)
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(rows := read_jsonl(run_dir / "log.jsonl")) < k:
            if proc.poll() is not None:
                raise AssertionError(f"the script ended before epoch {k}: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("no epoch finished within 120 s")
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 1.5 * rows[-1]["seconds"]))  # anywhere in the next epoch or so
        assert proc.poll() is None, "the run finished before it could be killed; give it more epochs"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return k


def _rerun(argv: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_sigkill_prcc_script_and_rerun(tmp_path):
    data = _images(tmp_path / "data", n=8, size=48)
    sizes = {**PRCC_TINY, "epochs": 8, "crops_per_image": 24, "base_width": 8}
    ref = _prcc(tmp_path / "ref", data, **sizes)
    fit_prcc(ref)

    run, out = tmp_path / "kill" / "run", tmp_path / "kill" / "out" / "ae.pt"
    argv = _argv("pretrain_prcc.py", {"data": str(data), "run_dir": str(run), "out": str(out), **sizes})
    _kill_during_training(argv, run, sizes["epochs"], random.Random(20240601))
    assert not out.exists() and not (run / "metrics.json").exists()  # nothing is published before the end
    done = _rerun(argv)
    assert "wrote" in done.stderr
    assert _same(_weights(out), _weights(ref.out))
    assert _rows(run) == _rows(ref.run_dir)
    assert not _temp_files(run, out.parent)


@pytest.mark.slow
def test_sigkill_cam16_script_keeps_a_better_out(tmp_path):
    store = write_patch_store(tmp_path / "patches.h5")
    sizes = {**CAM16_TINY, "epochs": 5}
    ref = _cam16(tmp_path / "ref", store, **sizes)
    fit_cam16(ref)

    # --out already holds a better model on the same data and validation slides (an earlier run)
    out, run = tmp_path / "kill" / "best_so_far.pt", tmp_path / "kill" / "run"
    ck = load_checkpoint(ref.out)
    earlier = {k: v + 0.01 if v.is_floating_point() else v for k, v in ck["model"].items()}
    save_checkpoint(out, kind=ck["kind"], config=ck["config"], model=earlier, input_spec=ck["input"],
                    metrics={**ck["metrics"], "val_loss": ck["metrics"]["val_loss"] / 2}, data=ck["data"])
    before = out.read_bytes()
    argv = _argv("pretrain_cam16.py", {"data": str(store), "run_dir": str(run), "out": str(out), **sizes})
    _kill_during_training(argv, run, sizes["epochs"], random.Random(7))
    assert not (run / "metrics.json").exists()
    done = _rerun(argv)
    assert "kept" in done.stderr
    assert out.read_bytes() == before
    assert _same(_weights(run / "best.pt"), _weights(ref.out))
    assert _rows(run) == _rows(ref.run_dir)
    assert not _temp_files(run, out.parent)
