"""Config dataclasses <-> YAML <-> argparse, shared by every script.

Precedence: dataclass defaults < `--config FILE.yaml` < explicit command-line flags.
Every field of the dataclass becomes a flag `--field-name`; a field that is itself a dataclass is a
section (a nested mapping in YAML, dotted flags `--section.field-name`). Every value is checked
against its field's type when it is loaded. The resolved config is saved beside the run
(`config.yaml`) so every number traces back to a file that reproduces it.
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


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage block of 40 flags hides the line that matters)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (--help lists the flags)\n")


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, str)


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> list[str]:
    """Add one `--name` flag per field of dataclass `cls`; default None means "not given".

    A field that is itself a dataclass (a config section) gets dotted flags, `--section.name`.
    Returns the dotted paths of every flag added (their argparse `dest`).
    """
    dests = []
    for f in dataclasses.fields(cls):
        t = _field_type(cls, f)
        origin = typing.get_origin(t)
        args = typing.get_args(t)
        if origin is typing.Union or origin is types.UnionType:  # on the command line, the first type
            t = next(a for a in args if a is not type(None))
            origin, args = typing.get_origin(t), typing.get_args(t)
        dest = prefix + f.name
        if dataclasses.is_dataclass(t):
            dests += add_dataclass_args(parser, t, prefix=dest + ".")
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        dests.append(dest)
        if origin in (list, tuple) or t in (list, tuple):
            inner = args[0] if args else str
            if inner is type(Ellipsis):
                inner = str
            parser.add_argument(flag, dest=dest, nargs="+", type=inner, default=None, help=helptext)
        elif t is bool:
            # `--flag` alone means true; `--flag false` still works
            parser.add_argument(flag, dest=dest, type=_bool, nargs="?", const=True, default=None, metavar="BOOL",
                                help=helptext)
        elif t in (int, float, str):
            parser.add_argument(flag, dest=dest, type=t, default=None, help=helptext)
        else:
            parser.add_argument(flag, dest=dest, type=str, default=None, help=helptext)
    return dests


def _set_dotted(values: dict, dotted: str, value: Any) -> None:
    """values["a"]["b"] = value for "a.b" (sections created or copied as needed)."""
    *path, last = dotted.split(".")
    node = values
    for k in path:
        child = node.get(k)
        node[k] = dict(child) if isinstance(child, dict) else {}
        node = node[k]
    node[last] = value


class ConfigError(ValueError):
    """A config value of the wrong type or an unknown key; the message names the key and the fix."""


def _type_name(t: Any) -> str:
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(inner[0], _type_name(inner[0]))}" if inner else "a list"
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if dataclasses.is_dataclass(t):
        return f"a mapping ({t.__name__})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a mapping"}.get(t, getattr(t, "__name__", str(t)))


def _shown(v: Any) -> str:
    return f"the string {v!r}" if isinstance(v, str) else f"{type(v).__name__} {v!r}"


def check_value(value: Any, t: Any, key: str, source: str) -> Any:
    """`value` checked against (and, where lossless, converted to) the type hint `t`.

    Lossless conversions only: an int for a float field, a numeric string for a float field (PyYAML
    reads `1e-3` without a dot as a string), a tuple for a list. Everything else of the wrong type is a
    ConfigError naming `source`, the key, the value and the expected type: a quoted "false" for a bool
    would otherwise be truthy, `epochs: 2.7` would be truncated, `arms: scratch` iterated letter by letter.
    """
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{source}: {key} must be {_type_name(t)}, got {_shown(value)}{extra}")

    if t is Any:
        return value
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return check_value(value, a, key, source)
            except ConfigError as e:
                errors.append(e)
        raise bad()
    if origin in (list, tuple) or t in (list, tuple):
        if not isinstance(value, (list, tuple)):
            hint = f" (write [{value}] for a list of one)" if isinstance(value, (str, int, float)) else ""
            raise bad(hint)
        inner = [a for a in args if a is not Ellipsis]
        items = [check_value(v, inner[0], f"{key}[{i}]", source) if inner else v for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or t is tuple) else items
    if origin is dict or t is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    if dataclasses.is_dataclass(t):
        if dataclasses.is_dataclass(value) and isinstance(value, t):
            return value
        if not isinstance(value, dict):
            raise bad()
        return config_from_dict(t, value, source=source, prefix=f"{key}.")
    if t is bool:
        if isinstance(value, bool):
            return value
        hint = " (remove the quotes)" if isinstance(value, str) and value.lower() in ("true", "false") else ""
        raise bad(hint)
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if t is str:
        if isinstance(value, str):
            return value
        raise bad(" (quote it)" if isinstance(value, (int, float)) else "")
    return value


def config_from_dict(cls: type[T], d: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from a dict, every value checked against its field's type.

    Unknown keys are rejected with the valid ones listed; nested dataclass fields take nested mappings
    (their keys named `section.key` in messages).

    Raises:
        ConfigError: an unknown key or a value of the wrong type.
    """
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the config'} must be a mapping of key: value, "
                          f"got {_shown(d)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    hints = typing.get_type_hints(cls)
    if unknown:
        sections = {k: t for k, t in hints.items() if dataclasses.is_dataclass(t)}
        moved = [f"{k} is now {prefix}{s}.{k}" for k in unknown for s, t in sections.items()
                 if k in {f.name for f in dataclasses.fields(t)}]
        raise ConfigError(f"{source}: unknown key(s) {[prefix + k for k in unknown]} for {cls.__name__}"
                          + (f" ({'; '.join(moved)})" if moved else "") + f"; valid keys: {sorted(fields)}")
    values = {k: check_value(v, hints.get(k, Any), prefix + k, source) for k, v in d.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{source}: {e}") from e


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
    parser = _Parser(description=description, allow_abbrev=False,
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML file of config values")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    dests = add_dataclass_args(parser, cls)
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if ns.config:
        values.update(load_yaml(ns.config))
    for dest in dests:  # flags override YAML, key by key inside a section too
        v = getattr(ns, dest)
        if v is not None:
            _set_dotted(values, dest, v)
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
