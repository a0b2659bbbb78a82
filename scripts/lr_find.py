"""Learning-rate range test (see fusion.commands.lr_find).

    python scripts/lr_find.py --help      (installed: wbc lr_find --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import lr_find as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
