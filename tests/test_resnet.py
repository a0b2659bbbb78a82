"""Cam16ResNet: shapes, normalisation buffers, init, local weight loading, checkpoint round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from pretrain.checkpoint import build_model, load_checkpoint, load_encoder, save_checkpoint
from pretrain.resnet import ARCHS, Cam16ResNet, ResNetConfig, build_resnet, load_weights


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_forward_and_encode_shapes(arch, dim):
    torch.manual_seed(0)
    model = Cam16ResNet(ResNetConfig(arch=arch, input_size=32)).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 2)
        feats = model.encode(x)
    assert feats.shape == (2, dim) and model.out_dim == dim
    assert torch.isfinite(feats).all()


def test_input_spec_and_normalisation_buffers():
    model = Cam16ResNet(input_size=64)
    spec = model.input_spec()
    assert spec == {"size": 64, "channels": 3, "range": [0, 1], "mean": list(model.config.mean),
                    "std": list(model.config.std)}
    state = model.state_dict()
    assert "mean" in state and "std" in state and state["mean"].shape == (1, 3, 1, 1)
    # same key names as torchvision's ResNet, so its state dicts load directly
    tv_keys = set(torchvision.models.resnet18(weights=None).state_dict())
    assert tv_keys == set(state) - {"mean", "std"}


def test_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError, match="resnet18"):
        ResNetConfig(arch="resnet7")
    assert set(ARCHS) == {"resnet18", "resnet34", "resnet50"}


def test_kaiming_init_is_explicit():
    torch.manual_seed(0)
    model = Cam16ResNet(arch="resnet18")
    w = model.layer3[0].conv1.weight  # (256, 128, 3, 3); fan_out = 256 * 9
    assert abs(w.std().item() - math.sqrt(2.0 / (256 * 9))) < 0.1 * math.sqrt(2.0 / (256 * 9))
    assert torch.all(model.bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    assert torch.all(model.fc.bias == 0)


def test_load_torchvision_state_dict_skips_mismatched_fc(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None)  # 1000-class fc
    path = tmp_path / "resnet18-local.pth"
    torch.save(tv.state_dict(), path)
    with pytest.warns(UserWarning, match="fc"):
        model = Cam16ResNet(ResNetConfig(weights_path=str(path)))
    assert torch.equal(model.conv1.weight, tv.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (2, 512)


def test_load_weights_from_our_checkpoint_and_mismatch_names_file(tmp_path):
    src = Cam16ResNet(input_size=32)
    ck = save_checkpoint(tmp_path / "c.pt", kind="cam16_resnet", config=src.config, model=src,
                         input_spec=src.input_spec())
    dst = load_weights(Cam16ResNet(input_size=32), ck)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(),
                                                 strict=True))
    with pytest.raises(ValueError, match="c.pt.*resnet50"):
        Cam16ResNet(ResNetConfig(arch="resnet50", weights_path=str(ck)))
    (tmp_path / "bad.pth").write_text("not a torch file")
    with pytest.raises(ValueError, match="bad.pth"):
        Cam16ResNet(ResNetConfig(weights_path=str(tmp_path / "bad.pth")))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        Cam16ResNet(ResNetConfig(weights_path=str(tmp_path / "absent.pth")))


def test_checkpoint_round_trip_and_frozen_encoder(tmp_path):
    torch.manual_seed(0)
    model = Cam16ResNet(input_size=32).eval()
    # weights_path in the saved config must never be read again when rebuilding
    cfg = {**vars(model.config), "weights_path": str(tmp_path / "gone.pth")}
    path = save_checkpoint(tmp_path / "cam16.pt", kind="cam16_resnet", config=cfg, model=model,
                           input_spec=model.input_spec(), metrics={"val_loss": 0.1})
    ckpt = load_checkpoint(path, kind="cam16_resnet")
    rebuilt = build_model(ckpt).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model(x), atol=1e-6)
    enc = load_encoder(path)
    assert enc.out_dim == 512 and enc.input_size == 32 and enc.kind == "cam16_resnet"
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training  # frozen stays in eval
    with torch.inference_mode():
        feats = enc.encode(x)
    assert feats.shape == (3, 512)
    assert torch.allclose(feats, model.encode(x).detach(), atol=1e-6)
    rand = load_encoder(path, random_init=True, seed=1)  # model above was built after seed 0
    assert not torch.allclose(rand.encode(x), feats)


def test_builder_rejects_unknown_config_keys():
    with pytest.raises(ValueError, match="valid keys"):
        build_resnet({"arch": "resnet18", "depth": 3})
