"""Imbalance options: focal loss and a class-balanced sampler, beside the class weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fusion_fakes import nest, synthetic_wbc

from fusion.train import RunConfig, _batches, focal_loss, train_run


@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss_with_gamma_0_is_cross_entropy_and_down_weights_easy_examples(weighted):
    torch.manual_seed(0)
    logits, y = torch.randn(16, 5), torch.randint(0, 5, (16,))
    w = torch.rand(5) + 0.5 if weighted else None
    ce = F.cross_entropy(logits, y, weight=w, label_smoothing=0.05)
    assert torch.allclose(focal_loss(logits, y, w, gamma=0.0, label_smoothing=0.05), ce, atol=1e-6)
    easy = torch.zeros(1, 5)
    easy[0, 2] = 8.0  # confidently right
    assert focal_loss(easy, torch.tensor([2]), gamma=2.0) < 1e-3 * F.cross_entropy(easy, torch.tensor([2]))


def test_balanced_sampler_draws_every_class_about_equally():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2] * 1)
    rows = torch.cat(_batches(100, 50, 60, torch.Generator().manual_seed(0), labels))
    share = torch.bincount(labels[rows], minlength=3).double() / len(rows)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.03)
    again = torch.cat(_batches(100, 50, 60, torch.Generator().manual_seed(0), labels))
    assert torch.equal(rows, again)  # seeded


def test_runs_with_focal_loss_and_balanced_sampler_train_and_record_the_options(tmp_path):
    data = synthetic_wbc(8, 16)
    base = nest(data="/synthetic", cache_dir="", val=0.25, test=0.25, image_size=16, cnn_channels=[8],
                epochs=2, min_steps=10, max_steps=0, evals=1, batch_size=16, progress=False, curves=False,
                device="cpu")
    plain = train_run(RunConfig(**{**base, "out": str(tmp_path / "plain")}), data=data)
    opts = {**base, "optim": {**base["optim"], "loss": "focal", "sampler": "balanced"}}
    other = train_run(RunConfig(**{**opts, "out": str(tmp_path / "focal")}), data=data)
    assert plain["status"] == other["status"] == "ok"
    assert plain["test_loss"] != other["test_loss"]  # the options change training
    assert "sampler: balanced" in (tmp_path / "focal" / "config.yaml").read_text()
    with pytest.raises(ValueError, match=r"optim.loss must be one of \['ce', 'focal'\]"):
        RunConfig(**{**base, "optim": {"loss": "dice"}})
    with pytest.raises(ValueError, match="optim.sampler"):
        RunConfig(**{**base, "optim": {"sampler": "smote"}})
