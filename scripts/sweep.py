"""Run a fusion sweep: label fractions x arms x seeds (x fusion modes), one folder per run.

    python scripts/sweep.py --config configs/demo_sweep.yaml [--seeds 0 1 2] [--overwrite true]

Every field of `fusion.sweep.SweepConfig` (the grid plus every `RunConfig` default) is a flag
(`--help` lists them). Re-running the same command resumes: finished runs are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.sweep import SweepConfig, run_sweep  # noqa: E402
from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    cfg, _ = parse_config(SweepConfig, argv, description=__doc__)
    return run_sweep(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
