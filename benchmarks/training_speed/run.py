"""The package's training against two reference loops, on the real PBC images (issue 20).

    .venv/bin/python benchmarks/training_speed/run.py [--loops package reference original] [--fractions 0.01 0.1]

Three ways to train the study's fused arm (prcc+cam16, sum) on the real study's split, seed 0, each
scored on the same test images:

- `original`: the original study's loop, written as a reference: the JPEGs decoded every epoch through
  a DataLoader (batch 8, PyTorch's default of no worker processes), images at full size (360 px), both
  frozen encoders run on every batch in plain autograd mode (no inference mode), fp32, Adam at 1e-3,
  10 epochs. (The original also validated every epoch; that time is NOT counted here, so the ratio
  against it is a lower bound.)
- `reference`: a torchvision-reference-style loop at the package's own settings: the same model at 48 px,
  the same steps, batch size, optimizer, schedule, loss, validations and BatchNorm re-estimation, but
  a DataLoader over the image folder (decode and transforms per epoch, 2 persistent workers) and the encoders run
  on every batch (under no_grad; on the augmented view, where the package computes them once per
  un-augmented image). It isolates the engineering from the modelling.
- `package`: `fusion.train.train_run` with the package defaults, timed end to end from the JPEG files:
  the decode-once cache built from scratch, the frozen features computed, training, test.

Writes benchmarks/training_speed/record/results.jsonl (one row per loop and fraction; rerunning skips
rows already there) and summary.md. Needs ../shared/data and the real study's encoders in
runs/real_study/checkpoints/ (benchmarks/cross_lab/run.py makes them when missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

from fusion.data import load_wbc  # noqa: E402
from fusion.encoders import load_arm_encoders  # noqa: E402
from fusion.metrics import classification_metrics  # noqa: E402
from fusion.models import CNNConfig, FusionModel, SmallCNN, resize_for_encoder  # noqa: E402
from fusion.splits import load_split, split_indices  # noqa: E402
from fusion.study import machine_info  # noqa: E402
from fusion.train import RunConfig, class_weight_tensor, make_optimizer, make_schedule, plan_steps, train_run  # noqa: E402
from pretrain.utils import append_jsonl, read_jsonl, seed_everything  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = ROOT.parent / "shared" / "data" / "pbc-wbc"
SPLIT = ROOT / "benchmarks" / "real_study" / "split.json.gz"
CKPT = ROOT / "runs" / "real_study" / "checkpoints"
ARM, SEED = "prcc+cam16", 0


class Files(Dataset):
    """(image tensor, label) decoded from the JPEG file at every access, as a plain reference loop does."""

    def __init__(self, root: str, ids: list[str], labels: np.ndarray, transform) -> None:
        self.root, self.ids, self.labels, self.transform = Path(root), ids, labels, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        with Image.open(self.root / self.ids[i]) as im:
            return self.transform(im.convert("RGB")), int(self.labels[i])


def _model(image_size: int, n_classes: int, dropout: float = 0.2) -> FusionModel:
    enc = load_arm_encoders(ARM, {"prcc": CKPT / "prcc_autoencoder.pt", "cam16": CKPT / "cam16_resnet.pt"}, SEED,
                            image_size)
    cnn = SmallCNN(CNNConfig(channels=RunConfig().model.cnn_channels, num_classes=n_classes, dropout=dropout,
                             input_size=image_size))
    return FusionModel(cnn, enc, "sum", n_classes, True, dropout)


def _forward(model: FusionModel, x: torch.Tensor, inference: bool) -> torch.Tensor:
    """The encoders on this very batch (no feature cache): under no_grad, or in plain autograd mode."""
    with torch.no_grad() if inference else torch.enable_grad():
        feats = {s: e.encode(resize_for_encoder(e, x, True, s)).float() for s, e in model.encoders.items()}
    return model.forward_head(model.cnn.forward_features(x), feats)


def _score(model: FusionModel, loader: DataLoader, classes, inference: bool = True) -> dict:
    """Test accuracy and macro-F1, the encoders run on every batch (`inference` False: in autograd mode)."""
    model.eval()
    preds, ys = [], []
    with torch.no_grad() if inference else contextlib.nullcontext():
        for x, y in loader:
            preds.append(_forward(model, x, inference).argmax(1))
            ys.append(y)
    m = classification_metrics(torch.cat(ys).numpy(), torch.cat(preds).numpy(), classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def original(data, split, fraction: float) -> dict:
    """The original study's loop (see the module docstring)."""
    seed_everything(SEED)
    tf = v2.Compose([v2.Resize((360, 360)), v2.RandomHorizontalFlip(), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    test_tf = v2.Compose([v2.Resize((360, 360)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    tr, te = split_indices(split, data, "train", fraction), split_indices(split, data, "test")
    ids = list(data.ids)
    train = DataLoader(Files(data.root, [ids[i] for i in tr], data.labels[tr], tf), batch_size=8, shuffle=True)
    test = DataLoader(Files(data.root, [ids[i] for i in te], data.labels[te], test_tf), batch_size=8)
    model = _model(360, len(data.classes))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    t0, seen = time.perf_counter(), 0
    for _ in range(10):
        model.train()
        for x, y in train:
            loss = F.cross_entropy(_forward(model, x, inference=False), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    m = _score(model, test, data.classes, inference=False)
    return {**m, "train_seconds": train_s, "test_seconds": time.perf_counter() - t1, "images": seen,
            "steps": 10 * len(train), "batch_size": 8, "image_size": 360}


def reference(data, split, fraction: float) -> dict:
    """A torchvision-reference-style loop with the package's modelling (see the module docstring)."""
    cfg = RunConfig(arm=ARM, seed=SEED)
    o = cfg.optim
    seed_everything(SEED)
    size = cfg.image_size
    tf = v2.Compose([v2.Resize((size, size), antialias=True), v2.RandomHorizontalFlip(), v2.RandomVerticalFlip(),
                     v2.RandomRotation(cfg.augment.rotate),
                     v2.ColorJitter(cfg.augment.color, cfg.augment.color, cfg.augment.color),
                     v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    plain = v2.Compose([v2.Resize((size, size), antialias=True), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    tr, va, te = (split_indices(split, data, p, fraction if p == "train" else None) for p in ("train", "val", "test"))
    ids = list(data.ids)

    def loader(rows, t, shuffle, bs):
        # persistent training workers: at 1% an epoch is one batch, and restarting the workers every step
        # would make the reference look slower than a careful loop is
        return DataLoader(Files(data.root, [ids[i] for i in rows], data.labels[rows], t), batch_size=bs,
                          shuffle=shuffle, num_workers=2, drop_last=shuffle, persistent_workers=shuffle)

    bs, steps, evals = plan_steps(len(tr), cfg)
    model = _model(size, len(data.classes), cfg.model.dropout)
    opt = make_optimizer(model.parameters(), o)
    sched = make_schedule(opt, steps * evals, o)
    w = class_weight_tensor(data.labels[tr], len(data.classes))
    best, best_state = -1.0, None
    train_loader = loader(tr, tf, True, bs)
    train_iter = iter(train_loader)
    t0, seen = time.perf_counter(), 0
    for _ in range(evals):
        model.train()
        for _ in range(steps):
            try:
                x, y = next(train_iter)
            except StopIteration:  # a new epoch: decode and transform every image again
                train_iter = iter(train_loader)
                x, y = next(train_iter)
            loss = F.cross_entropy(_forward(model, x, True), y, weight=w, label_smoothing=o.label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
        _recalibrate(model, loader(tr[:o.bn_recalibrate], plain, False, bs))
        m = _score(model, loader(va, plain, False, cfg.runtime.eval_batch_size), data.classes)
        if m["macro_f1"] > best:
            best, best_state = m["macro_f1"], {k: v.clone() for k, v in model.state_dict().items()}
    train_s = time.perf_counter() - t0
    model.load_state_dict(best_state)
    t1 = time.perf_counter()
    m = _score(model, loader(te, plain, False, cfg.runtime.eval_batch_size), data.classes)
    return {**m, "train_seconds": train_s, "test_seconds": time.perf_counter() - t1, "images": seen,
            "steps": steps * evals, "batch_size": bs, "image_size": size, "val_macro_f1": best}


@torch.no_grad()
def _recalibrate(model: FusionModel, loader: DataLoader) -> None:
    """BatchNorm statistics re-estimated on un-augmented training images, as the package does."""
    bns = [m for m in model.cnn.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.cnn.train()
    for x, _ in loader:
        model.cnn.forward_features(x)
    for m in bns:
        m.momentum = 0.1


def package(data, split, fraction: float) -> dict:
    """`train_run` from the JPEG files: a fresh decode-once cache, the frozen features, training, test."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fresh = load_wbc(DATA, 48, Path(tmp) / "cache", progress=False)
        load_s = time.perf_counter() - t0
        cfg = RunConfig(data=str(DATA), split=str(SPLIT), cache_dir=str(Path(tmp) / "cache"), arm=ARM, seed=SEED,
                        fraction=fraction, out=str(Path(tmp) / "run"), prcc_checkpoint=str(CKPT / "prcc_autoencoder.pt"),
                        cam16_checkpoint=str(CKPT / "cam16_resnet.pt"),
                        runtime={"progress": False, "curves": False})
        r = train_run(cfg, data=fresh, split=split)
        total = time.perf_counter() - t0
        log = [{k: row[k] for k in ("epoch", "val_acc", "val_macro_f1", "seconds")}
               for row in read_jsonl(Path(tmp) / "run" / "log.jsonl")]
    return {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "decode_seconds": load_s,
            "train_seconds": r["train_seconds"], "test_seconds": total - load_s - r["train_seconds"],
            "images": r["steps"] * r["batch_size"], "steps": r["steps"], "batch_size": r["batch_size"],
            "image_size": 48, "val_macro_f1": r["val_macro_f1"], "seconds": total, "log": log}


def time_to(pk: dict, accuracy: float) -> tuple[float, int] | None:
    """Upper bound on the package's seconds to `accuracy`: decoding, setup, features and the test pass (all of
    `test_seconds`), plus training until the first validation at or above it (validation accuracy)."""
    t = pk["decode_seconds"] + pk["test_seconds"]
    for row in pk["log"]:
        t += row["seconds"]
        if row["val_acc"] >= accuracy:
            return t, row["epoch"]
    return None


LOOPS = {"package": package, "reference": reference, "original": original}


def summary(rows: list[dict]) -> str:
    by = {(r["loop"], r["fraction"]): r for r in rows}
    md = ["# Training speed: the package against two reference loops (recorded output)", "",
          "Command: `.venv/bin/python benchmarks/training_speed/run.py`. Data: the real PBC images (8,232), the "
          "real study's split, arm prcc+cam16 (sum), seed 0; every loop scored on the same 1,235 test images. "
          f"Machine: {json.dumps(rows[-1]['machine'])}", "",
          "| loop | fraction | image px | batch | steps | images trained | train s | images/s | whole run s | "
          "test acc. | test macro-F1 | package faster by (whole run) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        whole = r.get("seconds") or r["train_seconds"] + r["test_seconds"]
        pk = by.get(("package", r["fraction"]))
        ratio = f"{whole / pk['seconds']:.1f}x" if pk and r["loop"] != "package" else ""
        md.append(f"| {r['loop']} | {r['fraction'] * 100:g}% | {r['image_size']} | {r['batch_size']} | {r['steps']} | "
                  f"{r['images']} | {r['train_seconds']:.0f} | {r['images'] / r['train_seconds']:.1f} | {whole:.0f} | "
                  f"{r['accuracy']:.3f} | {r['macro_f1']:.3f} | {ratio} |")
    for r in rows:
        pk = by.get(("package", r["fraction"]))
        if r["loop"] == "original" and pk and "log" in pk and (hit := time_to(pk, r["accuracy"])):
            whole = r["train_seconds"] + r["test_seconds"]
            md.append("")
            md.append(f"Time to the original loop's accuracy at {r['fraction'] * 100:g}% ({r['accuracy']:.3f}): the "
                      f"package's validation accuracy passes it at check {hit[1]} of 10, at most {hit[0]:.0f} s from "
                      f"the JPEG files, against {whole:.0f} s for the original loop: **{whole / hit[0]:.1f}x**.")
    md += ["", "Whole run: training plus the test pass (package: also decoding every JPEG into a fresh cache and "
           "computing the frozen features). The original loop's per-epoch validation is not counted, so its "
           "time, and the ratio against it, are lower bounds."]
    return "\n".join(md) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loops", nargs="*", default=list(LOOPS), choices=list(LOOPS))
    p.add_argument("--fractions", nargs="*", type=float, default=[0.01, 0.1])
    args = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} is missing (the real PBC images); nothing to measure")
    data = load_wbc(DATA, 48, ROOT / "data" / "cache", progress=False)
    split = load_split(SPLIT)
    rec = HERE / "record"
    rec.mkdir(exist_ok=True)
    done = {(r["loop"], r["fraction"]) for r in read_jsonl(rec / "results.jsonl")}
    for f in args.fractions:
        for loop in args.loops:
            if (loop, f) in done:
                continue
            t = time.perf_counter()
            r = LOOPS[loop](data, split, f)
            row = {"loop": loop, "fraction": f, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                   "torch_threads": torch.get_num_threads(), "machine": machine_info()}
            append_jsonl(rec / "results.jsonl", row)
            print(f"{loop} {f:g}: {time.perf_counter() - t:.0f} s, macro-F1 {r['macro_f1']:.3f}", flush=True)
    (rec / "summary.md").write_text(summary(read_jsonl(rec / "results.jsonl")))
    print((rec / "summary.md").read_text())


if __name__ == "__main__":
    main()
