"""SmallCNN, FusionModel (every arm x mode trains a step, encoders stay frozen), arm encoder loading."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from fusion_fakes import tiny_checkpoints, use_tiny_cam16

from fusion.encoders import as_registry, load_arm_encoders
from fusion.models import FUSIONS, CNNConfig, FusionModel, SmallCNN, check_mode
from fusion.sources import DEFAULT_ARMS
from pretrain.checkpoint import CheckpointError
from pretrain.utils import count_parameters


@pytest.fixture(scope="module")
def ckpt_files(tmp_path_factory):
    return tiny_checkpoints(tmp_path_factory.mktemp("enc"), size=16)


@pytest.fixture
def ckpts(ckpt_files, monkeypatch):
    use_tiny_cam16(monkeypatch)
    return ckpt_files


def test_small_cnn_default_size_and_shapes():
    cnn = SmallCNN()
    assert 0.6e6 < count_parameters(cnn) < 0.9e6
    for s in (48, 64):
        x = torch.rand(2, 3, s, s)
        assert cnn.forward_features(x).shape == (2, cnn.out_dim)
        assert cnn(x).shape == (2, 5)
    small = SmallCNN(CNNConfig(channels=[8, 16], input_size=16))
    assert small(torch.rand(3, 3, 16, 16)).shape == (3, 5)
    with pytest.raises(ValueError, match="too small"):
        CNNConfig(channels=[8, 8, 8, 8, 8], input_size=16)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid arms") as e:
        as_registry({}).arm("imagenet")
    assert "prcc+cam16" in str(e.value)
    with pytest.raises(ValueError, match="valid modes") as e:
        check_mode("attention")
    assert "gated" in str(e.value)


def _snapshot(encoders):
    return {s: {k: v.clone() for k, v in e.state_dict().items()} for s, e in encoders.items()}


@pytest.mark.parametrize("mode", list(FUSIONS))
@pytest.mark.parametrize("arm", [*DEFAULT_ARMS, "random", "random:prcc", "random:cam16"])
def test_every_arm_and_mode_trains_a_step_with_frozen_encoders(arm, mode, ckpts):
    torch.manual_seed(0)
    encoders = load_arm_encoders(arm, ckpts, seed=0, image_size=16)
    assert sorted(encoders) == sorted(as_registry(ckpts).arm(arm).sources)
    before = _snapshot(encoders)
    model = FusionModel(SmallCNN(CNNConfig(channels=[8, 16], input_size=16)), encoders, mode)
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith("encoders") for n in names)  # the optimizer never sees encoder weights
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    assert all(not e.training for e in encoders.values())
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    w0 = model.cnn.head.weight.detach().clone()
    for _ in range(2):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(w0, model.cnn.head.weight) or mode == "concat" and encoders
    after = _snapshot(encoders)
    for s in before:
        for k in before[s]:
            assert torch.equal(before[s][k], after[s][k]), f"{arm}/{mode}: encoder {s} {k} changed"
    if mode == "gated" and encoders:
        gw = model.gate_weights
        assert set(gw) == {"cnn", *encoders} and abs(sum(gw.values()) - 1) < 1e-5


def test_precomputed_features_match_online(ckpts):
    encoders = load_arm_encoders("prcc+cam16", ckpts, image_size=16)
    model = FusionModel(SmallCNN(CNNConfig(channels=[8, 16], input_size=16)), encoders, "concat").eval()
    x = torch.rand(3, 3, 16, 16)
    feats = model.encode_sources(x)
    assert feats["cam16"].shape == (3, 12) and feats["prcc"].shape == (3, 8)
    assert torch.allclose(model(x), model(x, feats))


def test_random_arm_is_seeded_and_differs_from_pretrained(ckpts):
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    r0 = load_arm_encoders("random", ckpts, seed=0)
    assert torch.equal(torch.rand(1), expected_next)  # the global RNG is left alone
    r0b = load_arm_encoders("random", ckpts, seed=0)
    r1 = load_arm_encoders("random", ckpts, seed=1)
    pre = load_arm_encoders("prcc+cam16", ckpts)
    w = {n: e.state_dict() for n, e in (("r0", r0["cam16"]), ("r0b", r0b["cam16"]), ("r1", r1["cam16"]),
                                         ("pre", pre["cam16"]))}
    k = "conv.weight"
    assert torch.equal(w["r0"][k], w["r0b"][k])
    assert not torch.equal(w["r0"][k], w["r1"][k])
    assert not torch.equal(w["r0"][k], w["pre"][k])
    assert not r0["cam16"].pretrained and pre["cam16"].pretrained


def test_wrong_kind_missing_path_and_size_mismatch(ckpts):
    with pytest.raises(CheckpointError, match="prcc_checkpoint.*test_tiny_cam16.*expected kind 'prcc_autoencoder'"):
        load_arm_encoders("prcc", {"prcc": ckpts["cam16"]})
    with pytest.raises(CheckpointError, match="cam16_checkpoint.*prcc_autoencoder"):
        load_arm_encoders("cam16", {"cam16": ckpts["prcc"]})
    with pytest.raises(ValueError, match=r"uses source\(s\) \['cam16'\] that are not defined"):
        load_arm_encoders("prcc+cam16", {"prcc": ckpts["prcc"]})
    with pytest.raises(FileNotFoundError):
        load_arm_encoders("cam16", {"cam16": "nowhere/cam16.pt"})
    # the CAM16 test encoder expects 32 px; 16 px WBC images need encoder_resize
    with pytest.raises(ValueError, match=r"expects 32x32.*16x16.*encoder_resize") as e:
        load_arm_encoders("cam16", ckpts, image_size=16, encoder_resize=False)
    assert str(ckpts["cam16"]) in str(e.value)
    enc = load_arm_encoders("cam16", ckpts, image_size=16, encoder_resize=True)
    model = FusionModel(SmallCNN(CNNConfig(channels=[8, 16], input_size=16)), enc, "sum", encoder_resize=False)
    with pytest.raises(ValueError, match="expects 32x32"):
        model(torch.rand(2, 3, 16, 16))


def test_pool_before_relu_trains_bit_identically_to_relu_before_pool():
    """SmallCNN pools before its ReLU (cheaper); training must match conv-BN-ReLU-pool exactly."""
    torch.manual_seed(0)
    new = SmallCNN(CNNConfig(channels=[8, 16, 32], input_size=24))
    old = copy.deepcopy(new)
    blocks = list(old.features)
    old.features = torch.nn.Sequential(*[m for i in range(0, len(blocks), 4)
                                         for m in (blocks[i], blocks[i + 1], blocks[i + 3], blocks[i + 2])])
    assert isinstance(old.features[2], torch.nn.ReLU) and isinstance(new.features[2], torch.nn.MaxPool2d)
    assert list(old.state_dict()) == list(new.state_dict())  # checkpoints stay interchangeable
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (old, new)]
    y = torch.randint(0, 5, (16,))
    for step in range(5):
        x = torch.rand(16, 3, 24, 24) - 0.3  # some all-negative pooling windows too
        losses = []
        for m, opt in zip((old, new), opts, strict=True):
            torch.manual_seed(step)  # the same dropout mask
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == losses[1]
    for (k, a), b in zip(old.state_dict().items(), new.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_speed_probe_reports_the_median_step_time_of_its_config():
    from fusion.speed import speed_probe

    p = speed_probe(size=16, widths=(4, 8), repeats=3, steps=2)
    assert len(p["all"]) == 3 and all(t > 0 for t in p["all"])
    assert p["ms_per_step"] == sorted(p["all"])[1]
    assert (p["image_size"], p["widths"], p["threads"]) == (16, [4, 8], torch.get_num_threads())
