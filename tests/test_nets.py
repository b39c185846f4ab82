"""Encoders and decoders read the input shape: every net fits every image size."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from ae_lab.nets import activation, build_decoder, build_encoder, build_latent_head, output_function


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 64, 64), (1, 9, 7)])
@pytest.mark.parametrize("latent", ["deterministic", "gaussian"])
@pytest.mark.parametrize("kernel_size,fc_dims", [(3, []), (4, [12]), (5, [])])
def test_decoder_output_matches_input_shape(arch, shape, latent, kernel_size, fc_dims):
    cfg = OmegaConf.create(dict(arch=arch, latent=latent, latent_dim=6, hidden_dims=[20],
                                channels=[4, 8], kernel_size=kernel_size, fc_dims=fc_dims,
                                activation="relu", code_activation="none"))
    encoder, features = build_encoder(cfg, shape)
    head = build_latent_head(cfg, features)
    decoder = build_decoder(cfg, shape)
    x = torch.rand(3, *shape)
    h = encoder(x)
    assert h.shape == (3, features)
    latent_out = head(h)
    assert latent_out.z.shape == (3, 6)
    assert decoder(latent_out.z).shape == (3, *shape)


def test_locatello_conv_encoder_has_the_papers_layers():
    """Locatello et al. (2019), Table 1: conv 32x4x4 s2, 32x4x4 s2, 64x4x4 s2, 64x4x4 s2, FC 256, FC 2x10
    on 64x64x1 images; parameters counted by hand from those shapes."""
    cfg = OmegaConf.create(dict(arch="conv", latent="gaussian", latent_dim=10, hidden_dims=[], fc_dims=[256],
                                channels=[32, 32, 64, 64], kernel_size=4, activation="relu"))
    encoder, features = build_encoder(cfg, (1, 64, 64))
    head = build_latent_head(cfg, features)
    convs = [m for m in encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (1, 32, (4, 4), (2, 2)), (32, 32, (4, 4), (2, 2)), (32, 64, (4, 4), (2, 2)), (64, 64, (4, 4), (2, 2))]
    by_hand = (16 * 1 * 32 + 32) + (16 * 32 * 32 + 32) + (16 * 32 * 64 + 64) + (16 * 64 * 64 + 64) \
        + (4 * 4 * 64 * 256 + 256) + (256 * 20 + 20)
    assert sum(p.numel() for p in [*encoder.parameters(), *head.parameters()]) == by_hand
    decoder = build_decoder(cfg, (1, 64, 64))
    assert decoder(torch.zeros(2, 10)).shape == (2, 1, 64, 64)


def test_gaussian_head_draws_z_with_the_posteriors_mean_and_variance():
    """z = mean + exp(logvar / 2) * eps: over 200,000 draws per unit, the sample mean and variance of z are
    the posterior's (standard errors about 0.002 and 0.003 of the variance), for variances from e^-2 to e^1
    (the variance taken for the standard deviation, exp(logvar), would give e^-4 to e^2)."""
    head = build_latent_head(OmegaConf.create(dict(latent="gaussian", latent_dim=4)), features=1)
    mean, logvar = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([-2.0, 0.0, 1.0, -0.5])
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.cat([mean, logvar]))
    torch.manual_seed(0)
    latent = head(torch.zeros(200_000, 1))
    torch.testing.assert_close(latent.mean[0], mean)
    torch.testing.assert_close(latent.logvar[0], logvar)
    assert torch.equal(latent.code, latent.mean)
    torch.testing.assert_close(head.code(torch.zeros(3, 1)), mean.expand(3, 4))  # the code: the mean, no draw
    torch.testing.assert_close(latent.z.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(latent.z.var(0) / logvar.exp(), torch.ones(4), atol=0.015, rtol=0)


def test_each_activation_and_output_name_computes_its_function():
    x = torch.linspace(-3, 3, 13)
    expected = {"relu": torch.relu(x), "leaky_relu": torch.where(x > 0, x, 0.01 * x),
                "elu": torch.where(x > 0, x, torch.exp(x) - 1), "gelu": 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
                "silu": x * torch.sigmoid(x), "tanh": torch.tanh(x), "sigmoid": 1 / (1 + torch.exp(-x)), "none": x}
    for name, values in expected.items():
        torch.testing.assert_close(activation(name)(x), values, msg=name)
    torch.testing.assert_close(output_function("sigmoid")(x), 1 / (1 + torch.exp(-x)))
    assert torch.equal(output_function("linear")(x), x)


@pytest.mark.parametrize("kernel_size", [3, 4, 5])
def test_stride_two_convolutions_halve_each_side(kernel_size):
    """'Same'-style padding: an odd kernel keeps ceil(n / 2) of a side at stride 2, an even one floor(n / 2)."""
    cfg = OmegaConf.create(dict(arch="conv", channels=[2, 2], kernel_size=kernel_size, fc_dims=[], activation="relu"))
    encoder, _ = build_encoder(cfg, (1, 28, 27))
    x, sizes = torch.zeros(1, 1, 28, 27), []
    for layer in encoder:
        x = layer(x)
        if isinstance(layer, torch.nn.Conv2d):
            sizes.append(tuple(x.shape[-2:]))
    half = (lambda n: -(-n // 2)) if kernel_size % 2 else (lambda n: n // 2)
    assert sizes == [(half(28), half(27)), (half(half(28)), half(half(27)))]


def test_mlp_layers_follow_hidden_dims_and_the_decoder_mirrors_them():
    cfg = OmegaConf.create(dict(arch="mlp", latent="deterministic", latent_dim=3, hidden_dims=[20, 10],
                                activation="relu", code_activation="none"))
    encoder, features = build_encoder(cfg, (1, 8, 8))
    decoder = build_decoder(cfg, (1, 8, 8))

    def shapes(net: torch.nn.Module) -> list[tuple[int, int]]:
        return [(layer.in_features, layer.out_features) for layer in net if isinstance(layer, torch.nn.Linear)]

    assert (shapes(encoder), features) == ([(64, 20), (20, 10)], 10)
    assert shapes(decoder) == [(3, 10), (10, 20), (20, 64)]


def test_the_conv_decoder_is_its_encoders_mirror_with_an_activation_between_levels_and_logits_out():
    """Locatello et al. (2019), Table 1's decoder: FC, then 4x4 stride-2 up-convolutions 64, 32, 32 and the
    image's channels, ReLU after each but the last, whose outputs are the logits."""
    cfg = OmegaConf.create(dict(arch="conv", latent="gaussian", latent_dim=10, hidden_dims=[], fc_dims=[256],
                                channels=[32, 32, 64, 64], kernel_size=4, activation="relu"))
    decoder = build_decoder(cfg, (1, 64, 64))
    convs = [i for i, m in enumerate(decoder) if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(decoder[i].in_channels, decoder[i].out_channels) for i in convs] == [(64, 64), (64, 32), (32, 32), (32, 1)]
    assert convs[-1] == len(decoder) - 1  # nothing after the last up-convolution
    assert all(isinstance(decoder[i + 1], torch.nn.ReLU) for i in convs[:-1])
