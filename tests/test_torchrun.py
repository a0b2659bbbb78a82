"""Data-parallel pretraining: `pretrain.distributed` alone, and both scripts under real torchrun.

The torchrun tests start `torch.distributed.run --standalone --nproc_per_node 2` (two CPU processes,
gloo) through tests/torchrun_audit.py, which records every file a rank writes under the run's folder.
The data are sized so that an epoch is one global batch: a single process then takes the same steps
whatever order it shuffles in, and DDP's 2 x batch/2 must reproduce its losses. CAM16 uses group
norm and matches to rounding; the PRCC autoencoder has BatchNorm, whose statistics are per rank on
CPU (SyncBatchNorm needs a GPU), so its train losses agree only to about 1e-2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data.distributed import DistributedSampler
from wsi_fakes import write_patch_store

import pretrain.distributed as D
from pretrain.checkpoint import load_checkpoint, load_encoder
from pretrain.engine import Meter
from pretrain.resume import RunMismatchError, load_state, open_run, restore_state, rng_state, save_state
from pretrain.train_cam16 import Cam16Config, fit_cam16
from pretrain.train_prcc import PRCCConfig, fit_prcc
from pretrain.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
# 5 train images x 4 crops = 20 crops: one global batch of 20 per epoch, 10 per rank
PRCC = dict(image_size=16, epochs=3, batch_size=20, crops_per_image=4, val_crops_per_image=2, base_width=4,
            depth=2, latent_channels=4, device="cpu", progress=False)
# train = slide_0 + slide_1 = 12 patches: one global batch of 12 per epoch, 6 per rank
CAM16 = dict(arch="resnet18", norm="group", augment=False, image_size=32, epochs=3, batch_size=12,
             val_slides=["slide_2"], test_slides=["slide_3"], device="cpu", progress=False)


def _argv(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return out


def _torchrun(tmp: Path, script: str, values: dict, die_after: int | None = None) -> tuple[int, str, dict]:
    """(exit status, stdout, {rank: paths it wrote under tmp/run*}) of a 2-process torchrun."""
    audit = tmp / f"audit{die_after or ''}"
    audit.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "torchrun_audit.py"), str(audit), str(Path(values["run_dir"]).parent),
           *(["--die-after-epoch", str(die_after)] if die_after else []),
           str(ROOT / "scripts" / script), *_argv(values)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    audits = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)
              if (audit / f"rank{r}.json").exists()}
    return p.returncode, p.stdout + p.stderr, audits


def _close(rows: list[dict], ref: list[dict], keys: tuple[str, ...], rel: float) -> None:
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in ref]
    for r, q in zip(rows, ref, strict=True):
        for k in keys:
            assert r[k] == pytest.approx(q[k], rel=rel, abs=1e-6), (r["epoch"], k, r[k], q[k])


def _files(run_dir: str) -> set[str]:
    return {p.name for p in Path(run_dir).iterdir()}


# ----------------------------------------------------------------------------- alone, no processes

def test_alone_everything_is_the_plain_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = torch.nn.Linear(2, 1)
    meter = Meter()
    meter.update(3, loss=1.0)
    with D.session("cpu") as device:
        assert device == torch.device("cpu") and D.world_size() == 1 and D.is_main()
        assert D.per_rank_batch(7) == 7 and D.train_sampler(range(5), 0) is None and D.eval_shard(5) is None
        assert D.wrap(model, device) is model and D.unwrap(model) is model
        assert D.reduce_meter(meter) is meter and D.on_main(lambda x: x + 1, 1) == 2
    assert not torch.distributed.is_initialized()


def test_batch_not_divisible_by_the_processes_names_both(monkeypatch):
    monkeypatch.setattr(D, "world_size", lambda: 4)
    assert D.per_rank_batch(32) == 8
    with pytest.raises(ValueError, match="batch_size 30 is not divisible by the 4 processes"):
        D.per_rank_batch(30)


def test_one_gpu_named_for_several_processes_is_refused(monkeypatch):
    monkeypatch.setattr(D, "get_device", torch.device)  # as on a GPU machine
    assert D.rank_device("cuda:0", world=1) == torch.device("cuda:0")
    with pytest.raises(ValueError, match="--device cuda:0 names one GPU, but torchrun started 2 processes"):
        D.rank_device("cuda:0", world=2)


def test_ranks_batches_together_are_the_global_batch():
    """The k-th batches of W ranks hold the k-th global batch of the sampler's order (seed + epoch)."""
    n, batch, world, epoch = 24, 6, 3, 5

    def batches(replicas: int, r: int, size: int) -> list[list[int]]:
        s = DistributedSampler(range(n), num_replicas=replicas, rank=r, shuffle=True, seed=7)
        s.set_epoch(epoch)
        idx = list(s)
        return [idx[i:i + size] for i in range(0, len(idx), size)]

    whole = batches(1, 0, batch)
    per_rank = [batches(world, r, batch // world) for r in range(world)]
    for k, b in enumerate(whole):
        assert sorted(b) == sorted(i for r in range(world) for i in per_rank[r][k])


def test_reduce_meter_and_gather_shards_give_global_results(monkeypatch):
    a, b = Meter(), Meter()
    a.update(2, loss=1.0, acc=0.5)
    b.update(6, acc=1.0, loss=3.0)
    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "gather_object", lambda obj: [(a.n, a.sums), (b.n, b.sums)])
    assert D.reduce_meter(a).averages() == {"loss": 2.5, "acc": 0.875}  # rank 0's column order
    values = np.arange(7.0)
    monkeypatch.setattr(D, "gather_object", lambda obj: [values[0::2], values[1::2]])
    assert np.array_equal(D.gather_shards(values[0::2]), values)


def test_state_keeps_each_ranks_streams_and_refuses_another_world_size(tmp_path):
    cfg = PRCCConfig(data="images", run_dir=str(tmp_path), out=str(tmp_path / "x.pt"))
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.Adam(model.parameters())
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    save_state(tmp_path / "last.pt", {"epoch": 1}, cfg=cfg, fingerprint="", device=torch.device("cpu"),
               model=model, optimizer=opt, generator=gens[0], rank_rngs=[rng_state(g) for g in gens])
    state = load_state(tmp_path / "last.pt")
    g = torch.Generator()
    restore_state(state, model, opt, g, rank=1)
    assert torch.equal(g.get_state(), gens[1].get_state())
    with pytest.raises(RunMismatchError, match="trained by 2 process.*torchrun --nproc_per_node 2"):
        open_run(tmp_path, cfg, "", torch.device("cpu"), world_size=1)
    assert open_run(tmp_path, cfg, "", torch.device("cpu"), world_size=2)[0] == "resume"


# ----------------------------------------------------------------------------- real torchrun

def _images(folder: Path, n: int = 6, size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((size, size), Image.BILINEAR).save(folder / f"img_{i}.png")
    return folder


@pytest.mark.slow
def test_prcc_script_under_torchrun(tmp_path):
    """Same losses as one process (BatchNorm per rank on CPU: train loss loosely), the same files,
    each written by rank 0 only, one printed result, a checkpoint that load_encoder reads."""
    data = _images(tmp_path / "data")
    ref = PRCCConfig(data=str(data), run_dir=str(tmp_path / "ref" / "run"), out=str(tmp_path / "ref" / "ae.pt"), **PRCC)
    m_ref = fit_prcc(ref)
    assert m_ref["n_train_images"] * PRCC["crops_per_image"] == PRCC["batch_size"]  # one batch per epoch

    values = {"data": str(data), "run_dir": str(tmp_path / "ddp" / "run"), "out": str(tmp_path / "ddp" / "ae.pt"), **PRCC}
    rc, output, audits = _torchrun(tmp_path, "pretrain_prcc.py", values)
    assert rc == 0, output[-3000:]
    assert audits[1] == [] and any("log.jsonl" in p for p in audits[0])  # the hook works; rank 1 wrote nothing
    assert _files(values["run_dir"]) == _files(ref.run_dir)
    rows = read_jsonl(Path(values["run_dir"]) / "log.jsonl")
    _close(rows, read_jsonl(Path(ref.run_dir) / "log.jsonl"), ("val_loss",), rel=2e-3)
    _close(rows, read_jsonl(Path(ref.run_dir) / "log.jsonl"), ("train_loss",), rel=5e-2)
    printed = [line for line in output.splitlines() if line.startswith('{"best_epoch"')]
    assert len(printed) == 1 and json.loads(printed[0])["processes"] == 2
    assert load_encoder(values["out"]).encode(torch.rand(2, 3, 16, 16)).shape == (2, 4)


@pytest.mark.slow
def test_cam16_script_under_torchrun_killed_and_resumed(tmp_path):
    """Rank 0 dies after saving epoch 2; the same command resumes. The run matches one process with
    the same global batch to rounding (class-weighted loss on imbalanced classes included), and
    rank 1 wrote nothing in either start."""
    store = write_patch_store(tmp_path / "patches.h5")
    with h5py.File(store, "a") as f:  # train: 8 tumor, 4 normal, so the ranks' class weights differ
        labels = f["labels"][:]
        labels[[0, 2]] = 1
        f["labels"][:] = labels
    ref = Cam16Config(data=str(store), run_dir=str(tmp_path / "ref" / "run"), out=str(tmp_path / "ref" / "c.pt"),
                      **CAM16)
    m_ref = fit_cam16(ref)
    assert m_ref["split"]["train"]["patches"] == CAM16["batch_size"]  # one batch per epoch

    values = {"data": str(store), "run_dir": str(tmp_path / "ddp" / "run"), "out": str(tmp_path / "ddp" / "c.pt"),
              **CAM16}
    run = Path(values["run_dir"])
    rc, output, audits = _torchrun(tmp_path, "pretrain_cam16.py", values, die_after=2)
    assert rc != 0 and not (run / "metrics.json").exists(), output[-3000:]
    killed = read_jsonl(run / "log.jsonl")
    assert [r["epoch"] for r in killed] == [1, 2] and load_state(run / "last.pt")["fit"]["epoch"] == 2

    rc, output, audits = _torchrun(tmp_path, "pretrain_cam16.py", values)
    assert rc == 0, output[-3000:]
    assert audits[1] == [] and any("last.pt" in p for p in audits[0])
    rows = read_jsonl(run / "log.jsonl")
    assert rows[:2] == killed
    ref_rows = read_jsonl(Path(ref.run_dir) / "log.jsonl")
    _close(rows, ref_rows, ("train_loss", "val_loss", "train_acc", "val_acc"), rel=1e-4)
    assert [r["best"] for r in rows] == [r["best"] for r in ref_rows]
    assert _files(values["run_dir"]) == _files(ref.run_dir)
    m = json.loads((run / "metrics.json").read_text())
    assert m["test"]["confusion_matrix"] == m_ref["test"]["confusion_matrix"] and m["processes"] == 2
    assert np.allclose(np.load(run / "test_predictions.npz")["prob_tumor"],
                       np.load(Path(ref.run_dir) / "test_predictions.npz")["prob_tumor"], atol=1e-4)
    ours, theirs = load_checkpoint(values["out"])["model"], load_checkpoint(ref.out)["model"]
    assert ours.keys() == theirs.keys()  # the plain module's names, no "module." prefix
    assert all(torch.allclose(ours[k], theirs[k], atol=1e-4) for k in ours)
