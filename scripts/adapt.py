"""Few-shot adaptation to another lab (see fusion.commands.adapt).

    python scripts/adapt.py --help      (installed: wbc adapt --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import adapt as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
