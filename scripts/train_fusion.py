"""Train one fusion run (one fraction, arm, mode and seed) into its own folder.

    python scripts/train_fusion.py --data DIR --arm prcc+cam16 --mode sum --fraction 0.1 --seed 0 \
        --out runs/one [--config FILE.yaml] [--overwrite true]

Every field of `fusion.train.RunConfig` is a flag (`--help` lists them).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.train import RunConfig, run  # noqa: E402
from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_config(RunConfig, argv, description=__doc__)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
