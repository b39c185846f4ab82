"""Statistics of the code itself: how sparse it is and how strongly the encoder contracts."""

from __future__ import annotations

import torch

from ae_lab.objectives import contractive_penalty


def sparse_code_statistics(codes: torch.Tensor, near_zero: float) -> dict[str, float]:
    """`code_mean_activation`: mean of |a| over examples and units (for sigmoid codes, the firing rate
    that KL sparsity drives towards its target); `code_near_zero_fraction`: the fraction of (example,
    unit) activations with |a| < `near_zero`; `code_dead_units`: units near zero on every example."""
    magnitude = codes.abs()
    silent = magnitude < near_zero
    return {"code_mean_activation": float(magnitude.mean()),
            "code_near_zero_fraction": float(silent.float().mean()),
            "code_dead_units": float(silent.all(0).sum())}


def encoder_jacobian_norm(encode: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """||d code / d x||_F^2 per example (exact, one vector-Jacobian product per code unit)."""
    with torch.enable_grad():
        inputs = x.detach().requires_grad_(True)
        return contractive_penalty(encode(inputs), inputs, "exact", create_graph=False).detach()
