"""Encoder, latent-head and decoder builders. Each reads the input shape, so every net fits every data set.

Decoders return logits; the reconstruction is `output_function(model.output)(logits)`: the sigmoid for
data in [0, 1], the identity (`model.output=linear`) for data of any range.
Conv nets follow the input's rank: 2-D convolutions on (C, H, W) images, 1-D on (C, T) sequences.
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


def output_function(name: str) -> nn.Module:
    """The reconstruction from the decoder's logits: `sigmoid` or `linear` (the identity)."""
    return nn.Sigmoid() if name == "sigmoid" else nn.Identity()


_CONV = {1: (nn.Conv1d, nn.ConvTranspose1d), 2: (nn.Conv2d, nn.ConvTranspose2d)}  # by spatial dims


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

    mlp: Flatten, then `hidden_dims` (any input shape). conv: stride-2 convolutions (2-D on (C, H, W),
    1-D on (C, T)) through `channels`, Flatten, then the fully connected `fc_dims`.
    """
    act = cfg.activation
    if cfg.arch == "mlp":
        layers, width = _dense_stack(math.prod(input_shape), list(cfg.hidden_dims), act)
        return nn.Sequential(nn.Flatten(), *layers), width
    channels, spatial = input_shape[0], input_shape[1:]
    conv, _ = _CONV[len(spatial)]
    layers = []
    for out_channels in cfg.channels:
        layers += [conv(channels, out_channels, cfg.kernel_size, stride=2, padding=conv_padding(cfg.kernel_size)),
                   activation(act)]
        channels = out_channels
    depth = len(cfg.channels)
    flat = channels * math.prod(conv_sizes(side, depth, cfg.kernel_size)[-1] for side in spatial)
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
    input_channels, spatial = input_shape[0], input_shape[1:]
    _, transposed = _CONV[len(spatial)]
    depth, kernel, padding = len(cfg.channels), cfg.kernel_size, conv_padding(cfg.kernel_size)
    sizes = [conv_sizes(side, depth, kernel) for side in spatial]  # per spatial axis, per level
    channels = list(cfg.channels)
    dense, features = _dense_stack(cfg.latent_dim, list(reversed(cfg.fc_dims)), act)
    deepest = tuple(axis[-1] for axis in sizes)
    layers = [*dense, nn.Linear(features, channels[-1] * math.prod(deepest)), activation(act),
              nn.Unflatten(1, (channels[-1], *deepest))]
    targets = [input_channels] + channels[:-1]
    for level in range(depth, 0, -1):
        # a transposed stride-2 conv gives 2 (in - 1) - 2 padding + kernel + output_padding: pad to hit
        # the encoder's size
        output_padding = tuple(axis[level - 1] - (2 * (axis[level] - 1) - 2 * padding + kernel) for axis in sizes)
        layers.append(transposed(channels[level - 1], targets[level - 1], kernel, stride=2,
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

    def latent(self, out: torch.Tensor) -> Latent:
        """The latent from the linear layer's output (any leading dimensions: the ensemble's stacked
        MLP passes (M, B, latent_dim))."""
        code = self.act(out)
        return Latent(z=code, code=code)

    def forward(self, h: torch.Tensor) -> Latent:
        return self.latent(self.linear(h))


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

    def latent(self, out: torch.Tensor) -> Latent:
        """The latent from the linear layer's output (..., 2 latent_dim), z drawn (any leading dimensions:
        the ensemble's stacked MLP passes (M, B, 2 latent_dim))."""
        mean, logvar = out.chunk(2, dim=-1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return Latent(z=z, code=mean, mean=mean, logvar=logvar)

    def forward(self, h: torch.Tensor) -> Latent:
        return self.latent(self.linear(h))


def build_latent_head(cfg: DictConfig, features: int) -> nn.Module:
    if cfg.latent == "gaussian":
        return GaussianHead(features, cfg.latent_dim)
    return DeterministicHead(features, cfg.latent_dim, cfg.code_activation)
