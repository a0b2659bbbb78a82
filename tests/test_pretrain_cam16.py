"""CAM16 training: slide-level splits, metrics, a tiny end-to-end run of the script, real patches (slow)."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from wsi_fakes import write_patch_store

from pretrain.cam16_split import LeakySplitWarning, binary_metrics, describe_split, split_by_slide
from pretrain.checkpoint import load_checkpoint, load_encoder
from pretrain.train_cam16 import Cam16Config, PatchTransform

# slide -> (normal, tumor) patch counts, as in ../shared/data/cam16-patches
REAL_LIKE = {"tumor_001": (0, 24), "tumor_004": (7, 0), "tumor_064": (22, 4), "tumor_073": (16, 16)}


def _load_script(name: str):
    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ids(counts: dict[str, tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    slides, labels = [], []
    for s, (n, t) in counts.items():
        slides += [s] * (n + t)
        labels += [0] * n + [1] * t
    return np.asarray(slides), np.asarray(labels)


def _parts_of(split, slides):
    return {p: set(slides[idx]) for p, idx in split.items()}


def test_split_by_slide_whole_slides_deterministic_both_classes():
    slides, labels = _ids(REAL_LIKE)
    split = split_by_slide(slides, labels, seed=0, val=0.25, test=0.25)
    parts = _parts_of(split, slides)
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert sum(len(v) for v in split.values()) == len(labels)
    # only tumor_064 and tumor_073 hold both classes: they must be val and test
    assert parts["val"] | parts["test"] == {"tumor_064", "tumor_073"}
    for idx in split.values():
        assert set(labels[idx]) == {0, 1}
    again = split_by_slide(slides, labels, seed=0, val=0.25, test=0.25)
    assert all(np.array_equal(split[p], again[p]) for p in split)
    assert not describe_split(split, slides, labels)["leaks"]


def test_split_explicit_slides_and_errors():
    slides, labels = _ids(REAL_LIKE)
    split = split_by_slide(slides, labels, val=["tumor_064"], test=["tumor_073"])
    assert _parts_of(split, slides) == {"train": {"tumor_001", "tumor_004"}, "val": {"tumor_064"},
                                        "test": {"tumor_073"}}
    with pytest.raises(ValueError, match="tumor_999.*known slides"):
        split_by_slide(slides, labels, test=["tumor_999"])
    with pytest.raises(ValueError, match="train would get no slide"):
        split_by_slide(slides, labels, val=0.5, test=0.5)


def test_split_many_slides_and_pcam_official():
    rng = np.random.default_rng(0)
    slides = np.asarray([f"s{i:02d}" for i in rng.integers(0, 40, 800)])
    labels = (rng.random(800) < 0.4).astype(int)
    split = split_by_slide(slides, labels, seed=3, val=0.2, test=0.2)
    parts = _parts_of(split, slides)
    assert len(parts["val"]) == len(parts["test"]) == 8 and not parts["val"] & parts["test"]
    pcam = np.repeat(["pcam-train", "pcam-valid", "pcam-test"], [10, 4, 4])
    sp = split_by_slide(pcam, np.arange(18) % 2)
    assert _parts_of(sp, pcam) == {"train": {"pcam-train"}, "val": {"pcam-valid"}, "test": {"pcam-test"}}


def test_split_too_few_slides_warns_and_says_it_leaks():
    slides, labels = _ids({"a": (10, 10), "b": (5, 5)})
    with pytest.warns(LeakySplitWarning, match="LEAKS"):
        split = split_by_slide(slides, labels, seed=0, val=0.2, test=0.2)
    assert all(len(v) > 0 for v in split.values())
    assert describe_split(split, slides, labels)["leaks"]


def test_binary_metrics_two_classes_and_single_class():
    m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.7, 0.9]))
    assert m["accuracy"] == 0.75 and m["auc"] == 1.0 and m["confusion_matrix"] == [[1, 1], [0, 2]]
    assert m["per_class_accuracy"] == {"normal": 0.5, "tumor": 1.0}
    one = binary_metrics(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.9]))
    assert one["auc"] is None and "only normal" in one["auc_note"]
    assert one["accuracy"] == pytest.approx(2 / 3)


def test_patch_transform_shapes_and_range():
    img = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    x = PatchTransform(32, augment=True, seed=0)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    plain = PatchTransform(40, augment=False)(img)
    assert torch.equal(plain, torch.from_numpy(img).permute(2, 0, 1).float() / 255)


def test_script_end_to_end_tiny(tmp_path):
    main = _load_script("pretrain_cam16").main
    store = tmp_path / "patches.h5"
    write_patch_store(store)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"image_size": 32, "epochs": 1, "batch_size": 16, "progress": False}))
    out, run = tmp_path / "ck" / "cam16.pt", tmp_path / "run"
    metrics = main(["--config", str(cfg_file), "--data", str(store), "--out", str(out), "--run-dir", str(run),
                    "--test-slides", "slide_3", "--val-slides", "slide_2", "--device", "cpu"])
    for name in ("config.yaml", "log.jsonl", "curves.png", "confusion.png", "metrics.json", "split.json", "best.pt"):
        assert (run / name).is_file(), name
    assert len((run / "log.jsonl").read_text().splitlines()) == 1
    split = json.loads((run / "split.json").read_text())
    assert split["parts"]["test"]["slides"] == ["slide_3"] and not split["leaks"]
    assert set(metrics["test"]) >= {"accuracy", "auc", "f1", "confusion_matrix"}
    assert metrics["test"]["n"] == 6
    ckpt = load_checkpoint(out, kind="cam16_resnet")
    assert ckpt["input"]["size"] == 32 and ckpt["metrics"]["test"]["n"] == 6
    assert ckpt["train"]["data"] == str(store)
    enc = load_encoder(out)
    assert enc.encode(torch.rand(2, 3, 32, 32)).shape == (2, 512)


def test_config_validation():
    with pytest.raises(ValueError, match="valid archs"):
        Cam16Config(arch="vgg16")
    with pytest.raises(ValueError, match="monitor"):
        Cam16Config(monitor="val_auc")


@pytest.mark.slow
def test_real_patches_split_by_slide(tmp_path, shared_data):
    root = shared_data("cam16-patches")
    from pretrain.patches import open_patch_dataset
    from pretrain.train_cam16 import fit_cam16

    ds = open_patch_dataset(root)
    counts = {s: (int(((ds.slide_ids == s) & (ds.labels == 0)).sum()), int(((ds.slide_ids == s) & (ds.labels == 1)).sum()))
              for s in np.unique(ds.slide_ids)}
    assert counts == REAL_LIKE
    cfg = Cam16Config(data=str(root), out=str(tmp_path / "c.pt"), run_dir=str(tmp_path / "run"), image_size=64,
                      epochs=1, batch_size=32, val_slides=["tumor_064"], test_slides=["tumor_073"],
                      progress=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", LeakySplitWarning)
        m = fit_cam16(cfg, dataset=ds)
    assert m["split"]["test"]["slides"] == ["tumor_073"] and not m["split_leaks"]
    assert m["test"]["n"] == 32 and 0.0 <= m["test"]["accuracy"] <= 1.0 and m["test"]["auc"] is not None


def test_data_fingerprint_of_a_store_is_its_content_not_its_file(tmp_path):
    """A store extracted again from the same slides (new creation time, timings) is the same data, so a
    finished or killed pretraining run on it is reused or resumed instead of refused (`make demo` twice)."""
    import h5py

    from pretrain.train_cam16 import _data_fingerprint

    a, b = write_patch_store(tmp_path / "a.h5"), write_patch_store(tmp_path / "b.h5")
    for p, when in ((a, "2026-12-01T10:00"), (b, "2026-12-01T11:00")):
        with h5py.File(p, "a") as f:
            f.attrs["created"] = when
    assert a.read_bytes() != b.read_bytes() and _data_fingerprint(a) == _data_fingerprint(b)
    with h5py.File(b, "a") as f:
        f["labels"][0] = 1 - f["labels"][0]
    assert _data_fingerprint(a) != _data_fingerprint(b)
