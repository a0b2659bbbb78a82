"""Encode a folder of images with a trained encoder checkpoint and write the features to HDF5.

    python scripts/extract_features.py --checkpoint checkpoints/prcc_ae.pt --images DIR --out features.h5
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.features import FeatureConfig, run_extract_features  # noqa: E402
from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(FeatureConfig, argv, description=__doc__)
    run_extract_features(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
