"""Score a trained model on a labelled folder (see fusion.commands.evaluate).

    python scripts/evaluate.py --help      (installed: wbc evaluate --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import evaluate as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
