"""Reconstruction quality in image terms."""

from __future__ import annotations

import torch

MIN_MSE = 1e-10
"""Floor on the per-image MSE: a perfect reconstruction scores 100 dB instead of infinity."""


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of each image against its reference, in dB, for pixels in [0, 1]:
    10 log10(1 / mean squared error over the image's pixels). Shape (N,)."""
    mse = (images - references).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(MIN_MSE))
