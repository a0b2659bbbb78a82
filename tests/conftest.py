"""Shared fixtures. Real data lives in ../shared/data (beside the project); tests that need it skip
with a message when it is absent, because users outside the team do not have it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("WBC_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def require_shared(*parts: str) -> Path:
    """Path under ../shared/data, or skip the test saying what is missing."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found at {p} (the team's ../shared/data is absent on this machine; "
                    f"set WBC_SHARED_DATA to point at it)")
    return p


@pytest.fixture
def shared_data():
    return require_shared


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small demo data set generated once per test session (all three sources, real formats)."""
    from pretrain.demo import generate_demo_data

    out = tmp_path_factory.mktemp("demo")
    generate_demo_data(out, seed=0, small=True)
    return out
