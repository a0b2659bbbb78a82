"""Hyperparameter search on validation only: a learning-rate range test and an Optuna (TPE) search.

    python scripts/lr_find.py --config configs/demo_sweep.yaml --out runs/lr_find
    python scripts/search.py --sweep configs/demo_sweep.yaml --trials 20 --out runs/search
    python scripts/sweep.py --config runs/search/best_sweep.yaml        # the best trial, as a sweep

**LR range test** (Smith 2017): from `lr_start` to `lr_end`, the learning rate grows geometrically
over `lr_steps` training steps of the run's own model, batches and augmentation; the smoothed
training loss is recorded until it diverges. The suggestion is the rate of steepest descent of the
smoothed loss; `lr_find.png` shows the curve. Only training images are used.

**Search**: each trial is one validation-only run (`runtime.eval_test: false`) of the sweep's recipe
at one fraction, arm and seed, with the trial's values of the search space (learning rate, weight
decay, dropout and augmentation strength by default); its objective is the best validation
macro-F1. Optuna's TPE sampler proposes values, and its median pruner stops a trial whose validation
macro-F1 at a checkpoint is below the median of earlier trials at that checkpoint. The study is kept
in `<out>/study.jsonl` (Optuna's journal storage), so a killed search resumes where it stopped. The
sweep's split is used as it is, so validation is the sweep's validation and its test images are never
looked up (tests/test_search.py proves it). The best trial's values are written into
`<out>/best_sweep.yaml`: the sweep's YAML with those values and `out: <sweep out>_tuned`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.config import _set_dotted as set_dotted
from pretrain.config import config_from_dict, load_yaml, to_plain
from pretrain.engine import autocast
from pretrain.utils import atomic_write_json, atomic_write_text, get_device

from .data import WBCData, load_wbc
from .splits import split_indices
from .train import RunConfig, _batches, build_trainer, make_optimizer, prepare_split, train_run

SECTIONS = ("model", "optim", "augment")  # what a search may tune: the recipe, not the data or the run
DEFAULT_SPACE = {"optim.lr": {"low": 3e-4, "high": 1e-2, "log": True},
                 "optim.weight_decay": {"low": 1e-3, "high": 0.2, "log": True},
                 "model.dropout": {"low": 0.0, "high": 0.5},
                 "augment.color": {"low": 0.0, "high": 0.4},
                 "augment.rotate": {"low": 0.0, "high": 180.0}}


# ---------------------------------------------------------------------------------------------- LR range test


@dataclass
class LRFindConfig(RunConfig):
    """`scripts/lr_find.py`: a learning-rate range test of one run's recipe on its training images."""

    lr_start: float = 1e-6
    lr_end: float = 1.0
    lr_steps: int = field(default=100, metadata={"help": "steps from lr_start to lr_end (geometric)"})
    out: str = field(default="runs/lr_find", metadata={"help": "folder for lr_find.csv/.json/.png"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.lr_start < self.lr_end:
            raise ValueError(f"lr_start {self.lr_start} and lr_end {self.lr_end} must satisfy 0 < lr_start < lr_end")
        if self.lr_steps < 10:
            raise ValueError(f"lr_steps must be >= 10, got {self.lr_steps}")


def suggest_lr(lrs: np.ndarray, losses: np.ndarray) -> float:
    """The rate where the smoothed loss falls fastest per decade, before its minimum (first 10% skipped)."""
    stop = int(np.argmin(losses)) + 1
    start = min(len(lrs) // 10, max(stop - 2, 0))
    if stop - start < 3:
        return float(lrs[max(stop - 1, 0)] / 10)
    grad = np.gradient(losses[start:stop], np.log10(lrs[start:stop]))
    return float(lrs[start + int(np.argmin(grad))])


def lr_range_test(cfg: LRFindConfig, data: WBCData | None = None) -> dict:
    """Run the range test; write `lr_find.csv`, `lr_find.json` and `lr_find.png` into `cfg.out`."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = get_device(cfg.runtime.device)
    if data is None:
        data = load_wbc(cfg.data, cfg.image_size, cfg.cache_dir or None, progress=cfg.runtime.progress,
                        preprocess=cfg.preprocess, classes=cfg.classes)
    split = prepare_split(cfg, data, out / "split.json", parts=("train",))
    train_rows = torch.as_tensor(split_indices(split, data, "train", cfg.fraction))
    tr = build_trainer(cfg, data, train_rows.numpy(), device)
    optimizer = make_optimizer(tr.model.parameters(), dataclasses.replace(cfg.optim, lr=cfg.lr_start))
    gamma = (cfg.lr_end / cfg.lr_start) ** (1 / (cfg.lr_steps - 1))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: gamma ** i)
    bs = max(1, min(cfg.optim.batch_size, len(train_rows)))
    balanced = tr.labels[train_rows] if cfg.optim.sampler == "balanced" else None
    tr.model.train()
    lrs, raw, smooth, avg, best = [], [], [], 0.0, math.inf
    for i, b in enumerate(_batches(len(train_rows), bs, cfg.lr_steps, tr.g, balanced)):
        lr = optimizer.param_groups[0]["lr"]
        with autocast(device, cfg.runtime.amp):
            loss, _, _ = tr.feeder.step(tr.model, train_rows[b], device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sched.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            break
        avg = 0.9 * avg + 0.1 * value
        s = avg / (1 - 0.9 ** (i + 1))  # bias-corrected exponential moving average
        lrs.append(lr)
        raw.append(value)
        smooth.append(s)
        best = min(best, s)
        if s > 4 * best and i > 10:  # diverged
            break
    lrs_a, smooth_a = np.asarray(lrs), np.asarray(smooth)
    result = {"suggested_lr": suggest_lr(lrs_a, smooth_a), "min_loss_lr": float(lrs_a[int(np.argmin(smooth_a))]),
              "steps": len(lrs), "lr_start": cfg.lr_start, "lr_end": cfg.lr_end, "arm": cfg.arm,
              "fraction": cfg.fraction, "seed": cfg.seed, "optimizer": cfg.optim.optimizer}
    atomic_write_text(out / "lr_find.csv", "lr,loss,smoothed_loss\n" + "".join(
        f"{a:.6g},{b:.6g},{c:.6g}\n" for a, b, c in zip(lrs, raw, smooth, strict=True)))
    atomic_write_json(out / "lr_find.json", result)
    _plot_lr(lrs_a, np.asarray(raw), smooth_a, result["suggested_lr"], out / "lr_find.png")
    return result


def _plot_lr(lrs, raw, smooth, suggested, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, raw, alpha=0.3, label="loss")
    ax.plot(lrs, smooth, label="smoothed")
    ax.axvline(suggested, color="k", ls="--", label=f"suggested {suggested:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    ax.set_ylim(top=min(float(np.nanmax(smooth)) * 1.2, float(smooth[0]) * 3))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_lr_find(cfg: LRFindConfig) -> dict:
    r = lr_range_test(cfg)
    print(f"suggested learning rate {r['suggested_lr']:.3g} (loss minimum at {r['min_loss_lr']:.3g}); "
          f"curve: {Path(cfg.out) / 'lr_find.png'}")
    return r


# ---------------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class Param:
    """One dimension of the search space: a float or int range (optionally log-scaled) or choices."""

    key: str  # dotted, e.g. "optim.lr"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    integer: bool = False

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), log=self.log)


def _tunable() -> dict[str, type]:
    from .train import AugmentConfig, ModelConfig, OptimConfig

    out = {}
    for name, cls in zip(SECTIONS, (ModelConfig, OptimConfig, AugmentConfig), strict=True):
        for f in dataclasses.fields(cls):
            out[f"{name}.{f.name}"] = type(getattr(cls(), f.name))
    return out


def parse_space(space: dict) -> list[Param]:
    """`{key: {low, high, log} | [low, high] | [low, high, "log"] | {choices: [...]}}` -> Params.

    Raises:
        ValueError: an empty space, a key that is not a tunable recipe field (lists them), an inverted or
            empty range, a log range that reaches 0, or a type that does not fit the field.
    """
    if not space:
        raise ValueError("the search space is empty; give at least one dimension, e.g. "
                         "space: {optim.lr: {low: 0.0003, high: 0.01, log: true}}")
    tunable, params = _tunable(), []
    for key, spec in space.items():
        if key not in tunable:
            raise ValueError(f"search space: {key!r} is not a tunable field; tunable: {', '.join(sorted(tunable))}")
        if isinstance(spec, list) and len(spec) in (2, 3) and all(isinstance(v, int | float) for v in spec[:2]):
            spec = {"low": spec[0], "high": spec[1], "log": len(spec) == 3 and spec[2] == "log"}
        if not isinstance(spec, dict) or not ({"low", "high"} <= set(spec) or "choices" in spec):
            raise ValueError(f"search space {key}: give {{low, high[, log]}}, [low, high], [low, high, log] or "
                             f"{{choices: [...]}}, got {spec!r}")
        if "choices" in spec:
            if not spec["choices"]:
                raise ValueError(f"search space {key}: choices is empty")
            params.append(Param(key, choices=tuple(spec["choices"])))
            continue
        low, high, log = spec["low"], spec["high"], bool(spec.get("log", False))
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError(f"search space {key}: low and high must be numbers, got {low!r}, {high!r}")
        if tunable[key] not in (int, float):
            raise ValueError(f"search space {key}: the field is {tunable[key].__name__}, not a number; "
                             f"use {{choices: [...]}}")
        if low >= high:
            raise ValueError(f"search space {key}: low {low} >= high {high} "
                             f"({'an empty range' if low == high else 'inverted; swap them'})")
        if log and low <= 0:
            raise ValueError(f"search space {key}: a log range needs low > 0, got {low}")
        params.append(Param(key, float(low), float(high), log, integer=tunable[key] is int))
    return params


@dataclass
class SearchConfig:
    """`scripts/search.py`: tune a sweep's recipe on its validation split with Optuna."""

    sweep: str = field(default="", metadata={"help": "the sweep YAML whose recipe is tuned (required)"})
    out: str = field(default="runs/search", metadata={"help": "search folder: study.jsonl, trials/, best_sweep.yaml"})
    trials: int = field(default=20, metadata={"help": "finished (complete or pruned) trials wanted in all"})
    fraction: float = field(default=0.0, metadata={"help": "label fraction of the trials (0 = the sweep's first)"})
    arm: str = field(default="scratch", metadata={"help": "arm of the trials"})
    seed: int = field(default=-1, metadata={"help": "seed of the trials (-1 = the sweep's first)"})
    space: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_SPACE), metadata={
        "help": "dotted recipe field -> {low, high, log} or {choices}; YAML only"})
    sampler_seed: int = field(default=0, metadata={"help": "seed of the TPE sampler"})
    prune: bool = field(default=True, metadata={"help": "median pruning of trials behind at a validation"})
    startup_trials: int = field(default=5, metadata={"help": "trials before TPE and pruning start (random search)"})
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.sweep:
            raise ValueError("--sweep FILE.yaml is required: the sweep config whose recipe is tuned")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        parse_space(self.space)


def trial_config(sweep_cfg, cfg: SearchConfig, params: dict, out: Path) -> RunConfig:
    """The validation-only RunConfig of one trial: the sweep's run settings with the trial's values."""
    base = {f.name: getattr(sweep_cfg, f.name) for f in dataclasses.fields(RunConfig)}
    sections = {k: to_plain(base[k]) for k in (*SECTIONS, "runtime")}
    for key, value in params.items():
        set_dotted(sections, key, value)
    sections["runtime"].update({"eval_test": False, "progress": cfg.progress, "curves": False})
    return RunConfig(**{**base, **sections, "fraction": cfg.fraction or float(sweep_cfg.fractions[0]),
                        "arm": cfg.arm, "seed": cfg.seed if cfg.seed >= 0 else int(sweep_cfg.seeds[0]),
                        "out": str(out), "overwrite": True, "val_run": ""})


def load_sweep(path: str):
    from .sweep import SweepConfig

    raw = load_yaml(path)
    sweep_cfg = config_from_dict(SweepConfig, copy.deepcopy(raw), source=path)
    if sweep_cfg.folds:
        raise ValueError(f"{path} is a {sweep_cfg.folds}-fold sweep: every image is a test image in some fold, so a "
                         f"search on its validation split would see test images; tune on a sweep with one split")
    return sweep_cfg, raw


def run_search(cfg: SearchConfig, data: WBCData | None = None) -> dict:
    """Run (or resume) the search; write trials.csv, search.png, search.json and best_sweep.yaml."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = parse_space(cfg.space)
    sweep_cfg, raw = load_sweep(cfg.sweep)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_wbc(sweep_cfg.data, sweep_cfg.image_size, sweep_cfg.cache_dir or None, progress=cfg.progress,
                        preprocess=sweep_cfg.preprocess, classes=sweep_cfg.classes)
    # the sweep's own split file (made as the sweep would make it when missing): the same validation images
    split = prepare_split(sweep_cfg, data, Path(sweep_cfg.out) / "split.json", fractions=sweep_cfg.fractions,
                          parts=("train", "val"))
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.jsonl")))
    study = optuna.create_study(
        study_name="search", storage=storage, load_if_exists=True, direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.sampler_seed, n_startup_trials=cfg.startup_trials),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=1)
        if cfg.prune else optuna.pruners.NopPruner())
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # left by a killed search
        storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))
    if done:
        print(f"search {out}: {done} trials already finished, {max(cfg.trials - done, 0)} to go")

    def objective(trial) -> float:
        params = {p.key: p.suggest(trial) for p in space}
        run_cfg = trial_config(sweep_cfg, cfg, params, out / "trials" / f"t{trial.number:03d}")

        def report(epoch: int, val: dict) -> None:
            trial.report(val["macro_f1"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation macro-F1 {val['macro_f1']:.3f} at check {epoch}")

        try:
            r = train_run(run_cfg, data=data, split=split, on_validate=report)
        except optuna.TrialPruned:
            print(f"trial {trial.number}: pruned  {_fmt(params)}")
            raise
        value = r.get("val_macro_f1")
        print(f"trial {trial.number}: val macro-F1 {value if value is None else round(value, 4)}  {_fmt(params)}")
        return float("nan") if value is None else float(value)

    study.optimize(objective, n_trials=max(cfg.trials - done, 0), catch=())
    return write_outputs(study, cfg, raw, sweep_cfg, out)


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def write_outputs(study, cfg: SearchConfig, raw: dict, sweep_cfg, out: Path) -> dict:
    import yaml
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    keys = sorted({k for t in trials for k in t.params})
    lines = ["number,state,val_macro_f1,last_check," + ",".join(keys)]
    for t in trials:
        last = max(t.intermediate_values) if t.intermediate_values else ""
        lines.append(f"{t.number},{t.state.name},{'' if t.value is None else t.value},{last},"
                     + ",".join(str(t.params.get(k, "")) for k in keys))
    atomic_write_text(out / "trials.csv", "\n".join(lines) + "\n")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise ValueError(f"search {out}: no trial finished (all pruned or failed); see {out / 'trials.csv'}")
    best = study.best_trial
    tuned = copy.deepcopy(raw)
    for k, v in best.params.items():
        set_dotted(tuned, k, v)
    tuned["out"] = str(raw.get("out", sweep_cfg.out)).rstrip("/") + "_tuned"
    header = (f"# {cfg.sweep} with the best of {len(trials)} Optuna trials ({out}/trials.csv): trial {best.number}, "
              f"validation macro-F1 {best.value:.4f}\n# at fraction {cfg.fraction or sweep_cfg.fractions[0]}, arm "
              f"{cfg.arm}, seed {cfg.seed if cfg.seed >= 0 else sweep_cfg.seeds[0]}. Run it: "
              f"python scripts/sweep.py --config {out / 'best_sweep.yaml'}\n")
    atomic_write_text(out / "best_sweep.yaml", header + yaml.safe_dump(tuned, sort_keys=False))
    summary = {"best_trial": best.number, "best_val_macro_f1": best.value, "best_params": best.params,
               "trials": len(trials), "complete": len(complete),
               "pruned": sum(t.state == TrialState.PRUNED for t in trials),
               "failed": sum(t.state == TrialState.FAIL for t in trials), "sweep": cfg.sweep,
               "best_sweep": str(out / "best_sweep.yaml")}
    atomic_write_json(out / "search.json", summary)
    _plot_history(trials, out / "search.png")
    return summary


def _plot_history(trials, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState

    fig, ax = plt.subplots(figsize=(6, 4))
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.scatter([t.number for t in done], [t.value for t in done], label="complete")
    ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
               marker="x", color="grey", label="pruned (last check)")
    best = np.maximum.accumulate([t.value for t in done]) if done else []
    ax.step([t.number for t in done], best, where="post", color="k", label="best so far")
    ax.set(xlabel="trial", ylabel="validation macro-F1", title="Optuna search (validation only)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_search(summary: dict) -> dict:
    print(json.dumps({k: summary[k] for k in ("best_trial", "best_val_macro_f1", "best_params", "complete",
                                              "pruned", "failed")}))
    print(f"best config: {summary['best_sweep']}")
    return summary
