"""The loss terms, and the objective that sums them:

    loss = recon(x_hat, x) + beta * KL(q(z|x) || N(0, I)) + sparsity_weight * sparsity(code)
           + contractive_weight * ||d code / d x||_F^2

with the KL term in one of four forms (a Gaussian head only): plain; with free bits (Kingma et al.
2016), sum_j max(lambda, KL_j); capacity-controlled (Burgess et al. 2018), |KL - C|; or split into
alpha * MI + beta * TC + gamma * dimension-wise KL (beta-TCVAE, Chen et al. 2018); the last two
forms are in ae_lab/kl_forms.py. `beta`, the sparsity weight and C follow their schedules
(ae_lab/schedules.py) through `Objective.weights(step)`; the true KL is reported in every form.

Per-example terms are sums over pixels / latent units, averaged over the batch ("per example").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from ae_lab.kl_forms import free_bits_kl, kl_decomposition
from ae_lab.nets import Latent
from ae_lab.schedules import capacity, moves, scheduled_weight

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


JacobianRows = Callable[[torch.Tensor], torch.Tensor]
"""directions (k, B, d_z) -> the rows v^T J_i of every example's Jacobian J_i = d code_i / d inputs_i for
each direction v: (k, B, *input_shape)."""


def autograd_rows(code: torch.Tensor, inputs: torch.Tensor, create_graph: bool) -> JacobianRows:
    """The rows by `torch.autograd.grad`, batched over the directions with `is_grads_batched`. `code` must
    have been computed from `inputs` (which requires grad); `create_graph` keeps them differentiable."""
    return lambda directions: torch.autograd.grad(code, inputs, grad_outputs=directions, is_grads_batched=True,
                                                  create_graph=create_graph)[0]


def contractive_penalty(code: torch.Tensor, rows: JacobianRows | torch.Tensor, estimator: str = "exact",
                        projections: int = 1, create_graph: bool = True) -> torch.Tensor:
    """Per-example squared Frobenius norm of the encoder Jacobian d code / d inputs.

    `rows` computes vector-Jacobian products (`JacobianRows`): either such a function (the vectorised
    ensemble passes one made of a `torch.func.vjp` pullback, which `vmap` can batch where it cannot
    batch `torch.autograd.grad`), or the input tensor `code` was computed from, for which they are taken
    by autograd (`autograd_rows`, with `create_graph`). Works for any encoder that treats examples
    independently (MLP or conv, any depth).

    Cost: `exact` takes d_z vector-Jacobian products (one backward pass through the encoder per latent
    unit, vectorised), so time and memory grow linearly in the latent size d_z and in the encoder's
    cost (itself ~linear in the input size D), with d_z * B * D floats for the rows; training also
    back-propagates through them (create_graph). `projection` is the unbiased estimator
    E_v ||v^T J||^2 = ||J||_F^2 with v ~ N(0, I_{d_z}), averaged over `projections` draws: its cost
    is `projections` products, independent of d_z, at the price of variance.
    """
    if isinstance(rows, torch.Tensor):
        rows = autograd_rows(code, rows, create_graph)
    batch, latent_dim = code.shape
    if estimator == "exact":
        directions = torch.eye(latent_dim, dtype=code.dtype, device=code.device)
        directions = directions.unsqueeze(1).expand(latent_dim, batch, latent_dim)
    else:
        directions = torch.randn(projections, batch, latent_dim, dtype=code.dtype, device=code.device)
    squared = rows(directions).pow(2).flatten(2).sum(2)  # (directions, batch)
    return squared.sum(0) if estimator == "exact" else squared.mean(0)


def epoch_end_step(global_step: int) -> int:
    """The last step (from 0) of an epoch that ended with `global_step` steps done (0 before any)."""
    return max(global_step - 1, 0)


def non_finite_message(terms: dict[str, float], step: int, epoch: int) -> str:
    """Why a run (or an ensemble's member) stopped: its training loss `terms["loss"]` at global step `step`
    of `epoch` is not finite, and which of its `terms` are not (none: their weighted sum overflowed)."""
    bad = [f"{name}={value}" for name, value in terms.items() if name != "loss" and not math.isfinite(value)]
    return (f"the training loss became {terms['loss']} at step {step} (epoch {epoch}); "
            f"non-finite terms: {', '.join(bad) or 'none (their sum overflowed)'}")


@dataclass
class Batch:
    """What the terms of one step read; quantities several terms share are computed once.

    `jacobian_rows`: how the contractive term gets the rows of d code / d inputs; None: by autograd
    from `inputs` (which then requires grad; `create_graph` in training)."""

    logits: torch.Tensor
    x: torch.Tensor
    latent: Latent
    inputs: torch.Tensor
    weights: dict[str, float | torch.Tensor]
    create_graph: bool
    recon_kind: str
    output: Callable[[torch.Tensor], torch.Tensor]
    jacobian_rows: JacobianRows | None = None
    shared: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def once(self, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """`compute()`, computed for the first term that asks and kept for the others."""
        if key not in self.shared:
            self.shared[key] = compute()
        return self.shared[key]

    @cached_property
    def recon(self) -> torch.Tensor:
        return reconstruction_error(self.logits, self.x, self.recon_kind, self.output).mean()

    @cached_property
    def kl_per_unit(self) -> torch.Tensor:
        return gaussian_kl_per_unit(self.latent.mean, self.latent.logvar)

    @cached_property
    def kl(self) -> torch.Tensor:
        return self.kl_per_unit.sum(1).mean()


@dataclass(frozen=True)
class Term:
    """A reported term. `weight`: the key of `Objective.weights` that scales it in the loss, a fixed
    number, or None for a term reported but not optimised (the true KL beside its remedied form)."""

    name: str
    weight: str | float | None
    compute: Callable[[Batch], torch.Tensor]


class Objective:
    """The configured sum of terms; returns every active term (batch means) and their weighted `loss`.

    Which terms are active is fixed by the config (its kinds, and a weight > 0 switching a term on);
    the numbers that weight them (`weights(step)`, scheduled) are passed in at each call, so that a
    vectorised ensemble can give every member its own as tensors while the structure stays shared.
    `dataset_size` (training examples) is needed by `loss.kl=tc` only.
    """

    def __init__(self, cfg: DictConfig, gaussian_head: bool, dataset_size: int | None = None,
                 output: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid) -> None:
        self.cfg = cfg
        self.gaussian_head = gaussian_head
        self.output = output  # the decoder's output function (model.output)
        if gaussian_head and cfg.kl == "tc" and not dataset_size:
            raise ValueError("loss.kl=tc needs the training set size (Objective(dataset_size=...))")
        self.dataset_size = dataset_size
        self.terms = self._active_terms()

    def _active_terms(self) -> list[Term]:
        cfg = self.cfg
        terms = [Term("recon", 1.0, lambda b: b.recon)]
        if self.gaussian_head:
            plain = cfg.kl == "standard" and cfg.free_bits == 0 and cfg.beta_schedule.kind != "capacity"
            terms.append(Term("kl", "beta" if plain else None, lambda b: b.kl))
            if cfg.kl == "tc":
                def part(name: str) -> Callable[[Batch], torch.Tensor]:
                    return lambda b: b.once("tc", lambda: kl_decomposition(
                        b.latent.z, b.latent.mean, b.latent.logvar, self.dataset_size, cfg.tc_estimator))[name]

                terms += [Term("mi", "tc_alpha", part("mi")), Term("tc", "beta", part("tc")),
                          Term("dwkl", "tc_gamma", part("dwkl"))]
            elif cfg.free_bits > 0:
                terms.append(Term("kl_free_bits", "beta",
                                  lambda b: free_bits_kl(b.kl_per_unit, b.weights["free_bits"])))
            elif cfg.beta_schedule.kind == "capacity":
                terms.append(Term("kl_capacity_gap", "beta", lambda b: (b.kl - b.weights["capacity"]).abs()))
            if cfg.recon == "bce":
                terms.append(Term("elbo", None, lambda b: -(b.recon + b.kl)))
        if cfg.sparsity_weight > 0:
            if cfg.sparsity == "kl":
                terms.append(Term("sparsity", "sparsity_weight",
                                  lambda b: kl_sparsity(b.latent.code, b.weights["sparsity_target"])))
            else:
                terms.append(Term("sparsity", "sparsity_weight", lambda b: l1_sparsity(b.latent.code).mean()))
        if cfg.contractive_weight > 0:
            terms.append(Term("contractive", "contractive_weight", lambda b: contractive_penalty(
                b.latent.code, b.inputs if b.jacobian_rows is None else b.jacobian_rows,
                cfg.contractive_estimator, cfg.contractive_projections, create_graph=b.create_graph).mean()))
        return terms

    @property
    def needs_input_grad(self) -> bool:
        return self.cfg.contractive_weight > 0

    @property
    def term_names(self) -> list[str]:
        """The names `__call__` returns, in order."""
        return [*(term.name for term in self.terms), "loss"]

    def weights(self, step: int) -> dict[str, float]:
        """The scalars that weight the terms at training step `step` (the ones a sweep may vary per
        member without changing which terms exist): beta and the sparsity weight as scheduled, the
        capacity C (0 without the capacity schedule), free bits, the TC weights, the rest as configured."""
        cfg = self.cfg
        return {"beta": scheduled_weight(cfg.beta_schedule, cfg.beta, step),
                "capacity": capacity(cfg.beta_schedule, step),
                "free_bits": cfg.free_bits, "tc_alpha": cfg.tc_alpha, "tc_gamma": cfg.tc_gamma,
                "sparsity_weight": scheduled_weight(cfg.sparsity_schedule, cfg.sparsity_weight, step),
                "sparsity_target": cfg.sparsity_target, "contractive_weight": cfg.contractive_weight}

    @property
    def scheduled_names(self) -> list[str]:
        """The keys of `weights` that change with the step under this config (logged per epoch)."""
        names = []
        if self.gaussian_head and moves(self.cfg.beta_schedule):
            names.append("capacity" if self.cfg.beta_schedule.kind == "capacity" else "beta")
        if self.cfg.sparsity_weight > 0 and moves(self.cfg.sparsity_schedule):
            names.append("sparsity_weight")
        return names

    def scheduled_values(self, global_step: int) -> dict[str, float]:
        """The scheduled weights an epoch that ended with `global_step` steps done logs, e.g.
        `scheduled/beta`: those of its last step (`epoch_end_step`), at which Lightning logs its values."""
        weights = self.weights(epoch_end_step(global_step))
        return {f"scheduled/{name}": weights[name] for name in self.scheduled_names}

    def __call__(self, logits: torch.Tensor, x: torch.Tensor, latent: Latent, inputs: torch.Tensor,
                 weights: dict[str, float | torch.Tensor], create_graph: bool,
                 jacobian_rows: JacobianRows | None = None) -> dict[str, torch.Tensor]:
        """The terms of a batch whose (corrupted) `inputs` gave `logits` and `latent`; the contractive
        term takes the code's Jacobian rows from `jacobian_rows`, or by autograd from `inputs`."""
        batch = Batch(logits, x, latent, inputs, weights, create_graph, self.cfg.recon, self.output, jacobian_rows)
        values: dict[str, torch.Tensor] = {}
        loss = 0.0
        for term in self.terms:
            values[term.name] = term.compute(batch)
            if term.weight is not None:
                scale = weights[term.weight] if isinstance(term.weight, str) else term.weight
                loss = loss + scale * values[term.name]
        values["loss"] = loss
        return values
