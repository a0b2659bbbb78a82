"""The one patch-dataset interface: our HDF5 store, PatchCamelyon files and normal/ + tumor/ folders."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.patches import (
    H5PatchDataset,
    PatchDataset,
    PCamDataset,
    load_patch_folder,
    open_patch_dataset,
    slide_id_from_name,
)
from pretrain.store import StoreWriter


def _write_store(path, n=6, P=8, masks=True):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, P, P, 3), dtype=np.uint8)
    labels = np.arange(n) % 2
    with StoreWriter(path, P, save_masks=masks) as w:
        w.append(images[:4], np.ones((4, P, P), np.uint8) if masks else None)
        w.append_meta(labels[:4], np.arange(8).reshape(4, 2), 0, np.ones(4), labels[:4])
        w.append(images[4:], np.zeros((n - 4, P, P), np.uint8) if masks else None)
        w.append_meta(labels[4:], np.arange(2 * (n - 4)).reshape(-1, 2), 1, np.ones(n - 4), labels[4:])
        w.finish(["slide_a", "slide_b"], {"format": "wbc-fusion-patches", "patch_size": P})
    return images, labels


def _write_pcam(folder, split="valid", n=5, size=96):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 2, (n, 1, 1, 1), dtype=np.uint8)
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as f:
        f.create_dataset("x", data=x, chunks=(1, size, size, 3))
    with h5py.File(folder / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as f:
        f.create_dataset("y", data=y)
    return x, y.reshape(-1)


def test_store_round_trip(tmp_path):
    images, labels = _write_store(tmp_path / "p.h5")
    ds = open_patch_dataset(tmp_path / "p.h5")
    assert isinstance(ds, H5PatchDataset) and isinstance(ds, PatchDataset)
    assert len(ds) == 6 and ds.patch_size == 8 and ds.labels.dtype == np.int64
    assert ds.slide_ids.tolist() == ["slide_a"] * 4 + ["slide_b"] * 2
    img, lab = ds[5]
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3)
    np.testing.assert_array_equal(img, images[5])
    assert lab == 1 and isinstance(lab, int)
    assert ds.read_mask(0).mean() == 1 and ds.read_mask(5).mean() == 0
    assert ds.coords.shape == (6, 2)
    sub = ds.subset([5, 0])
    assert sub.labels.tolist() == [1, 0] and sub.slide_ids.tolist() == ["slide_b", "slide_a"]
    np.testing.assert_array_equal(sub[0][0], images[5])
    assert len(ds.subset(np.nonzero(ds.slide_ids == "slide_a")[0])) == 4
    with pytest.raises(IndexError):
        ds[6]


def test_transform_output_is_returned(tmp_path):
    _write_store(tmp_path / "p.h5")
    ds = open_patch_dataset(tmp_path / "p.h5", transform=lambda a: torch.from_numpy(a).permute(2, 0, 1).float() / 255)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and float(x.max()) <= 1


def test_hdf5_opened_lazily_and_not_pickled(tmp_path):
    _write_store(tmp_path / "p.h5")
    ds = open_patch_dataset(tmp_path / "p.h5")
    assert not ds._h5.is_open()  # construction reads only the small arrays and closes the file
    ds[0]
    assert ds._h5.is_open()
    clone = pickle.loads(pickle.dumps(ds))
    assert not clone._h5.is_open()
    np.testing.assert_array_equal(clone[1][0], ds[1][0])


def test_lazy_hdf5_with_two_dataloader_workers(tmp_path):
    images, labels = _write_store(tmp_path / "p.h5")
    ds = open_patch_dataset(tmp_path / "p.h5", transform=lambda a: torch.from_numpy(np.ascontiguousarray(a)))
    ds[0]  # parent opened its own handle first: the workers must not reuse it
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, shuffle=False)
    xs, ys = zip(*dl, strict=True)
    np.testing.assert_array_equal(torch.cat(xs).numpy(), images)
    np.testing.assert_array_equal(torch.cat(ys).numpy(), labels)


@pytest.mark.filterwarnings("ignore:.*PatchCamelyon has no slide ids")
def test_pcam_file_and_folder(tmp_path):
    x, y = _write_pcam(tmp_path, "valid")
    for p in (tmp_path / "camelyonpatch_level_2_split_valid_x.h5", tmp_path / "camelyonpatch_level_2_split_valid_y.h5",
              tmp_path):
        with pytest.warns(UserWarning, match="PatchCamelyon has no slide ids"):
            ds = open_patch_dataset(p)
        assert isinstance(ds, PCamDataset) and len(ds) == 5 and ds.patch_size == 96
        np.testing.assert_array_equal(ds.labels, y)
        assert set(ds.slide_ids) == {"pcam-valid"}
        np.testing.assert_array_equal(ds[3][0], x[3])
    x2, y2 = _write_pcam(tmp_path, "train", n=3)
    both = open_patch_dataset(tmp_path)  # every split in the folder, train first
    assert len(both) == 8 and both.slide_ids[0] == "pcam-train" and both.slide_ids[-1] == "pcam-valid"
    np.testing.assert_array_equal(both[4][0], x[1])
    assert len(open_patch_dataset(tmp_path, split="train")) == 3


def test_pcam_missing_label_file(tmp_path):
    _write_pcam(tmp_path)
    (tmp_path / "camelyonpatch_level_2_split_valid_y.h5").unlink()
    with pytest.raises(FileNotFoundError, match="_y.h5"):
        open_patch_dataset(tmp_path / "camelyonpatch_level_2_split_valid_x.h5")


@pytest.mark.filterwarnings("ignore:.*PatchCamelyon has no slide ids")
def test_missing_datasets_error_lists_contents(tmp_path):
    p = tmp_path / "other.h5"
    with h5py.File(p, "w") as f:
        f.create_dataset("features", data=np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"other.h5.*features \(3, 4\)"):
        open_patch_dataset(p)
    with h5py.File(p, "a") as f:
        f.attrs["format"] = "wbc-fusion-patches"
        f.create_dataset("images", data=np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"missing dataset\(s\) \['labels'.*the file has: features"):
        open_patch_dataset(p)
    bad = tmp_path / "camelyonpatch_level_2_split_test_x.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 4, 4, 3), np.uint8))
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_test_y.h5", "w") as f:
        f.create_dataset("y", data=np.zeros((2, 1, 1, 1), np.uint8))
    with pytest.raises(ValueError, match="lacks dataset 'x'.*images"):
        open_patch_dataset(bad)


def test_folder_of_patches(tmp_path):
    rng = np.random.default_rng(0)
    for cls, names in (("normal", ["tumor_001_100_200", "tumor_001_300_200"]), ("tumor", ["tumor_004_1_2", "odd"])):
        (tmp_path / cls).mkdir()
        for n in names:
            a = rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)
            a[..., 3] = 255
            Image.fromarray(a, "RGBA").save(tmp_path / cls / f"{n}.png")
    ds = open_patch_dataset(tmp_path)
    assert len(ds) == 4 and ds.patch_size == 16
    assert ds.labels.tolist() == [0, 0, 1, 1]
    assert sorted(ds.slide_ids.tolist()) == ["odd", "tumor_001", "tumor_001", "tumor_004"]
    img, _ = ds[0]
    assert img.shape == (16, 16, 3) and img.dtype == np.uint8


def test_folder_errors(tmp_path):
    (tmp_path / "normal").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "normal" / "a.png")
    with pytest.raises(ValueError, match="expected subfolders"):
        load_patch_folder(tmp_path)
    (tmp_path / "tumor").mkdir()
    Image.new("RGB", (10, 10)).save(tmp_path / "tumor" / "b.png")
    with pytest.raises(ValueError, match="one square size"):
        load_patch_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        open_patch_dataset(tmp_path / "nope")


def test_slide_id_from_name():
    assert slide_id_from_name("x/tumor_001_12345_6789.png") == "tumor_001"
    assert slide_id_from_name("patch7.png") == "patch7"


@pytest.mark.slow
def test_real_cam16_patch_folder(shared_data):
    root = shared_data("cam16-patches")
    ds = open_patch_dataset(root)
    assert len(ds) == 89 and ds.patch_size == 256
    assert int((ds.labels == 0).sum()) == 45 and int((ds.labels == 1).sum()) == 44
    assert set(ds.slide_ids) == {"tumor_001", "tumor_004", "tumor_064", "tumor_073"}
    assert ds[0][0].shape == (256, 256, 3)
