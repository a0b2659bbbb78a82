"""Write the report of a sweep folder: report.md, results.csv, per_class.csv, paired.csv and PNGs.

    python scripts/report.py runs/demo_sweep

Prints the headline table (macro-F1 and accuracy, mean ± 95% CI over seeds), one verdict per
fraction, and the path of report.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.report import ReportConfig, run_report  # noqa: E402
from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    cfg, ns = parse_config(ReportConfig, argv, description=__doc__,
                           extra=lambda p: p.add_argument("sweep_dir", nargs="?", default=None,
                                                          help="sweep folder (same as --run-dir)"))
    if ns.sweep_dir:
        cfg.run_dir = ns.sweep_dir
    return run_report(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
