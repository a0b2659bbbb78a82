"""Shared helpers: config parsing, atomic writes, JSONL, seeding, device, the fit loop."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from pretrain.config import config_from_dict, parse_config, save_config
from pretrain.engine import NonFiniteLossError, evaluate, fit, train_one_epoch
from pretrain.images import NoImagesError, TooManyBadImagesError, find_images, load_images
from pretrain.utils import (
    append_jsonl,
    atomic_path,
    atomic_write_json,
    eval_batches,
    fingerprint_files,
    get_device,
    read_jsonl,
    seed_everything,
)


@dataclasses.dataclass
class _Cfg:
    data: str = "x"
    epochs: int = 2
    lr: float = 1e-3
    amp: bool = False
    fractions: tuple[float, ...] = (0.1, 1.0)


def test_parse_config_precedence(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 5\nlr: 0.5\n")
    cfg, _ = parse_config(_Cfg, ["--config", str(y), "--lr", "0.1", "--amp", "true", "--fractions", "0.5", "1"])
    assert cfg.epochs == 5 and cfg.lr == 0.1 and cfg.amp is True and list(cfg.fractions) == [0.5, 1.0]
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert "epochs: 5" in (tmp_path / "out" / "config.yaml").read_text()


def test_unknown_config_key_lists_valid(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*valid keys"):
        config_from_dict(_Cfg, {"epoch": 3})


def test_atomic_path_keeps_old_on_error(tmp_path):
    p = tmp_path / "sub" / "f.json"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(p.read_text()) == {"a": 1}
    assert [x.name for x in p.parent.iterdir()] == ["f.json"]


def test_eval_batches_never_leave_a_lone_last_item():
    assert eval_batches(257, 128) == [(0, 128), (128, 257)]
    assert eval_batches(258, 128) == [(0, 128), (128, 256), (256, 258)]
    assert eval_batches(256, 128) == [(0, 128), (128, 256)]
    assert eval_batches(1, 128) == [(0, 1)] and eval_batches(0, 128) == []


def test_jsonl_ignores_truncated_last_line(tmp_path):
    p = tmp_path / "log.jsonl"
    append_jsonl(p, {"epoch": 1})
    with open(p, "a") as f:
        f.write('{"epoch": 2, "lo')
    assert read_jsonl(p) == [{"epoch": 1}]


def test_seed_and_device():
    seed_everything(3)
    a = torch.rand(3)
    seed_everything(3)
    assert torch.equal(a, torch.rand(3))
    assert get_device("cpu").type == "cpu"
    assert get_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            get_device("cuda")


def test_fingerprint_changes_with_content(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"1")
    f1 = fingerprint_files([a], tmp_path)
    a.write_bytes(b"2")
    assert fingerprint_files([a], tmp_path) != f1


def test_find_images_errors(tmp_path):
    with pytest.raises(NoImagesError, match=str(tmp_path)):
        find_images(tmp_path)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NoImagesError, match=r"\.png"):
        find_images(tmp_path)


def test_load_images_skips_and_fails_on_mostly_bad(tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    bad = [tmp_path / f"bad{i}.png" for i in range(3)]
    for b in bad:
        b.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="bad0.png"):
        arrays, kept = load_images([good, bad[0]], max_bad_fraction=0.5)
    assert kept == [good] and arrays[0].shape == (8, 8, 3)
    with pytest.raises(TooManyBadImagesError), pytest.warns(UserWarning):
        load_images([good, *bad])


def _toy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return list(zip(x.split(16), y.split(16), strict=True))


def _step(model, batch, device):
    x, y = batch
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    return loss, len(y), {"acc": (logits.argmax(1) == y).float().mean().item()}


def test_fit_keeps_best_copy_and_logs(tmp_path):
    seed_everything(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    data = _toy()
    res = fit(model, epochs=4, optimizer=opt, monitor="val_acc", mode="max", log_path=tmp_path / "log.jsonl",
              train_epoch=lambda e: train_one_epoch(model, data, _step, opt, torch.device("cpu"), progress=False),
              validate=lambda e: evaluate(model, data, _step, torch.device("cpu")), progress=False)
    rows = read_jsonl(tmp_path / "log.jsonl")
    assert len(rows) == 4 and {"train_loss", "val_loss", "val_acc", "lr"} <= set(rows[0])
    assert res.best["val_acc"] == max(r["val_acc"] for r in rows)
    assert res.best_state["weight"].data_ptr() != model.weight.data_ptr()


def test_nan_loss_raises():
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def bad_step(m, b, d):
        return m(b[0]).sum() * float("nan"), len(b[0]), {}

    with pytest.raises(NonFiniteLossError):
        train_one_epoch(model, _toy(), bad_step, opt, torch.device("cpu"), progress=False)


@dataclasses.dataclass
class _Optim:
    lr: float = 1e-3
    epochs: int = 2


@dataclasses.dataclass
class _Nested:
    data: str = "x"
    optim: _Optim = dataclasses.field(default_factory=_Optim)


def test_nested_sections_from_yaml_and_dotted_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("optim:\n  epochs: 5\n  lr: 1e-2\n")
    cfg, _ = parse_config(_Nested, ["--config", str(y), "--optim.lr", "0.5"])
    assert cfg.optim == _Optim(lr=0.5, epochs=5)  # a flag overrides one key of the section
    cfg, _ = parse_config(_Nested, ["--optim.epochs", "7"])
    assert cfg.optim == _Optim(lr=1e-3, epochs=7) and cfg.data == "x"
    y.write_text("optim:\n  epochs: ten\n")
    with pytest.raises(ValueError, match=r"optim\.epochs must be an integer, got the string 'ten'"):
        parse_config(_Nested, ["--config", str(y)])
    y.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['optim\.epoch'\]"):
        parse_config(_Nested, ["--config", str(y)])
