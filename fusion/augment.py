"""Batched tensor augmentation: RandomResizedCrop + flips + rotation in ONE affine resample, plus
brightness/contrast/saturation jitter. Runs on whatever device the batch is on (CPU or GPU), with
its randomness drawn from an explicit `torch.Generator` so runs are reproducible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugConfig:
    """Augmentation strengths.

    Attributes:
        scale: (min, max) fraction of the image area kept by the random resized crop.
        ratio: (min, max) aspect ratio of the crop (sampled log-uniformly).
        rotate: maximum rotation in degrees (uniform in [-rotate, rotate]); 180 = any angle.
        hflip, vflip: probability of a horizontal / vertical flip.
        color: brightness, contrast and saturation factors drawn from [1 - color, 1 + color].
    """

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (0.8, 1.25)
    rotate: float = 180.0
    hflip: float = 0.5
    vflip: float = 0.5
    color: float = 0.15


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment(x: torch.Tensor, cfg: AugConfig, g: torch.Generator) -> torch.Tensor:
    """(B, 3, S, S) float in [0, 1] -> augmented (B, 3, S, S) float in [0, 1], same device.

    Random numbers are drawn on the CPU from `g` (so CPU and GPU runs see the same parameters).
    """
    b = x.shape[0]
    area = _uniform(b, cfg.scale[0], cfg.scale[1], g)
    log_r = _uniform(b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), g)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - w) * _uniform(b, -1, 1, g)  # crop centre in [-1, 1] coordinates
    cy = (1 - h) * _uniform(b, -1, 1, g)
    ang = torch.deg2rad(_uniform(b, -cfg.rotate, cfg.rotate, g))
    fx = torch.where(torch.rand(b, generator=g) < cfg.hflip, -1.0, 1.0)
    fy = torch.where(torch.rand(b, generator=g) < cfg.vflip, -1.0, 1.0)
    cos, sin = torch.cos(ang), torch.sin(ang)
    # output (u, v) -> input: centre + R(ang) @ diag(w * fx, h * fy) @ (u, v)
    theta = torch.stack([
        torch.stack([cos * w * fx, -sin * h * fy, cx], dim=1),
        torch.stack([sin * w * fx, cos * h * fy, cy], dim=1),
    ], dim=1)  # (B, 2, 3)
    jitter = [_uniform(b, 1 - cfg.color, 1 + cfg.color, g) for _ in range(3)]
    theta = theta.to(x.device, x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.color > 0:
        bright, contrast, sat = (j.to(x.device, x.dtype).view(b, 1, 1, 1) for j in jitter)
        out = out * bright
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        out = (out - mean) * contrast + mean
        gray = (0.299 * out[:, 0:1] + 0.587 * out[:, 1:2] + 0.114 * out[:, 2:3])
        out = gray + (out - gray) * sat
    return out.clamp_(0.0, 1.0)
