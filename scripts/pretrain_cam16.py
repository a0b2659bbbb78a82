"""Train the Camelyon16 ResNet tumor-vs-normal classifier on patches split by slide.

    python scripts/pretrain_cam16.py --data PATCHES [--config FILE.yaml] [--arch resnet18]
        [--image-size 96] [--epochs 10] [--batch-size 64] [--lr 1e-3] [--weight-decay 1e-4]
        [--val-slides S ...] [--test-slides S ...] [--weights-path LOCAL.pth] [--seed 0] [--device auto]
        [--out checkpoints/cam16_resnet.pt] [--run-dir runs/cam16]

PATCHES: our HDF5 patch store (.h5), a PatchCamelyon file or folder, or a folder with normal/ and
tumor/ subfolders of `<slide>_<x>_<y>.png` patches. Every field of
`pretrain.train_cam16.Cam16Config` is a flag (`--help` lists them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402
from pretrain.train_cam16 import Cam16Config, fit_cam16  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_config(Cam16Config, argv, description=__doc__)
    metrics = fit_cam16(cfg)
    print(json.dumps(metrics["test"]))
    return metrics


if __name__ == "__main__":
    sys.exit(cli(main))
