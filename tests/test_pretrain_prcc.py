"""PRCC autoencoder pretraining: data side, one-epoch smoke test, determinism, every bad input."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import load_encoder
from pretrain.checkpoint import load_checkpoint
from pretrain.config import load_yaml, parse_config
from pretrain.images import NoImagesError, TooManyBadImagesError
from pretrain.prcc import RandomCropDataset, fixed_crops, mean_image_mse, split_by_image
from pretrain.train_prcc import PRCCConfig, fit_prcc
from pretrain.utils import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=16, epochs=1, batch_size=8, crops_per_image=4, val_crops_per_image=2,
            base_width=4, depth=2, latent_channels=4, device="cpu", progress=False)


def _images(folder: Path, n: int = 6, size: int = 40, seed: int = 0) -> Path:
    """`n` smooth random RGB PNGs of `size` px (in a nested sub-folder too, to test recursion)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
        sub = folder / ("a" if i % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        img.save(sub / f"img_{i}.png")
    return folder


def _cfg(tmp_path: Path, data: Path, **kw) -> PRCCConfig:
    kw = {"out": str(tmp_path / "new" / "folder" / "ae.pt"), "run_dir": str(tmp_path / "run"), **TINY, **kw}
    return PRCCConfig(data=str(data), **kw)


def _load_script():
    spec = importlib.util.spec_from_file_location("pretrain_prcc_script", ROOT / "scripts" / "pretrain_prcc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_epoch_smoke_via_script(tmp_path):
    data = _images(tmp_path / "data")
    out = tmp_path / "new" / "folder" / "ae.pt"  # folder does not exist yet: created
    run = tmp_path / "run"
    argv = ["--data", str(data), "--out", str(out), "--run-dir", str(run)]
    for k, v in TINY.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    metrics = _load_script().main(argv)

    for name in ("config.yaml", "log.jsonl", "loss_curve.png", "reconstructions.png", "metrics.json"):
        assert (run / name).is_file(), name
    rows = read_jsonl(run / "log.jsonl")
    assert len(rows) == 1 and {"epoch", "lr", "train_loss", "val_loss", "val_mse_over_baseline"} <= set(rows[0])
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert load_yaml(run / "config.yaml")["image_size"] == 16
    assert metrics["baseline_mse"] > 0 and metrics["val_mse"] > 0 and metrics["n_images"] == 6

    ckpt = load_checkpoint(out, kind="prcc_autoencoder")
    assert ckpt["metrics"]["val_mse"] == metrics["val_mse"]
    assert ckpt["data"]["n_images"] == 6 and ckpt["data"]["fingerprint"] == metrics["fingerprint"]
    assert ckpt["data"]["root"] == str(data) and ckpt["train"]["lr"] == 1e-3
    assert ckpt["input"]["size"] == 16
    enc = load_encoder(out)
    assert enc.encode(torch.rand(2, 3, 16, 16)).shape == (2, 4)


def test_same_seed_same_losses(tmp_path):
    data = _images(tmp_path / "data")
    runs = []
    for i, seed in enumerate((0, 0, 1)):
        cfg = _cfg(tmp_path / str(i), data, seed=seed)
        fit_prcc(cfg)
        runs.append([(r["train_loss"], r["val_loss"]) for r in read_jsonl(Path(cfg.run_dir) / "log.jsonl")])
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(NoImagesError, match=r"no images found under .*empty.*\.png"):
        fit_prcc(_cfg(tmp_path, tmp_path / "empty"))
    with pytest.raises(NoImagesError, match="does not exist"):
        fit_prcc(_cfg(tmp_path, tmp_path / "missing"))


def test_bad_files_are_skipped_with_warnings(tmp_path):
    data = _images(tmp_path / "data", n=6)
    good = (data / "a" / "img_1.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "text.jpg").write_text("this is not a jpeg")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = fit_prcc(_cfg(tmp_path, data))
    msgs = [str(x.message) for x in w]
    assert any("truncated.png" in s for s in msgs) and any("text.jpg" in s for s in msgs)
    assert any("skipped 2 of 8" in s for s in msgs)
    assert m["n_images"] == 6


def test_mostly_bad_files_is_an_error(tmp_path):
    data = _images(tmp_path / "data", n=2)
    for i in range(3):
        (data / f"bad_{i}.png").write_bytes(b"\x89PNG garbage")
    with pytest.warns(UserWarning), pytest.raises(TooManyBadImagesError, match="3 of 5"):
        fit_prcc(_cfg(tmp_path, data))


def test_images_smaller_than_crop(tmp_path):
    data = _images(tmp_path / "data", n=4, size=40)
    _images(tmp_path / "data" / "small", n=2, size=8, seed=1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = fit_prcc(_cfg(tmp_path, data))
    msgs = [str(x.message) for x in w]
    assert any("img_0.png" in s and "smaller than the 16 px crop" in s for s in msgs)
    assert any("skipped 2 images" in s for s in msgs)
    assert m["n_images"] == 4
    only_small = _images(tmp_path / "small_only", n=3, size=8)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="smaller than the requested crop of 16 px"):
        fit_prcc(_cfg(tmp_path / "other_run", only_small))  # its own run folder: another config


def test_single_image_cannot_be_split(tmp_path):
    data = _images(tmp_path / "data", n=1)
    with pytest.raises(ValueError, match="at least 2 images"):
        fit_prcc(_cfg(tmp_path, data))


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="input_size=20 must be divisible by 2\\*\\*depth = 8"):
        fit_prcc(_cfg(tmp_path, tmp_path / "unused", image_size=20, depth=3))
    with pytest.raises(ValueError, match="val_fraction"):
        PRCCConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="unknown key"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("epocs: 3\n")
        parse_config(PRCCConfig, ["--config", str(bad)])


def test_interrupted_training_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import pretrain.train_prcc as tp

    data = _images(tmp_path / "data")
    real_step = tp._mse_step

    def interrupt_after(n_calls: int):
        calls = {"n": 0}

        def step(model, batch, device):
            calls["n"] += 1
            if calls["n"] > n_calls:
                raise KeyboardInterrupt  # Ctrl-C in the middle of training
            return real_step(model, batch, device)

        return step

    # 2 training batches + 1 validation batch per epoch: dies during epoch 2, after epoch 1 was saved
    monkeypatch.setattr(tp, "_mse_step", interrupt_after(3))
    cfg = _cfg(tmp_path, data, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        fit_prcc(cfg)
    run = Path(cfg.run_dir)
    saved = load_checkpoint(run / "best.pt")  # the run's best lives in its folder while it trains
    assert saved["metrics"]["epoch"] == 1 and not Path(cfg.out).exists() and (run / "last.pt").is_file()

    monkeypatch.setattr(tp, "_mse_step", real_step)
    fit_prcc(cfg)  # resumes at epoch 2 and publishes to --out at the end
    assert [r["epoch"] for r in read_jsonl(run / "log.jsonl")] == [1, 2, 3]
    final = load_checkpoint(cfg.out)

    # a new run (its own folder) killed before its first epoch ends leaves the published best in place
    monkeypatch.setattr(tp, "_mse_step", interrupt_after(1))
    with pytest.raises(KeyboardInterrupt):
        fit_prcc(_cfg(tmp_path / "other", data, epochs=3, seed=5, out=cfg.out))
    kept = load_checkpoint(cfg.out)
    assert kept["metrics"] == final["metrics"]
    assert all(torch.equal(kept["model"][k], v) for k, v in final["model"].items())
    assert load_encoder(cfg.out).out_dim == 4


def test_demo_config_parses():
    cfg, _ = parse_config(PRCCConfig, ["--config", str(ROOT / "configs" / "demo_prcc.yaml")])
    assert cfg.data == "data/demo/prcc" and cfg.out == "checkpoints/prcc_autoencoder.pt"
    cfg.model_config()  # image size compatible with the depth


def test_split_by_image_and_groups():
    names = [f"slide_{s}/tile_{i}.png" for s in range(4) for i in range(5)]
    tr, va = split_by_image(names, 0.25, seed=0)
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == 20 and len(va) == 5
    assert (tr, va) == split_by_image(names, 0.25, seed=0)
    tr, va = split_by_image(names, 0.25, seed=0, group_regex=r"slide_\d+")
    assert len({names[i].split("/")[0] for i in va}) == 1 and len(va) == 5
    assert {names[i].split("/")[0] for i in va}.isdisjoint(names[i].split("/")[0] for i in tr)


def test_crops_are_deterministic():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(3)]
    ds = RandomCropDataset(arrays, 16, per_image=2, seed=7)
    assert len(ds) == 6 and ds[0].shape == (3, 16, 16) and ds[0].dtype == torch.uint8
    assert torch.equal(ds[4], ds[4])
    ds.set_epoch(1)
    a = ds[4]
    ds.set_epoch(2)
    assert not torch.equal(a, ds[4])
    assert np.array_equal(fixed_crops(arrays, 16, 2, seed=3), fixed_crops(arrays, 16, 2, seed=3))
    with pytest.raises(ValueError, match="smaller than the 32 px crop"):
        RandomCropDataset(arrays, 32, per_image=1)


def test_mean_image_baseline():
    x = np.zeros((4, 2, 2, 3), np.uint8)
    x[:2] = 255  # half white, half black: the mean image is grey 0.5 -> MSE 0.25
    assert mean_image_mse(x, x) == pytest.approx((0.25, 0.25))


def test_trains_on_demo_prcc(demo_root, tmp_path):
    from pretrain.demo import demo_paths

    m = fit_prcc(_cfg(tmp_path, demo_paths(demo_root)["prcc"]))
    assert m["n_images"] >= 2 and Path(tmp_path / "new" / "folder" / "ae.pt").is_file()


@pytest.mark.slow
def test_learns_on_real_he_patches(tmp_path, shared_data):
    """Real H&E (Camelyon16 patches as unlabelled histology): well below the mean-image baseline."""
    data = shared_data("cam16-patches")
    cfg = PRCCConfig(data=str(data), out=str(tmp_path / "ae.pt"), run_dir=str(tmp_path / "run"),
                     image_size=32, depth=2, base_width=8, latent_channels=16, epochs=3, crops_per_image=8,
                     val_crops_per_image=4, batch_size=32, lr=2e-3, group_regex=r"tumor_\d{3}",
                     device="cpu", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every real patch decodes; none is skipped
        m = fit_prcc(cfg)
    assert m["n_images"] == 89
    assert m["val_mse"] < 0.5 * m["baseline_mse"], m


def test_trains_on_slide_tiles_plus_folder(demo_root, tmp_path):
    """Issue 3 item 5: the autoencoder learns from tiles cut from whole-slide images by the tiler."""
    from pretrain.demo import demo_paths

    p = demo_paths(demo_root)
    cfg = _cfg(tmp_path, p["prcc"])
    cfg.slides = [str(p["slides"])]
    cfg.tiles_per_slide = 6
    cfg.tissue_threshold = 0.3
    m = fit_prcc(cfg)
    ck = load_checkpoint(cfg.out, kind="prcc_autoencoder")
    assert sum(ck["data"]["sources"][1]["slides"].values()) == m["n_images"] - ck["data"]["sources"][0]["n_images"]
    assert m["n_images"] > ck["data"]["sources"][0]["n_images"]
    # tiles of one slide never straddle train and validation: every tile of a validation slide is in val
    slides = ck["data"]["sources"][1]["slides"]
    val = [n for n in ck["data"]["val_images"] if "@" in n]
    for s in {n.split("@")[0] for n in val}:
        assert sum(n.startswith(s + "@") for n in val) == slides[s + ".tif"]


def test_slides_only_needs_no_folder(demo_root, tmp_path):
    from pretrain.demo import demo_paths

    cfg = _cfg(tmp_path, "", slides=[str(demo_paths(demo_root)["slides"])], tiles_per_slide=4,
               tissue_threshold=0.3)
    m = fit_prcc(cfg)
    assert m["n_images"] == 8 and m["n_val_images"] == 4  # 2 small demo slides, split by slide


def test_no_data_and_no_slides_is_an_error():
    with pytest.raises(ValueError, match="--slides"):
        PRCCConfig(data="", slides=[])
