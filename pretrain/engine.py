"""Plain training-loop functions shared by every stage (autoencoder, ResNet, fusion CNN).

`train_one_epoch(...) -> dict` and `evaluate(...) -> dict` average per-sample meters;
`fit(...)` runs epochs with ReduceLROnPlateau, keeps a real copy of the best-on-validation weights,
logs one JSON line per epoch, optionally stops early, and calls `on_best` so callers can save
checkpoints atomically as soon as a new best appears (an interrupted run keeps the last good one);
`on_state`/`resume` let a caller save its state every epoch and continue a killed run exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .utils import append_jsonl

# step(model, batch, device) -> (loss scalar tensor, batch size, {metric: batch mean})
StepFn = Callable[[nn.Module, object, torch.device], tuple[torch.Tensor, int, dict[str, float]]]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when enabled; a no-op elsewhere (CPU runs stay in float32)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Meter:
    """Per-sample weighted averages of named values."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.n = 0

    def update(self, n: int, **values: float) -> None:
        self.n += n
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n

    def averages(self) -> dict[str, float]:
        return {k: s / max(self.n, 1) for k, s in self.sums.items()}


def train_one_epoch(model: nn.Module, loader: Iterable, step: StepFn, optimizer: torch.optim.Optimizer,
                    device: torch.device, amp: bool = False, desc: str = "train",
                    progress: bool = True, grad_clip: float | None = None,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    reduce: Callable[[Meter], Meter] | None = None) -> dict[str, float]:
    """One pass over `loader`; returns {"loss": mean, **other metric means}.

    `scheduler`, when given, is stepped after every optimizer step (per-step schedules such as cosine).
    `reduce`, when given, turns this process's meter into the one over all processes before averaging
    (`pretrain.distributed.reduce_meter`), so that the means are those of the global data.

    Raises:
        NonFiniteLossError: a batch loss is NaN/inf (the caller marks the run failed).
    """
    model.train()
    meter = Meter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True)
    for batch in bar:
        with autocast(device, amp):
            loss, n, extra = step(model, batch, device)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{desc}: loss became {loss.item()} after {meter.n} samples")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        meter.update(n, loss=loss.item(), **extra)
        bar.set_postfix(loss=f"{meter.averages()['loss']:.4f}")
    return (meter if reduce is None else reduce(meter)).averages()


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, step: StepFn, device: torch.device, amp: bool = False,
             desc: str = "val", progress: bool = False,
             reduce: Callable[[Meter], Meter] | None = None) -> dict[str, float]:
    """Mean loss and metrics of `step` over `loader` in eval mode, without gradients (`reduce`: as in
    `train_one_epoch`, for a loader holding this process's share of the data)."""
    model.eval()
    meter = Meter()
    for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
        with autocast(device, amp):
            loss, n, extra = step(model, batch, device)
        meter.update(n, loss=loss.item(), **extra)
    return (meter if reduce is None else reduce(meter)).averages()


def epoch_row(epoch: int, optimizer: torch.optim.Optimizer, train: dict, val: dict, seconds: float) -> dict:
    """One log line: {"epoch", "lr", "train_<k>"..., "val_<k>"..., "seconds"}."""
    return {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], **{f"train_{k}": v for k, v in train.items()},
            **{f"val_{k}": v for k, v in val.items()}, "seconds": round(seconds, 3)}


@dataclass
class FitResult:
    best_epoch: int
    best: dict[str, float]
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None
    stopped_early: bool = False
    seconds: float = 0.0


def fit(model: nn.Module, *, epochs: int, train_epoch: Callable[[int], dict], validate: Callable[[int], dict],
        optimizer: torch.optim.Optimizer, monitor: str = "val_loss", mode: str = "min",
        plateau_patience: int | None = 3, plateau_factor: float = 0.5, early_stop: int | None = None,
        log_path: str | Path | None = None, on_best: Callable[[int, dict], None] | None = None,
        on_epoch: Callable[[int, dict], None] | None = None, progress: bool = True,
        desc: str = "epochs", resume: dict | None = None,
        on_state: Callable[[dict], None] | None = None) -> FitResult:
    """Run `epochs` of `train_epoch(epoch) -> {"loss",...}` then `validate(epoch) -> {...}`.

    Log rows are {"epoch", "lr", "seconds", "train_<k>", "val_<k>"}; `monitor` names one of them.
    The best state dict is deep-copied (not a reference to the live weights). `plateau_patience=None`
    leaves the learning rate alone (for callers that step their own per-batch schedule).

    Resuming: at the end of every epoch `on_state(state)` receives fit's own counters as plain types
    (epoch, best value/epoch/row/weights, epochs since best, stopped_early, history, scheduler state,
    seconds); the caller adds model, optimizer and RNG states and saves them. `resume=state` restores
    the counters and the scheduler and continues at `state["epoch"] + 1` (nothing left to do when it
    had stopped early); the caller restores model, optimizer and RNGs itself before calling fit.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    sched = None if plateau_patience is None else torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=plateau_factor, patience=plateau_patience)
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    best_val = math.inf if mode == "min" else -math.inf
    res = FitResult(best_epoch=-1, best={})
    since_best, start, seconds_before = 0, 1, 0.0
    if resume is not None:
        best_val, since_best, seconds_before = resume["best_value"], resume["since_best"], resume["seconds"]
        res.best_epoch, res.best, res.best_state = resume["best_epoch"], dict(resume["best"]), resume["best_state"]
        res.history, res.stopped_early = list(resume["history"]), resume["stopped_early"]
        if sched is not None and resume.get("scheduler") is not None:
            sched.load_state_dict(resume["scheduler"])
        start = epochs + 1 if res.stopped_early else resume["epoch"] + 1
    t_start = time.perf_counter()
    bar = tqdm(range(start, epochs + 1), desc=desc, disable=not progress, dynamic_ncols=True,
               initial=min(start - 1, epochs), total=epochs)
    for epoch in bar:
        t0 = time.perf_counter()
        tr = train_epoch(epoch)
        va = validate(epoch)
        row = epoch_row(epoch, optimizer, tr, va, time.perf_counter() - t0)
        if monitor not in row:
            raise KeyError(f"monitor {monitor!r} not among logged values {sorted(row)}")
        value = row[monitor]
        if sched is not None:
            sched.step(value)
        improved = better(value, best_val)
        row["best"] = improved
        res.history.append(row)
        if log_path is not None:
            append_jsonl(log_path, row)
        if improved:
            best_val = value
            res.best_epoch, res.best = epoch, dict(row)
            res.best_state = copy.deepcopy(model.state_dict())
            since_best = 0
            if on_best is not None:
                on_best(epoch, row)
        else:
            since_best += 1
        if on_epoch is not None:
            on_epoch(epoch, row)
        bar.set_postfix({monitor: f"{value:.4f}", "best": f"{best_val:.4f}"})
        res.stopped_early = early_stop is not None and since_best >= early_stop
        if on_state is not None:
            on_state({"epoch": epoch, "best_value": best_val, "best_epoch": res.best_epoch, "best": res.best,
                      "best_state": res.best_state, "since_best": since_best, "stopped_early": res.stopped_early,
                      "history": res.history, "scheduler": None if sched is None else sched.state_dict(),
                      "seconds": seconds_before + time.perf_counter() - t_start})
        if res.stopped_early:
            break
    res.seconds = seconds_before + time.perf_counter() - t_start
    return res
