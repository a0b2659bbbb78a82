"""Tile whole-slide images into one HDF5 patch store (labels from ASAP XML annotations).

    python scripts/extract_patches.py --slides data/demo/cam16/slides --annotations data/demo/cam16/annotations \
        --out data/cam16_patches.h5 --patch-size 256 --mpp 0.5 --workers 2

Prints a per-slide summary; writes an overlay PNG per slide to <out>_overlays/. Exit status 1 when
any slide failed: the others are still extracted into a new --out, but an existing --out is never
replaced by a store with fewer slides (see pretrain/extract_job.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pretrain.cli import cli  # noqa: E402
from pretrain.config import parse_config  # noqa: E402
from pretrain.extract import ExtractConfig  # noqa: E402
from pretrain.extract_job import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_config(ExtractConfig, argv, description=__doc__)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(cli(main))
