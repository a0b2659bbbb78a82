"""The one checkpoint format: weights_only loading, round trips, bad files, load_encoder, atomic writes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain import load_encoder
from pretrain.autoencoder import AEConfig, ConvAutoencoder
from pretrain.checkpoint import FORMAT, CheckpointError, build_model, load_checkpoint, save_checkpoint

TINY = AEConfig(base_width=4, depth=2, latent_channels=6, input_size=16)


def _save(path, seed=0, kind="prcc_autoencoder", **kw):
    torch.manual_seed(seed)
    model = ConvAutoencoder(TINY)
    with torch.no_grad():  # non-default BN statistics, so a forgotten buffer would show
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model.eval()
    save_checkpoint(path, kind=kind, config=TINY, model=model, input_spec=model.input_spec(),
                    metrics={"val_mse": 0.01}, data={"fingerprint": "abc", "n_images": 3, "root": "x"},
                    train={"epochs": 1}, **kw)
    return model


def test_weights_only_load_and_fields(tmp_path):
    p = tmp_path / "ae.pt"
    _save(p)
    raw = torch.load(p, weights_only=True)
    assert raw["format"] == FORMAT and raw["kind"] == "prcc_autoencoder"
    assert raw["config"]["latent_channels"] == 6 and raw["config"]["mean"] == list(TINY.mean)
    assert raw["input"] == {"size": 16, "channels": 3, "range": [0, 1], "mean": list(TINY.mean),
                            "std": list(TINY.std)}
    assert raw["metrics"] == {"val_mse": 0.01}
    assert raw["data"]["fingerprint"] == "abc" and raw["train"] == {"epochs": 1}
    assert isinstance(raw["version"], str) and raw["version"]


def test_round_trip_identical_outputs(tmp_path):
    p = tmp_path / "ae.pt"
    model = _save(p)
    rebuilt = build_model(load_checkpoint(p, kind="prcc_autoencoder")).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
        assert torch.equal(model.encode(x), rebuilt.encode(x))


def test_load_encoder_is_frozen(tmp_path):
    p = tmp_path / "ae.pt"
    model = _save(p)
    enc = load_encoder(p)
    assert not enc.training
    assert all(not q.requires_grad for q in enc.parameters())
    assert enc.kind == "prcc_autoencoder" and enc.input_size == 16 and enc.out_dim == 6 and enc.pretrained
    parent = nn.Sequential(enc, nn.Linear(6, 2))
    parent.train()
    assert not enc.training and all(not m.training for m in enc.modules())
    x = torch.rand(2, 3, 16, 16)
    z = enc.encode(x)
    assert z.shape == (2, 6) and not z.requires_grad
    with torch.no_grad():
        assert torch.equal(z, model.encode(x))
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    enc.encode(torch.rand(8, 3, 16, 16))  # a forward in a parent's train mode must not move BN stats
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_random_init_gives_other_weights(tmp_path):
    p = tmp_path / "ae.pt"
    _save(p)
    trained = load_encoder(p)
    r1 = load_encoder(p, random_init=True, seed=3)
    r2 = load_encoder(p, random_init=True, seed=3)
    assert not r1.pretrained and not r1.training
    w = "encoder.0.weight"
    assert not torch.equal(trained.state_dict()[w], r1.state_dict()[w])
    assert torch.equal(r1.state_dict()[w], r2.state_dict()[w])  # seeded control is reproducible
    assert r1.encode(torch.rand(1, 3, 16, 16)).shape == (1, 6)


@pytest.mark.parametrize("make,what", [
    (lambda p: torch.save(torch.zeros(3), p), "Tensor"),
    (lambda p: p.write_text("hello, not a checkpoint\n"), "not a loadable torch checkpoint"),
    (lambda p: torch.save({"model": {}, "epoch": 3}, p), "not a wbc-fusion checkpoint"),
])
def test_not_ours(tmp_path, make, what):
    p = tmp_path / "other.pt"
    make(p)
    with pytest.raises(CheckpointError, match=what) as e:
        load_encoder(p)
    assert str(p) in str(e.value)


def test_truncated_file(tmp_path):
    p = tmp_path / "ae.pt"
    _save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable torch checkpoint"):
        load_checkpoint(p)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_encoder(tmp_path / "nope.pt")


def test_wrong_kind(tmp_path):
    p = tmp_path / "ae.pt"
    _save(p)
    with pytest.raises(CheckpointError, match="is a 'prcc_autoencoder' checkpoint; expected kind 'cam16_resnet'"):
        load_checkpoint(p, kind="cam16_resnet")
    q = tmp_path / "fusion.pt"
    _save(q, kind="wbc_fusion")
    with pytest.raises(CheckpointError, match="'wbc_fusion'.*expected kind 'prcc_autoencoder' or 'cam16_resnet'"):
        load_encoder(q)


def test_unknown_kind_cannot_be_built(tmp_path):
    p = tmp_path / "x.pt"
    _save(p, kind="mystery_model")
    with pytest.raises(CheckpointError, match="no model builder registered for kind 'mystery_model'"):
        build_model(load_checkpoint(p))


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "ae.pt"
    model = _save(p, seed=0)
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh:  # half-written file, then the process "dies"
            fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(p, seed=1)
    monkeypatch.undo()
    enc = load_encoder(p)  # still the first, complete file
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(enc.encode(x), model.encode(x))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["ae.pt"]  # no temp file left behind


def test_missing_folder_is_created(tmp_path):
    p = tmp_path / "a" / "b" / "ae.pt"
    _save(p)
    assert load_checkpoint(p)["kind"] == "prcc_autoencoder"
