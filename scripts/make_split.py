"""Make the one WBC train/val/test split with nested label fractions, saved as JSON.

    python scripts/make_split.py --data ../shared/data/pbc-wbc --out data/split.json --image-size 64 --seed 0
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.splits import SplitConfig, run_make_split  # noqa: E402
from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(SplitConfig, argv, description=__doc__)
    run_make_split(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
