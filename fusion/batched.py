"""Several runs of a sweep trained at once, as one grouped network (`batch_runs: N` in a sweep config).

Runs that differ only by their seed (same fraction, arm, mode, split and recipe) share the step plan and
the learning-rate schedule. Their small-CNN trunks are stacked into one network of grouped convolutions
(`groups = N`): run i's images travel in input channels [3i, 3i + 3) and its feature maps in their own
channel block, so each run keeps its own weights, activations and per-channel BatchNorm/GroupNorm
statistics, computed by one wide convolution instead of N narrow ones. The tiny heads (the CNN's linear
head and the fusion heads) stay each run's own modules, applied to its slice of the pooled features.

What stays per run, exactly as when it trains alone (`fusion.train.train_run`): the initialisation (each
model is built by `setup_run` with its seed), the batches and augmentations (its own generator), the
dropout masks (its own stream of the global generator, swapped in around its head), the schedule, the
validations (its own model, with BatchNorm re-estimation), the choice of the best weights, early
stopping, the log, checkpoint and metrics. AdamW and SGD update every weight on its own, so one
optimizer over the stacked weights is N optimizers. What differs is floating-point order: a grouped
convolution sums in another order than N separate ones, so the numbers agree within numerical noise,
not bit for bit (`tests/test_batched.py`; measured on real data in `benchmarks/batched_runs/`).

Runs that cannot be grouped (standard-architecture arms, encoders run online, runs reused from a pilot)
train alone. A group shares one process and device: one unit of work for any launcher.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from pretrain.config import to_plain
from pretrain.engine import FitResult, Meter, NonFiniteLossError, autocast, epoch_row
from pretrain.utils import append_jsonl

from .models import SmallCNN
from .train import RunConfig, RunState, flat, make_optimizer, make_schedule, setup_run

# RunConfig fields that may differ inside a group (everything else must be equal)
GROUP_FREE = ("seed", "out", "overwrite")


def group_key(spec: RunConfig) -> str | None:
    """Runs with the same key can train as one group; None for a run that trains alone."""
    arm = spec.registry().arm(spec.arm)
    if spec.val_run or arm.backbone is not None or (arm.sources and spec.model.encoder_features != "precompute"):
        return None
    return repr(sorted((k, repr(v)) for k, v in flat(to_plain(spec)).items() if k not in GROUP_FREE))


def make_units(specs: Sequence[RunConfig], size: int) -> list[list[RunConfig]]:
    """The runs split into units of work: groups of up to `size` runs with the same `group_key`, in the
    order of their first run; runs that cannot be grouped are units of one."""
    if size <= 1:
        return [[s] for s in specs]
    groups: dict[str, list[list[RunConfig]]] = {}
    units: list[list[RunConfig]] = []
    for s in specs:
        key = group_key(s)
        if key is None:
            units.append([s])
            continue
        if key not in groups or len(groups[key][-1]) >= size:
            groups.setdefault(key, []).append([])
            units.append(groups[key][-1])
        groups[key][-1].append(s)
    return units


class GroupedTrunk(nn.Module):
    """The conv trunks of N SmallCNNs of one architecture as one network of grouped convolutions.

    `forward([x_1..x_N])` with x_i (B, 3, S, S) in [0, 1] returns [f_1..f_N], f_i (B, F): what
    `cnns[i].forward_features(x_i)` computes. `load(cnns)` copies the runs' trunk weights and buffers in,
    `store(cnns)` copies them back out (for validation on each run's own model).
    """

    def __init__(self, cnns: Sequence[SmallCNN]) -> None:
        super().__init__()
        n = self.n = len(cnns)
        layers: list[nn.Module] = []
        for m in cnns[0].features:
            if isinstance(m, nn.Conv2d):
                layers.append(nn.Conv2d(m.in_channels * n, m.out_channels * n, m.kernel_size, m.stride, m.padding,
                                        bias=m.bias is not None, groups=n))
            elif isinstance(m, nn.BatchNorm2d):
                layers.append(nn.BatchNorm2d(m.num_features * n, m.eps, m.momentum))
            elif isinstance(m, nn.GroupNorm):  # contiguous groups: run i's groups are its own channels
                layers.append(nn.GroupNorm(m.num_groups * n, m.num_channels * n, m.eps))
            elif isinstance(m, (nn.MaxPool2d, nn.ReLU)):
                layers.append(copy.deepcopy(m))
            else:
                raise TypeError(f"batched runs cannot group a {type(m).__name__} layer of the small CNN")
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", cnns[0].mean.clone())
        self.register_buffer("std", cnns[0].std.clone())
        self.to(cnns[0].mean.device)
        self.features.to(memory_format=torch.channels_last)
        self.load(cnns)

    @torch.no_grad()
    def load(self, cnns: Sequence[SmallCNN]) -> None:
        states = [c.features.state_dict() for c in cnns]
        for name, t in self.features.state_dict().items():
            if name.endswith("num_batches_tracked"):  # a count, the same in every run of a group
                t.copy_(states[0][name])
            else:
                t.copy_(torch.cat([s[name] for s in states]))

    @torch.no_grad()
    def store(self, cnns: Sequence[SmallCNN]) -> None:
        mine = self.features.state_dict()
        for i, c in enumerate(cnns):
            for name, t in c.features.state_dict().items():
                t.copy_(mine[name] if name.endswith("num_batches_tracked") else mine[name].chunk(self.n)[i])

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        x = torch.cat([(x - self.mean) / self.std for x in xs], dim=1)  # (B, 3N, S, S)
        f = self.features(x.contiguous(memory_format=torch.channels_last)).mean(dim=(2, 3))  # (B, N*F)
        return list(f.view(f.shape[0], self.n, -1).unbind(1))


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _own_rng(states: list, i: int, device: torch.device) -> Iterator[None]:
    """Run i's stream of the global generator (its dropout masks) for the duration of the block."""
    cpu, gpu = states[i]
    torch.set_rng_state(cpu)
    if gpu is not None:
        torch.cuda.set_rng_state(gpu, device)
    try:
        yield
    finally:
        states[i] = _rng_state(device)


class _Track:
    """One run's bookkeeping of `pretrain.engine.fit` (monitor val_macro_f1, higher is better)."""

    def __init__(self, st: RunState) -> None:
        self.st, self.res = st, FitResult(best_epoch=-1, best={})
        self.best, self.since_best, self.active, self.error = -float("inf"), 0, True, None

    def record(self, row: dict) -> None:
        cfg = self.st.cfg
        improved = row["val_macro_f1"] > self.best
        row["best"] = improved
        self.res.history.append(row)
        append_jsonl(self.st.run_dir / "log.jsonl", row)
        if improved:
            self.best, self.since_best = row["val_macro_f1"], 0
            self.res.best_epoch, self.res.best = row["epoch"], dict(row)
            self.res.best_state = copy.deepcopy(self.st.model.state_dict())
        else:
            self.since_best += 1
        self.res.stopped_early = bool(cfg.optim.early_stop) and self.since_best >= cfg.optim.early_stop
        self.active = not self.res.stopped_early


def _check_group(states: Sequence[RunState]) -> None:
    first = states[0]
    for st in states:
        if not isinstance(st.model.cnn, SmallCNN):
            raise ValueError(f"{st.run_dir}: only small-CNN runs can be batched")
        plan, want = (st.batch_size, st.steps, st.epochs, st.device), (first.batch_size, first.steps, first.epochs,
                                                                       first.device)
        if plan != want:
            raise ValueError(f"{st.run_dir}: step plan {plan} differs from {first.run_dir}'s {want}; "
                             f"only runs with the same plan train as one group")


def train_group(specs: Sequence[RunConfig], data=None, split: dict | None = None, features=None) -> list[dict]:
    """Train `specs` (one `make_units` group) together; their result dicts, in order (as `train_run`'s).

    Finished runs are read back, not trained again; the others are set up one after another exactly as
    `train_run` sets them up, then trained as one `GroupedTrunk` with their own heads.
    """
    out: list[dict | None] = []
    states: list[RunState] = []
    rngs: list[tuple] = []
    for spec in specs:
        st = setup_run(spec, data, split=split, features=features)
        out.append(st if isinstance(st, dict) else None)
        if not isinstance(st, dict):
            states.append(st)
            rngs.append(_rng_state(st.device))  # right after its seeded build: what its dropout draws from
    if states:
        done = iter(_train_states(states, rngs))
        out = [r if r is not None else next(done) for r in out]
    return out  # type: ignore[return-value]


def _train_states(states: list[RunState], rngs: list[tuple]) -> list[dict]:
    _check_group(states)
    first, n = states[0], len(states)
    device, cfg0 = first.device, first.cfg
    cnns = [st.model.cnn for st in states]
    trunk = GroupedTrunk(cnns)
    if cfg0.runtime.compile:
        trunk.compile()
    heads = [p for st in states for name, p in st.model.named_parameters() if not name.startswith("cnn.features.")]
    optimizer = make_optimizer([*trunk.parameters(), *heads], cfg0.optim)
    scheduler = make_schedule(optimizer, first.steps * first.epochs, cfg0.optim)
    tracks = [_Track(st) for st in states]
    t_start = time.perf_counter()
    for epoch in range(1, first.epochs + 1):
        t0 = time.perf_counter()
        live = [i for i, t in enumerate(tracks) if t.active]
        if not live:
            break
        batches = {i: states[i].epoch_batches(epoch) for i in live}
        meters = {i: Meter() for i in live}
        trunk.train()
        for st in states:
            st.model.train()
        for k in range(first.steps):
            inputs = {i: states[i].trainer.feeder.batch(batches[i][k], device, True) for i in live}
            with autocast(device, cfg0.runtime.amp):
                # every run's images go through the trunk (a stopped run's outputs are simply not used)
                fs = trunk([inputs[i][0] if i in inputs else inputs[live[0]][0] for i in range(n)])
                losses, accs = {}, {}
                for i in live:
                    x, y, feats = inputs[i]
                    with _own_rng(rngs, i, device):
                        logits = states[i].model.forward_head(fs[i], feats)
                    losses[i] = states[i].trainer.feeder.loss(logits, y)
                    accs[i] = (logits.argmax(1) == y).float().mean()
            bad = [i for i in live if not torch.isfinite(losses[i])]
            for i in bad:  # that run fails, as it would alone; the others go on
                tracks[i].error = NonFiniteLossError(f"epoch {epoch}: loss became {losses[i].item()} after "
                                                     f"{meters[i].n} samples")
                tracks[i].active = False
            live = [i for i in live if i not in bad]
            if not live:
                break
            optimizer.zero_grad(set_to_none=True)
            torch.stack([losses[i] for i in live]).sum().backward()
            optimizer.step()
            scheduler.step()
            for i in live:
                meters[i].update(len(batches[i][k]), loss=losses[i].item(), acc=accs[i].item())
        trunk.store(cnns)
        for i in live:
            st = states[i]
            va = st.validate(epoch)
            tracks[i].record(epoch_row(epoch, optimizer, st.with_train_size(meters[i].averages()), va,
                                       (time.perf_counter() - t0) / n))
        trunk.load(cnns)  # the re-estimated BatchNorm statistics, as a run alone continues from them
    seconds = time.perf_counter() - t_start
    results = []
    for t in tracks:
        if t.error is not None:
            results.append(t.st.fail(t.error))
            continue
        t.res.seconds = seconds / n  # the group's time, shared evenly: sums over runs stay the wall time
        results.append(t.st.finish(t.res, extra={"batched": n, "group_seconds": round(seconds, 2)}))
    return results

