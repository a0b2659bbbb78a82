"""Few-shot adaptation to a new lab: fine-tune a trained model on k labelled cells per class of the
target lab, test on the rest of that lab's cells, against a fresh model trained on those k cells alone.

    python scripts/adapt.py --checkpoint runs/sweep/runs/f1.0_scratch_s0/best.pt \
        --data ../shared/data/bccd-wbc --shots 1 3 5 10 --seeds 0 1 2 --out runs/adapt_bccd

For each k and seed, k images per class are drawn (seeded; fewer where a class is small, so that at
least half of every class stays in its test part); both models train for `steps` steps on them with
the checkpoint's own recipe (augmentation, label smoothing, BatchNorm re-estimation on the shots
before testing) and are scored on the same remaining images (macro-F1 over the classes present,
balanced accuracy). Per seed, every k is tested on the same cells: those the largest k leaves (the
draws are nested); k = 0 is the trained model without target labels on them. Rows go to `<out>/adapt.jsonl` (a rerun skips finished rows); `fewshot.png`
and `fewshot.md` show the curve with 95% CIs over seeds.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pretrain.utils import append_jsonl, atomic_write_text, get_device, read_jsonl, seed_everything

from .data import load_wbc
from .encoders import build_fusion_model, images_to_tensor
from .evaluate import load_classifier, match_classes, score
from .metrics import mean_ci
from .train import (
    AugmentConfig,
    OptimConfig,
    _Feeder,
    aug_config,
    make_optimizer,
    predict,
    recalibrate_bn,
    warmup_cosine,
)


@dataclass
class AdaptConfig:
    """`scripts/adapt.py`: few-shot fine-tuning of a trained model on another lab's labelled cells."""

    checkpoint: str = field(default="", metadata={"help": "a training run's best.pt (or run folder)"})
    data: str = field(default="", metadata={"help": "the target lab's folder of class folders"})
    out: str = field(default="runs/adapt", metadata={"help": "output folder"})
    shots: list[int] = field(default_factory=lambda: [1, 3, 5, 10], metadata={"help": "labelled cells per class"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    steps: int = field(default=200, metadata={"help": "optimizer steps of each adaptation"})
    lr: float = field(default=5e-4, metadata={"help": "peak AdamW learning rate of the fine-tuning"})
    scratch_lr: float = field(default=2e-3, metadata={"help": "peak learning rate of the model trained alone"})
    batch_size: int = 32
    cache_dir: str = "data/cache"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.checkpoint or not self.data:
            raise ValueError("--checkpoint and --data are required")
        if not self.shots or min(self.shots) < 1:
            raise ValueError(f"shots must list positive counts per class, got {self.shots}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def draw_shots(labels: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """(train rows, test rows, {class: shots taken}): k rows per class, at most floor(n_c / 2) so that at
    least half of each class is left for the test; classes with one image are test-only."""
    rng = np.random.default_rng(seed)
    train, taken = [], {}
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = min(k, len(rows) // 2)
        taken[int(c)] = n
        train += list(rng.permutation(rows)[:n])
    train = np.sort(np.asarray(train, dtype=np.int64))
    return train, np.setdiff1d(np.arange(len(labels)), train), taken


def _fit(model, images, labels, rows, recipe: dict, steps: int, lr: float, bs: int, seed: int, device) -> None:
    aug = aug_config(AugmentConfig(**(recipe.get("augment") or {})))  # the checkpoint's own augmentation
    g = torch.Generator().manual_seed(seed)
    feeder = _Feeder(images, labels, {}, aug, g, None, (recipe.get("optim") or {}).get("label_smoothing", 0.0))
    optimizer = make_optimizer(model.parameters(), OptimConfig(lr=lr, weight_decay=0.05))
    sched = warmup_cosine(optimizer, steps, 0.05)
    rows_t = torch.as_tensor(rows)
    bs = max(1, min(bs, len(rows)))
    perm = torch.cat([torch.randperm(len(rows), generator=g) for _ in range(math.ceil(steps * bs / len(rows)))])
    model.train()
    for i in range(steps):
        loss, _, _ = feeder.step(model, rows_t[perm[i * bs:(i + 1) * bs]], device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
    recalibrate_bn(model.cnn, images, rows_t, device, bs, len(rows))
    model.eval()


def _score(model, images, y, rows, classes, device) -> dict:
    logits, _ = predict(model, images, {}, rows, device, 128)
    m = score(y[rows], logits.argmax(1).numpy(), classes)
    return {"macro_f1": m["macro_f1"], "balanced_accuracy": m["balanced_accuracy"], "accuracy": m["accuracy"],
            "n_test": int(len(rows)), "per_class_recall": {c: v["recall"] for c, v in m["per_class"].items()}}


def run_adapt(cfg: AdaptConfig) -> Path:
    """Run every missing (k, seed, mode) of the grid; write adapt.jsonl, fewshot.md and fewshot.png."""
    from pretrain.checkpoint import load_checkpoint

    device = get_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    trained, info = load_classifier(cfg.checkpoint, device)
    ckpt = load_checkpoint(info["checkpoint"], kind="wbc_fusion")
    recipe = ckpt.get("train") or {}
    data = load_wbc(cfg.data, info["image_size"], cfg.cache_dir or None, progress=False, preprocess=info["preprocess"])
    index = match_classes(list(data.classes), info["classes"], info["aliases"], data.root, info["checkpoint"])
    to_model = np.array([-1 if i is None else i for i in index])
    y_all = to_model[data.labels]
    keep = np.flatnonzero(y_all >= 0)
    images = images_to_tensor(data.images[keep])
    y = y_all[keep]
    labels = torch.as_tensor(y, dtype=torch.int64)
    path = out / "adapt.jsonl"
    done = {(r["k"], r["seed"], r["mode"]) for r in read_jsonl(path)} if path.is_file() else set()
    base = {"checkpoint": info["checkpoint"], "checkpoint_sha256": info["sha256"], "data": data.root}
    for seed in cfg.seeds:
        # one test set per seed: what the largest k leaves (the draws are nested, so every k's shots lie outside it)
        _, common, _ = draw_shots(y, max(cfg.shots), seed)
        for k in [0, *cfg.shots]:
            train, _, taken = draw_shots(y, k, seed) if k else (np.zeros(0, np.int64), None, {})
            for mode in (["finetune", "alone"] if k else ["trained"]):
                if (k, seed, mode) in done:
                    continue
                if mode == "trained":
                    model = trained
                elif mode == "finetune":
                    model = copy.deepcopy(trained)
                    _fit(model, images, labels, train, recipe, cfg.steps, cfg.lr, cfg.batch_size, seed, device)
                else:
                    seed_everything(seed)
                    model = build_fusion_model(ckpt["config"]).to(device)  # fresh init, same architecture
                    _fit(model, images, labels, train, recipe, cfg.steps, cfg.scratch_lr, cfg.batch_size, seed, device)
                row = {**base, "k": k, "seed": seed, "mode": mode, "n_train": int(len(train)),
                       "shots": {info["classes"][c]: n for c, n in taken.items()},
                       **_score(model, images, y, common, info["classes"], device)}
                append_jsonl(path, row)
                print(f"k={k} seed={seed} {mode}: macro-F1 {row['macro_f1']:.3f} (train {row['n_train']}, "
                      f"test {row['n_test']})", flush=True)
    write_summary(out)
    return path


def write_summary(out: Path) -> None:
    """fewshot.md (table) and fewshot.png (curve) from adapt.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(out / "adapt.jsonl")
    ks = sorted({r["k"] for r in rows})
    md = ["| k per class | mode | seeds | macro-F1 (mean ± 95% CI) | balanced accuracy |", "|---|---|---|---|---|"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, colour in (("finetune", "C0"), ("alone", "C1"), ("trained", "k")):
        pts = []
        for k in ks:
            v = [r for r in rows if r["k"] == k and r["mode"] == mode]
            if not v:
                continue
            m, hw = mean_ci([r["macro_f1"] for r in v])
            b, bhw = mean_ci([r["balanced_accuracy"] for r in v])
            md.append(f"| {k} | {mode} | {len(v)} | {m:.3f} ± {0 if np.isnan(hw) else hw:.3f} | "
                      f"{b:.3f} ± {0 if np.isnan(bhw) else bhw:.3f} |")
            pts.append((k, m, 0 if np.isnan(hw) else hw))
        if pts and mode != "trained":
            k_, m_, h_ = map(np.asarray, zip(*pts, strict=True))
            ax.errorbar(k_, m_, yerr=h_, marker="o", color=colour, capsize=3,
                        label={"finetune": "fine-tuned trained model", "alone": "trained on the k cells alone"}[mode])
        elif pts:
            ax.axhline(pts[0][1], color=colour, ls="--", label="trained model, no target labels")
    ax.set(xlabel="labelled target cells per class (k)", ylabel="macro-F1 on the rest", xscale="symlog",
           title="few-shot adaptation to the target lab")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fewshot.png", dpi=120)
    plt.close(fig)
    atomic_write_text(out / "fewshot.md", "\n".join(md) + "\n")
    print("\n".join(md))
