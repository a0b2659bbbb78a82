"""Splits as files: one stratified train/val/test split, nested label fractions of train, JSON.

A split is a plain dict (saved as JSON) of file ids and their content hashes:

    {"format": "wbc-fusion-split", "version": 1, "seed": 0, "classes": [...], "source": "/abs/root",
     "n": 8232, "val": 0.15, "test": 0.15,
     "parts": {"train": [ids], "val": [ids], "test": [ids]},
     "hashes": {id: sha1}, "labels": {id: class name},
     "train_order": {class: [train ids in one seeded permutation]},
     "fractions": {"0.01": [ids], "0.1": [ids], "0.5": [ids], "1.0": [ids]},
     "duplicate_groups": [[ids]], "counts": {part or "fraction:<f>": {class: n, "total": n}},
     "dropped": {...}}

Exact duplicates (same sha1) form one unit when splitting, so no group straddles two parts. A
fraction f takes, per class, the first max(1, round(f * n_class)) ids of `train_order`, so fractions
are nested (1% ⊂ 10% ⊂ 50% ⊂ 100%) and any new fraction added later nests with the old ones.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from pretrain.utils import atomic_path, atomic_write_json

from .data import WBCData, find_duplicates, load_wbc

FORMAT = "wbc-fusion-split"
VERSION = 1
PARTS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.01, 0.1, 0.5, 1.0)
_KEYS = ("format", "seed", "classes", "source", "n", "parts", "hashes", "labels", "train_order",
         "fractions", "duplicate_groups", "counts")


class SplitError(ValueError):
    """A split that cannot be made, read, or is inconsistent."""


class SplitMismatchError(SplitError):
    """A split applied to data that does not hold the same images (missing id or other content)."""


def fraction_key(f: float) -> str:
    """The JSON key of a label fraction: "0.01", "0.1", "0.5", "1.0". Raises for f outside (0, 1]."""
    try:
        v = float(f)
    except (TypeError, ValueError):
        raise SplitError(f"label fraction {f!r} is not a number; give a value in (0, 1], e.g. 0.1") from None
    if not (0.0 < v <= 1.0) or math.isnan(v):
        raise SplitError(f"label fraction {f!r} is outside (0, 1]; give e.g. 0.01 for 1% of the "
                         f"training labels and 1.0 for all of them")
    return repr(v)


def _counts(ids: Iterable[str], labels: dict[str, str], classes: Iterable[str]) -> dict[str, int]:
    out = dict.fromkeys(classes, 0)
    for i in ids:
        out[labels[i]] += 1
    out["total"] = sum(out.values())
    return out


def _fraction_ids(split: dict, f: float, warn: bool = True) -> list[str]:
    """Per class the first max(1, round(f * n)) ids of `train_order`, in `parts["train"]` order."""
    fraction_key(f)
    chosen, raised = set(), []
    for cls in split["classes"]:
        order = split["train_order"].get(cls, [])
        k = math.floor(f * len(order) + 0.5)
        if k == 0 and order:
            k = 1
            raised.append(f"{cls} ({len(order)} in train)")
        chosen.update(order[:k])
    if raised and warn:
        warnings.warn(f"label fraction {f} would leave {', '.join(raised)} without any image; "
                      f"raised to one image for each such class", stacklevel=3)
    return [i for i in split["parts"]["train"] if i in chosen]


def _stratified(units: np.ndarray, y: np.ndarray, size: float, seed: int, what: str, classes: tuple[str, ...]):
    """Split unit indices in two, stratified by `y`; size is the fraction going to the second part."""
    if size <= 0:
        return units, units[:0]
    try:
        return train_test_split(units, test_size=size, stratify=y, random_state=seed)
    except ValueError as e:
        counts = ", ".join(f"{c} {int((y == k).sum())}" for k, c in enumerate(classes))
        raise SplitError(f"cannot split off a stratified {what} of {size:.0%} from {len(units)} images "
                         f"({counts}): {e}. Use more images per class or a smaller/zero --{what}") from e


def _units(data: WBCData) -> tuple[list[list[int]], np.ndarray, list[list[int]]]:
    """Rows grouped into units (a group of byte-identical images moves as one), each unit's label, the groups."""
    if len(data) == 0:
        raise SplitError(f"no images in {data.root} to split")
    groups = find_duplicates(data.hashes)
    in_group = {i for g in groups for i in g}
    units = sorted([g for g in groups] + [[i] for i in range(len(data)) if i not in in_group],
                   key=lambda g: g[0])
    return units, np.array([int(data.labels[g[0]]) for g in units]), groups


def _check_shares(val: float, test: float) -> None:
    for name, v in (("val", val), ("test", test)):
        if not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise SplitError(f"{name} fraction must be in [0, 1), got {v!r}")
    if val + test >= 1:
        raise SplitError(f"val + test = {val + test} leaves no training images; keep their sum below 1")


def make_split(data: WBCData, val: float = 0.15, test: float = 0.15,
               fractions: Iterable[float] = DEFAULT_FRACTIONS, seed: int = 0) -> dict:
    """One stratified train/val/test split of `data` plus nested label fractions of train.

    `val` and `test` are fractions of all images (0 allowed, val + test < 1). Stratification uses
    scikit-learn's `train_test_split` on duplicate-group representatives (a group of byte-identical
    images moves as one). Returns the JSON-able dict described in the module docstring.
    """
    _check_shares(val, test)
    keys = {fraction_key(f): float(f) for f in fractions}
    units, y, groups = _units(data)
    classes = tuple(data.classes)
    rest, test_u = _stratified(np.arange(len(units)), y, test, seed, "test", classes)
    train_u, val_u = _stratified(rest, y[rest], val / (1 - test), seed + 1, "val", classes)
    return _assemble(data, units, groups, (train_u, val_u, test_u), seed, val, test, keys.values())


def make_kfold_splits(data: WBCData, k: int, val: float = 0.15, fractions: Iterable[float] = DEFAULT_FRACTIONS,
                      seed: int = 0) -> list[dict]:
    """Stratified k-fold cross-validation: k splits whose test parts are the k folds (each image in exactly
    one), the rest of each split cut into train and a stratified `val` share of all images. Duplicate
    groups are units, so no group is ever split across folds or parts.

    Raises:
        SplitError: k < 2, or k larger than the smallest class allows (the message gives the counts).
    """
    from sklearn.model_selection import StratifiedKFold

    if not isinstance(k, int) or k < 2:
        raise SplitError(f"folds must be an integer >= 2, got {k!r}")
    _check_shares(val, 1.0 / k)
    units, y, groups = _units(data)
    classes = tuple(data.classes)
    smallest = min(int((y == c).sum()) for c in range(len(classes)))
    if k > smallest:
        counts = ", ".join(f"{c} {int((y == i).sum())}" for i, c in enumerate(classes))
        raise SplitError(f"{k} folds need at least {k} images (duplicate groups count once) of every class, but "
                         f"the smallest class has {smallest} ({counts}); use folds <= {smallest}")
    keys = {fraction_key(f): float(f) for f in fractions}
    splits = []
    folds = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(units)), y)
    for i, (rest, test_u) in enumerate(folds):
        train_u, val_u = _stratified(rest, y[rest], val / (1 - 1.0 / k), seed + 1 + i, "val", classes)
        split = _assemble(data, units, groups, (train_u, val_u, test_u), seed, val, 1.0 / k, keys.values())
        split["fold"] = {"index": i, "of": k}
        splits.append(split)
    return splits


def _assemble(data: WBCData, units, groups, parts_u, seed: int, val: float, test: float,
              fractions: Iterable[float]) -> dict:
    """The split dict (module docstring) from unit indices per part."""
    classes = tuple(data.classes)
    rows = {p: sorted(i for u in us for i in units[u]) for p, us in zip(PARTS, parts_u, strict=True)}
    labels = {data.ids[i]: classes[int(data.labels[i])] for i in range(len(data))}
    parts = {p: [data.ids[i] for i in r] for p, r in rows.items()}
    missing = [c for c, n in _counts(parts["train"], labels, classes).items() if n == 0 and c != "total"]
    if missing:
        raise SplitError(f"the training part has no image of {', '.join(missing)}; "
                         f"{data.root} holds {data.class_counts()}: add images of these classes")
    rng = np.random.default_rng(seed)
    train_order = {}
    for cls in classes:
        ids = [i for i in parts["train"] if labels[i] == cls]
        train_order[cls] = [ids[j] for j in rng.permutation(len(ids))]
    split = {
        "format": FORMAT, "version": VERSION, "seed": int(seed), "classes": list(classes),
        "source": data.root, "n": len(data), "val": float(val), "test": float(test),
        "parts": parts,
        "hashes": {data.ids[i]: data.hashes[i] for i in range(len(data))},
        "labels": labels,
        "train_order": train_order,
        "fractions": {},
        "duplicate_groups": [[data.ids[i] for i in g] for g in groups],
        "counts": {p: _counts(ids, labels, classes) for p, ids in parts.items()},
        "dropped": data.dropped,
    }
    for f in sorted(fractions):
        add_fraction(split, f)
    return split


def add_fraction(split: dict, f: float) -> dict:
    """Add label fraction `f` of train to `split` (in place; also returned). Nests with existing ones."""
    key = fraction_key(f)
    split["fractions"][key] = _fraction_ids(split, float(f))
    split["counts"][f"fraction:{key}"] = _counts(split["fractions"][key], split["labels"], split["classes"])
    split["fractions"] = dict(sorted(split["fractions"].items(), key=lambda kv: float(kv[0])))
    return split


def validate_split(split: dict, source: str = "split") -> dict:
    """Check structure and consistency; raise `SplitError` naming `source` and the problem."""
    if not isinstance(split, dict) or split.get("format") != FORMAT:
        got = split.get("format") if isinstance(split, dict) else type(split).__name__
        raise SplitError(f"{source} is not a {FORMAT} file (format {got!r}); make one with "
                         f"scripts/make_split.py --data DIR --out split.json")
    missing = [k for k in _KEYS if k not in split]
    if missing:
        raise SplitError(f"{source}: missing key(s) {missing}; re-create it with scripts/make_split.py")
    if not isinstance(split["classes"], list) or len(split["classes"]) < 2:
        raise SplitError(f"{source}: classes must list at least 2 class names, got {split['classes']!r}")
    if sorted(split["parts"]) != sorted(PARTS):
        raise SplitError(f"{source}: parts {sorted(split['parts'])}, expected {list(PARTS)}")
    seen: dict[str, str] = {}
    for p in PARTS:
        for i in split["parts"][p]:
            if i in seen:
                raise SplitError(f"{source}: id {i!r} is in both {seen[i]} and {p}")
            if i not in split["hashes"] or i not in split["labels"]:
                raise SplitError(f"{source}: id {i!r} of {p} has no hash or label")
            seen[i] = p
    for g in split["duplicate_groups"]:
        where = {seen.get(i) for i in g}
        if len(where) > 1:
            raise SplitError(f"{source}: duplicate group {g} straddles parts {sorted(map(str, where))}")
    train = set(split["parts"]["train"])
    prev: set[str] = set()
    for key, ids in sorted(split["fractions"].items(), key=lambda kv: float(kv[0])):
        fraction_key(key)
        outside = [i for i in ids if i not in train]
        if outside:
            raise SplitError(f"{source}: fraction {key} holds {outside[0]!r}, which is not in train")
        if not prev <= set(ids):
            raise SplitError(f"{source}: fraction {key} does not contain the smaller fractions (not nested)")
        prev = set(ids)
    return split


def save_split(split: dict, path: str | os.PathLike) -> Path:
    """Validate and write the split as JSON (atomically); gzip-compressed when `path` ends in `.gz`
    (the split of the 8,232 PBC images is 1.5 MB of JSON, 0.37 MB gzipped)."""
    validate_split(split, source="split to save")
    if str(path).endswith(".gz"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(gzip.compress(json.dumps(split, separators=(",", ":")).encode(), mtime=0))
    else:
        atomic_write_json(path, split)
    return Path(path)


def load_split(path: str | os.PathLike) -> dict:
    """Read and validate a split JSON file.

    Raises:
        FileNotFoundError: no such file (the message says how to make one).
        SplitError: not JSON, not a split, or inconsistent (the message names the file and problem).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist; make it once with "
                                f"scripts/make_split.py --data DIR --out {path}")
    try:
        raw = path.read_bytes()
        split = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as e:
        raise SplitError(f"split file {path} is not valid JSON ({e})") from e
    return validate_split(split, source=f"split file {path}")


def split_indices(split: dict, data: WBCData, part: str, fraction: float | None = None) -> np.ndarray:
    """Rows of `data` (int64, in the split's order) for `part`, or label `fraction` of train.

    A fraction missing from the file is derived from its stored `train_order` exactly as
    `add_fraction` would (so it is reproducible from the file alone).
    Raises:
        SplitMismatchError: an id is not in `data`, or its content hash or label differs (the split
            was made for other images); the message names the id.
    """
    if part not in PARTS:
        raise SplitError(f"unknown part {part!r}; expected one of {list(PARTS)}")
    if list(split["classes"]) != list(data.classes):
        raise SplitMismatchError(f"the split's classes {split['classes']} differ from those of the data loaded "
                                 f"from {data.root} ({list(data.classes)}); make a split for this class set")
    if fraction is None or (part == "train" and float(fraction) == 1.0):
        ids = split["parts"][part]
    elif part != "train":
        raise SplitError(f"label fractions apply to train only; got part {part!r} with fraction {fraction}")
    else:
        key = fraction_key(fraction)
        ids = split["fractions"].get(key) or _fraction_ids(split, float(fraction))
    row = {i: r for r, i in enumerate(data.ids)}
    absent = [i for i in ids if i not in row]
    if absent:
        raise SplitMismatchError(
            f"{len(absent)} of {len(ids)} {part} ids of the split (made from {split.get('source')}) are "
            f"not in the data loaded from {data.root}, e.g. {absent[0]!r}; load the same data set")
    rows = np.array([row[i] for i in ids], dtype=np.int64)
    for i, r in zip(ids, rows, strict=True):
        if data.hashes[r] != split["hashes"][i]:
            raise SplitMismatchError(f"{data.root}: {i!r} has content sha1 {data.hashes[r][:12]}..., but the "
                                     f"split recorded {split['hashes'][i][:12]}...: the file changed since the "
                                     f"split was made; make a new split or restore the file")
        if data.classes[int(data.labels[r])] != split["labels"][i]:
            raise SplitMismatchError(f"{data.root}: {i!r} is labelled {data.classes[int(data.labels[r])]} but the "
                                     f"split says {split['labels'][i]}")
    return rows


@dataclass
class SplitConfig:
    """`scripts/make_split.py`: load the WBC set once (warming the cache) and write the split JSON."""

    data: str = field(default="", metadata={"help": "WBC folder of class folders, or bloodmnist*.npz"})
    out: str = field(default="data/split.json", metadata={"help": "split JSON to write"})
    image_size: int = field(default=64, metadata={"help": "decode size to cache (pixels)"})
    seed: int = 0
    val: float = field(default=0.15, metadata={"help": "fraction of all images for validation"})
    test: float = field(default=0.15, metadata={"help": "fraction of all images for test"})
    fractions: list[float] = field(default_factory=lambda: list(DEFAULT_FRACTIONS),
                                   metadata={"help": "label fractions of train, each in (0, 1]"})
    cache_dir: str = field(default="data/cache", metadata={"help": "decoded-image cache; '' for none"})
    classes: list[str] | dict | str = field(default_factory=list, metadata={"help": "class set: the folder names by default (the five WBC classes in their usual order); a list, or name -> aliases in YAML ({neutrophil: [SNE, BNE]}); 'all' keeps BloodMNIST's 8 classes"})


def run_make_split(cfg: SplitConfig) -> dict:
    """Load `cfg.data`, make the split, save it to `cfg.out`, print a one-line count per part."""
    if not cfg.data:
        raise SplitError("no data given; pass --data DIR (class folders) or --data bloodmnist.npz")
    data = load_wbc(cfg.data, cfg.image_size, cache_dir=cfg.cache_dir or None, classes=cfg.classes)
    split = make_split(data, val=cfg.val, test=cfg.test, fractions=cfg.fractions, seed=cfg.seed)
    save_split(split, cfg.out)
    for name, c in split["counts"].items():
        print(f"{name:>16}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    print(f"{len(split['duplicate_groups'])} duplicate groups kept within one part; wrote {cfg.out}")
    return split
