"""The whole study on real data, as resumable stages: PRCC autoencoder -> CAM16 ResNet -> fusion-mode
pilot (validation only) -> fraction sweep -> report, with the wall time of each stage recorded.

    python scripts/study.py --config benchmarks/real_study/config.yaml [--set sweep.seeds=[0,1,2,3,4]]

The study config is YAML with the sections `prcc` (PRCCConfig), `cam16` (Cam16Config), `pilot` and
`sweep` (SweepConfig); strings may use `{shared}` (the shared data folder) and `{work}`. Checkpoints
and run folders go under `work` (git-ignored); the small outputs worth keeping (report, CSVs, plots,
results.jsonl, the pilot's choice, timings, machine, and the machine's speed at the start and the end
(`speed.json`, see `fusion.speed`)) are copied into `record`.

Every stage is skipped when its output exists, so rerunning the same command after an interruption
continues where it stopped. The pilot picks the fusion mode (besides `sum`) from the candidates by
mean VALIDATION macro-F1 with the test split never evaluated; the sweep then runs `sum` and that mode.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

from pretrain.utils import atomic_write_json

if TYPE_CHECKING:
    from .encoders import FeatureCache

CHECKPOINTS = {"prcc": "prcc_autoencoder.pt", "cam16": "cam16_resnet.pt"}  # encoder -> file in <work>/checkpoints
RECORD_FILES = {"report.md": "report.md", "results.csv": "results.csv", "per_class.csv": "per_class.csv",
                "paired.csv": "paired.csv", "metric_vs_fraction.png": "metric_vs_fraction.png",
                "results.jsonl": "results.jsonl", "config.yaml": "sweep_config.yaml"}  # sweep file -> record name


STUDY_KEYS = ("shared", "work", "record", "prcc", "cam16", "pilot", "sweep")


@dataclass
class PilotConfig:
    """The study's fusion-mode pilot: candidate modes of one arm, on validation only (`pilot:`)."""

    arm: str = "prcc+cam16"
    modes: list[str] = field(default_factory=list)  # candidate modes, e.g. [concat, gated]; [] = no pilot
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1])
    seeds: list[int] = field(default_factory=lambda: [0])


class SharedDataMissing(FileNotFoundError):
    """The real data folder is absent (users outside the team): the study cannot run."""


def _set(cfg: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    node = cfg
    for k in path:
        node = node.setdefault(k, {})
    node[last] = value


def load_study_config(path: str | os.PathLike, sets: list[str] = ()) -> dict:
    """Read the YAML study config and apply `section.key=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"study config {path} does not exist")
    cfg = yaml.safe_load(path.read_text()) or {}
    for s in sets:
        if "=" not in s:
            raise ValueError(f"--set expects section.key=value, got {s!r}")
        key, val = s.split("=", 1)
        _set(cfg, key.strip(), yaml.safe_load(val))
    unknown = sorted(set(cfg) - set(STUDY_KEYS))
    if unknown:
        raise ValueError(f"study config {path}: unknown key(s) {unknown}; valid keys: {list(STUDY_KEYS)}")
    for section in ("prcc", "cam16", "pilot", "sweep"):
        cfg.setdefault(section, {})
    return cfg


def _resolve(value, subs: dict[str, str]):
    """Fill `{shared}`/`{work}` in strings (recursively)."""
    if isinstance(value, str):
        for k, v in subs.items():
            value = value.replace("{" + k + "}", v)
        return value
    if isinstance(value, list):
        return [_resolve(v, subs) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, subs) for k, v in value.items()}
    return value


def _abs(p: str | os.PathLike) -> Path:
    """Relative paths of a study config are relative to the working directory, as for every command."""
    return Path(p).resolve()


def study_checkpoints(folder: str | os.PathLike) -> dict[str, Path]:
    """{"prcc": ..., "cam16": ...}: the encoder checkpoints a study run left in `folder`
    (`<work>/checkpoints`); raises FileNotFoundError naming the missing file and how to make it."""
    ck = {name: Path(folder) / file for name, file in CHECKPOINTS.items()}
    for path in ck.values():
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the study first (make real-study) or point "
                                    f"--checkpoints at the checkpoints folder of a study run")
    return ck


def machine_info() -> dict:
    """The machine a record was made on. The CPU's family/model and the vector instructions torch's kernels use
    are part of it: the same config gives slightly different numbers on CPUs whose kernels differ
    (`benchmarks/real_study/NOTES.md`, "Another CPU against the record")."""
    import torch

    cpu, info = platform.processor() or platform.machine(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "cpu family", "model") and key not in info:
                info[key] = value.strip()
            if not line.strip() and info:  # the first processor's block is enough
                break
    except OSError:
        pass
    return {"cpu": info.get("model name", cpu), "cpu_family": info.get("cpu family"), "cpu_model": info.get("model"),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


class _Timings:
    """Wall seconds per stage in `<work>/timings.json`, kept across resumed invocations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, done: bool, fn):
        if done:
            print(f"[study] {name}: already done ({self.data.get(name, {}).get('seconds', '?')} s), skipped")
            return None
        print(f"[study] {name}: starting", flush=True)
        t0 = time.perf_counter()
        out = fn()
        sec = round(time.perf_counter() - t0, 1)
        prev = self.data.get(name, {})
        self.data[name] = {"seconds": round(prev.get("seconds", 0.0) + sec, 1),
                           "invocations": prev.get("invocations", 0) + 1}
        atomic_write_json(self.path, self.data)
        print(f"[study] {name}: {sec:.0f} s", flush=True)
        return out


def _probe_speed(path: Path, at: str) -> None:
    """Append this machine's CPU speed now (ms per WBC CNN training step, `fusion.speed`) to `path`:
    a wall time on a shared machine only means something beside the speed the machine ran at."""
    from .speed import speed_probe

    probes = json.loads(path.read_text()) if path.is_file() else []
    probes.append({"at": at, **speed_probe()})
    atomic_write_json(path, probes)
    print(f"[study] machine speed ({at}): {probes[-1]['ms_per_step']} ms per CPU training step of the WBC CNN "
          f"(48 px, batch 64)", flush=True)


def _pilot(cfg: dict, sweep_kw: dict, work: Path, features: FeatureCache) -> dict:
    """Candidate fusion modes on the validation split only; returns {"chosen", "candidates": {...}}.
    `features` (a FeatureCache) keeps the frozen features it computes for the sweep."""
    from pretrain.config import config_from_dict

    from .data import load_wbc
    from .splits import load_split
    from .sweep import run_name
    from .train import RunConfig, train_run

    pilot = config_from_dict(PilotConfig, cfg["pilot"], source="study config", prefix="pilot.")
    modes, arm, fractions, seeds = pilot.modes, pilot.arm, pilot.fractions, pilot.seeds
    base = {k: v for k, v in sweep_kw.items() if k in RunConfig.__dataclass_fields__}
    base["runtime"] = {**base.get("runtime", {}), "eval_test": False, "progress": False, "curves": False}
    data = load_wbc(base["data"], base.get("image_size", 48), base.get("cache_dir") or None, progress=False,
                    classes=base.get("classes"), preprocess=base.get("preprocess") or ())
    split = load_split(base["split"])
    scores: dict[str, list[dict]] = {m: [] for m in modes}
    for mode in modes:
        for f in fractions:
            for s in seeds:
                name = run_name(f, arm, mode, s)
                rc = config_from_dict(RunConfig, {**base, "fraction": f, "arm": arm, "mode": mode, "seed": s,
                                                  "out": str(work / "pilot" / name)}, source="study config pilot")
                r = train_run(rc, data=data, split=split, features=features)
                scores[mode].append({"run": name, "fraction": f, "seed": s, "val_macro_f1": r["val_macro_f1"],
                                     "val_acc": r["val_acc"], "seconds": r["seconds"]})
                print(f"  pilot {name}: val macro-F1 {r['val_macro_f1']:.4f}", flush=True)
    means = {m: float(np.mean([x["val_macro_f1"] for x in v])) for m, v in scores.items()}
    chosen = max(modes, key=lambda m: means[m])
    return {"arm": arm, "fractions": fractions, "seeds": seeds, "criterion": "mean validation macro-F1",
            "mean_val_macro_f1": means, "chosen": chosen, "runs": scores}


def record_sweep(sweep_dir: Path, record: Path) -> None:
    """Copy a reported sweep's small outputs (tables, plots, results.jsonl, config) into `record`."""
    for name, dest in RECORD_FILES.items():
        if (sweep_dir / name).is_file():
            shutil.copy2(sweep_dir / name, record / dest)
    for png in sorted(sweep_dir.glob("confusion_*.png")):
        if png.name.split("_")[1] in ("0.01", "1"):  # the smallest and the full fraction
            shutil.copy2(png, record / png.name)


def run_study(cfg: dict) -> Path:
    """Run (or resume) every stage; return the record folder."""
    from pretrain.config import config_from_dict
    from pretrain.train_cam16 import Cam16Config, fit_cam16
    from pretrain.train_prcc import PRCCConfig, fit_prcc

    from .encoders import FeatureCache
    from .report import make_report
    from .sweep import SweepConfig, run_sweep

    shared = _abs(os.environ.get("WBC_SHARED_DATA") or cfg.get("shared", "../shared/data"))
    if not shared.is_dir():
        raise SharedDataMissing(f"the real data folder {shared} is absent, so the real study cannot run "
                                f"(set WBC_SHARED_DATA or `shared:` in the study config to where it is)")
    for key in ("work", "record"):
        if not cfg.get(key):
            raise ValueError(f"the study config needs `{key}:` (the folder for the {'run folders and checkpoints' if key == 'work' else 'small outputs worth keeping'})")
    work, record = _abs(cfg["work"]), _abs(cfg["record"])
    work.mkdir(parents=True, exist_ok=True)
    record.mkdir(parents=True, exist_ok=True)
    cfg = _resolve(copy.deepcopy(cfg), {"shared": str(shared), "work": str(work)})
    ckpt = {name: work / "checkpoints" / file for name, file in CHECKPOINTS.items()}
    timings = _Timings(work / "timings.json")
    _probe_speed(work / "speed.json", "start")

    prcc = config_from_dict(PRCCConfig, {**cfg["prcc"], "out": str(ckpt["prcc"]), "run_dir": str(work / "prcc")},
                            source="study config prcc")
    timings.run("prcc_autoencoder", ckpt["prcc"].is_file() and (work / "prcc" / "metrics.json").is_file(),
                lambda: fit_prcc(prcc))
    cam16 = config_from_dict(Cam16Config, {**cfg["cam16"], "out": str(ckpt["cam16"]), "run_dir": str(work / "cam16")},
                             source="study config cam16")
    timings.run("cam16_resnet", ckpt["cam16"].is_file() and (work / "cam16" / "metrics.json").is_file(),
                lambda: fit_cam16(cam16))

    sweep_kw = {**cfg["sweep"], "prcc_checkpoint": str(ckpt["prcc"]), "cam16_checkpoint": str(ckpt["cam16"]),
                "out": str(work / "sweep")}
    sweep_kw["split"] = str(_abs(sweep_kw.get("split", record / "split.json")))
    pilot_path = work / "pilot.json"
    features = FeatureCache()  # frozen features, shared by the pilot and the sweep
    modes = list(sweep_kw.get("modes", ["sum"]))
    if config_from_dict(PilotConfig, cfg["pilot"], source="study config", prefix="pilot.").modes:
        timings.run("pilot", pilot_path.is_file(),
                    lambda: atomic_write_json(pilot_path, _pilot(cfg, sweep_kw, work, features)))
        chosen = json.loads(pilot_path.read_text())["chosen"]
        modes = modes + [chosen] if chosen not in modes else modes
    # the pilot's runs of the chosen mode are sweep runs too: the sweep tests them instead of training them again
    sweep = config_from_dict(SweepConfig, {**sweep_kw, "modes": modes, "val_runs": str(work / "pilot")},
                             source="study config sweep")
    # resumes: finished runs are skipped; the pilot's frozen features are reused, not recomputed
    timings.run("sweep", False, lambda: run_sweep(sweep, features))
    timings.run("report", False, lambda: make_report(work / "sweep"))

    _probe_speed(work / "speed.json", "end")
    record_sweep(work / "sweep", record)
    for stage in ("prcc", "cam16"):
        if (work / stage / "metrics.json").is_file():
            shutil.copy2(work / stage / "metrics.json", record / f"{stage}_metrics.json")
    for name in ("pilot.json", "speed.json"):
        if (work / name).is_file():
            shutil.copy2(work / name, record / name)
    runs = [json.loads(line) for line in (work / "sweep" / "results.jsonl").read_text().splitlines() if line]
    timings.data["sweep_runs_sum"] = {"seconds": round(sum(r.get("seconds", 0) for r in runs), 1),
                                      "runs": len(runs)}
    atomic_write_json(record / "timings.json", timings.data)
    atomic_write_json(record / "machine.json", machine_info())
    print(f"[study] recorded outputs in {record}; total stage time "
          f"{sum(v['seconds'] for k, v in timings.data.items() if k != 'sweep_runs_sum') / 60:.1f} min")
    return record
