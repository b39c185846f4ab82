"""Encoders and decoders read the input shape: every net fits every image size."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ae_lab.nets import build_decoder, build_encoder, build_latent_head


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 64, 64), (1, 9, 7)])
@pytest.mark.parametrize("latent", ["deterministic", "gaussian"])
def test_decoder_output_matches_input_shape(arch, shape, latent):
    cfg = OmegaConf.create(dict(arch=arch, latent=latent, latent_dim=6, hidden_dims=[20],
                                channels=[4, 8], kernel_size=3, activation="relu",
                                code_activation="none"))
    encoder, features = build_encoder(cfg, shape)
    head = build_latent_head(cfg, features)
    decoder = build_decoder(cfg, shape)
    x = torch.rand(3, *shape)
    h = encoder(x)
    assert h.shape == (3, features)
    latent_out = head(h)
    assert latent_out.z.shape == (3, 6)
    assert decoder(latent_out.z).shape == (3, *shape)
