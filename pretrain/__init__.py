"""Histology side: data, WSI tiling, autoencoder, ResNet, training, checkpoints, shared helpers."""

from .checkpoint import CheckpointError, load_checkpoint, load_encoder, save_checkpoint
from .utils import get_device, seed_everything

__all__ = ["CheckpointError", "get_device", "load_checkpoint", "load_encoder", "save_checkpoint",
           "seed_everything"]
__version__ = "0.1.0"
