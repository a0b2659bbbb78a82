"""Make the WBC split with nested label fractions (see fusion.commands.make_split).

    python scripts/make_split.py --help      (installed: wbc make_split --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import make_split as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
