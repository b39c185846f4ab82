"""What evaluation reads off a split: the model's codes and per-example values."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Encoded:
    """The test split seen through the model: per-example tensors on the CPU, one row per example."""

    codes: torch.Tensor
    values: dict[str, torch.Tensor]  # per-example metrics (psnr, bce, elbo, ...)
    labels: torch.Tensor | None
    factor_classes: torch.Tensor | None
    mean: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
