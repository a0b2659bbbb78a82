"""Config dataclasses <-> YAML <-> argparse, shared by every script.

Precedence: dataclass defaults < `--config FILE.yaml` < explicit command-line flags.
Every field of the dataclass becomes a flag `--field-name`; the resolved config is saved beside the
run (`config.yaml`) so every number traces back to a file that reproduces it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .utils import atomic_write_text

T = TypeVar("T")


def _bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, str)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--name` flag per field of dataclass `cls`; default None means "not given"."""
    for f in dataclasses.fields(cls):
        t = _field_type(cls, f)
        origin = typing.get_origin(t)
        args = typing.get_args(t)
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if origin in (list, tuple) or t in (list, tuple):
            inner = args[0] if args else str
            if inner is type(Ellipsis):
                inner = str
            parser.add_argument(flag, dest=f.name, nargs="+", type=inner, default=None, help=helptext)
            continue
        if origin is typing.Union or origin is types.UnionType:
            non_none = [a for a in args if a is not type(None)]
            t = non_none[0] if non_none else str
        if t is bool:
            # `--flag` alone means true; `--flag false` still works
            parser.add_argument(flag, dest=f.name, type=_bool, nargs="?", const=True, default=None, metavar="BOOL",
                                help=helptext)
        elif t in (int, float, str):
            parser.add_argument(flag, dest=f.name, type=t, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=f.name, type=str, default=None, help=helptext)


def config_from_dict(cls: type[T], d: dict[str, Any], source: str = "config") -> T:
    """Build dataclass `cls` from a dict, rejecting unknown keys with a message listing valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
    return cls(**d)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a mapping of key: value, got {type(d).__name__}")
    return d


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "",
                 extra: typing.Callable[[argparse.ArgumentParser], None] | None = None,
                 ) -> tuple[T, argparse.Namespace]:
    """Parse `--config FILE.yaml` plus per-field overrides into a `cls` instance.

    Returns the config and the raw namespace (for flags added by `extra` that are not config fields).
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file of config values")
    add_dataclass_args(parser, cls)
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if ns.config:
        values.update(load_yaml(ns.config))
    for f in dataclasses.fields(cls):
        v = getattr(ns, f.name)
        if v is not None:
            values[f.name] = v
    cfg = config_from_dict(cls, values, source=ns.config or "command line")
    return cfg, ns


def to_plain(obj: Any) -> Any:
    """Dataclass / tuple / Path -> plain dicts, lists, str (safe for YAML, JSON and weights_only)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: to_plain(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    return obj


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    atomic_write_text(path, yaml.safe_dump(to_plain(cfg), sort_keys=False))


def start_run(run_dir: str | os.PathLike, cfg: Any, stale: tuple[str, ...] = ("log.jsonl",)) -> Path:
    """Create the run folder, remove files of an earlier (interrupted) run, save `config.yaml`.

    One run per folder: the per-epoch log and plots left by a killed run would otherwise mix
    with this run's. Returns the run folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    return run_dir
