"""Pretrain the PRCC convolutional autoencoder (see fusion.commands.pretrain_prcc).

    python scripts/pretrain_prcc.py --help      (installed: wbc pretrain_prcc --help)
    torchrun --nproc_per_node N scripts/pretrain_prcc.py ...   (data-parallel; see pretrain/distributed.py)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fusion.commands import pretrain_prcc as main  # noqa: E402
from pretrain.cli import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli(main))
