"""Splits: stratified, deterministic, duplicate groups on one side, nested fractions, JSON round trip."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusion.data import CLASSES, WBCData
from fusion.splits import (
    SplitError,
    SplitMismatchError,
    add_fraction,
    fraction_key,
    load_split,
    make_split,
    save_split,
    split_indices,
)

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = (40, 120, 30, 50, 160)  # imbalanced like PBC


def fake_data(per_class=PER_CLASS, dup_groups=((0, 1, 2), (45, 46), (200, 201), (300, 399))) -> WBCData:
    """In-memory WBCData (no pixels needed); rows in `dup_groups` share one content hash."""
    labels = np.repeat(np.arange(len(CLASSES)), per_class).astype(np.int64)
    ids = [f"{CLASSES[c]}/img_{i:04d}.jpg" for i, c in enumerate(labels)]
    hashes = [f"{i:040x}" for i in range(len(ids))]
    for g in dup_groups:
        for i in g:
            hashes[i] = hashes[g[0]]
    images = np.zeros((len(ids), 2, 2, 3), np.uint8)
    return WBCData(images, labels, ids, hashes, root="/fake/wbc", image_size=2)


def _split(data=None, **kw):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        split = make_split(data if data is not None else fake_data(), **kw)
    return split, [str(x.message) for x in w]


def test_parts_disjoint_complete_stratified():
    data = fake_data()
    split, _ = _split(data, val=0.15, test=0.15)
    parts = split["parts"]
    all_ids = parts["train"] + parts["val"] + parts["test"]
    assert sorted(all_ids) == sorted(data.ids) and len(set(all_ids)) == len(all_ids)
    for c, n in zip(CLASSES, PER_CLASS, strict=True):
        for p, frac in (("val", 0.15), ("test", 0.15), ("train", 0.7)):
            assert abs(split["counts"][p][c] - frac * n) <= 2.5, (p, c, split["counts"][p])
    assert split["n"] == len(data) and split["format"] == "wbc-fusion-split"
    assert split["hashes"] == dict(zip(data.ids, data.hashes, strict=True))


def test_duplicate_groups_never_straddle_parts():
    data = fake_data()
    for seed in range(8):
        split, _ = _split(data, seed=seed)
        where = {i: p for p, ids in split["parts"].items() for i in ids}
        assert len(split["duplicate_groups"]) == 4
        for g in split["duplicate_groups"]:
            assert len({where[i] for i in g}) == 1, (seed, g)


def test_deterministic_per_seed():
    a, _ = _split(seed=3)
    b, _ = _split(seed=3)
    c, _ = _split(seed=4)
    assert json.dumps(a) == json.dumps(b)
    assert a["parts"]["test"] != c["parts"]["test"]


def test_fractions_nested_stratified_at_least_one_per_class():
    split, msgs = _split(fractions=(1.0, 0.5, 0.1, 0.01))
    assert list(split["fractions"]) == ["0.01", "0.1", "0.5", "1.0"]
    train = split["parts"]["train"]
    sets = [set(split["fractions"][k]) for k in split["fractions"]]
    assert all(a < b for a, b in zip(sets, sets[1:], strict=False))
    assert set(split["fractions"]["1.0"]) == set(train)
    for c in CLASSES:
        n = split["counts"]["train"][c]
        assert split["counts"]["fraction:0.01"][c] == 1  # round(0.01 * n) == 0 for every class here
        assert split["counts"]["fraction:0.5"][c] == int(np.floor(0.5 * n + 0.5))
    assert any("label fraction 0.01 would leave" in m and "raised to one image" in m for m in msgs)


def test_add_arbitrary_fraction_nests_with_existing():
    split, _ = _split()
    before = json.dumps(split["fractions"]["0.1"])
    add_fraction(split, 0.25)
    f10, f25, f50 = (set(split["fractions"][k]) for k in ("0.1", "0.25", "0.5"))
    assert f10 < f25 < f50 and json.dumps(split["fractions"]["0.1"]) == before
    assert list(split["fractions"]) == ["0.01", "0.1", "0.25", "0.5", "1.0"]


@pytest.mark.parametrize("f", [0, -0.1, 1.5, float("nan"), "abc", None])
def test_fractions_outside_range_rejected(f):
    with pytest.raises(SplitError, match="fraction"):
        fraction_key(f)
    with pytest.raises(SplitError):
        make_split(fake_data(), fractions=(0.1, f))


@pytest.mark.parametrize("kw", [dict(val=0.5, test=0.5), dict(val=-0.1), dict(test=1.0), dict(val="x")])
def test_bad_val_test(kw):
    with pytest.raises(SplitError):
        make_split(fake_data(), **kw)


def test_zero_val_and_test_allowed():
    split, _ = _split(val=0.0, test=0.0)
    assert split["parts"]["val"] == [] and split["parts"]["test"] == []
    assert len(split["parts"]["train"]) == sum(PER_CLASS)


def test_too_small_for_stratified_split():
    with pytest.raises(SplitError, match="stratified test"):
        make_split(fake_data(per_class=(1, 5, 5, 5, 5), dup_groups=()), val=0.1, test=0.1)


def test_save_load_round_trip_and_indices(tmp_path):
    data = fake_data()
    split, _ = _split(data)
    path = save_split(split, tmp_path / "split.json")
    back = load_split(path)
    assert back == json.loads(json.dumps(split))
    rows = split_indices(back, data, "test")
    assert [data.ids[r] for r in rows] == back["parts"]["test"] and rows.dtype == np.int64
    r01 = split_indices(back, data, "train", 0.01)
    assert len(r01) == 5 and sorted(data.labels[r01].tolist()) == [0, 1, 2, 3, 4]
    assert np.array_equal(split_indices(back, data, "train", 1.0), split_indices(back, data, "train"))
    on_the_fly = split_indices(back, data, "train", 0.3)  # not in the file: derived from train_order
    assert set(data.ids[r] for r in on_the_fly) == set(add_fraction(back, 0.3)["fractions"]["0.3"])
    # the same split applies to the same images loaded in another order
    perm = np.random.default_rng(0).permutation(len(data))
    shuffled = WBCData(data.images[perm], data.labels[perm], [data.ids[i] for i in perm],
                       [data.hashes[i] for i in perm], data.root, data.image_size)
    assert [shuffled.ids[r] for r in split_indices(back, shuffled, "val")] == back["parts"]["val"]


def test_gzipped_split_round_trip_and_truncated_file(tmp_path):
    split, _ = _split(fake_data())
    plain, packed = save_split(split, tmp_path / "s.json"), save_split(split, tmp_path / "s.json.gz")
    assert packed.read_bytes()[:2] == b"\x1f\x8b" and packed.stat().st_size < plain.stat().st_size / 3
    assert load_split(packed) == load_split(plain)
    (tmp_path / "cut.json.gz").write_bytes(packed.read_bytes()[:40])
    with pytest.raises(SplitError, match=r"cut\.json\.gz is not valid JSON"):
        load_split(tmp_path / "cut.json.gz")


def test_split_refuses_other_images():
    data = fake_data()
    split, _ = _split(data)
    victim = split["parts"]["val"][3]
    changed = fake_data()
    changed.hashes[changed.ids.index(victim)] = "f" * 40
    with pytest.raises(SplitMismatchError, match=victim):
        split_indices(split, changed, "val")
    keep = np.arange(10, len(data))
    fewer = WBCData(data.images[keep], data.labels[keep], [data.ids[i] for i in keep],
                    [data.hashes[i] for i in keep], data.root, data.image_size)
    with pytest.raises(SplitMismatchError, match="not in the data"):
        split_indices(split, fewer, "train")
    relabelled = fake_data()
    relabelled.labels[relabelled.ids.index(victim)] = (relabelled.labels[relabelled.ids.index(victim)] + 1) % 5
    with pytest.raises(SplitMismatchError, match="labelled"):
        split_indices(split, relabelled, "val")
    with pytest.raises(SplitError, match="train only"):
        split_indices(split, data, "val", 0.1)
    with pytest.raises(SplitError, match="unknown part"):
        split_indices(split, data, "holdout")


def _tamper(split, how):
    s = json.loads(json.dumps(split))
    if how == "overlap":
        s["parts"]["val"].append(s["parts"]["train"][0])
    elif how == "not nested":
        s["fractions"]["0.01"].append(next(i for i in s["parts"]["train"] if i not in s["fractions"]["0.1"]))
    elif how == "outside train":
        s["fractions"]["0.5"].append(s["parts"]["test"][0])
    elif how == "straddle":
        g = s["duplicate_groups"][0]
        for p in s["parts"].values():
            if g[0] in p:
                p.remove(g[0])
        s["parts"]["test" if g[1] not in s["parts"]["test"] else "val"].append(g[0])
    elif how == "format":
        s["format"] = "something-else"
    elif how == "missing key":
        del s["hashes"]
    return s


@pytest.mark.parametrize("how, match", [("overlap", "in both"), ("not nested", "not nested"),
                                        ("outside train", "not in train"), ("straddle", "straddles|in both"),
                                        ("format", "is not a wbc-fusion-split"), ("missing key", "missing key")])
def test_load_rejects_inconsistent_files(tmp_path, how, match):
    split, _ = _split()
    p = tmp_path / "s.json"
    p.write_text(json.dumps(_tamper(split, how)))
    with pytest.raises(SplitError, match=match):
        load_split(p)


def test_load_missing_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="make_split.py"):
        load_split(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SplitError, match="not valid JSON"):
        load_split(tmp_path / "bad.json")


def test_make_split_script(tmp_path):
    spec = importlib.util.spec_from_file_location("make_split", ROOT / "scripts" / "make_split.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (tmp_path / "wbc" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "wbc" / c / f"{i}.png")
    out = tmp_path / "split.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        script.main(["--data", str(tmp_path / "wbc"), "--out", str(out), "--image-size", "8", "--seed", "1",
              "--fractions", "0.2", "1.0", "--cache-dir", str(tmp_path / "cache")])
    split = load_split(out)
    assert split["seed"] == 1 and list(split["fractions"]) == ["0.2", "1.0"] and split["n"] == 50
    assert list((tmp_path / "cache").glob("wbc_*_8.npz"))
