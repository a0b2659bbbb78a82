"""Score a trained model on a labelled folder of class folders (another lab's images, a test set).

    python scripts/evaluate.py --checkpoint runs/one/best.pt --data ../shared/data/bccd-wbc \
        [--out DIR] [--device auto] [--batch-size 128]

Writes metrics.json, predictions.csv and confusion.png into --out (default:
<checkpoint folder>/eval_<data folder name>/) and prints a per-class table. Class folders are matched
to the model's classes by name, case-insensitively; images of classes the model does not know are
counted and left out, and macro-F1 averages over the classes present in the data.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.evaluate import EvalConfig, run_evaluate  # noqa: E402
from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    cfg, _ = parse_config(EvalConfig, argv, description=__doc__)
    return run_evaluate(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
