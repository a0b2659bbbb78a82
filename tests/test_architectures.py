"""Standard architectures as arms: scratch or local weights, whole or frozen, SGD + step decay,
progressive resizing, and the report's architecture rows (issue 18, item 1 and 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fusion_fakes import nest, synthetic_wbc

from fusion.encoders import build_fusion_model
from fusion.models import BackboneClassifier, BackboneConfig
from fusion.report import summarise
from fusion.sources import SourceError, build_registry
from fusion.train import OptimConfig, RunConfig, make_optimizer, make_schedule, train_run
from pretrain.backbones import build_backbone
from pretrain.checkpoint import load_checkpoint

ARCH = "torchvision:squeezenet1_1"  # the fastest standard architecture on CPU (min side 17)


def _base(tmp_path, arms, **kw):
    return nest(**{**dict(data="/synthetic", cache_dir="", val=0.25, test=0.25, image_size=32, epochs=2, min_steps=4,
                          max_steps=4, evals=2, batch_size=16, progress=False, curves=False, device="cpu",
                          arm_sets=arms, split=str(tmp_path / "split.json")), **kw})


def test_arm_with_a_backbone_trains_and_its_checkpoint_rebuilds_the_same_model(tmp_path):
    data = synthetic_wbc(8, 32)
    cfg = RunConfig(**_base(tmp_path, {"sq": {"backbone": "squeezenet1_1"}}, arm="sq", out=str(tmp_path / "sq")))
    r = train_run(cfg, data=data)
    assert r["status"] == "ok" and r["backbone"] == ARCH and not r["backbone_pretrained"]
    assert r["trainable_params"] == r["params"] > 700_000 and r["train_images_per_s"] > 0
    ckpt = load_checkpoint(tmp_path / "sq" / "best.pt", kind="wbc_fusion")
    assert ckpt["config"]["classifier"] == "backbone"
    model = build_fusion_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    saved = np.load(tmp_path / "sq" / "test_probs.npz")
    x = torch.from_numpy(data.images[saved["rows"]]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        probs = torch.softmax(model(x), 1).numpy()
    np.testing.assert_allclose(probs, saved["probs"], atol=1e-5)


def test_frozen_backbone_from_local_weights_keeps_them_and_trains_only_the_head(tmp_path):
    torch.manual_seed(5)
    ref = build_backbone(ARCH)
    torch.save(ref.state_dict(), tmp_path / "sq.pth")
    arms = {"sq_frozen": {"backbone": ARCH, "weights": str(tmp_path / "sq.pth"), "freeze": True}}
    cfg = RunConfig(**_base(tmp_path, arms, arm="sq_frozen", out=str(tmp_path / "f")))
    r = train_run(cfg, data=synthetic_wbc(8, 32))
    assert r["backbone_pretrained"] and r["backbone_frozen"]
    state = load_checkpoint(tmp_path / "f" / "best.pt", kind="wbc_fusion")["model"]
    for k, v in ref.state_dict().items():  # the backbone is exactly the file's, after training
        assert torch.equal(state[f"cnn.backbone.{k}"], v), k
    assert r["trainable_params"] == 512 * 5 + 5  # the linear head only


def test_bad_architecture_inputs_name_the_fix(tmp_path):
    with pytest.raises(SourceError, match=r"unknown architecture 'resnet81'.*valid short names: resnet18, resnet50, "
                                          r"vgg16, vgg19, mobilenet_v2"):
        build_registry(arms={"x": {"backbone": "resnet81"}})
    with pytest.raises(SourceError, match=r"unknown torchvision model .vgg61.; close names: vgg11, vgg13, vgg16"):
        build_registry(arms={"x": {"backbone": "torchvision:vgg61"}})
    with pytest.raises(SourceError, match="freeze: true needs weights"):
        build_registry(arms={"x": {"backbone": "resnet18", "freeze": True}})
    with pytest.raises(SourceError, match=r"takes the keys \['sources', 'backbone', 'weights', 'freeze'\]"):
        build_registry(arms={"x": {"backbone": "resnet18", "lr": 1}})
    with pytest.raises(ValueError, match="alexnet needs images of at least 63x63 pixels, but image_size is 48"):
        BackboneClassifier(BackboneConfig("torchvision:alexnet", input_size=48))
    torch.save(build_backbone(ARCH).state_dict(), tmp_path / "sq.pth")  # weights of another architecture
    arms = {"r18": {"backbone": "resnet18", "weights": str(tmp_path / "sq.pth")}}
    cfg = RunConfig(**_base(tmp_path, arms, arm="r18", out=str(tmp_path / "r")))
    with pytest.raises(ValueError, match=r"sq.pth does not fit torchvision:resnet18: missing keys \[bn1.bias.*unexpected keys \[features"):
        train_run(cfg, data=synthetic_wbc(4, 32))


def test_sgd_with_momentum_and_step_decay():
    p = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer(p, OptimConfig(optimizer="sgd", lr=0.1, momentum=0.8))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8
    sched = make_schedule(opt, 100, OptimConfig(schedule="step", warmup=0.1, step_at=[0.5, 0.8], step_gamma=0.1))
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1) and lrs[49] == pytest.approx(0.1)
    assert lrs[50] == pytest.approx(0.01) and lrs[80] == pytest.approx(0.001)
    for bad in ({"optimizer": "lamb"}, {"schedule": "poly"}, {"step_at": [0.8, 0.5]}, {"step_at": [1.5]}):
        with pytest.raises(ValueError, match="optim."):
            OptimConfig(**bad)


def test_progressive_resizing_trains_at_growing_sizes_then_full_size(tmp_path):
    cfg = RunConfig(**_base(tmp_path, {}, out=str(tmp_path / "p"), cnn_channels=[8], evals=4, min_steps=8,
                            max_steps=8, progressive=[16, 24]))
    assert train_run(cfg, data=synthetic_wbc(8, 32))["status"] == "ok"
    log = [json.loads(line) for line in (tmp_path / "p" / "log.jsonl").read_text().splitlines()]
    assert [r["train_train_size"] for r in log] == [16, 16, 24, 32]
    with pytest.raises(ValueError, match=r"progressive sides \[16, 32\] must all be below image_size 32"):
        RunConfig(**_base(tmp_path, {}, progressive=[16, 32]))
    with pytest.raises(ValueError, match="optim.progressive must list growing"):
        RunConfig(**_base(tmp_path, {}, progressive=[24, 16]))


def test_report_puts_architectures_beside_the_small_cnn_with_their_cost(tmp_path):
    rows = []
    for seed in range(3):
        for arm, backbone, f1 in (("scratch", "small_cnn", 0.90), ("vgg", "torchvision:vgg16", 0.80)):
            rows.append({"run": f"{arm}{seed}", "arm": arm, "sources": [], "twin_of": None, "backbone": backbone,
                         "mode": "sum", "fraction": 0.01, "seed": seed, "status": "ok", "accuracy": f1,
                         "macro_f1": f1 - 0.01 * seed * (arm == "vgg"), "train_seconds": 10.0 * (1 + 9 * (arm == "vgg")),
                         "train_images_per_s": 100.0, "trainable_params": 7, "per_class": {}})
    s = summarise(rows)
    (vs,) = s.paired
    assert (vs["arm"], vs["versus"], vs["kind"]) == ("vgg", "scratch", "architecture")
    assert "vgg worse than the small CNN (-0.110 macro-F1)" in s.verdicts[0.01]
    assert s.verdicts[0.01].startswith("Architectures at 1%")  # no sources: nothing about pretraining


def test_ensemble_averages_the_runs_probabilities_and_refuses_other_test_images(tmp_path):
    from fusion.ensemble import ensemble
    from fusion.metrics import classification_metrics

    data = synthetic_wbc(8, 32)
    dirs = []
    for seed, arms, arm in ((0, {}, "scratch"), (1, {}, "scratch"), (0, {"sq": {"backbone": ARCH}}, "sq")):
        cfg = RunConfig(**_base(tmp_path, arms, arm=arm, seed=seed, cnn_channels=[8], out=str(tmp_path / f"{arm}{seed}")))
        train_run(cfg, data=data)
        dirs.append(tmp_path / f"{arm}{seed}")
    e = ensemble(dirs)  # two seeds of the small CNN and a SqueezeNet
    probs = [np.load(d / "test_probs.npz") for d in dirs]
    mean = np.mean([p["probs"] for p in probs], axis=0)
    assert e["macro_f1"] == classification_metrics(probs[0]["labels"], mean.argmax(1), list(probs[0]["classes"]))["macro_f1"]
    assert len(e["member_macro_f1"]) == 3
    other = RunConfig(**_base(tmp_path, {}, cnn_channels=[8], split=str(tmp_path / "other.json"), split_seed=3,
                              out=str(tmp_path / "other")))
    train_run(other, data=data)
    with pytest.raises(ValueError, match="tested on other images or classes"):
        ensemble([dirs[0], tmp_path / "other"])
