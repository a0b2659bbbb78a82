"""--launcher ray: the same sweep rows and patch store as the local launcher, a killed Ray sweep resumes,
and no Ray process outlives the job that started it."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fusion_fakes import nest, strip_timing, tiny_checkpoints, write_wbc_folder

from fusion.sweep import SweepConfig, run_sweep
from pretrain.utils import read_jsonl

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (pip install '.[distributed]')")

ROOT = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")  # the process checks read /proc


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray_launcher")
    return {"ckpt": tiny_checkpoints(root / "ck"), "wbc": write_wbc_folder(root / "wbc", 8, 16)}


def _base(files, out, **kw) -> dict:
    """4 runs (scratch and prcc, 2 seeds) on 1 thread, whichever launcher trains them."""
    return nest(**{**dict(data=str(files["wbc"]), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8],
                          epochs=1, min_steps=40, max_steps=0, evals=1, batch_size=16, early_stop=0,
                          prcc_checkpoint=str(files["ckpt"]["prcc"]), fractions=[1.0], arms=["scratch", "prcc"],
                          twins=False, modes=["sum"], seeds=[0, 1], probes=[], out=str(out), progress=False,
                          device="cpu", curves=False, threads=1, worker_threads=1), **kw})


@pytest.fixture(scope="module")
def local_rows(files, tmp_path_factory) -> list[dict]:
    import torch

    n = torch.get_num_threads()  # `threads: 1` sets this process's count; give it back to the other tests
    try:
        rows = read_jsonl(run_sweep(SweepConfig(**_base(files, tmp_path_factory.mktemp("local") / "s"))))
    finally:
        torch.set_num_threads(n)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows) and {r["torch_threads"] for r in rows} == {1}
    return strip_timing(rows)


def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every live (not zombie) process."""
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            state, ppid, _, sid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue
        if state != "Z":
            out[int(d.name)] = (int(ppid), int(sid))
    return out


def _descendants(pid: int) -> list[int]:
    procs, found, todo = _procs(), [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, (pp, _) in procs.items() if pp == parent]
        found += kids
        todo += kids
    return found


def _session(sid: int, wait: float = 0.0) -> list[int]:
    """Live processes of session `sid`, after waiting up to `wait` s for them to end."""
    t0 = time.time()
    while (left := [p for p, (_, s) in _procs().items() if s == sid]) and time.time() - t0 < wait:
        time.sleep(0.2)
    return left


@pytest.fixture
def local_ray():
    """A local Ray instance of 2 CPUs in this process, which the launchers use and leave up; checked gone after."""
    import ray

    before = set(_descendants(os.getpid()) if LINUX else [])
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.ERROR)
    try:
        yield ray
        assert ray.is_initialized()
    finally:
        ray.shutdown()
    if LINUX:
        assert set(_descendants(os.getpid())) <= before, "Ray processes left after ray.shutdown()"


@needs_ray
@pytest.mark.slow  # each Ray instance takes seconds to start
def test_ray_launcher_gives_the_local_launchers_rows(files, local_rows, local_ray, tmp_path):
    import torch

    n = torch.get_num_threads()
    try:
        rows = read_jsonl(run_sweep(SweepConfig(**_base(files, tmp_path / "s", launcher="ray"))))
    finally:
        torch.set_num_threads(n)
    assert strip_timing(rows) == local_rows


@needs_ray
@pytest.mark.slow  # each Ray instance takes seconds to start
def test_slides_as_ray_tasks_give_the_same_store(local_ray, tmp_path):
    import h5py
    import numpy as np
    from wsi_fakes import write_fake_slide

    from pretrain.extract import ExtractConfig
    from pretrain.extract_job import extract_patches

    slides = [write_fake_slide(tmp_path, "slide_a")[0], write_fake_slide(tmp_path, "slide_b")[0],
              tmp_path / "slides" / "slide_c.svs"]
    slides[2].write_bytes(b"junk")
    summaries = {launcher: extract_patches(slides, tmp_path / "annotations", tmp_path / f"{launcher}.h5",
                                           ExtractConfig(patch_size=64, overlays=False, launcher=launcher))
                 for launcher in ("local", "ray")}
    assert [s["status"] for s in summaries["ray"]] == ["ok", "ok", "failed"]
    assert [s["patches"] for s in summaries["ray"]] == [s["patches"] for s in summaries["local"]]
    with h5py.File(tmp_path / "local.h5") as f, h5py.File(tmp_path / "ray.h5") as g:
        for k in ("images", "labels", "coords", "slide_index"):
            np.testing.assert_array_equal(f[k][:], g[k][:])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp store, no parts


def test_bad_launcher_lists_the_choices_and_missing_ray_says_how_to_install_it(files, tmp_path, monkeypatch):
    from pretrain.raytasks import ray_session

    with pytest.raises(ValueError, match=r"\['local', 'ray'\]"):
        SweepConfig(**_base(files, tmp_path, launcher="slurm"))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    with pytest.raises(ValueError, match=r"pip install '\.\[distributed\]'"):
        with ray_session():
            pass


def _sweep(cfg: Path) -> list[str]:
    return [sys.executable, str(ROOT / "scripts" / "sweep.py"), "--config", str(cfg), "--launcher", "ray"]


@needs_ray
@pytest.mark.slow  # each Ray instance takes seconds to start
def test_killed_ray_sweep_resumes_with_the_same_rows_and_leaves_no_ray_processes(files, tmp_path):
    import torch

    out = tmp_path / "s"
    cfg = tmp_path / "sweep.yaml"
    long = {"min_steps": 2000}  # runs of seconds: the kill lands while the others still train
    cfg.write_text(yaml.safe_dump(_base(files, out, **long)))
    n = torch.get_num_threads()
    try:
        local_rows = strip_timing(read_jsonl(run_sweep(SweepConfig(**_base(files, tmp_path / "local", **long)))))
    finally:
        torch.set_num_threads(n)
    p = subprocess.Popen(_sweep(cfg), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own session: the Ray instance it starts is found by it
    try:
        t0 = time.time()
        while not list(out.glob("runs/*/metrics.json")) and p.poll() is None and time.time() - t0 < 120:
            time.sleep(0.05)
        assert p.poll() is None, p.stderr.read()
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 143, p.stderr.read()
        if LINUX:  # the driver shut its local Ray instance down on the way out
            assert _session(p.pid, wait=10) == [], "Ray processes outlived the killed sweep"
    finally:
        p.kill()
        for pid in _session(p.pid) if LINUX else []:
            os.kill(pid, signal.SIGKILL)
    n_before = len(list(out.glob("runs/*/metrics.json")))  # its row may not be in results.jsonl yet
    assert 1 <= n_before < 4, n_before

    again = subprocess.run(_sweep(cfg), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"{n_before} already finished, {4 - n_before} to go" in again.stdout
    rows = read_jsonl(out / "results.jsonl")
    assert len({r["run"] for r in rows}) == len(rows) == 4
    assert strip_timing(rows) == local_rows
