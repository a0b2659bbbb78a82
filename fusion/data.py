"""White-blood-cell images: class folders or MedMNIST BloodMNIST `.npz`, decoded and resized once.

`load_wbc(path, image_size)` returns a `WBCData` of uint8 arrays (N, S, S, 3) with labels into
`CLASSES`, stable ids and content hashes. Decoding happens once per (source, size): the result is
cached as `<cache_dir>/wbc_<fingerprint>_<size>.npz`, and later calls only read that file.

Resizing choice (the same for every source): centre-crop to a square of the shorter side, then
resize with PIL's antialiasing Lanczos filter. Cropping keeps the cell's aspect ratio (PBC images are
360x363, so only 1-3 px of background are lost); squashing would distort cell shapes. JPEGs are read
in libjpeg "draft" mode (DCT-domain downscaling by 1/2, 1/4 or 1/8 while keeping the short side >= S)
before the final resize, which is ~3.5x faster than a full decode and differs by ~1.7/255 on average.

Unusual files (16-bit, float, alpha, palette, CMYK, ...) are converted by `pretrain.images`' rules or
refused by name. Images whose shorter side is below `min_size` (default `MIN_WBC_SIDE` = 16 px) are
skipped with a warning each and listed in `WBCData.dropped["too_small"]`: below 16 px no cell is
recognisable, while BloodMNIST's smallest release (28 px) is kept. It is an absolute size, not a
fraction of `image_size`, because upscaling 28 px BloodMNIST to 64 px is a legitimate use.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pretrain.images import (
    IMAGE_EXTS,
    BadImageError,
    NoImagesError,
    SmallImageError,
    array_to_rgb,
    decode_rgb,
    find_images,
    pil_to_rgb,
    pixel_scale,
    warn_bad_files,
    warn_small_files,
)
from pretrain.utils import atomic_path

from .preprocess import apply as apply_preprocess
from .preprocess import check_ops

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

# MedMNIST `INFO["bloodmnist"]["label"]`, in label order; three are not white cells of our five.
BLOODMNIST_CLASSES = ("basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte",
                      "neutrophil", "platelet")
BLOODMNIST_TO_WBC = {0: 0, 1: 1, 4: 2, 5: 3, 6: 4}  # BloodMNIST label -> index into CLASSES
NPZ_PARTS = ("train", "val", "test")

# Bump when decoding/resizing changes, so that old caches are not reused.
# 2: 16-bit/float/alpha decoding fixed, too-small images dropped (min_size is part of the key).
CACHE_VERSION = 2
MIN_WBC_SIDE = 16  # px; see the module docstring
_RESAMPLE = Image.Resampling.LANCZOS


class ClassFolderError(ValueError):
    """The class folders of a data folder do not match its declared classes, or a bad `classes` config."""


@dataclass
class WBCData:
    """A decoded WBC set. Row i of every field describes the same image.

    images: (N, S, S, 3) uint8, already resized to `image_size` = S.
    labels: (N,) int64 indices into `classes`.
    ids: stable ids: path relative to `root` ("neutrophil/BNE_123.jpg") or "bloodmnist:train:123".
    hashes: sha1 hex of the file bytes (of the uint8 RGB pixels before resizing for `.npz` sources).
    root: the folder or `.npz` file it came from (absolute).
    dropped: what was left out and why, e.g. {"unreadable": {id: reason}, "too_small": {id: reason},
        "classes": {name: count}}.
    """

    images: np.ndarray
    labels: np.ndarray
    ids: list[str]
    hashes: list[str]
    root: str
    image_size: int
    dropped: dict = field(default_factory=dict)
    classes: tuple[str, ...] = CLASSES  # the data set's class names, in label order

    def __post_init__(self) -> None:
        n = len(self.images)
        if not (len(self.labels) == len(self.ids) == len(self.hashes) == n):
            raise ValueError(f"WBCData fields disagree in length: images {n}, labels {len(self.labels)}, "
                             f"ids {len(self.ids)}, hashes {len(self.hashes)}")
        self.classes = tuple(self.classes)

    def __len__(self) -> int:
        return len(self.images)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts, strict=True)}


def find_duplicates(hashes: Sequence[str]) -> list[list[int]]:
    """Groups (len >= 2) of row indices with equal content hash, each sorted, ordered by first index."""
    rows: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        rows[h].append(i)
    return sorted((g for g in rows.values() if len(g) > 1), key=lambda g: g[0])


def square_resize(im: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """Centre-crop an image to a square and resize it (antialiased) -> (size, size, 3) uint8.

    `im` is a PIL image of any supported mode or a pixel array (H, W[, C]); both are first converted
    to 8-bit RGB by `pretrain.images`' rules, so 16-bit or float inputs are not clipped to white.
    """
    if isinstance(im, np.ndarray):
        im = Image.fromarray(array_to_rgb(im, "array"))
    elif im.mode != "RGB":
        im = Image.fromarray(pil_to_rgb(im, "image"))
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return np.asarray(im.resize((size, size), _RESAMPLE, box=(left, top, left + s, top + s)))


def decode_bytes(data: bytes, size: int, source: str = "image", min_size: int = 0,
                 preprocess: Sequence[str] = (), notes: list[str] | None = None) -> np.ndarray:
    """Decode encoded image bytes -> (size, size, 3) uint8 (see module docstring for the resize).

    Raises:
        BadImageError: truncated, corrupt, not an image or refused (see `pretrain.images`); one line
            naming `source`. `SmallImageError` (a BadImageError) when the shorter side < `min_size`.
    """
    img = decode_rgb(data, source, draft=size, min_size=min_size)
    return square_resize(apply_preprocess(img, preprocess, notes) if preprocess else img, size)


def _decode_one(path: Path, size: int, min_size: int, preprocess: Sequence[str] = (),
                notes: list[str] | None = None) -> tuple[np.ndarray | None, str, BadImageError | None]:
    """Read and decode one file -> (image or None, sha1 of the bytes, the refusal or None).

    Returns the error instead of raising so that worker threads hand each file's reason back.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return None, "", BadImageError(f"{path}: cannot read file", f"cannot read file ({type(e).__name__}: {e})")
    digest = hashlib.sha1(data).hexdigest()
    try:
        return (decode_bytes(data, size, source=str(path), min_size=min_size, preprocess=preprocess, notes=notes),
                digest, None)
    except BadImageError as e:
        return None, digest, e


def decode_file(path: Path, size: int, min_size: int = 0, preprocess: Sequence[str] = ()
                ) -> tuple[np.ndarray | None, str, str]:
    """Read and decode one file -> (image (size, size, 3) uint8 or None, sha1 of the bytes, reason or "").

    `min_size` (px, default 0: any size) refuses smaller images with a reason; `load_wbc` uses 16.
    """
    arr, digest, err = _decode_one(path, size, min_size, preprocess)
    return arr, digest, err.reason if err is not None else ""


def _images_in(folder: Path) -> list[Path]:
    try:
        return find_images(folder, IMAGE_EXTS)
    except NoImagesError:
        return []


ClassSpec = Sequence[str] | Mapping[str, Sequence[str]] | str | None


def class_spec(classes: ClassSpec) -> dict[str, tuple[str, ...]] | str:
    """Normalise a `classes` config: "" / None / [] -> "auto"; "all"; or {class: (aliases...)}.

    A list names the classes (label order = list order); a mapping also gives each its aliases, e.g.
    `{neutrophil: [SNE, BNE]}` maps folders `SNE/` and `BNE/` onto `neutrophil`. Names match
    case-insensitively.
    """
    if classes in (None, "", "auto") or (isinstance(classes, (list, tuple, dict)) and not classes):
        return "auto"
    if classes == "all":
        return "all"
    if isinstance(classes, str):
        raise ClassFolderError(f"classes must be a list of class names, a mapping name -> aliases, 'auto' or "
                               f"'all', got the string {classes!r}")
    items = classes.items() if isinstance(classes, Mapping) else ((c, ()) for c in classes)
    spec: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for name, aliases in items:
        if isinstance(aliases, str):
            aliases = (aliases,)
        for key in (name, *aliases):
            k = str(key).strip().lower()
            if k in seen:
                raise ClassFolderError(f"classes: {key!r} is given for both {seen[k]!r} and {name!r}")
            seen[k] = str(name)
        spec[str(name)] = tuple(str(a) for a in aliases or ())
    if len(spec) < 2:
        raise ClassFolderError(f"classes: a task needs at least 2 classes, got {list(spec)}")
    return spec


def _alias_table(spec: dict[str, tuple[str, ...]]) -> dict[str, int]:
    return {k.strip().lower(): i for i, (name, aliases) in enumerate(spec.items()) for k in (name, *aliases)}


def _auto_order(names: Sequence[str]) -> tuple[str, ...]:
    """The five WBC classes in their usual order first (so a WBC set keeps its labels), others sorted."""
    known = [c for c in CLASSES if c in names]
    return tuple(known + sorted(n for n in names if n not in CLASSES))


def class_folders(root: str | os.PathLike, classes: ClassSpec = None
                  ) -> tuple[tuple[str, ...], list[tuple[int, Path, list[Path]]]]:
    """The classes of a folder of class folders -> (class names, [(label, folder, files)]).

    By default the classes are the sub-folder names (lower-cased; the five WBC classes keep their usual
    order). `classes` (see `class_spec`) fixes the class list and its aliases instead: every folder
    must then map onto one class, several folders may map onto one (aliases), and every class needs a
    folder. Sub-folders without images are ignored; images directly in `root` are warned about.

    Raises:
        NoImagesError: `root` is not a folder.
        ClassFolderError: fewer than two classes, a folder that maps to no class, a class with no
            folder, or two folders that differ only in case; the message lists everything found.
    """
    root = Path(root)
    if not root.is_dir():
        raise NoImagesError(f"WBC data folder {root} does not exist or is not a folder")
    spec = class_spec(classes)
    found = {d: _images_in(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}
    found = {d: files for d, files in found.items() if files}
    listing = ", ".join(f"{d.name}/ ({len(f)} images)" for d, f in found.items()) or "no folder with images"
    problems = []
    if isinstance(spec, dict):
        names = tuple(spec)
        table = _alias_table(spec)
        label_of = {d: table.get(d.name.strip().lower()) for d in found}
        unknown = [d.name for d, lab in label_of.items() if lab is None]
        if unknown:
            problems.append(f"not a class or alias: {', '.join(unknown)}")
        missing = [c for i, c in enumerate(names) if i not in label_of.values()]
        if missing:
            problems.append(f"no folder for: {', '.join(missing)}")
    else:
        keys = [d.name.strip().lower() for d in found]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            problems.append(f"folders that differ only in case: {', '.join(twice)}")
        names = _auto_order(sorted(set(keys)))
        label_of = {d: names.index(d.name.strip().lower()) for d in found}
        if len(names) < 2:
            problems.append(f"{len(names)} class folder(s); a task needs at least 2")
    if problems:
        npz = sorted(p.name for p in root.glob("*.npz"))
        hint = f" For a MedMNIST file, pass it directly (e.g. {root / npz[0]})." if npz else ""
        expected = f"the classes {', '.join(names)}" if isinstance(spec, dict) else "one folder per class"
        raise ClassFolderError(
            f"WBC folder {root}: class folders do not match {expected} (names case-insensitive). Found "
            f"{listing}. {'; '.join(problems)}. Rename or move the folders, or set classes: (with aliases) in "
            f"the config.{hint}")
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS]
    if loose:
        warnings.warn(f"ignoring {len(loose)} images directly in {root} (e.g. {loose[0].name}): "
                      f"only images inside a class folder have a label", stacklevel=3)
    return names, sorted(((label_of[d], d, files) for d, files in found.items()), key=lambda t: (t[0], t[1].name))


def _fingerprint(items: Sequence[tuple[str, os.stat_result]], kind: str, size: int, min_size: int,
                 classes: object = "auto") -> str:
    """Cheap source fingerprint: relative paths + byte sizes + mtimes (never the content), the class spec."""
    h = hashlib.sha256(f"{kind}:{CACHE_VERSION}:{size}:{min_size}:{json.dumps(classes, sort_keys=True)}".encode())
    for rel, st in sorted(items, key=lambda t: t[0]):
        h.update(f"\0{rel}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _read_cache(path: Path, size: int) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in ("images", "labels", "ids", "hashes", "meta")}
        meta = json.loads(str(out["meta"]))
        if meta.get("version") != CACHE_VERSION or out["images"].shape[1:] != (size, size, 3):
            raise ValueError(f"made by another loader version or size ({meta.get('version')}, "
                             f"{out['images'].shape})")
        return {"images": out["images"], "labels": out["labels"].astype(np.int64),
                "ids": [str(s) for s in out["ids"]], "hashes": [str(s) for s in out["hashes"]],
                "dropped": meta.get("dropped", {}), "classes": tuple(meta.get("classes", CLASSES))}
    except Exception as e:  # any unreadable cache is rebuilt, never trusted
        warnings.warn(f"ignoring unreadable cache {path} ({type(e).__name__}: {e}); decoding again",
                      stacklevel=3)
        return None


def _write_cache(path: Path, d: dict) -> None:
    meta = json.dumps({"version": CACHE_VERSION, "dropped": d["dropped"], "classes": list(d["classes"])})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no ".npz"
        np.savez(f, images=d["images"], labels=d["labels"], ids=np.array(d["ids"], dtype=str),
                 hashes=np.array(d["hashes"], dtype=str), meta=np.array(meta))


def warn_fallbacks(fallback: dict[str, str], n: int, what: str) -> None:
    """One warning naming the images a preprocessing step could not handle (kept, with its substitute)."""
    first = next(iter(fallback.items()))
    warnings.warn(f"{len(fallback)} of {n} images of {what}: a preprocessing step fell back (e.g. {first[0]}: "
                  f"{first[1]}); they are kept, see WBCData.dropped['fallback']", stacklevel=3)


def _decode_folder(root: Path, folders, size: int, workers: int | None, progress: bool,
                   min_size: int = MIN_WBC_SIDE, preprocess: Sequence[str] = ()) -> dict:
    paths, labels = [], []
    for label, _, files in folders:
        paths += files
        labels += [label] * len(files)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL releases the GIL while decoding
        notes: list[list[str]] = [[] for _ in paths]  # preprocessing fallbacks, per file
        results = list(tqdm(pool.map(lambda i: _decode_one(paths[i], size, min_size, preprocess, notes[i]),
                                     range(len(paths))), total=len(paths),
                            desc=f"decode {root.name} @{size}px", unit="img", disable=not progress,
                            dynamic_ncols=True))
    images, keep_labels, ids, hashes, bad, small = [], [], [], [], [], []
    for p, label, (arr, digest, err) in zip(paths, labels, results, strict=True):
        rel = p.relative_to(root).as_posix()
        if err is not None:
            (small if isinstance(err, SmallImageError) else bad).append((p, err.reason))
            continue
        images.append(arr)
        keep_labels.append(label)
        ids.append(rel)
        hashes.append(digest)
    what = f"WBC images under {root}"
    warn_bad_files(bad, len(paths), what=what)
    warn_small_files(small, len(paths), what, min_size, "minimum (min_size)")
    if small and not images:
        raise ValueError(f"every readable WBC image under {root} is smaller than min_size={min_size} px "
                         f"(e.g. {small[0][0]}: {small[0][1]}); pass a smaller min_size if you mean it")
    dropped = {key: {p.relative_to(root).as_posix(): r for p, r in items}
               for key, items in (("unreadable", bad), ("too_small", small)) if items}
    fallback = {p.relative_to(root).as_posix(): "; ".join(n) for p, n in zip(paths, notes, strict=True) if n}
    if fallback:
        dropped["fallback"] = fallback
        warn_fallbacks(fallback, len(paths), what)
    return {"images": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
            "labels": np.asarray(keep_labels, np.int64), "ids": ids, "hashes": hashes, "dropped": dropped}


def _npz_classes(spec: dict | str) -> tuple[tuple[str, ...], dict[int, int]]:
    """(class names, {BloodMNIST label: our label}) for a class spec: auto = the five white-cell classes;
    "all" = BloodMNIST's eight; or the spec's classes matched by name/alias (other labels dropped)."""
    if spec == "auto":
        return CLASSES, dict(BLOODMNIST_TO_WBC)
    if spec == "all":
        return BLOODMNIST_CLASSES, {i: i for i in range(len(BLOODMNIST_CLASSES))}
    table = _alias_table(spec)
    mapping = {i: table[c] for i, c in enumerate(BLOODMNIST_CLASSES) if c in table}
    missing = [c for i, c in enumerate(spec) if i not in mapping.values()]
    if missing:
        raise ClassFolderError(f"classes {missing} match no BloodMNIST label ({', '.join(BLOODMNIST_CLASSES)}); "
                               f"give aliases, e.g. {{{missing[0]}: [ig]}}")
    return tuple(spec), mapping


def _npz_images(path: Path, part: str, x: np.ndarray, n_labels: int, min_size: int) -> tuple[np.ndarray, float]:
    """Check one MedMNIST-style image array -> (x as (N, H, W, C), its pixel scale for `to_uint8`).

    Float arrays in [0, 1] or [0, 255] and uint16 are scaled by one factor for the whole array.
    """
    name = f"{path}:{part}_images"
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) != n_labels:
        raise ValueError(f"{name} must be (N, H, W), (N, H, W, 1) or (N, H, W, 3) matching {part}_labels "
                         f"(N,) or (N, 1); got {x.shape} {x.dtype} and {n_labels} labels")
    if min(x.shape[1:3]) < min_size:
        raise ValueError(f"{name}: images are {x.shape[2]}x{x.shape[1]} px, below min_size={min_size} px "
                         f"per side; pass a smaller min_size if you mean it")
    return x, pixel_scale(x, name)


def _decode_npz(path: Path, size: int, progress: bool, min_size: int = MIN_WBC_SIDE,
                classes: dict | str = "auto", preprocess: Sequence[str] = ()) -> dict:
    """MedMNIST BloodMNIST: by default keep the five white-cell classes and drop (and count) the other
    three; `classes="all"` keeps all eight (see `_npz_classes`)."""
    names, to_ours = _npz_classes(classes)
    prefix = path.stem.split("_")[0] or "npz"
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}: {e})") from e
    with z:
        parts = [p for p in NPZ_PARTS if f"{p}_images" in z.files and f"{p}_labels" in z.files]
        if not parts:
            raise ValueError(f"{path}: expected MedMNIST keys like train_images/train_labels "
                             f"(also val_*, test_*); found {sorted(z.files)}")
        images, labels, ids, hashes = [], [], [], []
        dropped_counts: dict[str, int] = defaultdict(int)
        fallback: dict[str, str] = {}
        for part in parts:
            y = z[f"{part}_labels"].reshape(-1)
            x, scale = _npz_images(path, part, z[f"{part}_images"], len(y), min_size)
            if len(y) and (y.min() < 0 or y.max() >= len(BLOODMNIST_CLASSES)):
                raise ValueError(f"{path}: {part}_labels range {y.min()}..{y.max()} is not BloodMNIST's "
                                 f"0..{len(BLOODMNIST_CLASSES) - 1} ({', '.join(BLOODMNIST_CLASSES)})")
            for i in tqdm(range(len(x)), desc=f"{path.name}:{part} @{size}px", unit="img",
                          disable=not progress, dynamic_ncols=True, leave=False):
                lab = int(y[i])
                if lab not in to_ours:
                    dropped_counts[BLOODMNIST_CLASSES[lab]] += 1
                    continue
                a = array_to_rgb(x[i], f"{path}:{part}_images[{i}]", scale)
                note: list[str] = []
                a = apply_preprocess(a, preprocess, note) if preprocess else a
                if note:
                    fallback[f"{prefix}:{part}:{i}"] = "; ".join(note)
                hashes.append(hashlib.sha1(a.tobytes()).hexdigest())
                images.append(a if a.shape[:2] == (size, size) else square_resize(Image.fromarray(a), size))
                labels.append(to_ours[lab])
                ids.append(f"{prefix}:{part}:{i}")
    if not images:
        raise ValueError(f"{path}: no image of the classes {', '.join(names)} in parts {parts}")
    dropped = {"classes": dict(dropped_counts)} if dropped_counts else {}
    if fallback:
        dropped["fallback"] = fallback
        warn_fallbacks(fallback, len(images), str(path))
    return {"images": np.stack(images), "labels": np.asarray(labels, np.int64), "ids": ids, "classes": names,
            "hashes": hashes, "dropped": dropped}


def load_wbc(path: str | os.PathLike, image_size: int, cache_dir: str | os.PathLike | None = "data/cache",
             workers: int | None = None, progress: bool = True, min_size: int = MIN_WBC_SIDE,
             classes: ClassSpec = None, preprocess: Sequence[str] = ()) -> WBCData:
    """Load a WBC set from class folders or a BloodMNIST `.npz`, resized to `image_size` pixels.

    Args:
        path: a folder with one sub-folder per class (jpg/png/bmp/tif; names case-insensitive),
            or a MedMNIST `bloodmnist*.npz`.
        image_size: side S of the square output images, in pixels.
        cache_dir: where `wbc_<fingerprint>_<S>.npz` is kept (written atomically); None: no cache.
            The fingerprint covers relative paths, byte sizes and mtimes, so edits invalidate it.
        workers: decoding threads (default: CPU count, at most 8).
        min_size: images whose shorter side is below this many pixels are skipped (default 16; see
            the module docstring); for a `.npz`, whose images share one size, it is an error.
        classes: the class set (see `class_spec`): by default the folder names (the five WBC classes in
            their usual order), or for BloodMNIST the five white-cell classes; "all" keeps BloodMNIST's
            eight; a list or {class: [aliases]} fixes the classes and their order.
    Unreadable or refused images (see `pretrain.images`) are skipped, each named in a warning and in
    `dropped["unreadable"]`; more than half unreadable raises `TooManyBadImagesError`. Too-small ones
    go to `dropped["too_small"]`. Duplicate files (same sha1) are kept and reported.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer number of pixels, got {image_size!r}")
    image_size = int(image_size)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be a non-negative integer number of pixels, got {min_size!r}")
    min_size = int(min_size)
    spec = class_spec(classes)
    preprocess = check_ops(preprocess)
    key_spec = spec if not preprocess else {"classes": spec, "preprocess": list(preprocess)}
    src = Path(path).expanduser().resolve()
    if src.is_file() and src.suffix.lower() == ".npz":
        kind, items, folders = "npz", [(src.name, src.stat())], None
    elif src.is_file():
        raise ValueError(f"{src} is a file but not a .npz; pass a folder of class folders or a "
                         f"MedMNIST bloodmnist*.npz")
    else:
        names, folders = class_folders(src, spec)
        kind = "folder"
        items = [(p.relative_to(src).as_posix(), p.stat()) for _, _, files in folders for p in files]
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"wbc_{_fingerprint(items, kind, image_size, min_size, key_spec)}_{image_size}.npz"
    d = _read_cache(cache, image_size) if cache is not None and cache.is_file() else None
    if d is None:
        if kind == "npz":
            d = _decode_npz(src, image_size, progress, min_size, spec, preprocess)
        else:
            d = {**_decode_folder(src, folders, image_size, workers, progress, min_size, preprocess), "classes": names}
        if cache is not None:
            try:
                _write_cache(cache, d)
            except OSError as e:  # a read-only or full disk costs speed next time, not this result
                warnings.warn(f"could not write the image cache {cache} ({e}); the next load decodes "
                              f"again. Pass another cache_dir to keep it", stacklevel=2)
    else:
        for key, what in (("unreadable", "unreadable ... were skipped"),
                          ("too_small", f"smaller than {min_size} px ... were skipped"),
                          ("fallback", "... had a preprocessing fallback (kept)")):
            if d["dropped"].get(key):
                bad = d["dropped"][key]
                adj, _, verb = what.partition(" ... ")
                warnings.warn(f"{len(bad)} images {adj + ' ' if adj else ''}under {src} {verb} when the cache "
                              f"{cache} was built (e.g. {next(iter(bad))}); see WBCData.dropped[{key!r}]",
                              stacklevel=2)
    data = WBCData(images=d["images"], labels=d["labels"], ids=d["ids"], hashes=d["hashes"], root=str(src),
                   image_size=image_size, dropped=d["dropped"], classes=d["classes"])
    _report(data)
    return data


def _report(data: WBCData) -> None:
    """Warn about dropped classes and exact duplicates (kept; `make_split` keeps each group together)."""
    if data.dropped.get("classes"):
        kept = ", ".join(f"{c} {n}" for c, n in data.class_counts().items())
        warnings.warn(f"{data.root}: dropped images of classes outside {', '.join(data.classes)}: "
                      f"{data.dropped['classes']}; "
                      f"kept {kept}", stacklevel=3)
    groups = find_duplicates(data.hashes)
    if not groups:
        return
    mixed = [g for g in groups if len({int(data.labels[i]) for i in g}) > 1]
    example = ", ".join(data.ids[i] for i in groups[0])
    msg = (f"{data.root}: {len(groups)} groups of exact-duplicate images ({sum(map(len, groups))} files), "
           f"e.g. {example}; splits keep each group in one part")
    if mixed:
        msg += (f". {len(mixed)} groups carry different labels, e.g. "
                + ", ".join(f"{data.ids[i]}={data.classes[data.labels[i]]}" for i in mixed[0]))
    warnings.warn(msg, stacklevel=3)
