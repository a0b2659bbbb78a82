"""Tile whole-slide images into one HDF5 patch store (see fusion.commands.extract_patches).

    python scripts/extract_patches.py --help      (installed: wbc extract_patches --help)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import extract_patches as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
