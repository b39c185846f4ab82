"""Encoder, latent-head and decoder builders. Each reads the input shape, so every net fits every data set.

Decoders return logits; the reconstruction is `sigmoid(logits)` (data lie in [0, 1]).
Configs arrive as plain strings and numbers (the module's saved hyperparameters).
Nothing here mixes examples within a batch (no batch norm), so per-example Jacobians stay exact.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from omegaconf import DictConfig
from torch import nn


_ACTIVATIONS = {
    "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU,
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "none": nn.Identity,
}


def activation(name: str) -> nn.Module:
    return _ACTIVATIONS[name]()


def conv_sizes(side: int, layers: int) -> list[int]:
    """Side lengths through `layers` stride-2 convolutions with 'same' padding: ceil-halving."""
    sizes = [side]
    for _ in range(layers):
        sizes.append(math.ceil(sizes[-1] / 2))
    return sizes


def build_encoder(cfg: DictConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """Return the encoder (images -> features h of shape (B, F)) and F."""
    act = cfg.activation
    if cfg.arch == "mlp":
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for hidden in cfg.hidden_dims:
            layers += [nn.Linear(width, hidden), activation(act)]
            width = hidden
        return nn.Sequential(*layers), width
    channels, height, width = input_shape
    layers = []
    for out_channels in cfg.channels:
        layers += [nn.Conv2d(channels, out_channels, cfg.kernel_size, stride=2,
                             padding=cfg.kernel_size // 2), activation(act)]
        channels = out_channels
    layers.append(nn.Flatten())
    depth = len(cfg.channels)
    features = channels * conv_sizes(height, depth)[-1] * conv_sizes(width, depth)[-1]
    return nn.Sequential(*layers), features


def build_decoder(cfg: DictConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """Return the decoder: codes (B, latent_dim) -> logits of shape (B, *input_shape)."""
    act = cfg.activation
    if cfg.arch == "mlp":
        layers: list[nn.Module] = []
        width = cfg.latent_dim
        for hidden in reversed(cfg.hidden_dims):
            layers += [nn.Linear(width, hidden), activation(act)]
            width = hidden
        layers += [nn.Linear(width, math.prod(input_shape)), nn.Unflatten(1, tuple(input_shape))]
        return nn.Sequential(*layers)
    image_channels, height, width = input_shape
    depth = len(cfg.channels)
    heights, widths = conv_sizes(height, depth), conv_sizes(width, depth)
    channels = list(cfg.channels)
    layers = [nn.Linear(cfg.latent_dim, channels[-1] * heights[-1] * widths[-1]), activation(act),
              nn.Unflatten(1, (channels[-1], heights[-1], widths[-1]))]
    targets = [image_channels] + channels[:-1]
    for level in range(depth, 0, -1):
        # a transposed stride-2 conv gives 2*in - 1 + output_padding: pad to hit the encoder's size
        pad = (heights[level - 1] - (2 * heights[level] - 1), widths[level - 1] - (2 * widths[level] - 1))
        layers.append(nn.ConvTranspose2d(channels[level - 1], targets[level - 1], cfg.kernel_size,
                                         stride=2, padding=cfg.kernel_size // 2, output_padding=pad))
        if level > 1:
            layers.append(activation(act))
    return nn.Sequential(*layers)


class Latent(NamedTuple):
    z: torch.Tensor  # what the decoder reads
    code: torch.Tensor  # the representation penalties act on: z, or the posterior mean
    mean: torch.Tensor | None = None
    logvar: torch.Tensor | None = None


class DeterministicHead(nn.Module):
    """z = code_activation(W h + b)."""

    def __init__(self, features: int, latent_dim: int, code_activation: str) -> None:
        super().__init__()
        self.linear = nn.Linear(features, latent_dim)
        self.act = activation(code_activation)

    def code(self, h: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(h))

    def forward(self, h: torch.Tensor) -> Latent:
        code = self.code(h)
        return Latent(z=code, code=code)


class GaussianHead(nn.Module):
    """q(z|x) = N(mean, diag(exp(logvar))); z is drawn by reparameterisation, the code is the mean."""

    def __init__(self, features: int, latent_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 2 * latent_dim)

    def posterior(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and log-variance of q(z|x), each (B, latent_dim)."""
        mean, logvar = self.linear(h).chunk(2, dim=-1)
        return mean, logvar

    def code(self, h: torch.Tensor) -> torch.Tensor:
        return self.posterior(h)[0]

    def forward(self, h: torch.Tensor) -> Latent:
        mean, logvar = self.posterior(h)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return Latent(z=z, code=mean, mean=mean, logvar=logvar)


def build_latent_head(cfg: DictConfig, features: int) -> nn.Module:
    if cfg.latent == "gaussian":
        return GaussianHead(features, cfg.latent_dim)
    return DeterministicHead(features, cfg.latent_dim, cfg.code_activation)
