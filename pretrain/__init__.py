"""Histology side: data, WSI tiling, autoencoder, ResNet, training, checkpoints, shared helpers.

Top-level names are imported lazily (PEP 562) so that light users, e.g. slide-tiling worker
processes, do not pay for importing torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "CheckpointError": "pretrain.checkpoint",
    "load_checkpoint": "pretrain.checkpoint",
    "load_encoder": "pretrain.checkpoint",
    "save_checkpoint": "pretrain.checkpoint",
    "get_device": "pretrain.utils",
    "seed_everything": "pretrain.utils",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pretrain' has no attribute {name!r}")
