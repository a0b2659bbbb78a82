"""External backbones (`timm:` / `torchvision:`): building without downloads, loading local weights
in every accepted format, errors that name the file and keys, frozen encoders, the random twin."""

from __future__ import annotations

import hashlib
import logging

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn

from pretrain import backbones as bb
from pretrain.backbones import (
    build_backbone,
    input_config,
    load_external_encoder,
    load_weights,
    minimum_input_size,
    parse_model_name,
)

TV = "torchvision:resnet18"


def _seeded(fn, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


@pytest.fixture(scope="module")
def resnet18_source():
    """A full torchvision resnet18 (fc included, non-trivial BN stats) and its state dict."""
    net = _seeded(lambda: torchvision.models.resnet18(weights=None), 7)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval(), {k: v.clone() for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory, resnet18_source):
    _, state = resnet18_source
    d = tmp_path_factory.mktemp("rn18")
    files = {"plain": d / "plain.pth", "nested": d / "nested.pth", "bin": d / "pytorch_model.bin",
             "safetensors": d / "model.safetensors"}
    torch.save(state, files["plain"])
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, files["nested"])
    torch.save(state, files["bin"])
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, files["safetensors"])
    return files


def _reference(net: nn.Module, x: torch.Tensor, mean, std) -> torch.Tensor:
    """Pooled features of the source model by hand: normalise, trunk, no fc."""
    fc, net.fc = net.fc, nn.Identity()
    try:
        with torch.no_grad():
            m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
            return net((x - m) / s)
    finally:
        net.fc = fc


def test_parse_model_name():
    assert parse_model_name("timm:resnet10t") == ("timm", "resnet10t")
    assert parse_model_name("torchvision:resnet18") == ("torchvision", "resnet18")
    for bad in ("hub:resnet18", "resnet18", "timm:"):
        with pytest.raises(ValueError, match=r"timm:<model>, torchvision:<model>"):
            parse_model_name(bad)


@pytest.mark.parametrize("fmt", ["plain", "nested", "bin", "safetensors"])
def test_torchvision_weights_round_trip(fmt, resnet18_source, resnet18_files):
    net, _ = resnet18_source
    enc = load_external_encoder(TV, resnet18_files[fmt])
    assert (enc.kind, enc.model_name, enc.pretrained, enc.out_dim, enc.input_size) == ("external", TV, True, 512, 224)
    assert enc.weights_path == enc.checkpoint_path == str(resnet18_files[fmt])
    assert enc.weights_sha256 == hashlib.sha256(resnet18_files[fmt].read_bytes()).hexdigest()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = enc.encode(x)  # (2, 512)
    assert got.shape == (2, 512)
    assert torch.equal(got, _reference(net, x, bb.IMAGENET_MEAN, bb.IMAGENET_STD))


def test_classifier_keys_dropped_with_note(resnet18_files, caplog):
    model = build_backbone(TV)
    with caplog.at_level(logging.INFO, logger="pretrain.backbones"):
        dropped = load_weights(model, resnet18_files["plain"], TV)
    assert dropped == ["fc.bias", "fc.weight"]
    assert "fc.weight" in caplog.text and "dropped 2 classifier key(s)" in caplog.text


def test_missing_num_batches_tracked_is_fine(tmp_path, resnet18_source):
    _, state = resnet18_source
    path = tmp_path / "old.pth"  # files written before BatchNorm had num_batches_tracked
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    load_weights(build_backbone(TV), path, TV)


def test_torchvision_classifier_prefix_kept(tmp_path):
    """mobilenet_v3_small: whole classifier MLP dropped, pooled 576 features, loads from safetensors."""
    name = "torchvision:mobilenet_v3_small"
    src = _seeded(lambda: torchvision.models.mobilenet_v3_small(weights=None), 1).eval()
    path = tmp_path / "mnv3.safetensors"
    safetensors.torch.save_file(src.state_dict(), path)
    enc = load_external_encoder(name, path)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    src.classifier = nn.Identity()
    with torch.no_grad():
        want = src((x - enc.mean) / enc.std)
        assert enc.out_dim == 576 and torch.equal(enc.encode(x), want)


def test_feature_part_cuts_at_first_linear_and_keeps_names():
    head = nn.Sequential(nn.LayerNorm(8), nn.Flatten(1), nn.Linear(8, 10))  # ConvNeXt-like
    kept = bb._feature_part(head)
    assert [k for k, _ in kept.named_children()] == ["0", "1"]
    squeeze = nn.Sequential(nn.Dropout(), nn.Conv2d(8, 10, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    assert isinstance(bb._feature_part(squeeze).pool, nn.AdaptiveAvgPool2d)
    assert isinstance(bb._feature_part(nn.Sequential(nn.Dropout(), nn.Linear(8, 2))), nn.Identity)
    assert minimum_input_size("torchvision:squeezenet1_1") == 17
    assert load_external_encoder("torchvision:squeezenet1_1", random_init=True).out_dim == 512


def test_timm_weights_nested_and_prefixed(tmp_path):
    """timm model saved with its head, under "model" with a "backbone." prefix: head dropped, rest loads."""
    name = "timm:test_vit"
    src = _seeded(lambda: timm.create_model("test_vit", pretrained=False), 2).eval()
    path = tmp_path / "vit.pth"
    torch.save({"model": {f"backbone.{k}": v for k, v in src.state_dict().items()}}, path)
    enc = load_external_encoder(name, path)
    x = torch.rand(2, 3, enc.input_size, enc.input_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = src.forward_head(src.forward_features((x - enc.mean) / enc.std), pre_logits=True)
        assert torch.equal(enc.encode(x), want)
    assert enc.out_dim == src.num_features


def test_timm_input_config_from_pretrained_cfg():
    enc = load_external_encoder("timm:test_resnet", random_init=True)
    cfg = enc.backbone.pretrained_cfg
    assert enc.input_size == cfg["input_size"][-1] == 160
    assert torch.allclose(enc.mean.flatten(), torch.tensor(cfg["mean"])) and cfg["mean"] == (0.5, 0.5, 0.5)
    assert torch.allclose(enc.std.flatten(), torch.tensor(cfg["std"]))
    rn = build_backbone("timm:resnet10t")
    assert input_config(rn, "timm") == {"size": 176, "mean": bb.IMAGENET_MEAN, "std": bb.IMAGENET_STD}
    assert input_config(build_backbone(TV), "torchvision", "resnet18")["size"] == 224
    over = load_external_encoder("timm:test_resnet", random_init=True, input_size=64, mean=(0, 0, 0), std=(1, 1, 1))
    assert over.input_size == 64 and over.mean.sum() == 0 and over.std.sum() == 3
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(over.encode(x), over.backbone(x))  # identity normalisation


def test_weights_mismatch_names_file_keys_and_fix(resnet18_files, resnet18_source, tmp_path):
    with pytest.raises(ValueError) as e:
        load_external_encoder("torchvision:resnet34", resnet18_files["plain"])
    msg = str(e.value)
    assert "\n" not in msg and str(resnet18_files["plain"]) in msg
    assert "missing keys [layer1.2." in msg and "unexpected" not in msg and "is this file for torchvision:resnet34?" in msg
    _, state = resnet18_source
    bad = tmp_path / "bad.pth"
    torch.save({**state, "conv1.weight": torch.zeros(32, 3, 7, 7), "extra.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"unexpected keys \[extra\.weight\].*conv1\.weight: file \(32, 3, 7, 7\) "
                                         r"vs model \(64, 3, 7, 7\)"):
        load_external_encoder(TV, bad)


@pytest.mark.parametrize("fmt", ["plain", "safetensors"])
def test_truncated_file(fmt, resnet18_files, tmp_path):
    src = resnet18_files[fmt]
    cut = tmp_path / f"cut{src.suffix}"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(ValueError, match=rf"{cut.name}.*is it complete"):
        load_external_encoder(TV, cut)


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_external_encoder(TV, tmp_path / "nope.pth")
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"'\.h5'; accepted: .pth, .pt, .bin, .ckpt, .safetensors"):
        load_external_encoder(TV, tmp_path / "w.h5")
    with pytest.raises(ValueError, match="no weights file given for torchvision:resnet18; weights are never "
                                         "downloaded: give a local .pth/.bin/.safetensors"):
        load_external_encoder(TV)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        load_external_encoder(TV, tmp_path / "list.pt")
    torch.save({"format": bb.FORMAT, "kind": "cam16_resnet", "model": {}}, tmp_path / "ours.pth")
    with pytest.raises(ValueError, match="wbc-fusion 'cam16_resnet' checkpoint"):
        load_external_encoder(TV, tmp_path / "ours.pth")


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet1'; close names: .*resnet10t"):
        build_backbone("timm:resnet1")
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet181'; close names: resnet18,"):
        build_backbone("torchvision:resnet181")
    with pytest.raises(ValueError, match="not an image classification backbone"):
        build_backbone("torchvision:fcn_resnet50")
    with pytest.raises(ValueError, match="hub or directory"):
        build_backbone("timm:hf-hub:org/model")


def test_frozen(resnet18_files):
    enc = load_external_encoder(TV, resnet18_files["plain"])
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    nn.Sequential(enc).train()
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    enc.encode(torch.rand(4, 3, 64, 64))  # BN in eval: running stats do not move
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_random_twin_seeded_and_rng_untouched(resnet18_files):
    rng = torch.get_rng_state()
    a = load_external_encoder(TV, random_init=True, seed=3)
    b = load_external_encoder(TV, resnet18_files["plain"], random_init=True, seed=3)  # weights ignored
    c = load_external_encoder(TV, random_init=True, seed=4)
    load_external_encoder(TV, resnet18_files["plain"])
    assert torch.equal(rng, torch.get_rng_state())
    assert (a.pretrained, a.weights_path, a.weights_sha256, a.seed) == (False, None, None, 3)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["backbone.conv1.weight"], sc["backbone.conv1.weight"])
    assert len({a.cache_key, b.cache_key, c.cache_key}) == 2 and "random3" in a.cache_key


def test_too_small_input_refused():
    with pytest.raises(ValueError, match=r"torchvision:resnet18 needs images of at least 32x32 pixels, got "
                                         r"input_size 16x16"):
        load_external_encoder(TV, random_init=True, input_size=16)
    enc = load_external_encoder(TV, random_init=True, input_size=32)
    with pytest.raises(ValueError, match="at least 32x32 pixels, got images 24x24; resize"):
        enc.encode(torch.rand(1, 3, 24, 24))
    assert minimum_input_size(TV) == 32
    vit = load_external_encoder("timm:vit_tiny_patch16_224", random_init=True)
    assert vit.input_size == 224 and vit.fixed_size == 224
    with pytest.raises(ValueError, match="takes only 224x224 images"):
        vit.encode(torch.rand(1, 3, 160, 160))
    with pytest.raises(ValueError, match="takes only 224x224"):
        load_external_encoder("timm:vit_tiny_patch16_224", random_init=True, input_size=160)


def test_never_downloads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(timm.models._builder, "load_pretrained", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in (TV, "torchvision:mobilenet_v3_small", "timm:resnet10t", "timm:test_efficientnet"):
        assert load_external_encoder(name, random_init=True).out_dim > 0
