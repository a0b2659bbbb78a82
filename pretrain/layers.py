"""What every model of the package shares: the ImageNet normalisation constants and one explicit init."""

from __future__ import annotations

import math

from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def group_norm(channels: int, groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with `groups` groups, or the largest divisor of `channels` below it."""
    return nn.GroupNorm(math.gcd(channels, groups), channels)


def layer_norm(channels: int) -> nn.GroupNorm:
    """LayerNorm over channels and space of a (B, C, H, W) map: GroupNorm with one group."""
    return nn.GroupNorm(1, channels)


# the normalisation layer of a conv block by name: batch statistics (the default), or none (group, layer),
# a known point of failure when another lab's images shift the statistics
NORMS = {"batch": nn.BatchNorm2d, "group": group_norm, "layer": layer_norm}


def kaiming_init(module: nn.Module) -> None:
    """Initialise every layer of `module` from scratch, explicitly (He et al. 2015).

    Convolutions: `kaiming_normal_(mode="fan_out", nonlinearity="relu")` (what torchvision does too);
    norm layers (batch, group, layer): weight 1, bias 0; linear layers: `kaiming_normal_` with fan_in
    and a linear gain (std = 1/sqrt(fan_in)) and bias 0, so initial logits are O(1).
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
