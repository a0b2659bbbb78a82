"""ConvAutoencoder: shapes over configurations, encode, validation errors, the registered builder."""

from __future__ import annotations

import pytest
import torch

from pretrain.autoencoder import AEConfig, ConvAutoencoder, build_autoencoder
from pretrain.checkpoint import _BUILDERS


@pytest.mark.parametrize("depth,base_width,latent,size", [
    (1, 4, 8, 8),
    (2, 8, 16, 32),
    (3, 4, 5, 24),
    (4, 2, 3, 16),
])
def test_shapes(depth, base_width, latent, size):
    torch.manual_seed(0)
    cfg = AEConfig(base_width=base_width, depth=depth, latent_channels=latent, input_size=size)
    model = ConvAutoencoder(cfg).eval()
    x = torch.rand(2, 3, size, size)
    r = model(x)
    assert r.shape == (2, 3, size, size)
    assert r.dtype == torch.float32 and 0.0 <= r.min() and r.max() <= 1.0
    z = model.encode(x)
    assert z.shape == (2, latent) and model.out_dim == latent
    assert model.forward_features(x).shape == (2, latent, size // 2**depth, size // 2**depth)
    # fully convolutional: any multiple of 2**depth runs, encode stays (B, latent)
    assert model(torch.rand(1, 3, 2 * size, 2 * size)).shape == (1, 3, 2 * size, 2 * size)
    assert model.encode(torch.rand(1, 3, 2 * size, 2 * size)).shape == (1, latent)


def test_defaults_and_input_spec():
    model = ConvAutoencoder()
    assert isinstance(model.encoder, torch.nn.Module) and isinstance(model.decoder, torch.nn.Module)
    spec = model.input_spec()
    assert spec == {"size": 64, "channels": 3, "range": [0, 1], "mean": [0.485, 0.456, 0.406],
                    "std": [0.229, 0.224, 0.225]}
    sd = model.state_dict()
    assert "mean" in sd and "std" in sd  # normalisation travels with the weights


def test_normalisation_is_inside_forward():
    """Changing the mean buffer changes the output: the model normalises its own [0, 1] input."""
    torch.manual_seed(0)
    model = ConvAutoencoder(AEConfig(base_width=4, depth=2, latent_channels=4, input_size=16)).eval()
    x = torch.rand(1, 3, 16, 16)
    a = model.encode(x)
    model.mean.fill_(0.0)
    assert not torch.allclose(a, model.encode(x))


@pytest.mark.parametrize("kwargs,field", [
    ({"input_size": 30, "depth": 3}, "input_size"),
    ({"depth": 0}, "depth"),
    ({"base_width": -4}, "base_width"),
    ({"latent_channels": 0}, "latent_channels"),
    ({"mean": (0.5, 0.5)}, "mean"),
    ({"std": (0.0, 1.0, 1.0)}, "std"),
])
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AEConfig(**kwargs)


def test_bad_input_shape():
    model = ConvAutoencoder(AEConfig(base_width=4, depth=2, latent_channels=4, input_size=16))
    with pytest.raises(ValueError, match=r"\(B, 3, S, S\)"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="multiples of 2\\*\\*depth"):
        model(torch.rand(1, 3, 18, 18))


def test_builder_registered():
    assert "prcc_autoencoder" in _BUILDERS
    m = build_autoencoder({"base_width": 4, "depth": 2, "latent_channels": 6, "input_size": 16,
                           "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]})  # lists, as stored
    assert m.out_dim == 6 and m.cfg.mean == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="unknown key"):
        build_autoencoder({"widht": 4})
