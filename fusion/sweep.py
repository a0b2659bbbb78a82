"""A sweep: fractions x seeds x arms x fusion modes, each run in its own folder.

    python scripts/sweep.py --config configs/demo_sweep.yaml

`<out>/` receives `config.yaml` (the resolved sweep), `split.json` (made once if `split` is not given,
then reused), `runs/<run name>/` (see `fusion.train`) and `results.jsonl` (one line per finished run).
The data set is loaded once and the frozen features are computed once per encoder and reused by all
runs. Restarting the same command skips runs whose `metrics.json` exists, so an interrupted sweep
ends with the same results as an uninterrupted one. `scratch` has no fusion, so it runs once per
(fraction, seed) whatever `modes` holds.

The run list is deterministic and `run_one(spec, ctx)` trains one run from a `RunConfig` alone
(`ctx` only shares already-loaded data). `workers: N` trains N runs at once in spawned processes with
`worker_threads` torch threads each. On 2 CPU cores it finished whole real runs only 1.09x faster than
one run at a time on two threads (benchmarks/real_study/NOTES.md); it pays off with more
cores. A run's numbers depend on its thread count (recorded as `torch_threads`), not on which process
or in which order it ran. Each worker process computes the frozen features it needs once for itself.
`launcher: ray` trains the runs as Ray tasks instead, on this machine or a Ray cluster (fusion/launch.py).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from pretrain.config import save_config
from pretrain.raytasks import check_launcher
from pretrain.utils import append_jsonl, folder_lock, read_jsonl, rewrite_jsonl

from .data import WBCData, load_wbc
from .encoders import FeatureCache
from .external import check_external, evaluate_external
from .models import FUSIONS
from .sources import DEFAULT_ARMS, SourceError, config_key
from .splits import fraction_key, load_split, make_kfold_splits, save_split, split_indices
from .sweep_probes import run_sweep_probes
from .train import RunConfig, SettingsChangedError, plan_steps, prepare_split, settings_diff, train_run

RUN_ONLY = ("fraction", "arm", "mode", "seed", "val_run")  # RunConfig fields the sweep sets per run
LOCK = ".sweep.lock"  # held while a sweep runs in its folder: a second sweep there is refused


@dataclass
class SweepConfig(RunConfig):
    """RunConfig defaults for every run, plus the grid. `fraction`, `arm`, `mode`, `seed` are ignored
    (set per run from the lists); `out` is the sweep folder; `overwrite` empties it first."""

    out: str = field(default="runs/sweep", metadata={"help": "sweep folder"})
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 0.5, 1.0],
                                   metadata={"help": "label fractions of train"})
    arms: list[str] | dict = field(default_factory=lambda: [*DEFAULT_ARMS, "random"], metadata={
        "help": "arm names (defined in arm_sets, or random:<arm> twins), or in YAML a mapping name -> list "
                "of sources that defines and selects them at once, e.g. {scratch: [], imagenet: [r18]}"})
    twins: bool = field(default=True, metadata={
        "help": "add the random twin of every arm with sources that the grid lacks (the control)"})
    modes: list[str] = field(default_factory=lambda: ["sum"], metadata={"help": f"subset of {list(FUSIONS)}"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    progress_runs: bool = field(default=False, metadata={"help": "also show each run's epoch bar"})
    val_runs: str = field(default="", metadata={
        "help": "folder of validation-only runs named like the sweep's (the study's pilot): a sweep run found "
                "there with the same settings is tested from its weights instead of trained again"})
    workers: int = field(default=1, metadata={"help": "runs trained at once, each in its own process with "
                                                     "`worker_threads` torch threads; 1 = in this process"})
    worker_threads: int = field(default=1, metadata={"help": "torch threads per worker process (workers > 1) or "
                                                            "Ray task. CPU results depend on the thread count"})
    launcher: str = field(default="local", metadata={
        "help": "local: runs in this process or `workers` processes; ray: one Ray task per run (fusion/launch.py)"})
    ray_address: str = field(default="", metadata={
        "help": "Ray cluster for --launcher ray: auto (the one started on this node), HOST:6379; empty: "
                "$RAY_ADDRESS, else a local instance on this machine's CPUs"})
    batch_runs: int = field(default=1, metadata={
        "help": "train up to this many runs that differ only by seed at once, as one batched model (grouped "
                "convolutions, fusion/batched.py); 1 = one run at a time"})
    ray_cpus: float = field(default=1.0, metadata={"help": "CPUs each Ray task reserves"})
    ray_gpus: float = field(default=0.0, metadata={"help": "GPUs each Ray task reserves; a fraction (0.25) lets "
                                                           "tasks share a GPU"})
    probes: list[str] = field(default_factory=lambda: ["linear", "knn"], metadata={
        "help": "frozen-feature probes per source and fraction (linear, knn); [] for none"})
    folds: int = field(default=0, metadata={
        "help": "stratified k-fold cross-validation: k splits whose test parts are the k folds (duplicate groups "
                "never split), every run repeated per fold; 0 = one split"})
    external: dict = field(default_factory=dict, metadata={
        "help": "external labelled sets to score every run on, name -> folder (YAML), e.g. {bccd: "
                "../shared/data/bccd-wbc}: another lab's cells (fusion/external.py)"})
    rerun_changed: bool = field(default=False, metadata={
        "help": "train again the finished runs whose recorded settings differ from the requested ones "
                "(default: list them and stop)"})

    def __post_init__(self) -> None:
        if isinstance(self.arms, dict):  # {name: [sources]} defines the arms and selects them
            self.arm_sets = {**self.arm_sets, **{k: (dict(v) if isinstance(v, dict) else list(v))
                                                 for k, v in self.arms.items() if k != "scratch"}}
            self.arms = list(self.arms)
        super().__post_init__()
        reg = self.registry()
        bad_arms = []
        for a in self.arms:
            try:
                reg.arm(a)
            except SourceError as e:
                bad_arms.append((a, e))
        if bad_arms or not self.arms:
            detail = f": {bad_arms[0][1]}" if bad_arms else ""
            raise ValueError(f"unknown or undefined arm(s) {[a for a, _ in bad_arms]} in the sweep config{detail}")
        if self.twins:
            extra = [t for a in self.arms if (t := reg.twin(a)) and t not in self.arms]
            self.arms = [*self.arms, *extra]
        bad_modes = [m for m in self.modes if m not in FUSIONS]
        if bad_modes or not self.modes:
            raise ValueError(f"unknown fusion mode(s) {bad_modes} in the sweep config; "
                             f"valid modes: {list(FUSIONS)}")
        bad_f = [f for f in self.fractions if not 0 < float(f) <= 1]
        if bad_f or not self.fractions:
            raise ValueError(f"fractions must be in (0, 1], got {self.fractions}")
        if not self.seeds:
            raise ValueError("seeds must list at least one seed")
        self.external = check_external(self.external)
        if self.workers < 1 or self.worker_threads < 1:
            raise ValueError(f"workers and worker_threads must be >= 1, got {self.workers}, {self.worker_threads}")
        check_launcher(self.launcher)
        if self.batch_runs < 1:
            raise ValueError(f"batch_runs must be >= 1, got {self.batch_runs}")
        if self.ray_cpus < 0 or self.ray_gpus < 0:
            raise ValueError(f"ray_cpus and ray_gpus must be >= 0, got {self.ray_cpus}, {self.ray_gpus}")


@dataclass
class SweepContext:
    """What all runs of a sweep share: the loaded images, the split and the frozen-feature cache."""

    data: WBCData
    split: dict
    splits: dict[str, dict] = field(default_factory=dict)  # split file -> split, one per fold (k-fold mode)
    features: FeatureCache = field(default_factory=FeatureCache)


def run_name(fraction: float, arm: str, mode: str, seed: int, fold: int | None = None,
             fused: bool | None = None) -> str:
    """`f0.01_prcc_sum_s0`; the mode is left out for arms without sources (`fused` False; default: scratch)."""
    fused = arm != "scratch" if fused is None else fused
    return (f"f{fraction_key(fraction)}_{arm}" + (f"_{mode}" if fused else "") + f"_s{seed}"
            + ("" if fold is None else f"_k{fold}"))


def run_specs(cfg: SweepConfig) -> list[RunConfig]:
    """The deterministic run list: (fold,) fraction, then seed, then arm, then mode (scratch once per seed)."""
    base = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)}
    reg = cfg.registry()
    specs = []
    for fold in (range(cfg.folds) if cfg.folds else [None]):
        if fold is not None:
            base["split"] = str(fold_path(cfg.out, fold))
        for fraction in cfg.fractions:
            for seed in cfg.seeds:
                for arm in cfg.arms:
                    for mode in (cfg.modes if reg.arm(arm).sources else cfg.modes[:1]):  # no sources: no fusion
                        name = run_name(fraction, arm, mode, seed, fold, fused=bool(reg.arm(arm).sources))
                        twin = Path(cfg.val_runs) / name if cfg.val_runs else None
                        specs.append(RunConfig(**{
                            **base, "fraction": float(fraction), "arm": arm, "mode": mode, "seed": int(seed),
                            "out": str(Path(cfg.out) / "runs" / name), "overwrite": False,
                            **{k: dataclasses.replace(getattr(cfg, k)) for k in ("model", "optim", "augment")},
                            "runtime": dataclasses.replace(cfg.runtime, progress=cfg.progress_runs),
                            "val_run": str(twin) if twin and twin.is_dir() else ""}))
    return specs


def run_one(spec: RunConfig, ctx: SweepContext | None = None) -> dict:
    """Train (or, when finished before, read back) one run."""
    if ctx is None:
        return train_run(spec)
    return train_run(spec, data=ctx.data, split=ctx.splits.get(spec.split, ctx.split), features=ctx.features)


def run_unit(unit: list[RunConfig], ctx: SweepContext | None = None) -> list[dict]:
    """Train one unit of work (`fusion.batched.make_units`): a run alone, or a group of runs trained at once
    as one batched model; the seam every launcher maps (this process, worker processes, Ray tasks)."""
    if len(unit) == 1:
        return [run_one(unit[0], ctx)]
    from .batched import train_group

    if ctx is None:
        return train_group(unit)
    return train_group(unit, ctx.data, ctx.splits.get(unit[0].split, ctx.split), ctx.features)


_WORKER_CTX: SweepContext | None = None  # set in each worker process by _init_worker


def worker_context(cfg: SweepConfig, split_paths: list[str]) -> SweepContext:
    """A worker's own context (a pool process or a Ray task): its torch thread count fixed to
    `worker_threads`, the images loaded from the decode-once cache and the splits from the driver's files."""
    import torch

    torch.set_num_threads(cfg.worker_threads)
    data = load_wbc(cfg.data, cfg.image_size, cfg.cache_dir or None, progress=False, classes=cfg.classes,
                    preprocess=cfg.preprocess)
    splits = {p: load_split(p) for p in split_paths}
    return SweepContext(data, next(iter(splits.values())), splits=splits)


def _init_worker(cfg: SweepConfig, split_paths: list[str]) -> None:
    """Worker process start: load its context once."""
    global _WORKER_CTX
    _WORKER_CTX = worker_context(cfg, split_paths)


def _run_in_worker(unit: list[RunConfig]) -> list[dict]:
    return run_unit(unit, _WORKER_CTX)


def _results(todo: list[RunConfig], cfg: SweepConfig, ctx: SweepContext, split_paths: list[str]):
    """Yield each todo run's result: in order in this process, or as they finish across `cfg.workers`
    processes (spawned, so a CUDA context or threads of this process are never forked) or Ray tasks.
    With `batch_runs` > 1 the runs go in units of up to that many runs trained at once (fusion/batched.py)."""
    from .batched import make_units

    units = make_units(todo, cfg.batch_runs)
    if cfg.launcher == "ray":
        from .launch import ray_results

        yield from ray_results(units, cfg, split_paths)
        return
    if cfg.workers == 1:
        for unit in units:
            yield from run_unit(unit, ctx)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(cfg.workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                             initargs=(cfg, split_paths)) as pool:
        for fut in as_completed([pool.submit(_run_in_worker, unit) for unit in units]):
            yield from fut.result()


def planned_work(todo: list[RunConfig], split: dict, data: WBCData, splits: dict | None = None) -> dict[str, int]:
    """Run name -> training images it will process (batch size x steps; 0 for a run tested from the
    pilot's weights). The ETA weighs runs by it: a 1,500-step run counts for about twice an 800-step one."""
    n_train = {(s.split, s.fraction): len(split_indices((splits or {}).get(s.split, split), data, "train", s.fraction))
               for s in todo}
    work = {}
    for spec in todo:
        bs, steps, evals = plan_steps(n_train[(spec.split, spec.fraction)], spec)
        work[Path(spec.out).name] = 0 if spec.val_run else bs * steps * evals
    return work


def _check_checkpoints(cfg: SweepConfig) -> None:
    """Every source file the grid's arms need exists, before any work; the error names the arms."""
    reg = cfg.registry()
    needed = {s for a in cfg.arms for s in reg.arm(a).sources}
    for s in sorted(needed):
        path = reg.sources[s].path
        if not path or not Path(path).is_file():
            users = [a for a in cfg.arms if s in reg.arm(a).sources]
            raise FileNotFoundError(f"arms {users} need the {s} encoder, but {config_key(reg.sources[s])} "
                                    f"{path!r} does not exist; "
                                    f"train or fetch it first, or drop those arms")
    import torch

    from .models import build_classifier

    for a in dict.fromkeys(cfg.arms):  # an architecture arm builds (size, weights file) before any run trains
        if (spec := reg.arm(a).backbone) is not None:
            try:
                with torch.random.fork_rng(devices=[]):
                    build_classifier(spec, 2, cfg.image_size, 0.0, ())
            except (ValueError, OSError) as e:
                raise type(e)(f"arm {a!r}: {e}") from e


def _clear(folder: Path, keep: tuple[str, ...]) -> None:
    import shutil

    for p in folder.iterdir():
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _changed_runs(specs: list[RunConfig]) -> dict[str, list[str]]:
    """Run folder -> settings that differ, for every finished run not made with its requested settings."""
    changed = {}
    for spec in specs:
        if (Path(spec.out) / "metrics.json").is_file() and (diff := settings_diff(spec, spec.out)):
            changed[spec.out] = diff
    return changed


def _refuse_changed(out: Path, changed: dict[str, list[str]], n_finished: int) -> SettingsChangedError:
    fields = sorted({d.split(":")[0] for diffs in changed.values() for d in diffs})
    first, diffs = next(iter(changed.items()))
    return SettingsChangedError(
        f"{len(changed)} of {n_finished} finished runs in {out} were made with other settings than requested "
        f"(fields {', '.join(fields)}; e.g. {Path(first).name}: {'; '.join(diffs[:3])}); give --rerun-changed "
        f"true to train those runs again with the new settings, or use another --out")


def fold_path(out: str | Path, fold: int) -> Path:
    return Path(out) / f"split_fold{fold}.json"


def _fold_splits(cfg: SweepConfig, data: WBCData, out: Path) -> dict[str, dict]:
    """k-fold mode: {split file: split} for the k folds, made once (`make_kfold_splits`) and then reused."""
    if not cfg.folds:
        return {}
    paths = [fold_path(out, i) for i in range(cfg.folds)]
    if all(p.is_file() for p in paths):
        return {str(p): load_split(p) for p in paths}
    made = make_kfold_splits(data, cfg.folds, val=cfg.val, fractions=cfg.fractions, seed=cfg.split_seed)
    for p, sp in zip(paths, made, strict=True):
        save_split(sp, p)
    return {str(p): sp for p, sp in zip(paths, made, strict=True)}


def _load(cfg: SweepConfig, out: Path) -> tuple[WBCData, dict]:
    """The sweep's images (from the decode-once cache) and its split (made once, then reused)."""
    data = load_wbc(cfg.data, cfg.image_size, cfg.cache_dir or None, progress=cfg.runtime.progress, classes=cfg.classes,
                    preprocess=cfg.preprocess)
    return data, prepare_split(cfg, data, Path(cfg.split) if cfg.split else out / "split.json", cfg.fractions)


def _score_external(cfg: SweepConfig, out: Path, results_path: Path) -> None:
    if cfg.external:
        evaluate_external(out, cfg.external, read_jsonl(results_path), cfg.cache_dir or None, cfg.runtime.device,
                          cfg.runtime.eval_batch_size)


def run_sweep(cfg: SweepConfig, features: FeatureCache | None = None) -> Path:
    """Run every missing run of the grid; return the path of `results.jsonl`.

    A finished run is reused only when its recorded `config.yaml` matches the requested settings (but for
    `RESULT_FREE` fields); otherwise the sweep lists what differs and stops, unless `rerun_changed`.
    The folder is locked while the sweep runs, so a second sweep on it is refused.

    `features`: a frozen-feature cache to start from (the study passes the pilot's, so the sweep does not
    compute the same encoders' features again); in worker mode each worker keeps its own.
    """
    _check_checkpoints(cfg)
    out = Path(cfg.out)
    with folder_lock(out, LOCK):
        return _run_sweep(cfg, out, features)


def _run_sweep(cfg: SweepConfig, out: Path, features: FeatureCache | None) -> Path:
    if cfg.overwrite:
        _clear(out, keep=(LOCK,))
    specs = run_specs(cfg)
    results_path = out / "results.jsonl"
    changed = _changed_runs(specs)
    n_finished = sum((Path(s.out) / "metrics.json").is_file() for s in specs)
    if changed and not cfg.rerun_changed:
        raise _refuse_changed(out, changed, n_finished)
    if changed:
        names = {Path(k).name for k in changed}
        rewrite_jsonl(results_path, [r for r in read_jsonl(results_path) if r.get("run") not in names])
        specs = [dataclasses.replace(s, overwrite=True) if s.out in changed else s for s in specs]
        print(f"sweep {out}: training {len(changed)} finished runs again with the new settings")
    save_config(cfg, out / "config.yaml")  # only now: every run it will hold matches it
    logged = {r.get("run") for r in read_jsonl(results_path)}
    todo = []
    for spec in specs:
        done = (Path(spec.out) / "metrics.json").is_file() and not spec.overwrite
        if done and Path(spec.out).name not in logged:  # killed between metrics.json and the append
            append_jsonl(results_path, {**run_one(spec), "run_dir": str(Path(spec.out).relative_to(out))})
        if not done:
            todo.append(spec)
    n_done = len(specs) - len(todo)
    print(f"sweep {out}: {len(specs)} runs, {n_done} already finished, {len(todo)} to go")
    features = features if features is not None else FeatureCache()
    if not todo:
        if not cfg.folds:
            run_sweep_probes(cfg, out, features, lambda: _load(cfg, out))
        _score_external(cfg, out, results_path)
        return results_path

    t0 = time.perf_counter()
    data, split = _load(cfg, out)
    splits = _fold_splits(cfg, data, out)
    ctx = SweepContext(data, split, splits=splits, features=features)
    split_paths = list(splits) or [str(Path(cfg.split) if cfg.split else out / "split.json")]
    print(f"data: {len(data)} images at {cfg.image_size}px from {data.root} ({time.perf_counter() - t0:.1f} s)")
    bar = tqdm(total=len(specs), initial=n_done, desc="runs", unit="run", disable=not cfg.runtime.progress,
               dynamic_ncols=True)
    work = planned_work(todo, split, data, splits)
    done_work, t_runs = 0, time.perf_counter()
    for i, r in enumerate(_results(todo, cfg, ctx, split_paths)):
        append_jsonl(results_path, {**r, "run_dir": str(Path("runs") / r["run"])})
        left = len(todo) - i - 1
        done_work += work.get(r["run"], 0)
        elapsed = time.perf_counter() - t_runs  # per image trained so far, times the images still to train
        eta = (elapsed / done_work * (sum(work.values()) - done_work) if done_work
               else elapsed / (i + 1) * left)
        bar.update(1)
        msg = (f"{r['run']}: macro-F1 {r['macro_f1']:.3f}" if r["status"] == "ok"
               else f"{r['run']}: FAILED ({r.get('reason', '')[:60]})")
        bar.set_postfix_str(f"{msg} | {n_done + i + 1} done, {left} left, ETA {eta / 60:.1f} min")
        if not cfg.runtime.progress:
            print(f"[{n_done + i + 1}/{len(specs)}] {msg} | {left} left, ETA {eta / 60:.1f} min", flush=True)
    bar.close()
    if not cfg.folds:  # probes run on the one split; in k-fold mode they are left out
        run_sweep_probes(cfg, out, ctx.features, lambda: (data, split))
    _score_external(cfg, out, results_path)
    print(f"sweep finished in {(time.perf_counter() - t0) / 60:.1f} min: {results_path}")
    return results_path
