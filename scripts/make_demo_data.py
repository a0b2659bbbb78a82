"""Generate the synthetic demo data set (see fusion.commands.make_demo_data).

    python scripts/make_demo_data.py --help      (installed: wbc make_demo_data --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import make_demo_data as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
