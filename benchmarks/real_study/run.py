"""The real study, end to end and resumable (see fusion/study.py and RESULTS.md):

    python benchmarks/real_study/run.py [--set key=value ...]   # = scripts/study.py --config <this folder>/config.yaml

Skips with a message (exit 0) when the real data folder (../shared/data) is absent.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fusion.commands import study  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(study, ["--config", str(Path(__file__).with_name("config.yaml")), *sys.argv[1:]]))
