"""One fusion run: outputs, determinism, frozen encoders, resume/overwrite, NaN loss, bad inputs."""

from __future__ import annotations

import json

import pytest
import torch
from fusion_fakes import nest, synthetic_wbc, tiny_checkpoints, use_tiny_cam16

from fusion.encoders import load_arm_encoders
from fusion.models import CNNConfig, FusionModel, SmallCNN
from fusion.train import RunConfig, _Feeder, plan_steps, predict, recalibrate_bn, train_run, warmup_cosine
from pretrain.checkpoint import build_model, load_checkpoint
from pretrain.engine import train_one_epoch


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {"ckpt": tiny_checkpoints(root / "ck"), "nan": tiny_checkpoints(root / "nan", nan=True),
            "data": synthetic_wbc(10, 16), "root": root}


@pytest.fixture
def env(files, monkeypatch):
    use_tiny_cam16(monkeypatch)
    return files


def _cfg(env, tmp_path, **kw) -> RunConfig:
    base = dict(data="unused", split=str(env["root"] / "split.json"), val=0.2, test=0.2, image_size=16,
                cnn_channels=[8, 16], epochs=2, min_steps=4, max_steps=0, evals=2, batch_size=16, early_stop=0,
                prcc_checkpoint=str(env["ckpt"]["prcc"]), cam16_checkpoint=str(env["ckpt"]["cam16"]),
                out=str(tmp_path / "run"), progress=False, device="cpu", curves=False)
    return RunConfig(**nest(**{**base, **kw}))


def test_run_writes_everything_and_reloads(env, tmp_path):
    cfg = _cfg(env, tmp_path, arm="prcc+cam16", mode="gated", curves=True)
    r = train_run(cfg, data=env["data"])
    assert r["status"] == "ok"
    run = tmp_path / "run"
    for name in ("config.yaml", "log.jsonl", "curves.png", "metrics.json", "best.pt"):
        assert (run / name).is_file(), name
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and {"train_loss", "val_loss", "train_acc", "val_acc", "val_macro_f1"} <= set(log[0])
    assert 0 <= r["accuracy"] <= 1 and 0 <= r["macro_f1"] <= 1
    assert set(r["per_class"]) == {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    assert abs(sum(r["gate_weights"].values()) - 1) < 1e-5
    assert json.loads((run / "metrics.json").read_text())["macro_f1"] == r["macro_f1"]
    model = build_model(load_checkpoint(run / "best.pt", kind="wbc_fusion"))
    assert isinstance(model, FusionModel) and model.sources == ["cam16", "prcc"]
    assert model.eval()(torch.rand(2, 3, 16, 16)).shape == (2, 5)


def test_same_seed_same_metrics_and_resume(env, tmp_path):
    a = train_run(_cfg(env, tmp_path, arm="random", out=str(tmp_path / "a")), data=env["data"])
    b = train_run(_cfg(env, tmp_path, arm="random", out=str(tmp_path / "b")), data=env["data"])
    for k in ("accuracy", "macro_f1", "val_macro_f1", "confusion", "best_epoch"):
        assert a[k] == b[k], k
    # an existing finished folder is not trained again; overwrite retrains it
    log = tmp_path / "a" / "log.jsonl"
    stamp = log.stat().st_mtime_ns
    again = train_run(_cfg(env, tmp_path, arm="random", out=str(tmp_path / "a")), data=env["data"])
    assert again == json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert log.stat().st_mtime_ns == stamp
    redo = train_run(_cfg(env, tmp_path, arm="random", out=str(tmp_path / "a"), overwrite=True), data=env["data"])
    assert redo["macro_f1"] == a["macro_f1"] and log.stat().st_mtime_ns != stamp


def test_a_validation_only_run_is_tested_not_trained_again(env, tmp_path, monkeypatch):
    """`val_run` (the study's pilot): the same numbers as training afresh, without training."""
    kw = {"arm": "prcc+cam16", "mode": "concat"}
    train_run(_cfg(env, tmp_path, **kw, eval_test=False, out=str(tmp_path / "pilot")), data=env["data"])
    fresh = train_run(_cfg(env, tmp_path, **kw, out=str(tmp_path / "fresh")), data=env["data"])
    import fusion.train

    real_fit = fusion.train.fit
    monkeypatch.setattr(fusion.train, "fit", lambda *a, **k: pytest.fail("a reused run was trained"))
    reused = train_run(_cfg(env, tmp_path, **kw, out=str(tmp_path / "reused"), val_run=str(tmp_path / "pilot")),
                       data=env["data"])
    for k in ("accuracy", "macro_f1", "per_class", "confusion", "test_loss", "best_epoch", "val_macro_f1",
              "val_acc", "epochs_run", "steps"):
        assert reused[k] == fresh[k], k
    assert reused["val_run"] == str(tmp_path / "pilot") and (tmp_path / "reused" / "log.jsonl").is_file()
    assert reused["val_run_seconds"] > 0 and "val_run_seconds" not in fresh
    assert build_model(load_checkpoint(tmp_path / "reused" / "best.pt", kind="wbc_fusion"))

    # other settings, or a folder without a validation-only run: trained as usual
    monkeypatch.setattr(fusion.train, "fit", real_fit)
    other = train_run(_cfg(env, tmp_path, **kw, lr=1e-3, out=str(tmp_path / "other"),
                           val_run=str(tmp_path / "pilot")), data=env["data"])
    missing = train_run(_cfg(env, tmp_path, **kw, out=str(tmp_path / "missing"), val_run=str(tmp_path / "fresh")),
                        data=env["data"])
    assert "val_run" not in other and "val_run" not in missing and missing["macro_f1"] == fresh["macro_f1"]


def test_encoder_weights_identical_after_fusion_training(env):
    """Online mode (encoders run on every augmented batch): weights and BN statistics unchanged."""
    encoders = load_arm_encoders("prcc+cam16", env["ckpt"], image_size=16)
    before = {s: {k: v.clone() for k, v in e.state_dict().items()} for s, e in encoders.items()}
    model = FusionModel(SmallCNN(CNNConfig(channels=[8, 16], input_size=16)), encoders, "sum")
    data = env["data"]
    images = torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()
    from fusion.augment import AugConfig

    feeder = _Feeder(images, torch.from_numpy(data.labels), {}, AugConfig(), torch.Generator().manual_seed(0),
                     None, 0.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = [torch.randperm(len(images))[:16] for _ in range(3)]
    train_one_epoch(model, batches, feeder.step, opt, torch.device("cpu"), progress=False)
    for s, e in encoders.items():
        assert not e.training
        for k, v in e.state_dict().items():
            assert torch.equal(v, before[s][k]), f"{s}.{k} changed"
    for k, v in load_checkpoint(env["ckpt"]["prcc"])["model"].items():
        assert torch.equal(encoders["prcc"].state_dict()[k], v)


def test_online_features_mode_trains(env, tmp_path):
    r = train_run(_cfg(env, tmp_path, arm="prcc", mode="concat", encoder_features="online", epochs=1),
                  data=env["data"])
    assert r["status"] == "ok" and r["encoder_features"] == "online"


def test_nan_loss_marks_run_failed(env, tmp_path):
    cfg = _cfg(env, tmp_path, arm="cam16", cam16_checkpoint=str(env["nan"]["cam16"]))
    r = train_run(cfg, data=env["data"])
    assert r["status"] == "failed" and "non-finite" in r["reason"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


def test_bad_inputs(env, tmp_path):
    with pytest.raises(ValueError, match="valid arms"):
        _cfg(env, tmp_path, arm="imagenet")
    with pytest.raises(ValueError, match="valid modes"):
        _cfg(env, tmp_path, mode="mean")
    from pretrain.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="prcc_checkpoint"):
        train_run(_cfg(env, tmp_path, arm="prcc", prcc_checkpoint=str(env["ckpt"]["cam16"])), data=env["data"])
    with pytest.raises(ValueError, match=r"expects 32x32 images but the WBC images are 16x16"):
        train_run(_cfg(env, tmp_path, arm="cam16", encoder_resize=False), data=env["data"])


def test_plan_steps_gives_small_fractions_enough_steps():
    cfg = RunConfig(**nest(epochs=20, min_steps=400, max_steps=1000, batch_size=64, evals=10))
    bs, steps, evals = plan_steps(57, cfg)
    assert (bs, steps, evals) == (57, 40, 10)  # 20 passes = 20 steps < min_steps -> 400 steps
    bs, steps, evals = plan_steps(5700, cfg)
    assert (bs, steps, evals) == (64, 100, 10)  # 20 passes = 1800 steps, capped at max_steps
    bs, steps, evals = plan_steps(1000, RunConfig(**nest(epochs=4, min_steps=10, max_steps=0, evals=3)))
    assert bs == 64 and steps * evals >= 4 * 16 and evals == 3


def test_warmup_cosine_schedule_shape():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_cosine(opt, total_steps=100, warmup=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0)
    assert lrs.index(max(lrs)) == 9 and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[10:-1], lrs[11:], strict=True))  # monotone decay after warm-up


def test_predictions_do_not_depend_on_the_eval_batch_size():
    """eval_batch_size is a speed knob only (real_study/NOTES.md): the same logits, bit for bit, at any size.
    257 rows leave a lone image at 128 and 64, which alone would take another kernel path."""
    torch.manual_seed(0)
    model = FusionModel(SmallCNN(CNNConfig(channels=[8, 16, 32], input_size=24)), {})
    images = torch.randint(0, 256, (300, 3, 24, 24), dtype=torch.uint8)
    rows = torch.randperm(300)[:257].numpy()
    ref, _ = predict(model, images, {}, rows, torch.device("cpu"), 512)
    for bs in (128, 64, 7):
        assert torch.equal(predict(model, images, {}, rows, torch.device("cpu"), bs)[0], ref), bs
    assert RunConfig().runtime.eval_batch_size == 128


def test_recalibrate_bn_uses_exact_clean_statistics():
    torch.manual_seed(0)
    cnn = SmallCNN(CNNConfig(channels=[4, 8], input_size=8))
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    bn = cnn.features[1]
    bn.running_mean.fill_(5.0)
    recalibrate_bn(cnn.eval(), images, torch.arange(40), torch.device("cpu"), batch_size=40, limit=40)
    x = (images.float() / 255 - cnn.mean) / cnn.std
    conv = cnn.features[0](x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(bn.running_mean, conv.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not cnn.training and bn.momentum == 0.1
