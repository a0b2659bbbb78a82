"""Opening slides with OpenSlide (clear errors for broken files) and choosing the pyramid level."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
from wsi_fakes import write_fake_slide

from pretrain.wsi import SlideError, choose_level, find_slides, open_slide, read_region_rgb, slide_mpp


def fake(downsamples=(1.0, 4.0, 16.0), props=None, size=(4000, 3000)):
    """Stand-in with the attributes `choose_level` uses."""
    dims = [(round(size[0] / d), round(size[1] / d)) for d in downsamples]
    return SimpleNamespace(level_downsamples=list(downsamples), level_count=len(downsamples),
                           level_dimensions=dims, properties=props or {})


def test_open_and_read_fake_slide(tmp_path):
    path, _ = write_fake_slide(tmp_path)
    s = open_slide(path)
    assert s.level_count == 2 and s.dimensions == (512, 384)
    assert slide_mpp(s) == pytest.approx(0.5)
    a = read_region_rgb(s, (600, 0), 0, (16, 16))  # outside the slide: transparent -> white
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8 and a.min() == 255
    s.close()


def test_choose_level_by_mpp():
    s = fake(props={"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"})
    assert choose_level(s, mpp=1.0)[:2] == (1, 4.0)  # exactly level 1
    lvl, ds, note = choose_level(s, mpp=0.5)  # between levels 0 and 1: read level 0, resize by 2
    assert (lvl, ds) == (0, 2.0) and "resized" in note
    assert choose_level(s, mpp=8.0)[:2] == (2, 32.0)
    lvl, ds, note = choose_level(s, mpp=0.1)  # finer than level 0: clamp, no upsampling
    assert (lvl, ds) == (0, 1.0) and "finer than level 0" in note
    assert choose_level(s)[:2] == (0, 1.0)
    assert choose_level(s, downsample=16)[:2] == (2, 16.0)
    assert choose_level(s, level=1)[:2] == (1, 4.0)


def test_choose_level_fallbacks():
    lvl, ds, note = choose_level(fake(props={"openslide.objective-power": "40"}), mpp=1.0)
    assert (lvl, ds) == (1, 4.0) and "objective power 40x" in note
    lvl, ds, note = choose_level(fake(), mpp=0.5)
    assert (lvl, ds) == (0, 1.0) and "no µm/px" in note and "level 0" in note
    # a TIFF's default 72 dpi is not a microscope resolution
    lvl, ds, note = choose_level(fake(props={"openslide.mpp-x": "352.78", "openslide.mpp-y": "352.78"}), mpp=0.5)
    assert (lvl, ds) == (0, 1.0) and "implausible" in note


def test_choose_level_bad_arguments():
    with pytest.raises(ValueError, match="only one of"):
        choose_level(fake(), mpp=0.5, level=1)
    with pytest.raises(ValueError, match="levels 0..2"):
        choose_level(fake(), level=3)
    with pytest.raises(ValueError, match="mpp must be > 0"):
        choose_level(fake(props={"openslide.mpp-x": "0.25"}), mpp=0)


def test_slide_errors_name_file_and_reason(tmp_path):
    with pytest.raises(SlideError, match="missing.svs.*does not exist"):
        open_slide(tmp_path / "missing.svs")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"not a slide at all" * 10)
    with pytest.raises(SlideError, match="junk.svs: cannot read slide with OpenSlide: unsupported") as e:
        open_slide(junk)
    assert isinstance(e.value, ValueError) and e.value.path == str(junk)
    again = pickle.loads(pickle.dumps(e.value))  # crosses process boundaries intact
    assert str(again) == str(e.value)


def test_find_slides(tmp_path):
    p, _ = write_fake_slide(tmp_path)
    assert find_slides([p.parent]) == [p]
    with pytest.raises(FileNotFoundError, match="no slide files"):
        find_slides([tmp_path / "annotations"])


@pytest.mark.slow
def test_real_slides_levels_and_mpp(shared_data):
    root = shared_data("wsi")
    s = open_slide(root / "cmu-1-small-region.svs")
    assert s.level_count == 1 and slide_mpp(s) == pytest.approx(0.499)
    assert choose_level(s, mpp=0.5)[:2] == (0, 1.0)
    t = open_slide(root / "tcga-cr-7395-01a-01-ts1.svs")
    assert t.level_count == 2 and slide_mpp(t) is None
    lvl, ds, note = choose_level(t, mpp=0.5)
    assert lvl == 0 and "no µm/px" in note
    assert choose_level(t, downsample=2)[0] == 1
    assert open_slide(root / "small.svs").dimensions == (16, 16)
    assert slide_mpp(open_slide(root / "boxes.tiff")) is None  # 72 dpi default, ignored


@pytest.mark.slow
@pytest.mark.parametrize("name, reason", [
    ("broken.svs", "unsupported or unrecognised format"),
    ("unreadable.svs", "pixels cannot be decoded"),
    ("unopenable.tiff", "Unsupported TIFF compression"),
])
def test_real_bad_slides(shared_data, name, reason):
    path = shared_data("wsi", "bad", name)
    with pytest.raises(SlideError, match=f"{name}: cannot read slide with OpenSlide: .*{reason}"):
        open_slide(path)
