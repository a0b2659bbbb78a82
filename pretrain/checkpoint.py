"""One self-describing checkpoint format for every model of the project.

A checkpoint is a dict of plain types, loadable with `torch.load(path, weights_only=True)`:

    {
      "format":  "wbc-fusion-checkpoint",
      "kind":    "prcc_autoencoder" | "cam16_resnet" | "wbc_fusion" | ...,
      "config":  {...}   # the model's constructor arguments (plain dict)
      "model":   state_dict,
      "metrics": {...},  # e.g. best validation loss
      "data":    {...},  # training-data fingerprint, counts, source folder
      "input":   {"size": int, "channels": 3, "range": [0, 1], "mean": [...], "std": [...]},
      "train":   {...},  # the full training config (optional)
      "version": package version,
    }

Every model takes float RGB in [0, 1] of shape (B, 3, size, size) and applies its own normalisation
(`input.mean`/`input.std`) inside `forward`, so a checkpoint is usable without outside knowledge.

Model kinds register a builder with `register_kind`; `build_model(ckpt)` rebuilds any registered kind
from the file alone, and `load_encoder(path)` returns it frozen with `encode(x) -> (B, D)`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import to_plain
from .utils import atomic_path

FORMAT = "wbc-fusion-checkpoint"

# kind -> builder(config_dict) -> nn.Module.  Modules register themselves on import; `_KIND_MODULES`
# says which module to import for a kind so that loading works without importing it first.
_BUILDERS: dict[str, Callable[[dict], nn.Module]] = {}
_KIND_MODULES = {
    "prcc_autoencoder": "pretrain.autoencoder",
    "cam16_resnet": "pretrain.resnet",
}
ENCODER_KINDS = ("prcc_autoencoder", "cam16_resnet")


class CheckpointError(ValueError):
    """A file that is not one of our checkpoints, or is of another kind than expected."""


def register_kind(kind: str, module: str | None = None):
    """Decorator: register `builder(config: dict) -> nn.Module` for checkpoint kind `kind`."""

    def deco(fn: Callable[[dict], nn.Module]):
        _BUILDERS[kind] = fn
        if module is not None:
            _KIND_MODULES.setdefault(kind, module)
        return fn

    return deco


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("wbc-fusion")
    except Exception:
        return "0+unknown"


def save_checkpoint(path: str | os.PathLike, *, kind: str, config: Any, model: nn.Module | dict,
                    input_spec: dict, metrics: dict | None = None, data: dict | None = None,
                    train: Any = None) -> Path:
    """Write a checkpoint atomically (temp file + rename): an interrupted save keeps the old file."""
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    ckpt = {
        "format": FORMAT,
        "kind": kind,
        "config": to_plain(config),
        "model": state,
        "metrics": to_plain(metrics or {}),
        "data": to_plain(data or {}),
        "input": to_plain(input_spec),
        "train": to_plain(train) if train is not None else {},
        "version": _version(),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def describe_load_error(e: BaseException) -> str:
    """One line saying why `torch.load` failed, keeping the words of torch's message that explain it.

    torch's weights_only refusal is a paragraph of advice with the reason ("Unsupported global: ...")
    near its end, so cutting it to a prefix loses the reason; some errors (EOFError of a file cut
    short) have no message at all and are named by their type.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch bolds part of its message with ANSI codes
    m = re.search(r"WeightsUnpickler error:\s*(.+?)(?=\s*Please use|\n\s*\n|$)", text, flags=re.DOTALL)
    if m:
        reason = " ".join(m.group(1).split()).rstrip(".")
        if reason.startswith("Unsupported global"):
            return f"it contains Python objects that weights_only=True refuses to load ({reason})"
        return f"the weights_only=True unpickler cannot read it ({reason})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = f": {lines[0][:200]}" if lines else " (no message: the file is probably cut short)"
    return f"{type(e).__name__}{detail}"


def load_checkpoint(path: str | os.PathLike, kind: str | tuple[str, ...] | None = None,
                    map_location: str | torch.device = "cpu") -> dict:
    """Load and validate a checkpoint with `weights_only=True`.

    Raises:
        FileNotFoundError: the file does not exist.
        CheckpointError: not a torch file, not our format, or of another kind than `kind`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is not a loadable torch checkpoint: the file is empty (0 bytes, e.g. "
                              f"left by a copy that was cut short); delete it and train or copy it again")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    # the weights_only unpickler raises KeyError/IndexError/... on arbitrary bytes (e.g. a text file)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError,
            KeyError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a loadable torch checkpoint: {describe_load_error(e)}; "
                              f"expected a file written by this package's save_checkpoint") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        what = (f"a dict with keys {sorted(ckpt)[:8]}" if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}")
        raise CheckpointError(f"{path} is not a wbc-fusion checkpoint: it holds {what}; "
                              f"expected a dict with format={FORMAT!r} (written by save_checkpoint)")
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if ckpt.get("kind") not in kinds:
            raise CheckpointError(f"{path} is a {ckpt.get('kind')!r} checkpoint; expected kind "
                                  f"{' or '.join(repr(k) for k in kinds)}")
    return ckpt


def build_model(ckpt: dict, source: str = "checkpoint") -> nn.Module:
    """Rebuild the model of a loaded checkpoint from its kind and config, with its weights."""
    kind = ckpt["kind"]
    if kind not in _BUILDERS and kind in _KIND_MODULES:
        importlib.import_module(_KIND_MODULES[kind])
    if kind not in _BUILDERS:
        raise CheckpointError(f"{source}: no model builder registered for kind {kind!r}; "
                              f"known kinds: {sorted(set(_BUILDERS) | set(_KIND_MODULES))}")
    model = _BUILDERS[kind](ckpt["config"])
    if ckpt.get("model") is not None:  # None: architecture only, fresh initialisation
        model.load_state_dict(ckpt["model"])
    return model


def freeze(model: nn.Module) -> nn.Module:
    """eval() mode and no gradients; also pins train() so a parent's .train() cannot unfreeze BN."""
    model.eval()
    model.requires_grad_(False)
    model.train = lambda mode=True: model  # type: ignore[method-assign]  # frozen stays in eval
    return model


def load_encoder(path: str | os.PathLike, kind: str | tuple[str, ...] = ENCODER_KINDS,
                 map_location: str | torch.device = "cpu", random_init: bool = False,
                 seed: int | None = None) -> nn.Module:
    """Rebuild a pretrained model from its checkpoint alone and return it frozen.

    The returned module has `encode(x) -> (B, D)` for x float RGB in [0, 1] of shape
    (B, 3, S, S), S = `module.input_size`; `module.out_dim` is D and `module.kind` the checkpoint kind.

    `random_init=True` builds the same architecture with fresh random weights (seeded by `seed`)
    instead of the trained ones: the control that has the parameters but no pretrained knowledge.
    """
    ckpt = load_checkpoint(path, kind=kind, map_location=map_location)
    if random_init:
        if seed is not None:
            torch.manual_seed(seed)
        ckpt = {**ckpt, "model": None}
    model = build_model(ckpt, source=str(path))
    if not hasattr(model, "encode"):
        raise CheckpointError(f"{path}: kind {ckpt['kind']!r} has no encode(); it cannot be used as an encoder")
    model.kind = ckpt["kind"]
    model.input_size = int(ckpt["input"].get("size", 0))
    model.checkpoint_path = str(path)
    model.pretrained = not random_init
    return freeze(model)
