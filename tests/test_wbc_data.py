"""WBC loading: class folders (case-insensitive), BloodMNIST npz, duplicates, corrupt files, cache."""

from __future__ import annotations

import shutil
import time
import warnings

import numpy as np
import pytest
from PIL import Image

import fusion.data as fd
from fusion.data import CLASSES, ClassFolderError, WBCData, find_duplicates, load_wbc, square_resize
from pretrain.images import NoImagesError, TooManyBadImagesError

FOLDERS = ("Basophil", "EOSINOPHIL", "lymphocyte", "monocyte", "neutrophil")  # case varies on purpose
EXTS = (".jpg", ".png", ".bmp", ".tif")


def make_wbc_folder(root, per_class=4, size=(22, 20), seed=0):
    """Tiny fake WBC set: `per_class` (>= 2) noise images per class (mixed formats), plus one
    byte-identical copy in basophil and one in neutrophil, and a corrupt file in monocyte."""
    rng = np.random.default_rng(seed)
    for folder in FOLDERS:
        d = root / folder
        d.mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img_{i}{EXTS[i % len(EXTS)]}")
    shutil.copyfile(root / "Basophil" / "img_0.jpg", root / "Basophil" / "copy_of_0.jpg")
    shutil.copyfile(root / "neutrophil" / "img_1.png", root / "neutrophil" / "zz_copy.png")
    (root / "monocyte" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


def _load(*args, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        data = load_wbc(*args, progress=False, **kw)
    return data, [str(x.message) for x in w]


def test_folder_loads_classes_duplicates_and_skips_corrupt(tmp_path):
    root = make_wbc_folder(tmp_path / "wbc")
    data, msgs = _load(root, 16, cache_dir=tmp_path / "cache")
    assert data.images.shape == (4 * 5 + 2, 16, 16, 3) and data.images.dtype == np.uint8
    assert data.labels.dtype == np.int64
    assert data.class_counts() == {"basophil": 5, "eosinophil": 4, "lymphocyte": 4, "monocyte": 4,
                                   "neutrophil": 5}
    assert "Basophil/img_0.jpg" in data.ids and "EOSINOPHIL/img_1.png" in data.ids
    assert data.labels[data.ids.index("EOSINOPHIL/img_1.png")] == CLASSES.index("eosinophil")
    assert all(len(h) == 40 for h in data.hashes)
    assert data.dropped["unreadable"].keys() == {"monocyte/broken.jpg"}
    assert any("broken.jpg" in m for m in msgs) and any("skipped 1 of 23" in m for m in msgs)
    groups = find_duplicates(data.hashes)
    assert sorted(sorted(data.ids[i] for i in g) for g in groups) == [
        ["Basophil/copy_of_0.jpg", "Basophil/img_0.jpg"], ["neutrophil/img_1.png", "neutrophil/zz_copy.png"]]
    assert any("2 groups of exact-duplicate images" in m for m in msgs)


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    root = make_wbc_folder(tmp_path / "wbc")
    cache = tmp_path / "cache"
    first, _ = _load(root, 12, cache_dir=cache)
    files = sorted(cache.glob("wbc_*_12.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))

    def no_decode(*a, **k):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(fd, "_decode_one", no_decode)
    second, msgs = _load(root, 12, cache_dir=cache)
    np.testing.assert_array_equal(first.images, second.images)
    assert first.ids == second.ids and first.hashes == second.hashes
    assert second.dropped == first.dropped and any("when the cache" in m for m in msgs)
    monkeypatch.undo()

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "lymphocyte" / "new.png")  # >= min_size
    third, _ = _load(root, 12, cache_dir=cache)
    assert len(third) == len(first) + 1 and len(list(cache.glob("wbc_*_12.npz"))) == 2

    files[0].write_bytes(b"garbage")  # a damaged cache is rebuilt, never trusted
    (root / "lymphocyte" / "new.png").unlink()
    again, msgs = _load(root, 12, cache_dir=cache)
    assert any("ignoring unreadable cache" in m for m in msgs)
    np.testing.assert_array_equal(again.images, first.images)


def test_no_cache_dir_writes_nothing(tmp_path, monkeypatch):
    root = make_wbc_folder(tmp_path / "wbc")
    monkeypatch.chdir(tmp_path)
    _load(root, 8, cache_dir=None)
    assert not (tmp_path / "data").exists()


def test_centre_crop_keeps_the_middle():
    arr = np.zeros((10, 30, 3), np.uint8)  # wide: black sides, white 10 px square in the middle
    arr[:, 10:20] = 255
    out = square_resize(Image.fromarray(arr), 5)
    assert out.shape == (5, 5, 3) and out.min() > 230  # Lanczos support reaches ~1 px past the crop
    squashed = np.asarray(Image.fromarray(arr).resize((5, 5), Image.Resampling.LANCZOS))
    assert squashed.min() < 30


@pytest.mark.parametrize("change, expect", [
    (lambda r: shutil.rmtree(r / "monocyte"), "no folder for: monocyte"),
    (lambda r: (r / "neutrophil").rename(r / "neutrophils"), "not a class or alias: neutrophils"),
    (lambda r: shutil.copytree(r / "lymphocyte", r / "erythroblast"), "not a class or alias: erythroblast"),
])
def test_mismatched_class_folders_list_what_was_found(tmp_path, change, expect):
    """With the classes declared in config, every folder must map onto one of them."""
    root = make_wbc_folder(tmp_path / "wbc")
    change(root)
    with pytest.raises(ClassFolderError) as e:
        load_wbc(root, 8, cache_dir=None, progress=False, classes=list(CLASSES))
    msg = str(e.value)
    assert expect in msg and "Found" in msg and "lymphocyte/ (4 images)" in msg and str(root) in msg


def test_classes_come_from_the_folders_by_default(tmp_path):
    root = make_wbc_folder(tmp_path / "wbc")
    shutil.rmtree(root / "monocyte")
    shutil.copytree(root / "lymphocyte", root / "Blast")
    data = load_wbc(root, 8, cache_dir=None, progress=False)
    assert data.classes == ("basophil", "eosinophil", "lymphocyte", "neutrophil", "blast")  # WBC order first
    assert data.class_counts()["blast"] == 4


def test_class_aliases_merge_folders(tmp_path):
    root = make_wbc_folder(tmp_path / "wbc")
    n = len(list((root / "neutrophil").iterdir()))
    (root / "neutrophil").rename(root / "SNE")
    shutil.copytree(root / "SNE", root / "bne")
    data = load_wbc(root, 8, cache_dir=None, progress=False,
                    classes={"basophil": [], "eosinophil": [], "lymphocyte": [], "monocyte": [],
                             "neutrophil": ["SNE", "BNE"]})
    assert data.classes == CLASSES and data.class_counts()["neutrophil"] == 2 * n
    with pytest.raises(ClassFolderError, match="given for both"):
        load_wbc(root, 8, cache_dir=None, classes={"a": ["x"], "b": ["X"]})


def test_same_class_twice_and_missing_folder(tmp_path):
    root = make_wbc_folder(tmp_path / "wbc")
    shutil.copytree(root / "monocyte", root / "MONOCYTE")
    with pytest.raises(ClassFolderError, match="folders that differ only in case: monocyte"):
        load_wbc(root, 8, cache_dir=None, progress=False)
    with pytest.raises(NoImagesError, match="does not exist"):
        load_wbc(tmp_path / "nowhere", 8, cache_dir=None)


def test_empty_extra_folder_ignored_and_loose_images_warned(tmp_path):
    root = make_wbc_folder(tmp_path / "wbc")
    (root / "notes").mkdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(root / "loose.png")
    data, msgs = _load(root, 8, cache_dir=None)
    assert len(data) == 22 and any("ignoring 1 images directly in" in m for m in msgs)


def test_mostly_corrupt_folder_raises(tmp_path):
    root = make_wbc_folder(tmp_path / "wbc", per_class=2)
    for c in FOLDERS:
        for i in range(5):
            (root / c / f"bad_{i}.jpg").write_bytes(b"nope")
    with pytest.raises(TooManyBadImagesError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_wbc(root, 8, cache_dir=None, progress=False)


@pytest.mark.parametrize("size", [0, -3, 2.5, "64", True])
def test_bad_image_size(tmp_path, size):
    with pytest.raises(ValueError, match="image_size"):
        load_wbc(tmp_path, size, cache_dir=None)


def _bloodmnist(path, n=24, side=28):
    rng = np.random.default_rng(1)
    parts = {}
    for p in ("train", "val", "test"):
        parts[f"{p}_images"] = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        parts[f"{p}_labels"] = (np.arange(n) % 8).reshape(n, 1).astype(np.uint8)
    np.savez(path, **parts)
    return parts


def test_bloodmnist_npz_maps_8_classes_to_5(tmp_path):
    raw = _bloodmnist(tmp_path / "bloodmnist_64.npz")
    data, msgs = _load(tmp_path / "bloodmnist_64.npz", 16, cache_dir=tmp_path / "cache")
    assert data.images.shape == (3 * 15, 16, 16, 3)  # 5 of every 8 images kept
    assert data.dropped["classes"] == {"erythroblast": 9, "ig": 9, "platelet": 9}
    assert any("dropped images of classes outside basophil, eosinophil" in m for m in msgs)
    assert data.classes == CLASSES
    i = data.ids.index("bloodmnist:val:4")  # BloodMNIST 4 = lymphocyte
    assert CLASSES[data.labels[i]] == "lymphocyte"
    assert "bloodmnist:train:2" not in data.ids  # erythroblast
    same, _ = _load(tmp_path / "bloodmnist_64.npz", 28, cache_dir=None)  # native size: no resize
    np.testing.assert_array_equal(same.images[same.ids.index("bloodmnist:test:6")], raw["test_images"][6])
    again, _ = _load(tmp_path / "bloodmnist_64.npz", 16, cache_dir=tmp_path / "cache")
    assert again.ids == data.ids and again.dropped == data.dropped and again.classes == CLASSES
    eight = load_wbc(tmp_path / "bloodmnist_64.npz", 16, cache_dir=tmp_path / "cache", classes="all")
    assert len(eight) == 3 * 24 and eight.classes[2] == "erythroblast" and not eight.dropped


def test_npz_with_wrong_keys_and_other_files(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"train_images.*found \['images'\]"):
        load_wbc(tmp_path / "x.npz", 8, cache_dir=None)
    (tmp_path / "a.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .npz"):
        load_wbc(tmp_path / "a.txt", 8, cache_dir=None)


def test_find_duplicates_and_wbcdata_checks():
    assert find_duplicates(["a", "b", "a", "c", "b", "a"]) == [[0, 2, 5], [1, 4]]
    assert find_duplicates(["a", "b"]) == []
    with pytest.raises(ValueError, match="disagree in length"):
        WBCData(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, np.int64), ["a", "b"], ["x", "y"], "r", 4)


@pytest.mark.slow
def test_real_pbc_at_32px_via_cache(tmp_path_factory, shared_data):
    root = shared_data("pbc-wbc")
    cache = tmp_path_factory.mktemp("wbc_cache")
    t0 = time.perf_counter()
    data, _ = _load(root, 32, cache_dir=cache)
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    again, _ = _load(root, 32, cache_dir=cache)
    warm = time.perf_counter() - t0
    assert data.images.shape == (8232, 32, 32, 3)
    assert data.class_counts() == {"basophil": 989, "eosinophil": 2502, "lymphocyte": 970,
                                   "monocyte": 1121, "neutrophil": 2650}
    groups = find_duplicates(data.hashes)
    assert len(groups) == 9 and all(len({int(data.labels[i]) for i in g}) == 1 for g in groups)
    assert not data.dropped
    np.testing.assert_array_equal(again.images, data.images)
    assert warm < cold, (warm, cold)
    from fusion.splits import make_split

    split = make_split(data, seed=0)
    where = {i: p for p, ids in split["parts"].items() for i in ids}
    assert len(split["duplicate_groups"]) == 9
    assert all(len({where[i] for i in g}) == 1 for g in split["duplicate_groups"])
    assert split["counts"]["fraction:0.01"]["total"] < split["counts"]["fraction:0.1"]["total"]
    assert abs(split["counts"]["test"]["total"] - 0.15 * 8232) < 10
    print(f"PBC 8232 images @32px: decode {cold:.1f} s, cached reload {warm:.2f} s")
