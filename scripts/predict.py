"""Class probabilities of a trained model for unlabelled images (every image under a folder).

    python scripts/predict.py --checkpoint runs/one/best.pt --images DIR --out preds.csv

Images are decoded as in training, at the checkpoint's image size; unreadable ones are skipped with
a warning naming each. The CSV has one row per image: file, predicted_class, p_<class> per class.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.evaluate import PredictConfig, predict_images  # noqa: E402
from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = parse_config(PredictConfig, argv, description=__doc__)
    return predict_images(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
