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


def conv_padding(kernel_size: int) -> int:
    """'Same'-style padding: an odd kernel keeps ceil(n / 2) at stride 2, an even one n / 2."""
    return (kernel_size - 1) // 2


def conv_sizes(side: int, layers: int, kernel_size: int) -> list[int]:
    """Side lengths through `layers` stride-2 convolutions with `conv_padding`."""
    sizes = [side]
    for _ in range(layers):
        sizes.append((sizes[-1] + 2 * conv_padding(kernel_size) - kernel_size) // 2 + 1)
    return sizes


def _dense_stack(width: int, hidden_dims: list[int], act: str) -> tuple[list[nn.Module], int]:
    """Linear + activation layers through `hidden_dims`; returns them and the output width."""
    layers: list[nn.Module] = []
    for hidden in hidden_dims:
        layers += [nn.Linear(width, hidden), activation(act)]
        width = hidden
    return layers, width


def build_encoder(cfg: DictConfig, input_shape: tuple[int, ...]) -> tuple[nn.Module, int]:
    """Return the encoder (images -> features h of shape (B, F)) and F.

    mlp: Flatten, then `hidden_dims`. conv: stride-2 convolutions through `channels`, Flatten, then
    the fully connected `fc_dims`.
    """
    act = cfg.activation
    if cfg.arch == "mlp":
        layers, width = _dense_stack(math.prod(input_shape), list(cfg.hidden_dims), act)
        return nn.Sequential(nn.Flatten(), *layers), width
    channels, height, width = input_shape
    layers = []
    for out_channels in cfg.channels:
        layers += [nn.Conv2d(channels, out_channels, cfg.kernel_size, stride=2,
                             padding=conv_padding(cfg.kernel_size)), activation(act)]
        channels = out_channels
    depth = len(cfg.channels)
    flat = channels * conv_sizes(height, depth, cfg.kernel_size)[-1] * conv_sizes(width, depth, cfg.kernel_size)[-1]
    dense, features = _dense_stack(flat, list(cfg.fc_dims), act)
    return nn.Sequential(*layers, nn.Flatten(), *dense), features


def build_decoder(cfg: DictConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """Return the decoder: codes (B, latent_dim) -> logits of shape (B, *input_shape); the encoder's
    layers in reverse."""
    act = cfg.activation
    if cfg.arch == "mlp":
        layers, width = _dense_stack(cfg.latent_dim, list(reversed(cfg.hidden_dims)), act)
        return nn.Sequential(*layers, nn.Linear(width, math.prod(input_shape)),
                             nn.Unflatten(1, tuple(input_shape)))
    image_channels, height, width = input_shape
    depth, kernel, padding = len(cfg.channels), cfg.kernel_size, conv_padding(cfg.kernel_size)
    heights, widths = conv_sizes(height, depth, kernel), conv_sizes(width, depth, kernel)
    channels = list(cfg.channels)
    dense, features = _dense_stack(cfg.latent_dim, list(reversed(cfg.fc_dims)), act)
    layers = [*dense, nn.Linear(features, channels[-1] * heights[-1] * widths[-1]), activation(act),
              nn.Unflatten(1, (channels[-1], heights[-1], widths[-1]))]
    targets = [image_channels] + channels[:-1]
    for level in range(depth, 0, -1):
        # a transposed stride-2 conv gives 2 (in - 1) - 2 padding + kernel + output_padding: pad to hit
        # the encoder's size
        natural = [2 * (sizes[level] - 1) - 2 * padding + kernel for sizes in (heights, widths)]
        output_padding = (heights[level - 1] - natural[0], widths[level - 1] - natural[1])
        layers.append(nn.ConvTranspose2d(channels[level - 1], targets[level - 1], kernel, stride=2,
                                         padding=padding, output_padding=output_padding))
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
