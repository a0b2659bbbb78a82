"""Code changes that must leave every number of the study unchanged and cost less time: both, checked.

    .venv/bin/python benchmarks/real_study/same_numbers.py --change pool-relu    # -> POOL_RELU.md
    .venv/bin/python benchmarks/real_study/same_numbers.py --change eval-batch   # -> EVAL_BATCH.md

`--change pool-relu`: SmallCNN's blocks were conv-BN-ReLU-maxpool; they are now conv-BN-maxpool-ReLU.
ReLU is monotone, so it commutes with max: the same function and gradients, bit for bit, with the ReLU
and its backward on a 4x smaller tensor. "old" rebuilds every SmallCNN in the old order.
`--change eval-batch`: validation, test and frozen-feature batches of 128 images instead of 512 (each
image's result does not depend on the others in eval mode; smaller batches stay in cache on a CPU).
"old" runs with `eval_batch_size=512`.

1. The change in isolation, side by side. pool-relu: training steps (batch 64, 48 px, the study's
   widths, augmentation, AdamW) of two models, one per order, taking turns step by step for `--steps`
   steps each, so both meet the same machine speed (on this shared machine it swings by a third
   within minutes).
   eval-batch: `predict` on the validation split with a trained model, and the frozen features of
   2,048 images (pretrained and random encoders), at both batch sizes in turn, outputs compared exactly.
2. Whole real runs, old vs new, side by side: the study's 10% scratch run, seed 0, in `--run-rounds`
   rounds of old-new-new-old (so a steady drift of the machine's speed cancels); wall seconds and
   process CPU seconds per run.
3. Every run it trains (old and new, plus a 1% fused run, a 1% random-control run and the 100% scratch
   run, new only) is compared field by field with the committed record (`results.jsonl`): accuracy,
   macro-F1, per-class accuracy, confusion matrix, best check and validation macro-F1 must be identical.

Needs the real PBC images (../shared/data) and the study's encoder checkpoints in
`runs/real_study/checkpoints` (from `make real-study`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusion.augment import AugConfig, augment  # noqa: E402
from fusion.data import load_wbc  # noqa: E402
from fusion.encoders import compute_features, images_to_tensor, load_arm_encoders  # noqa: E402
from fusion.models import CNNConfig, FusionModel, SmallCNN  # noqa: E402
from fusion.splits import load_split, split_indices  # noqa: E402
from fusion.study import study_checkpoints  # noqa: E402
from fusion.sweep import run_name  # noqa: E402
from fusion.train import RunConfig, predict, train_run  # noqa: E402
from pretrain.utils import read_jsonl  # noqa: E402

HERE = Path(__file__).resolve().parent
FIELDS = ("accuracy", "macro_f1", "per_class", "confusion", "best_epoch", "val_macro_f1", "steps")
TIMED = (0.1, "scratch", "sum", 0)
CHECKED = [(0.01, "prcc+cam16", "sum", 0), (0.01, "random", "concat", 0), (1.0, "scratch", "sum", 0)]
LABELS = {"pool-relu": {"old": "conv-BN-ReLU-maxpool (old)", "new": "conv-BN-maxpool-ReLU (new)"},
          "eval-batch": {"old": "eval batch 512 (old)", "new": "eval batch 128 (new)"}}


def relu_before_pool(cnn: SmallCNN) -> SmallCNN:
    """Put each block back in the old conv-BN-ReLU-maxpool order (same modules, same weights)."""
    b = list(cnn.features)
    cnn.features = torch.nn.Sequential(*[m for i in range(0, len(b), 4) for m in (b[i], b[i + 1], b[i + 3], b[i + 2])])
    return cnn


@contextlib.contextmanager
def old_order():
    """Every SmallCNN built inside is in the old order."""
    init = SmallCNN.__init__

    def patched(self, *a, **kw):
        init(self, *a, **kw)
        relu_before_pool(self)

    SmallCNN.__init__ = patched
    try:
        yield
    finally:
        SmallCNN.__init__ = init


def step_times(steps: int) -> dict[str, list[float]]:
    """Milliseconds of each training step of two identical models, old order and new, stepped in turn
    (which goes first alternates), so both meet the same machine speed at every moment."""
    models, opts, gens = {}, {}, {}
    for order in ("old", "new"):
        torch.manual_seed(0)
        m = SmallCNN(CNNConfig(channels=[16, 32, 64, 128, 256], input_size=48))
        models[order] = relu_before_pool(m) if order == "old" else m
        opts[order] = torch.optim.AdamW(m.parameters(), 2e-3)
        gens[order] = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 48, 48), torch.randint(0, 5, (64,))
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(steps + 5):
        for order in (("old", "new") if i % 2 == 0 else ("new", "old")):
            t0 = time.perf_counter()
            loss = F.cross_entropy(models[order](augment(x, AugConfig(scale=(1.0, 1.0)), gens[order])), y)
            opts[order].zero_grad()
            loss.backward()
            opts[order].step()
            if i >= 5:  # warm-up
                times[order].append((time.perf_counter() - t0) * 1000)
    return times


def pool_relu_check(steps: int, labels: dict[str, str]) -> None:
    """Training steps, old order against new, interleaved step by step."""
    print(f"Two models, one per order, take turns step by step: {steps} timed steps each.\n")
    t = step_times(steps)
    pair = [n / o for o, n in zip(t["old"], t["new"], strict=True)]
    print("| order | median ms/step | mean ms/step | quartiles |\n|---|---|---|---|")
    for order in ("old", "new"):
        q = statistics.quantiles(t[order], n=4)
        print(f"| {labels[order]} | {statistics.median(t[order]):.1f} | {statistics.mean(t[order]):.1f} | "
              f"{q[0]:.1f}-{q[2]:.1f} |")
    print(f"\nnew / old: total time **{sum(t['new']) / sum(t['old']):.3f}**; median of the step-by-step "
          f"ratios {statistics.median(pair):.3f}; the new step was faster in {sum(r < 1 for r in pair)} of "
          f"{len(pair)} pairs\n", flush=True)


def eval_batch_check(data, split, ckpts: dict[str, Path], rounds: int) -> None:
    """predict() on the validation split and frozen features, batch 512 against 128, in turn."""
    images = images_to_tensor(data.images)
    rows = split_indices(split, data, "val")
    torch.manual_seed(0)
    model = FusionModel(SmallCNN(CNNConfig(channels=[16, 32, 64, 128, 256], input_size=48)), {})
    cpu = torch.device("cpu")
    print(f"`predict` on the {len(rows)} validation images (the study's CNN, seeded init), {rounds} rounds:\n")
    print("| batch | ms per pass, each round | median | logits identical to batch 512 |\n|---|---|---|---|")
    ms: dict[int, list[float]] = {512: [], 128: []}
    out: dict[int, torch.Tensor] = {}
    for _ in range(rounds):
        for bs in (512, 128):
            t0 = time.perf_counter()
            out[bs], _ = predict(model, images, {}, rows, cpu, bs)
            ms[bs].append((time.perf_counter() - t0) * 1000)
    for bs in (512, 128):
        print(f"| {bs} | {', '.join(f'{v:.0f}' for v in ms[bs])} | {statistics.median(ms[bs]):.0f} | "
              f"{'yes' if torch.equal(out[bs], out[512]) else '**NO**'} |")
    sub = images[:2048]
    print("\nFrozen features of 2,048 images (prcc + cam16 encoders):\n")
    print("| encoders | batch 512 s | batch 128 s | features identical |\n|---|---|---|---|")
    for arm, seed in (("prcc+cam16", 0), ("random", 0)):
        enc = load_arm_encoders(arm, ckpts, seed, 48, True)
        t0 = time.perf_counter()
        a = compute_features(enc, sub, cpu, 512)
        t1 = time.perf_counter()
        b = compute_features(enc, sub, cpu, 128)
        t2 = time.perf_counter()
        same = all(torch.equal(a[k], b[k]) for k in a)
        name = "pretrained" if arm != "random" else "random (seed 0)"
        print(f"| {name} | {t1 - t0:.1f} | {t2 - t1:.1f} | {'yes' if same else '**NO**'} |")
    print(flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "pbc-wbc"))
    p.add_argument("--change", choices=sorted(LABELS), required=True)
    p.add_argument("--checkpoints", default=str(ROOT / "runs" / "real_study" / "checkpoints"))
    p.add_argument("--rounds", type=int, default=7, help="eval-batch: alternating rounds of predict()")
    p.add_argument("--steps", type=int, default=400, help="pool-relu: timed training steps per order")
    p.add_argument("--run-rounds", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "runs" / "same_numbers"))
    args = p.parse_args()
    if not Path(args.data).is_dir():
        print(f"SKIP: {args.data} is absent")
        return
    try:
        ck = study_checkpoints(args.checkpoints)
    except FileNotFoundError as e:
        sys.exit(str(e))

    t_start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    labels = LABELS[args.change]
    record = {r["run"]: r for r in read_jsonl(HERE / "results.jsonl")}
    data = load_wbc(args.data, 48, "data/cache", progress=False)
    split = load_split(HERE / "split.json.gz")
    if args.change == "pool-relu":
        print("## 1. Training steps (batch 64, 48 px, widths 16-32-64-128-256, augmentation, AdamW)\n")
        pool_relu_check(args.steps, labels)
    else:
        print("## 1. Evaluation and frozen features at batch 512 and 128\n")
        eval_batch_check(data, split, ck, args.rounds)

    def run(spec, order: str) -> dict:
        frac, arm, mode, seed = spec
        cfg = RunConfig(data=args.data, split=str(HERE / "split.json.gz"), fraction=frac, arm=arm, mode=mode,
                        seed=seed, prcc_checkpoint=str(ck["prcc"]),
                        cam16_checkpoint=str(ck["cam16"]), out=f"{args.out}/{order}/{run_name(*spec)}",
                        overwrite=True, progress=False, curves=False,
                        **({"eval_batch_size": 512} if args.change == "eval-batch" and order == "old" else {}))
        cpu = time.process_time()
        with old_order() if args.change == "pool-relu" and order == "old" else contextlib.nullcontext():
            r = train_run(cfg, data=data, split=split)
        r["cpu"] = time.process_time() - cpu
        want = record[r["run"]]
        r["same"] = all(json.dumps(r[k]) == json.dumps(want[k]) for k in FIELDS)
        r["order"] = order
        return r

    print("## 2. Whole real runs, side by side (10% scratch, seed 0; order old, new, new, old per round)\n")
    done = []
    for _ in range(args.run_rounds):
        for order in ("old", "new", "new", "old"):
            done.append(run(TIMED, order))
    print("| order | wall s, in run order | mean | CPU s, in run order | mean |\n|---|---|---|---|---|")
    mean = {}
    for o in ("old", "new"):
        wall, cpu = [r["seconds"] for r in done if r["order"] == o], [r["cpu"] for r in done if r["order"] == o]
        mean[o] = (statistics.mean(wall), statistics.mean(cpu))
        print(f"| {labels[o]} | {', '.join(f'{v:.1f}' for v in wall)} | {mean[o][0]:.1f} | "
              f"{', '.join(f'{v:.1f}' for v in cpu)} | {mean[o][1]:.1f} |")
    print(f"\nnew / old, means: wall **{mean['new'][0] / mean['old'][0]:.3f}**, "
          f"CPU **{mean['new'][1] / mean['old'][1]:.3f}**\n", flush=True)

    for spec in CHECKED:
        done.append(run(spec, "new"))
    print("## 3. The same numbers as the record?\n")
    print("| run | order | steps | seconds | macro-F1 | record macro-F1 | identical in " + ", ".join(FIELDS) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in done:
        print(f"| {r['run']} | {r['order']} | {r['steps']} | {r['seconds']:.1f} | {r['macro_f1']:.4f} | "
              f"{record[r['run']]['macro_f1']:.4f} | {'yes' if r['same'] else '**NO**'} |")
    n_same = sum(r["same"] for r in done)
    print(f"\n{n_same} of {len(done)} runs identical to the record. Total {(time.perf_counter() - t_start) / 60:.1f} min.")
    if n_same != len(done):
        sys.exit(1)


if __name__ == "__main__":
    main()
