"""Cross-lab robustness options (issue 19): normalisation layers, HED stain jitter, scale normalisation
by the nucleus (cell_crop) and Macenko stain normalisation, with fallbacks named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fusion_fakes import nest, synthetic_wbc
from PIL import Image

from fusion.augment import AugConfig, augment, hed_jitter
from fusion.data import load_wbc
from fusion.encoders import build_fusion_model
from fusion.models import CNNConfig, SmallCNN
from fusion.preprocess import Fallback, cell_crop, macenko
from fusion.train import RunConfig, train_run
from pretrain.checkpoint import load_checkpoint

PBC = Path(__file__).resolve().parents[2] / "shared" / "data" / "pbc-wbc"
PINK, PURPLE = (235, 200, 205), (80, 40, 130)


def _cell(h: int, w: int, cy: int, cx: int, r: int) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = PINK
    yy, xx = np.mgrid[:h, :w]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = PURPLE
    return img


@pytest.mark.parametrize("norm", ["group", "layer"])
def test_group_and_layer_norm_cnn_has_no_batch_statistics_and_rebuilds_from_its_checkpoint(tmp_path, norm):
    cnn = SmallCNN(CNNConfig(channels=[6, 12], input_size=16, norm=norm))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in cnn.modules())
    cfg = RunConfig(**nest(data="/synthetic", cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8, 16],
                           norm=norm, epochs=1, min_steps=4, evals=2, batch_size=16, progress=False, curves=False,
                           device="cpu", out=str(tmp_path / "run")))
    assert train_run(cfg, data=synthetic_wbc(8, 16))["status"] == "ok"
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt", kind="wbc_fusion")
    model = build_fusion_model(ckpt["config"])
    model.load_state_dict(ckpt["model"])  # strict: the same layers
    assert ckpt["config"]["cnn"]["norm"] == norm
    with pytest.raises(ValueError, match=r"model.norm must be one of \['batch', 'group', 'layer'\]"):
        RunConfig(**nest(norm="instance"))


def test_hed_jitter_matches_skimage_and_is_off_by_default():
    from skimage.color import hed2rgb, rgb2hed

    x = torch.rand(2, 3, 8, 8) * 0.8 + 0.1
    a, b = torch.tensor([[1.1, 0.9, 1.0]] * 2), torch.tensor([[0.02, -0.01, 0.0]] * 2)
    ref = hed2rgb(rgb2hed(x[1].permute(1, 2, 0).numpy()) * a[1].numpy() + b[1].numpy())
    np.testing.assert_allclose(hed_jitter(x, a, b)[1].permute(1, 2, 0).numpy(), ref, atol=1e-5)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    off = augment(x, AugConfig(), g1)
    assert torch.equal(off, augment(x, AugConfig(hed=0.0), g2))  # no extra random draws when off
    on = augment(x, AugConfig(hed=0.1), torch.Generator().manual_seed(0))
    assert on.shape == x.shape and not torch.allclose(on, off)


def test_cell_crop_centres_the_nucleus_at_a_fixed_relative_scale():
    wide = cell_crop(_cell(200, 300, 90, 180, 15))  # a small cell in a large field
    tight = cell_crop(_cell(64, 64, 32, 32, 28))  # another lab's tight crop: padded with the background
    for out, r in ((wide, 15), (tight, 28)):
        side = out.shape[0]
        assert out.shape[:2] == (side, side) and abs(side - 2.0 * (2 * r + 1)) <= 3
        assert tuple(out[side // 2, side // 2]) == PURPLE  # the nucleus in the middle
        assert tuple(out[1, 1]) == PINK
    # the same cell at two magnifications reaches the model at the same relative size
    small = np.asarray(Image.fromarray(wide).resize((48, 48)))
    large = np.asarray(Image.fromarray(cell_crop(_cell(400, 600, 180, 360, 30))).resize((48, 48)))
    assert np.mean(np.all(small == PURPLE, -1)) == pytest.approx(np.mean(np.all(large == PURPLE, -1)), abs=0.02)


def test_no_nucleus_falls_back_to_the_centre_square_and_names_the_images(tmp_path):
    with pytest.raises(Fallback, match="no nucleus found"):
        cell_crop(np.full((30, 40, 3), 200, np.uint8))
    root = tmp_path / "wbc"
    for k, c in enumerate(("basophil", "eosinophil")):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(_cell(60, 80, 30, 40, 10 + i + 3 * k)).save(root / c / f"cell{i}.png")
    Image.fromarray(np.full((60, 80, 3), 220, np.uint8)).save(root / "basophil" / "blank.png")
    with pytest.warns(UserWarning, match=r"1 of 7 images .*basophil/blank.png: cell_crop: no nucleus found"):
        data = load_wbc(root, 16, cache_dir=None, progress=False, preprocess=["cell_crop"])
    assert list(data.dropped["fallback"]) == ["basophil/blank.png"] and len(data.ids) == 7


def test_macenko_normalises_stained_images_and_keeps_a_blank_one():
    with pytest.raises(Fallback, match="unchanged"):
        macenko(np.full((16, 16, 3), 250, np.uint8))
    if not PBC.is_dir():
        pytest.skip(f"real PBC images not found at {PBC}")
    img = np.asarray(Image.open(sorted((PBC / "lymphocyte").iterdir())[0]).convert("RGB"))
    out = macenko(img)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)


def test_sweep_scores_every_run_on_external_sets_reports_them_and_reuses_the_scores(tmp_path, monkeypatch, capsys):
    import shutil

    from fusion_fakes import tiny_checkpoints, use_tiny_cam16, write_wbc_folder

    from fusion.report import make_report
    from fusion.sweep import SweepConfig, run_sweep
    from pretrain.utils import read_jsonl

    use_tiny_cam16(monkeypatch)
    ck = tiny_checkpoints(tmp_path / "ck")
    wbc = write_wbc_folder(tmp_path / "wbc", 8, 16)
    lab2 = write_wbc_folder(tmp_path / "lab2", 6, 24, seed=3)  # another "lab": other images, other size
    shutil.rmtree(lab2 / "basophil")  # ... and without basophils
    cfg = SweepConfig(**nest(data=str(wbc), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8],
                             epochs=1, min_steps=2, evals=1, batch_size=16, prcc_checkpoint=str(ck["prcc"]),
                             cam16_checkpoint=str(ck["cam16"]), fractions=[1.0], arms=["scratch", "prcc"],
                             seeds=[0, 1, 2], probes=[], out=str(tmp_path / "sw"), progress=False, device="cpu",
                             curves=False, external={"lab2": str(lab2)}))
    run_sweep(cfg)
    rows = read_jsonl(tmp_path / "sw" / "external.jsonl")
    assert len(rows) == 9 and {r["external"] for r in rows} == {"lab2"}  # scratch, prcc, random:prcc x 3 seeds
    assert all(r["absent_classes"] == ["basophil"] and r["n"] == 24 for r in rows)
    assert (tmp_path / "sw" / "runs" / "f1.0_prcc_sum_s0" / "external_lab2" / "metrics.json").is_file()
    capsys.readouterr()
    run_sweep(cfg)  # nothing new to score
    assert len(read_jsonl(tmp_path / "sw" / "external.jsonl")) == 9 and "on lab2" not in capsys.readouterr().out
    md = make_report(tmp_path / "sw").read_text()
    assert "## External set `lab2`" in md and "it lacks basophil" in md and "### Balanced accuracy" in md
    assert "| 100% | prcc | random:prcc | 3 |" in md.split("## External set")[1]
    with pytest.raises(FileNotFoundError, match="external set 'lab3'"):
        SweepConfig(**nest(external={"lab3": str(tmp_path / "nope")}))


def test_draw_shots_is_nested_capped_at_half_of_each_class_and_seeded():
    from fusion.adapt import draw_shots

    labels = np.array([0] * 20 + [1] * 3 + [2] * 1)
    small, _, _ = draw_shots(labels, 3, seed=4)
    big, test, taken = draw_shots(labels, 10, seed=4)
    assert taken == {0: 10, 1: 1, 2: 0}  # never more than half of a class; a lone image is test only
    assert set(small) <= set(big) and not set(big) & set(test) and len(big) + len(test) == len(labels)
    assert np.array_equal(draw_shots(labels, 10, seed=4)[0], big) and not np.array_equal(draw_shots(labels, 10, 5)[0], big)


def test_few_shot_adaptation_writes_the_curve_for_finetuned_and_alone_and_resumes(tmp_path, capsys):
    from fusion_fakes import write_wbc_folder

    from fusion.adapt import AdaptConfig, run_adapt
    from pretrain.utils import read_jsonl

    src = write_wbc_folder(tmp_path / "pbc", 8, 16)
    cfg = RunConfig(**nest(data=str(src), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8],
                           epochs=1, min_steps=4, evals=1, batch_size=16, progress=False, curves=False,
                           device="cpu", out=str(tmp_path / "run")))
    train_run(cfg)
    lab2 = write_wbc_folder(tmp_path / "lab2", 6, 20, seed=3)
    acfg = AdaptConfig(checkpoint=str(tmp_path / "run"), data=str(lab2), out=str(tmp_path / "adapt"), shots=[1, 2],
                       seeds=[0], steps=3, cache_dir="", device="cpu")
    run_adapt(acfg)
    rows = read_jsonl(tmp_path / "adapt" / "adapt.jsonl")
    assert [(r["k"], r["mode"]) for r in rows] == [(0, "trained"), (1, "finetune"), (1, "alone"), (2, "finetune"),
                                                   (2, "alone")]
    assert {r["n_test"] for r in rows} == {30 - 10}  # every k tested on what k = 2 leaves
    assert rows[3]["n_train"] == 10 and rows[3]["shots"]["basophil"] == 2
    assert (tmp_path / "adapt" / "fewshot.png").stat().st_size > 0
    assert "| 2 | finetune | 1 |" in (tmp_path / "adapt" / "fewshot.md").read_text()
    capsys.readouterr()
    run_adapt(acfg)
    assert len(read_jsonl(tmp_path / "adapt" / "adapt.jsonl")) == 5 and "k=1" not in capsys.readouterr().out


def test_eda_page_shows_the_crops_cell_crop_made_and_its_fallbacks(tmp_path):
    from fusion.eda import EDAConfig, run_eda

    root = tmp_path / "wbc"
    for k, c in enumerate(("basophil", "eosinophil")):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(_cell(60, 90, 30, 30 + 10 * i, 8 + i + 4 * k)).save(root / c / f"cell{i}.png")
    Image.fromarray(np.full((60, 80, 3), 220, np.uint8)).save(root / "eosinophil" / "blank.png")
    with pytest.warns(UserWarning, match="fell back"):
        md = run_eda(EDAConfig(data=str(root), out=str(tmp_path / "eda"), image_size=16, preprocess=["cell_crop"],
                               progress=False, perplexity=3)).read_text()
    assert "## Preprocessing: cell_crop" in md and "Fallbacks: 1 of 9 images: `eosinophil/blank.png`" in md
    assert (tmp_path / "eda" / "preprocess_pairs.png").stat().st_size > 0 and "Left out" not in md


def test_cam16_resnet_with_group_norm_has_no_batch_statistics():
    from pretrain.resnet import Cam16ResNet, ResNetConfig
    from pretrain.train_cam16 import Cam16Config

    net = Cam16ResNet(ResNetConfig(arch="resnet18", input_size=32, norm="group"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert net.encode(torch.rand(2, 3, 32, 32)).shape == (2, 512)
    assert Cam16Config(norm="layer").model_config().norm == "layer"
    with pytest.raises(ValueError, match=r"unknown normalisation layer 'instance'"):
        ResNetConfig(norm="instance")
