"""The real study, end to end and resumable: see fusion/study.py and RESULTS.md.

    python benchmarks/real_study/run.py [--config benchmarks/real_study/config.yaml] [--set key=value ...]

Skips with a message (exit 0) when the real data folder (../shared/data) is absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusion.study import SharedDataMissing, load_study_config, run_study  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).with_name("config.yaml")))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML), e.g. --set sweep.seeds=[0,1,2,3,4]")
    args = p.parse_args(argv)
    try:
        run_study(load_study_config(args.config, args.set))
    except SharedDataMissing as e:
        print(f"SKIP: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
