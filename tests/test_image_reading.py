"""Unusual images through the real readers: 16-bit, float, 1-bit, palette, alpha, CMYK, LAB/YCbCr,
multi-frame, tiny and decompression-bomb files; float/uint16 arrays in HDF5 stores and `.npz` files.

Each case checks the decoded pixel values, or that the refusal is a one-line BadImageError naming
the file. Images are small synthetic files written into tmp_path.
"""

from __future__ import annotations

import io
import warnings

import cv2
import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from fusion.data import CLASSES, decode_bytes, load_wbc
from pretrain.images import (
    MAX_PIXELS_ENV,
    BadImageError,
    SmallImageError,
    TooManyBadImagesError,
    load_images,
    load_rgb,
    pil_to_rgb,
)
from pretrain.patches import STORE_FORMAT, ArrayPatchDataset, open_patch_dataset

S = 20  # side of the test images, px (>= the WBC loader's 16 px minimum)


def _grey16(path, value=32768):
    Image.fromarray(np.full((S, S), value, np.uint16)).save(path)  # Pillow mode "I;16"


def _rgb16(values):
    return np.broadcast_to(np.asarray(values, np.uint16), (S, S, 3)).copy()


def _palette(path):
    im = Image.new("P", (S, S))
    im.putpalette([255, 0, 0, 0, 0, 255, 10, 200, 30] + [0] * (256 * 3 - 9))
    im.paste(1, (0, 0, S, S // 2))  # top half blue, bottom half red (index 0)
    im.paste(2, (0, 0, 2, 2))  # corner green
    im.save(path)


def _palette_transparent(path):
    im = Image.new("P", (S, S))
    im.putpalette([0, 0, 0, 200, 50, 10] + [0] * (256 * 3 - 6))
    im.paste(1, (0, 0, S, S // 2))
    im.save(path, transparency=0)  # index 0 (black) is transparent -> white


def _rgba(path, alpha):
    a = np.zeros((S, S, 4), np.uint8)
    a[..., 0], a[..., 1], a[..., 2], a[..., 3] = 200, 100, 0, alpha
    Image.fromarray(a, "RGBA").save(path)


def _la(path):
    a = np.zeros((S, S, 2), np.uint8)
    a[..., 0], a[..., 1] = 100, 128
    Image.fromarray(a, "LA").save(path)


def _converted(mode, fmt):
    def write(path):
        rgb = np.zeros((S, S, 3), np.uint8)
        rgb[...] = (200, 50, 10)
        Image.fromarray(rgb).convert(mode).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return write


def _one_bit(path):
    a = np.zeros((S, S), bool)
    a[: S // 2] = True
    Image.fromarray(a).save(path)


# (name, file name, writer, check on the decoded (S, S, 3) uint8 array)
DECODES = [
    ("grey16-pil", "g.png", _grey16, lambda a: abs(int(a[0, 0, 0]) - 128) <= 1 and (a == a[0, 0, 0]).all()),
    ("grey16-cv2", "g.png", lambda p: cv2.imwrite(str(p), np.full((S, S), 65535, np.uint16)),
     lambda a: (a == 255).all()),
    ("grey16-dark", "g.png", lambda p: _grey16(p, 257 * 10), lambda a: (a == 10).all()),
    ("grey16-tiff", "g.tif", lambda p: tifffile.imwrite(p, np.full((S, S), 32768, np.uint16)),
     lambda a: abs(int(a[0, 0, 0]) - 128) <= 1),
    ("rgb16-png", "c.png", lambda p: cv2.imwrite(str(p), _rgb16([2570, 32768, 65535])[..., ::-1]),  # cv2: BGR
     lambda a: np.abs(a[0, 0].astype(int) - [10, 128, 255]).max() <= 1),
    ("rgb16-tiff", "c.tif", lambda p: tifffile.imwrite(p, _rgb16([2570, 32768, 65535]), photometric="rgb"),
     lambda a: np.abs(a[0, 0].astype(int) - [10, 128, 255]).max() <= 1),
    ("float-01", "f.tif", lambda p: Image.fromarray(np.full((S, S), 0.5, np.float32)).save(p),
     lambda a: abs(int(a[0, 0, 0]) - 128) <= 1),
    ("float-0-255", "f.tif", lambda p: Image.fromarray(np.full((S, S), 100.0, np.float32)).save(p),
     lambda a: (a == 100).all()),
    ("float-rgb-tifffile", "f.tif",
     lambda p: tifffile.imwrite(p, np.broadcast_to(np.float32([0.0, 0.5, 1.0]), (S, S, 3)).copy(), photometric="rgb"),
     lambda a: np.abs(a[0, 0].astype(int) - [0, 128, 255]).max() <= 1),
    ("float64-planar", "f.tif",
     lambda p: tifffile.imwrite(p, np.stack([np.full((S, S), v) for v in (0.2, 0.4, 0.6)]), photometric="rgb",
                                planarconfig="separate"),
     lambda a: np.abs(a[0, 0].astype(int) - [51, 102, 153]).max() <= 1),
    ("one-bit", "b.png", _one_bit, lambda a: (a[0] == 255).all() and (a[-1] == 0).all()),
    ("palette", "p.png", _palette,
     lambda a: a[0, 0].tolist() == [10, 200, 30] and a[5, 5].tolist() == [0, 0, 255] and a[-1, -1].tolist() == [255, 0, 0]),
    ("palette-transparent", "p.png", _palette_transparent,
     lambda a: a[0, 0].tolist() == [200, 50, 10] and a[-1, -1].tolist() == [255, 255, 255]),
    ("rgba-opaque", "a.png", lambda p: _rgba(p, 255), lambda a: (a[0, 0] == [200, 100, 0]).all()),
    ("rgba-half", "a.png", lambda p: _rgba(p, 128),  # on white: 200*.5+127.5, 100*.5+127.5, 127.5
     lambda a: np.abs(a[0, 0].astype(int) - [228, 178, 127]).max() <= 1),
    ("rgba-clear", "a.png", lambda p: _rgba(p, 0), lambda a: (a == 255).all()),
    ("la", "la.png", _la, lambda a: np.abs(a[0, 0].astype(int) - 178).max() <= 1),
    ("cmyk-jpeg", "k.jpg", _converted("CMYK", "JPEG"), lambda a: np.abs(a[5, 5].astype(int) - [200, 50, 10]).max() <= 8),
    ("cmyk-tiff", "k.tif", _converted("CMYK", "TIFF"), lambda a: (a[0, 0] == [200, 50, 10]).all()),
    ("ycbcr-tiff", "y.tif", _converted("YCbCr", "TIFF"), lambda a: np.abs(a[0, 0].astype(int) - [200, 50, 10]).max() <= 3),
    ("lab-tiff", "l.tif", _converted("LAB", "TIFF"), lambda a: np.abs(a[0, 0].astype(int) - [200, 50, 10]).max() <= 3),
]


@pytest.mark.parametrize("name, fname, write, check", DECODES, ids=[d[0] for d in DECODES])
def test_load_rgb_decodes_unusual_modes(tmp_path, name, fname, write, check):
    path = tmp_path / fname
    write(path)
    a = load_rgb(path)
    assert a.shape == (S, S, 3) and a.dtype == np.uint8
    assert check(a), (name, a[0, 0], a[-1, -1])


def test_16bit_grey_is_not_white_regression(tmp_path):
    """Defect 1: Pillow's convert("RGB") clips "I;16" to 255; scale by the dtype range instead."""
    _grey16(tmp_path / "g.png", 32768)
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    a = load_rgb(tmp_path / "g.png")
    assert abs(int(a.mean()) - 128) <= 1  # not 255, and not stretched to the image's own max


def test_hsv_converts():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[...] = (200, 50, 10)
    a = pil_to_rgb(Image.fromarray(rgb).convert("HSV"), "hsv")
    assert np.abs(a[0, 0].astype(int) - [200, 50, 10]).max() <= 5


def _float_tif(path, value):
    Image.fromarray(np.full((S, S), value, np.float32)).save(path)


REFUSALS = [
    ("float-negative", "n.tif", lambda p: _float_tif(p, -0.5), "neither 0..1 nor 0..255"),
    ("float-over-255", "o.tif", lambda p: _float_tif(p, 300.0), "300"),
    ("float-nan", "nan.tif", lambda p: _float_tif(p, np.nan), "NaN"),
    ("float-rgb-negative", "r.tif",
     lambda p: tifffile.imwrite(p, np.full((S, S, 3), -1, np.float32), photometric="rgb"), "-1"),
    ("int32", "i.tif", lambda p: tifffile.imwrite(p, np.full((S, S), 5, np.int32)), "mode 'I'"),
    ("multipage-tiff", "m.tif", lambda p: tifffile.imwrite(p, np.zeros((3, S, S), np.uint8), photometric="minisblack"), "3 frames/pages"),
    ("multipage-float-tiff", "mf.tif", lambda p: tifffile.imwrite(p, np.zeros((2, S, S, 3), np.float32),
                                                                  photometric="rgb"), "2 pages"),
    ("animated-png", "anim.png",
     lambda p: Image.new("RGB", (S, S)).save(p, save_all=True, append_images=[Image.new("RGB", (S, S), "red")]),
     "2 frames"),
    ("garbage", "g.png", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n not really"), "cannot decode image"),
]


@pytest.mark.parametrize("name, fname, write, expect", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_file_in_one_line(tmp_path, name, fname, write, expect):
    path = tmp_path / fname
    write(path)
    with pytest.raises(BadImageError) as e:
        load_rgb(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and expect in msg and "\n" not in msg
    assert isinstance(e.value, ValueError) and e.value.reason in msg


def test_load_images_skips_tiny_and_refused_files_by_name(tmp_path):
    """Defect 4 (pretrain side): a 1x1 px image is skipped by name, not upscaled later."""
    Image.new("RGB", (S, S), "blue").save(tmp_path / "ok.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    _float_tif(tmp_path / "neg.tif", -2.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        arrays, kept = load_images([tmp_path / n for n in ("ok.png", "dot.png", "neg.tif")])
    msgs = [str(x.message) for x in w]
    assert kept == [tmp_path / "ok.png"] and arrays[0][0, 0].tolist() == [0, 0, 255]
    assert any("dot.png" in m and "1x1 px" in m for m in msgs)
    assert any("neg.tif" in m and "neither 0..1 nor 0..255" in m for m in msgs)
    assert any("skipped 1 images smaller than the 8 px minimum" in m for m in msgs)


def test_decompression_bomb_is_skipped_by_name(tmp_path, monkeypatch):
    """Defect 5: over the limit (Pillow's error and its warning range) -> skipped naming file and size."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("RGB", (S, S)).save(tmp_path / "ok.png")  # 400 px
    Image.new("RGB", (40, 40)).save(tmp_path / "warn.png")  # 1600 px: Pillow only warns
    Image.new("RGB", (50, 50)).save(tmp_path / "bomb.png")  # 2500 px > 2x limit: Pillow raises
    for name, pixels in (("warn.png", "1,600"), ("bomb.png", "2,500")):
        with pytest.raises(BadImageError, match=f"{name}: .*{pixels} px is over the decompression-bomb limit "
                                                f"of 1,000 px.*{MAX_PIXELS_ENV}"), warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            load_rgb(tmp_path / name)
    monkeypatch.setenv(MAX_PIXELS_ENV, "none")
    assert load_rgb(tmp_path / "bomb.png").shape == (50, 50, 3)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ValueError, match=f"{MAX_PIXELS_ENV}='lots' is not a pixel count"):
        load_rgb(tmp_path / "ok.png")


def test_decode_bytes_small_and_corrupt_are_bad_image_errors():
    buf = io.BytesIO()
    Image.new("RGB", (4, 30)).save(buf, "PNG")
    with pytest.raises(SmallImageError, match=r"^cell\.png: 4x30 px is below the minimum of 16 px"):
        decode_bytes(buf.getvalue(), 8, source="cell.png", min_size=16)
    assert decode_bytes(buf.getvalue(), 8, source="cell.png").shape == (8, 8, 3)
    with pytest.raises(BadImageError, match=r"^x\.jpg: cannot decode image"):
        decode_bytes(b"\xff\xd8\xff\xe0 nope", 8, source="x.jpg")


# --- the WBC loader: class folders (decoded in worker threads) and .npz arrays -----------------------

def _wbc_tree(root):
    for k, c in enumerate(CLASSES):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (S, S + 2), (40 * k, 10 * i, 100)).save(root / c / f"{c}_{i}.png")
    return root


def _load_wbc(*args, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        data = load_wbc(*args, progress=False, **kw)
    return data, [str(x.message) for x in w]


def test_wbc_folder_decodes_16bit_float_and_alpha(tmp_path):
    root = _wbc_tree(tmp_path / "wbc")
    _grey16(root / "basophil" / "g16.png", 32768)
    cv2.imwrite(str(root / "eosinophil" / "c16.png"), _rgb16([2570, 32768, 65535])[..., ::-1])
    _float_tif(root / "monocyte" / "f.tif", 0.5)
    _rgba(root / "neutrophil" / "a.png", 0)
    data, _ = _load_wbc(root, 8, cache_dir=None, workers=2)
    img = {i: data.images[k] for k, i in enumerate(data.ids)}
    assert abs(int(img["basophil/g16.png"].mean()) - 128) <= 1
    assert np.abs(img["eosinophil/c16.png"][4, 4].astype(int) - [10, 128, 255]).max() <= 1
    assert abs(int(img["monocyte/f.tif"].mean()) - 128) <= 1
    assert (img["neutrophil/a.png"] == 255).all()


def test_wbc_tiny_images_skipped_with_warning_regression(tmp_path):
    """Defect 4: a 1x1 px file is not upscaled into the training set; min_size is a parameter."""
    root = _wbc_tree(tmp_path / "wbc")
    Image.new("RGB", (1, 1), "red").save(root / "lymphocyte" / "dot.png")
    Image.new("RGB", (12, 40)).save(root / "monocyte" / "thin.png")
    data, msgs = _load_wbc(root, 32, cache_dir=tmp_path / "cache", workers=2)
    assert len(data) == 15 and "lymphocyte/dot.png" not in data.ids
    assert data.dropped["too_small"] == {"lymphocyte/dot.png": "1x1 px is below the minimum of 16 px per side",
                                         "monocyte/thin.png": "12x40 px is below the minimum of 16 px per side"}
    assert any("dot.png" in m and "1x1 px" in m for m in msgs)
    assert any("skipped 2 WBC images" in m and "(2 of 17)" in m for m in msgs)
    again, msgs = _load_wbc(root, 32, cache_dir=tmp_path / "cache")  # from the cache: still reported
    assert again.dropped == data.dropped and any("smaller than 16 px" in m and "when the cache" in m for m in msgs)
    loose, _ = _load_wbc(root, 32, cache_dir=tmp_path / "cache", min_size=10)  # another key, not the old cache
    assert len(loose) == 16 and "monocyte/thin.png" in loose.ids


def test_wbc_bomb_reason_reaches_the_warning_from_threads(tmp_path, monkeypatch):
    """Defect 5 through `_decode_folder`'s thread pool: the per-file reason is in the warning."""
    root = _wbc_tree(tmp_path / "wbc")
    Image.new("RGB", (60, 60)).save(root / "basophil" / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data, msgs = _load_wbc(root, 8, cache_dir=None, workers=4)
    assert len(data) == 15 and "huge.png" in str(data.dropped["unreadable"])
    assert any("huge.png" in m and "3,600 px is over the decompression-bomb limit" in m and MAX_PIXELS_ENV in m
               for m in msgs)


def test_wbc_mostly_refused_folder_still_raises(tmp_path):
    root = tmp_path / "wbc"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        Image.new("RGB", (S, S)).save(root / c / "ok.png")
        for i in range(2):
            _float_tif(root / c / f"bad{i}.tif", -1.0)
    with pytest.raises(TooManyBadImagesError, match="neither 0..1 nor 0..255"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_wbc(root, 8, cache_dir=None, progress=False)


def _npz(path, x):
    n = len(x)
    np.savez(path, train_images=x, train_labels=np.zeros((n, 1), np.uint8))  # all basophils


@pytest.mark.parametrize("x, expect", [
    (np.full((2, 28, 28, 3), 0.5, np.float32), 128),
    (np.full((2, 28, 28, 3), 100.0, np.float64), 100),
    (np.full((2, 28, 28), 0.5, np.float32), 128),  # grey
    (np.full((2, 28, 28, 3), 32768, np.uint16), 128),
], ids=["float01", "float0-255", "grey-float", "uint16"])
def test_npz_float_and_uint16_arrays_are_scaled(tmp_path, x, expect):
    """Defect 3 (npz path): MedMNIST-like float/uint16 arrays are scaled by their dtype's range."""
    _npz(tmp_path / "bloodmnist.npz", x)
    data, _ = _load_wbc(tmp_path / "bloodmnist.npz", 16, cache_dir=None)
    assert data.images.shape == (2, 16, 16, 3) and abs(int(data.images.mean()) - expect) <= 1


@pytest.mark.parametrize("x, expect", [
    (np.full((2, 28, 28, 3), -0.5, np.float32), "neither 0..1 nor 0..255"),
    (np.full((2, 28, 28, 3), 7, np.int64), "int64 pixels have no standard"),
    (np.full((2, 8, 8, 3), 7, np.uint8), "8x8 px, below min_size=16"),
], ids=["negative", "int64", "too-small"])
def test_npz_refusals_name_the_array(tmp_path, x, expect):
    _npz(tmp_path / "bloodmnist.npz", x)
    with pytest.raises(ValueError, match=expect) as e:
        load_wbc(tmp_path / "bloodmnist.npz", 16, cache_dir=None, progress=False)
    assert "bloodmnist.npz:train_images" in str(e.value)


# --- HDF5 patch stores and PatchCamelyon -----------------------------------------------------------

def _store(path, images):
    n = len(images)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("labels", data=np.arange(n) % 2)
        f.create_dataset("coords", data=np.zeros((n, 2), np.int64))
        f.create_dataset("slide_index", data=np.zeros(n, np.int32))
        f.create_dataset("slide_names", data=np.array(["s"], dtype=object), dtype=h5py.string_dtype())
        f.attrs["format"] = STORE_FORMAT
    return path


@pytest.mark.parametrize("images, expect", [
    (np.full((4, 8, 8, 3), 0.5, np.float32), 128),
    (np.full((4, 8, 8, 3), 200.0, np.float32), 200),
    (np.full((4, 8, 8, 3), 32768, np.uint16), 128),
    (np.full((4, 8, 8, 3), 77, np.uint8), 77),
], ids=["float01", "float0-255", "uint16", "uint8"])
def test_h5_store_float_images_are_not_divided_twice_regression(tmp_path, images, expect):
    """Defect 3: a float store in [0, 1] read as uint8 0..255 (then /255 by the transform), not near-black."""
    ds = open_patch_dataset(_store(tmp_path / "p.h5", images))
    img, _ = ds[1]
    assert img.dtype == np.uint8 and img.shape == (8, 8, 3) and abs(int(img.mean()) - expect) <= 1


@pytest.mark.parametrize("images, expect", [
    (np.full((3, 8, 8, 3), 7, np.int64), "int64 pixels have no standard"),
    (np.full((3, 8, 8, 3), -1.0, np.float32), "-1..-1, neither 0..1 nor 0..255"),
    (np.full((3, 8, 8, 3), np.nan, np.float32), "NaN"),
], ids=["int64", "negative", "nan"])
def test_h5_store_refusals_name_dataset_and_dtype(tmp_path, images, expect):
    path = _store(tmp_path / "p.h5", images)
    with pytest.raises(BadImageError, match=expect) as e:
        open_patch_dataset(path)
    assert str(e.value).startswith(f"{path}:/images: ")


def test_h5_patch_outside_the_sampled_range_is_refused(tmp_path):
    images = np.full((300, 4, 4, 3), 0.5, np.float32)
    sampled = set(np.linspace(0, 299, 256).astype(int).tolist())
    odd = next(i for i in range(300) if i not in sampled)
    images[odd] = 250.0  # the sample says [0, 1]; this patch is not
    ds = open_patch_dataset(_store(tmp_path / "p.h5", images))
    assert abs(int(ds[0][0].mean()) - 128) <= 1
    with pytest.raises(BadImageError, match=rf"/images\[{odd}\]: float32 pixels range 250..250 fall outside 0..1"):
        ds[odd]


def test_pcam_float_x_and_array_dataset_are_scaled(tmp_path):
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_x.h5", "w") as f:
        f.create_dataset("x", data=np.full((3, 96, 96, 3), 0.25, np.float32))
    with h5py.File(tmp_path / "camelyonpatch_level_2_split_valid_y.h5", "w") as f:
        f.create_dataset("y", data=np.zeros((3, 1, 1, 1), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PCam's "no slide ids" notice
        ds = open_patch_dataset(tmp_path)
    assert abs(int(ds[2][0].mean()) - 64) <= 1
    arr = ArrayPatchDataset(np.full((2, 4, 4, 3), 0.5, np.float32), [0, 1], ["a", "b"], source="mem")
    assert abs(int(arr[0][0].mean()) - 128) <= 1
    with pytest.raises(BadImageError, match="mem: float32 pixels range 400..400"):
        ArrayPatchDataset(np.full((2, 4, 4, 3), 400.0, np.float32), [0, 1], ["a", "b"], source="mem")


def test_patch_folder_composites_transparent_patches_on_white(tmp_path):
    for cls in ("normal", "tumor"):
        (tmp_path / cls).mkdir()
        _rgba(tmp_path / cls / "s_1_2.png", 255)
    _rgba(tmp_path / "tumor" / "s_3_4.png", 0)
    ds = open_patch_dataset(tmp_path)
    imgs = [ds[i][0] for i in range(len(ds))]
    assert imgs[0][0, 0].tolist() == [200, 100, 0] and (imgs[2] == 255).all()
