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
        hed: stain jitter in HED space (Tellez et al. 2018): each image's haematoxylin, eosin and DAB
            optical densities are scaled by U(1 - hed, 1 + hed) and shifted by U(-hed, hed); 0 = off
            (then no random numbers are drawn for it, so runs without it are unchanged).
    """

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (0.8, 1.25)
    rotate: float = 180.0
    hflip: float = 0.5
    vflip: float = 0.5
    color: float = 0.15
    hed: float = 0.0


def _hed_matrices(device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from skimage.color import hed_from_rgb, rgb_from_hed  # Ruifrok & Johnston's stain vectors

    return (torch.as_tensor(hed_from_rgb, device=device, dtype=dtype),
            torch.as_tensor(rgb_from_hed, device=device, dtype=dtype))


def hed_jitter(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> the same images with stain densities s' = alpha * s + beta, where s are
    the HED optical densities of skimage's `rgb2hed` (alpha, beta: (B, 3)), mapped back as `hed2rgb` does.
    alpha 1, beta 0 is `hed2rgb(rgb2hed(x))`: the identity wherever no stain density is negative."""
    to_hed, to_rgb = _hed_matrices(x.device, x.dtype)
    log_adjust = math.log(1e-6)
    od = torch.log(x.clamp(min=1e-6)) / log_adjust  # (B, 3, H, W), 0 = white
    stains = torch.einsum("bchw,cd->bdhw", od, to_hed).clamp(min=0)  # as rgb2hed
    stains = stains * alpha[:, :, None, None] + beta[:, :, None, None]
    rgb = torch.exp(torch.einsum("bdhw,dc->bchw", stains, to_rgb) * log_adjust)
    return rgb.clamp(0.0, 1.0)


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
    out = out.clamp_(0.0, 1.0)
    if cfg.hed > 0:
        alpha = _uniform(b * 3, 1 - cfg.hed, 1 + cfg.hed, g).view(b, 3).to(x.device, x.dtype)
        beta = _uniform(b * 3, -cfg.hed, cfg.hed, g).view(b, 3).to(x.device, x.dtype)
        out = hed_jitter(out, alpha, beta)
    return out
