"""Likelihood-based evaluation of a VAE: the importance-weighted bound on log p(x), the ELBO and its
parts, KL per latent dimension and active units.

All values are per example, in nats. With a Bernoulli decoder they are likelihoods only for binary
data (binarised MNIST); on grey levels they are the training objective's numbers, not densities.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ae_lab.kl_forms import gaussian_log_density
from ae_lab.objectives import reconstruction_error

LogLikelihood = Callable[[torch.Tensor], torch.Tensor]
"""Maps latent samples z (S, B, D) to log p(x_b | z_sb), shape (S, B), for a fixed batch x (B, ...)."""


def bernoulli_log_likelihood(decoder: nn.Module, x: torch.Tensor) -> LogLikelihood:
    """log p(x|z) of a decoder that returns Bernoulli logits, for the batch `x` (B, C, H, W)."""

    def log_likelihood(z: torch.Tensor) -> torch.Tensor:
        # z (samples, B, latent_dim): decoded as one batch, sample-major; written with shape-free ops
        # (flatten, repeat, reshape(samples, -1)) so that a traced graph (ae_lab.export) takes any B
        samples = z.shape[0]
        logits = decoder(z.flatten(0, 1))
        targets = x.repeat(samples, *([1] * (x.dim() - 1)))
        return -reconstruction_error(logits, targets, "bce").reshape(samples, -1)

    return log_likelihood


@torch.no_grad()
def importance_weighted_bound(mean: torch.Tensor, logvar: torch.Tensor, log_likelihood: LogLikelihood,
                              samples: int, chunk: int) -> dict[str, torch.Tensor]:
    """Burda et al. (2016)'s bound log (1/k) sum_i w_i, w_i = p(x|z_i) p(z_i) / q(z_i|x), z_i ~ q(z|x).

    Returns per example (B,): `iw_bound` with k = `samples`; `elbo`, the mean of log w_i over the same
    draws (the k-sample estimate of the ELBO, equal to `iw_bound` when k = 1); `log_likelihood`, the
    mean of log p(x|z_i) (the ELBO's reconstruction part). The draws are taken `chunk` at a time and
    combined with log-sum-exp, so memory does not grow with k. Draws come from torch's global RNG.
    """
    batch = mean.shape[0]
    log_sum = torch.full((batch,), -math.inf, dtype=mean.dtype, device=mean.device)
    log_w_sum = torch.zeros(batch, dtype=mean.dtype, device=mean.device)
    log_px_sum = torch.zeros_like(log_w_sum)
    prior_mean, prior_logvar = torch.zeros_like(mean), torch.zeros_like(logvar)
    for start in range(0, samples, chunk):
        count = min(chunk, samples - start)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(count, *mean.shape, dtype=mean.dtype,
                                                          device=mean.device)
        log_px = log_likelihood(z)
        log_w = (log_px + gaussian_log_density(z, prior_mean, prior_logvar).sum(-1)
                 - gaussian_log_density(z, mean, logvar).sum(-1))
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(log_w, dim=0))
        log_w_sum += log_w.sum(0)
        log_px_sum += log_px.sum(0)
    return {"iw_bound": log_sum - math.log(samples), "elbo": log_w_sum / samples,
            "log_likelihood": log_px_sum / samples}


def active_units(mean: torch.Tensor, threshold: float) -> tuple[int, torch.Tensor]:
    """Burda et al.'s activity: unit d is active when Cov_x(E_q[z_d|x]) > `threshold` (0.01 in the paper).

    Returns the count and each unit's variance (over examples, population variance) of its posterior mean.
    """
    variance = mean.var(0, unbiased=False)
    return int((variance > threshold).sum()), variance
