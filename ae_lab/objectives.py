"""The loss terms, and the objective that sums them:

    loss = recon(x_hat, x) + beta * KL(q(z|x) || N(0, I)) + sparsity_weight * sparsity(code)
           + contractive_weight * ||d code / d x||_F^2

Per-example terms are sums over pixels / latent units, averaged over the batch ("per example").
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ae_lab.nets import Latent

_EPS = 1e-6


def reconstruction_error(logits: torch.Tensor, x: torch.Tensor, kind: str,
                         output: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid) -> torch.Tensor:
    """Per-example reconstruction error of x_hat = output(logits) against clean x, summed over pixels.

    `bce` is the Bernoulli negative log-likelihood in nats (computed from logits, stable, for the
    sigmoid output); `mse` is the sum of squared errors of `output(logits)` (the sigmoid, or the
    identity for `model.output=linear`).
    """
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    else:
        per_pixel = (output(logits) - x) ** 2
    return per_pixel.flatten(1).sum(1)


def gaussian_kl_per_unit(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean_d, exp(logvar_d)) || N(0, 1)) for every example and latent unit, in closed form."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per example, summed over latent units."""
    return gaussian_kl_per_unit(mean, logvar).sum(1)


def l1_sparsity(code: torch.Tensor) -> torch.Tensor:
    """Per-example L1 norm of the code activations."""
    return code.abs().sum(1)


def kl_sparsity(code: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
    """sum_j KL(rho || rho_hat_j), rho_hat_j = mean activation of unit j over the batch (codes in (0, 1)).

    A batch-level term (Ng's sparse autoencoder), not a per-example one.
    """
    rate = code.mean(0).clamp(_EPS, 1 - _EPS)
    return (target * torch.log(target / rate)
            + (1 - target) * torch.log((1 - target) / (1 - rate))).sum()


def contractive_penalty(code: torch.Tensor, inputs: torch.Tensor, estimator: str = "exact",
                        projections: int = 1, create_graph: bool = True) -> torch.Tensor:
    """Per-example squared Frobenius norm of the encoder Jacobian d code / d inputs.

    `code` must have been computed from `inputs` (which requires grad). Works for any encoder that
    treats examples independently (MLP or conv, any depth): rows of each example's Jacobian are
    vector-Jacobian products, batched over the rows with `is_grads_batched`.

    Cost: `exact` takes d_z vector-Jacobian products (one backward pass through the encoder per latent
    unit, vectorised), so time and memory grow linearly in the latent size d_z and in the encoder's
    cost (itself ~linear in the input size D), with d_z * B * D floats for the rows; training also
    back-propagates through them (create_graph). `projection` is the unbiased estimator
    E_v ||v^T J||^2 = ||J||_F^2 with v ~ N(0, I_{d_z}), averaged over `projections` draws: its cost
    is `projections` products, independent of d_z, at the price of variance.
    """
    batch, latent_dim = code.shape
    if estimator == "exact":
        directions = torch.eye(latent_dim, dtype=code.dtype, device=code.device)
        directions = directions.unsqueeze(1).expand(latent_dim, batch, latent_dim)
    else:
        directions = torch.randn(projections, batch, latent_dim, dtype=code.dtype, device=code.device)
    rows = torch.autograd.grad(code, inputs, grad_outputs=directions, is_grads_batched=True,
                               create_graph=create_graph)[0]
    squared = rows.pow(2).flatten(2).sum(2)  # (directions, batch)
    return squared.sum(0) if estimator == "exact" else squared.mean(0)


class Objective:
    """The configured sum of terms; returns every active term (batch means) and their weighted `loss`.

    Which terms are active is fixed by the config (a weight > 0 switches a term on); the numbers that
    weight them (`weights(step)`) are passed in at each call, so that a vectorised ensemble can give
    every member its own as tensors while the structure stays shared.
    """

    def __init__(self, cfg: DictConfig, gaussian_head: bool,
                 output: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid) -> None:
        self.cfg = cfg
        self.gaussian_head = gaussian_head
        self.output = output  # the decoder's output function (model.output)

    @property
    def needs_input_grad(self) -> bool:
        return self.cfg.contractive_weight > 0

    @property
    def term_names(self) -> list[str]:
        """The names `__call__` returns, in order."""
        names = ["recon"]
        if self.gaussian_head:
            names += ["kl", "elbo"] if self.cfg.recon == "bce" else ["kl"]
        if self.cfg.sparsity_weight > 0:
            names.append("sparsity")
        if self.cfg.contractive_weight > 0:
            names.append("contractive")
        return [*names, "loss"]

    def weights(self, step: int) -> dict[str, float]:
        """The scalars that weight the terms at training step `step` (the ones a sweep may vary per
        member without changing which terms exist)."""
        cfg = self.cfg
        return {"beta": cfg.beta, "sparsity_weight": cfg.sparsity_weight, "sparsity_target": cfg.sparsity_target,
                "contractive_weight": cfg.contractive_weight}

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, latent: Latent, inputs: torch.Tensor,
                 weights: dict[str, float | torch.Tensor], create_graph: bool) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        terms = {"recon": reconstruction_error(logits, x, cfg.recon, self.output).mean()}
        loss = terms["recon"]
        if self.gaussian_head:
            terms["kl"] = gaussian_kl(latent.mean, latent.logvar).mean()
            loss = loss + weights["beta"] * terms["kl"]
            if cfg.recon == "bce":
                terms["elbo"] = -(terms["recon"] + terms["kl"])
        if cfg.sparsity_weight > 0:
            if cfg.sparsity == "kl":
                terms["sparsity"] = kl_sparsity(latent.code, weights["sparsity_target"])
            else:
                terms["sparsity"] = l1_sparsity(latent.code).mean()
            loss = loss + weights["sparsity_weight"] * terms["sparsity"]
        if cfg.contractive_weight > 0:
            terms["contractive"] = contractive_penalty(
                latent.code, inputs, cfg.contractive_estimator, cfg.contractive_projections,
                create_graph=create_graph).mean()
            loss = loss + weights["contractive_weight"] * terms["contractive"]
        terms["loss"] = loss
        return terms
