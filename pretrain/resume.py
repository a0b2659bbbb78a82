"""Resumable pretraining runs: the run folder's training state, the config check, publishing the best.

A pretraining run folder holds, besides config.yaml, log.jsonl and plots:

    last.pt       the whole training state after the last finished epoch: model, optimizer, fit's own
                  counters and scheduler, the best weights so far, and every random stream (python,
                  numpy, torch CPU/CUDA, the DataLoader's shuffle generator, the augmentation's
                  generators; under torchrun, those of every rank). Rewritten atomically every epoch;
                  plain types, read with weights_only=True.
    best.pt       the best-on-validation checkpoint (a `save_checkpoint` file), rewritten on improvement.
    metrics.json  written last, when the run has finished; it describes best.pt.

Rerunning the same command continues after the last finished epoch; since every random stream is
restored, the final weights are identical to those of a run that was never interrupted. A finished
run is reused without training. `--out` is written only at the end, from best.pt, and only when it
is missing, holds a worse checkpoint of the same kind on the same data, or `overwrite` is set: a new
run never replaces a better model.

`overwrite` (config field, `--overwrite true`) means: replace `--out` whatever it holds, and start
over a run folder whose config or data differ. A run folder of the same config and data is still
resumed or reused, since starting it over would give the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError, describe_load_error, load_checkpoint
from .config import load_yaml, save_config, to_plain
from .utils import atomic_path, atomic_write_json

STATE_FORMAT = "wbc-fusion-train-state"
STATE_FILES = ("last.pt", "best.pt", "metrics.json")  # a run folder holding one of these holds a run
# Fields that do not change the trained weights: where the results go, whether progress is shown,
# the overwrite policy. The device is not compared as written ("auto" and "cuda" are the same run on
# a GPU machine) but by the type it resolved to, when resuming (see `open_run`).
NEUTRAL_FIELDS = ("out", "run_dir", "progress", "overwrite", "device")


class RunMismatchError(ValueError):
    """The run folder holds a run whose config or data differ from the requested one."""


def _fix(run_dir: Path) -> str:
    return f"pass --overwrite true to start over, or give another --run-dir than {run_dir}"


def config_diff(saved: dict, cfg: Any, neutral: tuple[str, ...] = NEUTRAL_FIELDS) -> list[str]:
    """'field: saved -> requested' for every result-changing field that differs.

    A field missing from `saved` (written by an older version) counts as its default value.
    """
    diffs = []
    for f in dataclasses.fields(cfg):
        if f.name in neutral:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        old, new = to_plain(saved.get(f.name, default)), to_plain(getattr(cfg, f.name))
        if old != new:
            diffs.append(f"{f.name}: {old!r} -> {new!r}")
    return diffs


def _clear(run_dir: Path) -> None:
    for name in (*STATE_FILES, "log.jsonl"):
        (run_dir / name).unlink(missing_ok=True)


def remove_temp_files(run_dir: Path, out: str | Path) -> None:
    """Remove temporary files that a killed process left behind (atomic writes' `.NAME.*.tmp`)."""
    out = Path(out)
    for p in [*run_dir.glob(".*.tmp"), *out.parent.glob(f".{out.name}.*.tmp")]:
        p.unlink(missing_ok=True)


def check_config(run_dir: str | Path, cfg: Any, neutral: tuple[str, ...] = NEUTRAL_FIELDS) -> Path:
    """Before any data is loaded: refuse a run folder that holds a run of another config.

    With `cfg.overwrite` that run is removed instead. Then config.yaml is (re)written.

    Raises:
        RunMismatchError: the folder's config.yaml differs in the fields named in the message.
        ValueError: `cfg.out` is one of the run folder's own files (a fresh start would delete it).
    """
    run_dir = Path(run_dir)
    if Path(cfg.out).resolve() in {(run_dir / n).resolve() for n in (*STATE_FILES, "config.yaml")}:
        raise ValueError(f"--out {cfg.out} is one of the run folder's own files, which a new run replaces; "
                         f"give --out a path outside {run_dir} (e.g. checkpoints/NAME.pt)")
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_temp_files(run_dir, cfg.out)
    if any((run_dir / n).exists() for n in STATE_FILES):
        saved = run_dir / "config.yaml"
        diffs = config_diff(load_yaml(saved), cfg, neutral) if saved.is_file() else ["config.yaml is missing"]
        if diffs and not cfg.overwrite:
            raise RunMismatchError(f"{run_dir} holds a run of another config ({'; '.join(diffs)}); {_fix(run_dir)}")
        if diffs:
            _clear(run_dir)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir


def open_run(run_dir: Path, cfg: Any, fingerprint: str, device: torch.device,
             world_size: int = 1) -> tuple[str, dict | None]:
    """What to do in a run folder whose config matches (after `check_config`), once the data are known.

    Returns ("done", metrics) for a finished run on the same data, ("resume", state) for a saved
    state on the same data and device type, else ("fresh", None) after removing stale files. A
    mismatch removes the old run when `cfg.overwrite`, else raises RunMismatchError. Resuming on
    another device type, or with another number of processes (`world_size`, torchrun's), is refused
    because its numbers would match neither setting's uninterrupted run.
    """
    metrics_path, last = run_dir / "metrics.json", run_dir / "last.pt"
    if metrics_path.is_file() and (run_dir / "best.pt").is_file():
        metrics = json.loads(metrics_path.read_text())
        old = metrics.get("fingerprint") or ""
        if not (old and fingerprint and old != fingerprint):
            return "done", metrics
        problem = f"its data changed since it finished (fingerprint {old} -> {fingerprint})"
    elif last.is_file():
        state = load_state(last)
        old = state.get("fingerprint") or ""
        if old and fingerprint and old != fingerprint:
            problem = f"its data changed since it was saved (fingerprint {old} -> {fingerprint})"
        elif state["device_type"] != device.type:
            problem = (f"it was trained on {state['device_type']} and cannot continue identically on "
                       f"{device.type} (pass --device {state['device_type']})")
        elif state.get("world_size", 1) != world_size:
            old_n = state.get("world_size", 1)
            how = "without torchrun" if old_n == 1 else f"e.g. torchrun --nproc_per_node {old_n}"
            problem = (f"it was trained by {old_n} process(es) and cannot continue identically with "
                       f"{world_size} (start {old_n}: {how})")
        else:
            return "resume", state
    else:
        _clear(run_dir)
        return "fresh", None
    if not cfg.overwrite:
        raise RunMismatchError(f"{run_dir} holds a run of this config but {problem}; {_fix(run_dir)}")
    _clear(run_dir)
    return "fresh", None


def rewrite_log(path: Path, history: list[dict]) -> None:
    """log.jsonl = exactly the resumed history (drops a row of an epoch that is redone)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in history))


def _rng_holders(obj: Any) -> list:
    """albumentations objects that own random streams: a Compose and each of its transforms hold a
    numpy Generator and a random.Random of their own, seeded from the Compose's seed."""
    if obj is None:
        return []
    own = [obj] if hasattr(obj, "random_generator") and hasattr(obj, "py_random") else []
    return own + [h for t in getattr(obj, "transforms", None) or [] for h in _rng_holders(t)]


def _py_state(r: random.Random | None = None) -> list:
    version, internal, gauss = (r or random).getstate()
    return [version, list(internal), gauss]


def _py_tuple(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])


def rng_state(generator: torch.Generator, augment: Any = None) -> dict:
    """Every random stream training draws from, as plain types (lists, ints, uint8 tensors)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": _py_state(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "loader": generator.get_state(),
            "augment": [{"numpy": h.random_generator.bit_generator.state, "python": _py_state(h.py_random)}
                        for h in _rng_holders(augment)]}


def set_rng_state(state: dict, generator: torch.Generator, augment: Any = None) -> None:
    random.setstate(_py_tuple(state["python"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["loader"])
    holders = _rng_holders(augment)
    if len(holders) != len(state["augment"]):
        raise ValueError(f"saved state has {len(state['augment'])} augmentation streams, this run "
                         f"{len(holders)}; the augmentation changed: pass --overwrite true to start over")
    for h, s in zip(holders, state["augment"], strict=True):
        h.random_generator.bit_generator.state = s["numpy"]
        h.py_random.setstate(_py_tuple(s["python"]))


def save_state(path: Path, fit_state: dict, *, cfg: Any, fingerprint: str, device: torch.device,
               model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               augment: Any = None, rank_rngs: list[dict] | None = None) -> None:
    """Write last.pt atomically: what `restore_state` needs to continue exactly after this epoch.

    `rank_rngs`: under torchrun, every rank's `rng_state`, in rank order (this process is rank 0).
    """
    state = {"format": STATE_FORMAT, "config": to_plain(cfg), "fingerprint": fingerprint or "",
             "device_type": device.type, "fit": fit_state, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "rng": rng_state(generator, augment),
             "world_size": len(rank_rngs) if rank_rngs else 1}
    if rank_rngs and len(rank_rngs) > 1:
        state["rank_rngs"] = rank_rngs
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: Path) -> dict:
    """Read last.pt with weights_only=True.

    Raises:
        CheckpointError: not a training state this package wrote (names the file and the fix).
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file gets the same one-line answer
        raise CheckpointError(f"{path} is not a loadable training state: {describe_load_error(e)}; "
                              f"delete it or pass --overwrite true to start this run over") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a training state of this package (format "
                              f"{STATE_FORMAT!r}); delete it or pass --overwrite true to start over")
    return state


def restore_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  generator: torch.Generator, augment: Any = None, rank: int = 0) -> dict:
    """Load model, optimizer and RNG states from last.pt; return fit's counters for `fit(resume=...)`.

    `rank`: under torchrun, this process's rank, whose own random streams are restored.

    Call it right before `fit`, after everything that draws random numbers in a fresh run too
    (model initialisation, splits), so that epoch k+1 sees the streams an uninterrupted run would.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rank_rngs"][rank] if "rank_rngs" in state else state["rng"], generator, augment)
    return state["fit"]


def _same_model(a: dict, b: dict) -> bool:
    """Same architecture and bit-identical weights (a rerun or resume rewrites an equal file)."""
    return (a.get("config") == b.get("config") and a["model"].keys() == b["model"].keys()
            and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]))


def _val_set(ckpt: dict) -> Any:
    data = ckpt.get("data", {})
    return data.get("val_images", (data.get("split") or {}).get("val"))


def publish(best: Path, out: str | Path, *, kind: str, metric: str, mode: str, overwrite: bool) -> tuple[bool, str]:
    """Copy the run's best checkpoint to `out` (atomically) unless `out` holds a better one.

    `out` is replaced when it is missing, when `overwrite` is set, or when it holds a checkpoint of
    `kind` on the same data (fingerprint) and validation set whose `metric` is worse. A checkpoint of
    other data, or a file that is not ours, is never compared and never replaced without `overwrite`.

    Returns:
        (whether `out` now holds this run's best, one line saying what was done and why).
    """
    out, best = Path(out), Path(best)
    new = load_checkpoint(best, kind=kind)
    new_v = float(new["metrics"].get(metric, math.nan))
    keep = f"this run's best stays in {best} (pass --overwrite true to replace {out}, or give another --out)"
    old, error = None, None
    if out.exists():
        try:
            old = load_checkpoint(out, kind=kind)
        except (CheckpointError, OSError) as e:
            error = e
    if old is not None and _same_model(old, new):
        return True, f"{out} already holds this run's model ({metric} {new_v:.6g})"
    if not out.exists():
        reason = "it did not exist"
    elif overwrite:
        reason = "overwrite is set"
    elif old is None:
        return False, f"kept {out}: {error}; {keep}"
    else:
        old_fp, new_fp = old.get("data", {}).get("fingerprint"), new["data"].get("fingerprint")
        old_v = old.get("metrics", {}).get(metric)
        if not old_fp or old_fp != new_fp or _val_set(old) != _val_set(new):
            what = f"fingerprint {old_fp} vs {new_fp}" if old_fp != new_fp else "another validation set"
            return False, f"kept {out}: it was validated on other data ({what}), so its {metric} is not comparable; {keep}"
        if not isinstance(old_v, (int, float)) or not math.isfinite(old_v):
            return False, f"kept {out}: it records no {metric} to compare with; {keep}"
        if not (new_v < old_v if mode == "min" else new_v > old_v):
            return False, f"kept {out}: its {metric} {old_v:.6g} is as good as or better than this run's {new_v:.6g}; {keep}"
        reason = f"this run's {metric} {new_v:.6g} beats its {old_v:.6g}"
    with atomic_path(out) as tmp:
        shutil.copyfile(best, tmp)
    return True, f"wrote {out} ({reason})"


def finish_run(run_dir: Path, cfg: Any, metrics: dict, *, kind: str, metric: str, mode: str,
               reused: bool = False) -> dict:
    """Publish best.pt to `cfg.out`, then write metrics.json (last: it marks the run finished).

    metrics.json describes best.pt; its "checkpoint" is `cfg.out` when that holds the same model,
    else best.pt itself, "out_note" says why. One line on stderr says what was done. A reused run's
    metrics.json is rewritten only when where its model lives changed (e.g. `--out` was deleted).
    """
    published, note = publish(run_dir / "best.pt", cfg.out, kind=kind, metric=metric, mode=mode,
                              overwrite=cfg.overwrite)
    where = {"checkpoint": str(cfg.out) if published else str(run_dir / "best.pt"), "published": published}
    changed = any(metrics.get(k) != v for k, v in where.items())
    metrics = {**metrics, **where, "out_note": note} if changed or not reused else metrics
    if changed or not reused:
        atomic_write_json(run_dir / "metrics.json", to_plain(metrics))
    what = f"reused the finished run in {run_dir} without training" if reused else f"finished {run_dir}"
    print(f"{kind}: {what}; {note}", file=sys.stderr, flush=True)
    return metrics
