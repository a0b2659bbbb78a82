"""Train one fusion run (see fusion.commands.train_fusion).

    python scripts/train_fusion.py --help      (installed: wbc train_fusion --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import train_fusion as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
