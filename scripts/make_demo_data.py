"""Generate the synthetic demo data set (WBC JPEGs, PRCC PNGs, CAM16 pyramidal TIFFs + ASAP XML).

    python scripts/make_demo_data.py --out data/demo --seed 0 [--small] [--force]

An existing set with the same seed and sizes is kept (pass --force to regenerate); the set is built
in a temporary folder and renamed at the end, so an interrupted run leaves no half set.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402
from pretrain.demo import DemoConfig, make_demo_data  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    cfg, _ = parse_config(DemoConfig, argv, description=__doc__)
    make_demo_data(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
