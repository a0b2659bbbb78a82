"""Test a trained fusion model anywhere: score it on a labelled folder, or predict unlabelled images.

Everything the model needs comes from its checkpoint (a run's `best.pt`, kind "wbc_fusion"): the
architecture and frozen encoders (`build_fusion_model`, which refuses an encoder file that changed),
the class list and the input size. Images are decoded exactly as in training (`fusion.data`:
centre-crop, Lanczos resize, images under 16 px skipped); normalisation happens inside the model.

Classes are matched BY NAME, case-insensitively (and through the aliases of the training config's
`classes:` mapping): a second lab may lack one of the model's classes or hold one it never saw.
Images of unknown classes are counted and left out of the metrics; the metrics are computed in the
model's class index space, and macro-F1 averages over the classes present in the data
(`metrics.json` says which, as "macro_f1_over"). Predictions into classes the data lacks stay in
the confusion matrix and count as errors.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pretrain.checkpoint import CheckpointError, build_model, load_checkpoint
from pretrain.images import find_images
from pretrain.utils import atomic_path, atomic_write_json, get_device, sha256_file

from .data import CLASSES, MIN_WBC_SIDE, decode_file, load_wbc
from .encoders import images_to_tensor
from .metrics import classification_metrics
from .train import predict

KIND = "wbc_fusion"


@dataclass
class EvalConfig:
    """Score a trained model (`best.pt`) on a labelled folder of class folders (or a bloodmnist .npz)."""

    checkpoint: str = field(default="", metadata={"help": "a training run's best.pt (kind wbc_fusion)"})
    data: str = field(default="", metadata={"help": "folder of class folders (names matched case-insensitively) "
                                                    "or a bloodmnist*.npz"})
    out: str = field(default="", metadata={"help": "output folder ('' = <checkpoint folder>/eval_<data name>)"})
    device: str = "auto"
    batch_size: int = 128
    progress: bool = True


@dataclass
class PredictConfig:
    """Class probabilities of a trained model for every image under a folder (recursively)."""

    checkpoint: str = field(default="", metadata={"help": "a training run's best.pt (kind wbc_fusion)"})
    images: str = field(default="", metadata={"help": "folder of images (searched recursively) or one image"})
    out: str = field(default="", metadata={"help": "CSV to write ('' = <checkpoint folder>/predict_<images name>.csv)"})
    device: str = "auto"
    batch_size: int = 128


def _require(value: str, flag: str) -> None:
    if not value:
        raise ValueError(f"{flag} is required")


def load_classifier(path: str | os.PathLike, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained fusion model from its checkpoint (or a run folder's best.pt) -> (model in eval
    mode on `device`, info).

    info: {"checkpoint": absolute path, "sha256", "classes": model class names (C,), "image_size": S,
    "arm", "aliases": {lower-case alias: class index}}.

    Raises:
        FileNotFoundError: no such file. CheckpointError: not a checkpoint, another kind (e.g. a
        pretrained encoder), or an encoder file that changed since training. OSError: a missing encoder file.
    """
    path = Path(path).expanduser().resolve()
    if path.is_dir() and (path / "best.pt").is_file():  # a run folder stands for its best.pt
        path = path / "best.pt"
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != KIND:
        raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint, not a trained WBC classifier; "
                              f"evaluate/predict take the best.pt of a fusion training run (kind {KIND!r}, "
                              f"written by scripts/train_fusion.py or a sweep's runs/<name>/best.pt)")
    cfg = ckpt["config"]
    classes = tuple(cfg.get("classes") or ())
    if not classes:  # checkpoints from before classes were recorded: the five WBC classes
        classes = CLASSES
    if len(classes) != int(cfg["num_classes"]):
        raise CheckpointError(f"{path}: records {len(classes)} classes {list(classes)} but a "
                              f"{cfg['num_classes']}-class head; the file is inconsistent, retrain it")
    try:
        model = build_model(ckpt, source=str(path))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: cannot rebuild its frozen encoders: {e}") from e
    except OSError as e:  # e.g. an encoder file recorded by a relative path, seen from another folder
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else OSError
        raise kind(f"{path}: cannot rebuild its frozen encoders: {e}") from e
    aliases = {c.strip().lower(): i for i, c in enumerate(classes)}
    spec = (ckpt.get("train") or {}).get("classes")
    if isinstance(spec, dict):
        for name, alts in spec.items():
            if str(name) in classes:
                for a in [alts] if isinstance(alts, str) else alts or ():
                    aliases.setdefault(str(a).strip().lower(), classes.index(str(name)))
    info = {"checkpoint": str(path), "sha256": sha256_file(path), "classes": list(classes),
            "image_size": int(ckpt["input"]["size"]), "arm": cfg.get("arm", ""), "aliases": aliases,
            "preprocess": list((ckpt.get("train") or {}).get("preprocess") or [])}  # as in training
    return model.to(device).eval(), info


def predict_proba(model: torch.nn.Module, images: np.ndarray, device: torch.device, batch_size: int) -> np.ndarray:
    """(N, S, S, 3) uint8 images -> (N, C) float32 class probabilities (softmax of the logits)."""
    x = images_to_tensor(images)  # (N, 3, S, S) uint8
    logits, _ = predict(model, x, {}, np.arange(len(x)), device, batch_size)
    return torch.softmax(logits.float(), dim=1).numpy()


def match_classes(data_classes: list[str], model_classes: list[str], aliases: dict[str, int],
                  source: str = "data", model: str = "model") -> list[int | None]:
    """Model class index of each data class by name (case-insensitive, aliases), None when unknown.

    Raises:
        ValueError: no data class is a class of the model (both lists named).
    """
    index = [aliases.get(c.strip().lower()) for c in data_classes]
    if all(i is None for i in index):
        raise ValueError(f"{source}: none of its classes ({', '.join(data_classes)}) is a class of {model} "
                         f"({', '.join(model_classes)}); class folders are matched by name, case-insensitively")
    return index


def score(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Metrics of (N,) true and predicted model class indices, macro-F1 over the classes present in y_true.

    Returns classification_metrics' accuracy, balanced accuracy and weighted F1; "macro_f1" and
    "macro_f1_over" (the present classes); "per_class" of the present classes; "confusion" as
    {"classes": all model classes, "matrix": (C, C) counts, rows true, columns predicted};
    "predicted_as_absent": {model class the data lacks: how many images were predicted as it}.
    """
    m = classification_metrics(y_true, y_pred, classes)
    present = [c for c in classes if m["per_class"][c]["support"] > 0]
    absent = Counter(classes[int(p)] for p in y_pred if classes[int(p)] not in present)
    return {"n": m["n"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
            "macro_f1": float(np.mean([m["per_class"][c]["f1"] for c in present])), "macro_f1_over": present,
            "weighted_f1": m["weighted_f1"], "per_class": {c: m["per_class"][c] for c in present},
            "confusion": {"classes": list(classes), "matrix": m["confusion"]},
            "predicted_as_absent": dict(sorted(absent.items()))}


def score_data(model: torch.nn.Module, info: dict, data, device: torch.device, batch_size: int) -> dict:
    """Score `model` (from `load_classifier`) on a loaded labelled set: classes matched by name, images of
    unknown classes left out. Returns {"report": `score`, "probs": (N, C), "pred": (N,), "keep": (N,) bool,
    "index": model class of each data class or None, "unknown": {data class: images}}."""
    classes = info["classes"]
    index = match_classes(list(data.classes), classes, info["aliases"], data.root, info["checkpoint"])
    counts = data.class_counts()
    unknown = {c: counts[c] for c, i in zip(data.classes, index, strict=True) if i is None}
    probs = predict_proba(model, data.images, device, batch_size)  # (N, C)
    pred = probs.argmax(1)
    to_model = np.array([-1 if i is None else i for i in index], dtype=np.int64)
    y = to_model[data.labels]  # (N,) model class index, -1 = unknown class
    keep = y >= 0
    return {"report": score(y[keep], pred[keep], classes), "probs": probs, "pred": pred, "keep": keep,
            "index": index, "unknown": unknown}


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _prob_cells(p: np.ndarray) -> list[str]:
    return [f"{v:.6f}" for v in p]


def evaluate(cfg: EvalConfig) -> dict:
    """Score `cfg.checkpoint` on `cfg.data`; write metrics.json, predictions.csv and confusion.png.

    Returns the metrics.json dict (see `score`, plus checkpoint path/sha256, data path, class mapping,
    "model_classes_missing_from_data", "data_classes_unknown_to_model" {class: images}, "dropped", "out").
    """
    _require(cfg.checkpoint, "--checkpoint")
    _require(cfg.data, "--data")
    device = get_device(cfg.device)
    model, info = load_classifier(cfg.checkpoint, device)
    data = load_wbc(cfg.data, info["image_size"], cache_dir=None, progress=cfg.progress,
                    preprocess=info["preprocess"])
    classes = info["classes"]
    scored = score_data(model, info, data, device, cfg.batch_size)
    index, unknown, probs, pred, keep = (scored[k] for k in ("index", "unknown", "probs", "pred", "keep"))
    report = scored["report"]
    if unknown:
        warnings.warn(f"{data.root}: left {sum(unknown.values())} images of classes the model does not know out of "
                      f"the metrics ({', '.join(f'{c} {n}' for c, n in unknown.items())}); it knows "
                      f"{', '.join(classes)}", stacklevel=2)
    src = Path(data.root)
    out = Path(cfg.out) if cfg.out else Path(info["checkpoint"]).parent / f"eval_{src.stem if src.is_file() else src.name}"
    report = {"checkpoint": info["checkpoint"], "checkpoint_sha256": info["sha256"], "arm": info["arm"],
              "data": data.root, "image_size": info["image_size"], "n_images": len(data), **report,
              "model_classes": classes,
              "data_classes": {c: (None if i is None else classes[i]) for c, i in zip(data.classes, index, strict=True)},
              "model_classes_missing_from_data": [c for c in classes if c not in report["macro_f1_over"]],
              "data_classes_unknown_to_model": unknown, "dropped": data.dropped, "out": str(out)}
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "predictions.csv", ["id", "true_class", "predicted_class", "in_metrics",
                                         *(f"p_{c}" for c in classes)],
               [[i, data.classes[lab], classes[p], int(k), *_prob_cells(pr)]
                for i, lab, p, k, pr in zip(data.ids, data.labels, pred, keep, probs, strict=True)])
    from .report_plots import plot_confusion

    plot_confusion([report["confusion"]["matrix"]], classes, out / "confusion.png",
                   title=f"{Path(info['checkpoint']).parent.name} on {src.name}: acc {report['accuracy']:.3f}")
    atomic_write_json(out / "metrics.json", report)
    return report


def format_table(r: dict) -> str:
    """A short plain-text summary of an `evaluate` result."""
    lines = [f"{r['checkpoint']} on {r['data']} ({r['n']} of {r['n_images']} images scored)",
             f"{'class':<16}{'n':>6}{'recall':>8}{'prec':>8}{'f1':>8}"]
    lines += [f"{c:<16}{m['support']:>6}{m['recall']:>8.3f}{m['precision']:>8.3f}{m['f1']:>8.3f}"
              for c, m in r["per_class"].items()]
    lines.append(f"accuracy {r['accuracy']:.4f}  balanced accuracy {r['balanced_accuracy']:.4f}  "
                 f"macro-F1 {r['macro_f1']:.4f} (over {len(r['macro_f1_over'])} classes)")
    if r["model_classes_missing_from_data"]:
        lines.append(f"model classes absent from the data: {', '.join(r['model_classes_missing_from_data'])}")
    if r["data_classes_unknown_to_model"]:
        lines.append("data classes unknown to the model (not scored): "
                     + ", ".join(f"{c} ({n})" for c, n in r["data_classes_unknown_to_model"].items()))
    lines.append(f"wrote {r['out']}/metrics.json, predictions.csv, confusion.png")
    return "\n".join(lines)


def run_evaluate(cfg: EvalConfig) -> dict:
    """`scripts/evaluate.py` entry: evaluate and print the table."""
    r = evaluate(cfg)
    print(format_table(r))
    return r


def predict_images(cfg: PredictConfig) -> Path:
    """Write `cfg.out` (CSV: file, predicted_class, p_<class> per model class) for every decodable image.

    Files that cannot be decoded (or are under 16 px, as in training) are skipped, each named in a
    warning. Raises NoImagesError (an OSError) for a missing or empty folder, ValueError when no image decodes.
    """
    _require(cfg.checkpoint, "--checkpoint")
    _require(cfg.images, "--images")
    device = get_device(cfg.device)
    model, info = load_classifier(cfg.checkpoint, device)
    root = Path(cfg.images).expanduser().resolve()
    files = [root] if root.is_file() else find_images(root)
    size = info["image_size"]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        decoded = list(pool.map(lambda p: decode_file(p, size, MIN_WBC_SIDE, info["preprocess"]), files))
    good = [(p, im) for p, (im, _, _) in zip(files, decoded, strict=True) if im is not None]
    for p, (im, _, reason) in zip(files, decoded, strict=True):
        if im is None:
            warnings.warn(f"skipping {p}: {reason}", stacklevel=2)
    if not good:
        raise ValueError(f"{root}: none of its {len(files)} images could be decoded (first: {files[0]}: "
                         f"{decoded[0][2]})")
    probs = predict_proba(model, np.stack([im for _, im in good]), device, cfg.batch_size)  # (N, C)
    classes = info["classes"]
    base = root.parent if root.is_file() else root
    out = Path(cfg.out) if cfg.out else Path(info["checkpoint"]).parent / f"predict_{root.stem}.csv"
    _write_csv(out, ["file", "predicted_class", *(f"p_{c}" for c in classes)],
               [[p.relative_to(base).as_posix(), classes[int(pr.argmax())], *_prob_cells(pr)]
                for (p, _), pr in zip(good, probs, strict=True)])
    counts = Counter(classes[i] for i in probs.argmax(1))
    skipped = len(files) - len(good)
    print(f"wrote {len(good)} predictions to {out}" + (f" ({skipped} unreadable skipped)" if skipped else "")
          + "; predicted: " + ", ".join(f"{c} {counts[c]}" for c in classes if counts[c]))
    return out
