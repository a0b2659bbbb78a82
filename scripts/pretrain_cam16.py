"""Train the Camelyon16 ResNet tumor classifier (see fusion.commands.pretrain_cam16).

    python scripts/pretrain_cam16.py --help      (installed: wbc pretrain_cam16 --help)
    torchrun --nproc_per_node N scripts/pretrain_cam16.py ...   (data-parallel; see pretrain/distributed.py)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import pretrain_cam16 as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
