"""Pretrain the PRCC convolutional autoencoder on random crops of every image under --data.

    python scripts/pretrain_prcc.py --data DIR [--config FILE.yaml] [--image-size 64] [--epochs 30]
        [--batch-size 32] [--lr 1e-3] [--seed 0] [--device auto] [--out checkpoints/prcc_autoencoder.pt]

Every field of `pretrain.train_prcc.PRCCConfig` is a flag (`--help` lists them).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402
from pretrain.train_prcc import PRCCConfig, fit_prcc  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_config(PRCCConfig, argv, description=__doc__)
    metrics = fit_prcc(cfg)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    sys.exit(cli(main))
