"""A trained model is tested anywhere: other labs' folders (missing, extra, case-different classes),
unlabelled images, and refusals (another checkpoint kind, a changed encoder file, bad folders)."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import require_shared
from fusion_fakes import nest, tiny_checkpoints, write_wbc_folder
from PIL import Image
from sklearn.metrics import f1_score

from fusion.data import CLASSES
from fusion.evaluate import EvalConfig, PredictConfig, evaluate, predict_images
from fusion.train import RunConfig, train_run
from pretrain.checkpoint import CheckpointError
from pretrain.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(root: Path, data: Path, out: Path, **kw) -> Path:
    cfg = dict(data=str(data), cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8], epochs=1,
               min_steps=2, max_steps=0, evals=1, batch_size=16, device="cpu", progress=False, curves=False,
               out=str(out))
    train_run(RunConfig(**nest(**{**cfg, **kw})))
    return out / "best.pt"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    wbc = write_wbc_folder(root / "wbc", 8, 16)
    ck = tiny_checkpoints(root / "ck")
    return {"root": root, "wbc": wbc, "ck": ck, "best": _run(root, wbc, root / "run")}


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return list(rows[0]), rows


def _variant(src: Path, dst: Path, rename: dict[str, str | None]) -> Path:
    """A copy of class folders with some renamed (None: left out)."""
    for d in sorted(src.iterdir()):
        if (new := rename.get(d.name, d.name)) is not None:
            shutil.copytree(d, dst / new)
    return dst


def _evaluate(fx, data: Path, out: Path | str = "") -> dict:
    return evaluate(EvalConfig(checkpoint=str(fx["best"]), data=str(data), out=str(out), device="cpu",
                               progress=False))


def test_same_classes_writes_metrics_predictions_and_plot(fx):
    r = _evaluate(fx, fx["wbc"])
    out = fx["best"].parent / "eval_wbc"  # the default place
    assert r["out"] == str(out)
    for name in ("metrics.json", "predictions.csv", "confusion.png"):
        assert (out / name).is_file(), name
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == m["n_images"] == 40 and m["macro_f1_over"] == list(CLASSES)
    assert m["checkpoint"] == str(fx["best"].resolve()) and len(m["checkpoint_sha256"]) == 64
    assert m["model_classes_missing_from_data"] == [] and m["data_classes_unknown_to_model"] == {}
    assert np.asarray(m["confusion"]["matrix"]).sum() == 40 and m["confusion"]["classes"] == list(CLASSES)
    header, rows = _csv(out / "predictions.csv")
    assert header == ["id", "true_class", "predicted_class", "in_metrics", *(f"p_{c}" for c in CLASSES)]
    assert len(rows) == 40
    p = np.array([[float(row[f"p_{c}"]) for c in CLASSES] for row in rows])
    assert np.allclose(p.sum(1), 1, atol=1e-4)
    assert [CLASSES[i] for i in p.argmax(1)] == [row["predicted_class"] for row in rows]
    acc = np.mean([row["true_class"] == row["predicted_class"] for row in rows])
    assert m["accuracy"] == pytest.approx(acc)


def test_missing_and_extra_classes_are_reported_and_left_out(fx, tmp_path):
    data = _variant(fx["wbc"], tmp_path / "lab2", {"monocyte": None})
    write_wbc_folder(tmp_path / "extra", 3, 16, seed=3)
    shutil.copytree(tmp_path / "extra" / "basophil", data / "platelet")
    with pytest.warns(UserWarning, match=r"left 3 images .*platelet 3"):
        r = _evaluate(fx, data, tmp_path / "out")
    assert r["model_classes_missing_from_data"] == ["monocyte"]
    assert r["data_classes_unknown_to_model"] == {"platelet": 3}
    assert r["data_classes"]["platelet"] is None and r["data_classes"]["basophil"] == "basophil"
    present = ["basophil", "eosinophil", "lymphocyte", "neutrophil"]
    assert r["macro_f1_over"] == present and list(r["per_class"]) == present
    assert r["n"] == 32 and r["n_images"] == 35
    _, rows = _csv(tmp_path / "out" / "predictions.csv")
    scored = [row for row in rows if row["in_metrics"] == "1"]
    assert len(rows) == 35 and len(scored) == 32
    assert {row["true_class"] for row in rows if row["in_metrics"] == "0"} == {"platelet"}
    yt = [row["true_class"] for row in scored]
    yp = [row["predicted_class"] for row in scored]
    assert r["macro_f1"] == pytest.approx(f1_score(yt, yp, labels=present, average="macro", zero_division=0))
    assert sum(r["predicted_as_absent"].values()) == sum(p == "monocyte" for p in yp)
    assert np.asarray(r["confusion"]["matrix"])[CLASSES.index("monocyte")].sum() == 0


def test_class_names_match_case_insensitively(fx, tmp_path):
    data = _variant(fx["wbc"], tmp_path / "Lab3", {"basophil": "Basophil", "neutrophil": "NEUTROPHIL"})
    r = _evaluate(fx, data, tmp_path / "out")
    ref = _evaluate(fx, fx["wbc"], tmp_path / "ref")
    assert r["n"] == 40 and r["data_classes_unknown_to_model"] == {}
    assert r["confusion"] == ref["confusion"] and r["accuracy"] == ref["accuracy"]


def test_no_matching_class_is_one_line_naming_both_lists(fx, tmp_path):
    data = _variant(fx["wbc"], tmp_path / "pets", {"basophil": "cat", "eosinophil": "dog", "lymphocyte": None,
                                                     "monocyte": None, "neutrophil": None})
    with pytest.raises(ValueError, match=r"pets: none of its classes \(cat, dog\) .*basophil, eosinophil"):
        _evaluate(fx, data, tmp_path / "out")


def test_predict_on_unlabelled_images_skips_corrupt_ones_and_decodes_like_training(fx, tmp_path):
    imgs = tmp_path / "unlabelled"
    (imgs / "sub").mkdir(parents=True)
    names = ["basophil/img000.png", "eosinophil/img001.png", "neutrophil/img002.png"]
    for i, n in enumerate(names):
        shutil.copy(fx["wbc"] / n, (imgs / "sub" if i else imgs) / f"cell{i}.png")
    (imgs / "sub" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match="broken.png"):
        out = predict_images(PredictConfig(checkpoint=str(fx["best"]), images=str(imgs),
                                           out=str(tmp_path / "preds.csv"), device="cpu"))
    header, rows = _csv(out)
    assert header == ["file", "predicted_class", *(f"p_{c}" for c in CLASSES)]
    assert [row["file"] for row in rows] == ["cell0.png", "sub/cell1.png", "sub/cell2.png"]
    p = np.array([[float(row[f"p_{c}"]) for c in CLASSES] for row in rows])
    assert np.allclose(p.sum(1), 1, atol=1e-4)
    ev = _evaluate(fx, fx["wbc"], tmp_path / "ev")
    _, ev_rows = _csv(Path(ev["out"]) / "predictions.csv")
    by_id = {row["id"]: [float(row[f"p_{c}"]) for c in CLASSES] for row in ev_rows}
    assert np.allclose(p, [by_id[n] for n in names], atol=1e-5)


@pytest.mark.parametrize("script", ["evaluate", "predict"])
def test_another_checkpoint_kind_is_refused_by_name(fx, tmp_path, script):
    wrong = str(fx["ck"]["prcc"])
    with pytest.raises(CheckpointError, match=r"prcc\.pt is a 'prcc_autoencoder' checkpoint.*best\.pt"):
        if script == "evaluate":
            evaluate(EvalConfig(checkpoint=wrong, data=str(fx["wbc"]), out=str(tmp_path), device="cpu"))
        else:
            predict_images(PredictConfig(checkpoint=wrong, images=str(fx["wbc"]), out=str(tmp_path / "p.csv"),
                                         device="cpu"))


def test_bad_data_folders_are_named(fx, tmp_path):
    with pytest.raises(OSError, match="nowhere"):
        _evaluate(fx, tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="void"):
        _evaluate(fx, tmp_path / "void", tmp_path / "out")
    with pytest.raises(OSError, match="void"):
        predict_images(PredictConfig(checkpoint=str(fx["best"]), images=str(tmp_path / "void"), device="cpu"))


def test_fused_run_evaluates_and_a_changed_encoder_file_is_refused(fx, tmp_path):
    enc = tmp_path / "prcc.pt"
    shutil.copy(fx["ck"]["prcc"], enc)
    best = _run(tmp_path, fx["wbc"], tmp_path / "fused", arm="prcc", prcc_checkpoint=str(enc))
    r = evaluate(EvalConfig(checkpoint=str(best), data=str(fx["wbc"]), out=str(tmp_path / "o"), device="cpu",
                            progress=False))
    assert r["arm"] == "prcc" and r["n"] == 40
    enc.write_bytes(enc.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match=r"best\.pt: cannot rebuild .*prcc\.pt changed since"):
        evaluate(EvalConfig(checkpoint=str(best), data=str(fx["wbc"]), out=str(tmp_path / "o2"), device="cpu"))
    enc.unlink()
    with pytest.raises(FileNotFoundError, match=r"best\.pt: cannot rebuild .*prcc\.pt does not exist"):
        predict_images(PredictConfig(checkpoint=str(best), images=str(fx["wbc"]), device="cpu"))
    assert not (tmp_path / "o2").exists()


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_scripts_print_a_table_and_exit_0(fx, tmp_path, capsys):
    args = ["--checkpoint", str(fx["best"]), "--device", "cpu"]
    assert cli(_script("evaluate").main, [*args, "--data", str(fx["wbc"]), "--out", str(tmp_path / "e"),
                                          "--progress", "false"]) == 0
    out = capsys.readouterr().out
    assert "macro-F1" in out and "neutrophil" in out and "metrics.json" in out
    run_folder = ["--checkpoint", str(fx["best"].parent), "--device", "cpu"]  # a run folder means its best.pt
    assert cli(_script("predict").main, [*run_folder, "--images", str(fx["wbc"]), "--out", str(tmp_path / "p.csv")]) == 0
    assert "wrote 40 predictions" in capsys.readouterr().out


@pytest.mark.slow
def test_a_model_of_pbc_evaluates_on_bccd(tmp_path):
    bccd = require_shared("bccd-wbc")
    pbc = require_shared("pbc-wbc")
    sub = tmp_path / "pbc_small"
    for c in CLASSES:  # 12 images per class, linked, never copied into the repo
        (sub / c).mkdir(parents=True)
        for p in sorted((pbc / c).iterdir())[:12]:
            (sub / c / p.name).symlink_to(p)
    best = _run(tmp_path, sub, tmp_path / "run", image_size=32, min_steps=10)
    r = evaluate(EvalConfig(checkpoint=str(best), data=str(bccd), out=str(tmp_path / "e"), device="cpu",
                            progress=False))
    assert r["n"] == r["n_images"] > 300 and r["macro_f1_over"] == list(CLASSES)
    assert 0 <= r["macro_f1"] <= 1 and (tmp_path / "e" / "confusion.png").is_file()
    img = np.asarray(Image.open(tmp_path / "e" / "confusion.png"))
    assert img.ndim == 3
