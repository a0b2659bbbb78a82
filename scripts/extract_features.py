"""Encode a folder of images with an encoder checkpoint (see fusion.commands.extract_features).

    python scripts/extract_features.py --help      (installed: wbc extract_features --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import extract_features as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
