"""The KL term's remedied and decomposed forms: free bits (Kingma et al. 2016) and the beta-TCVAE split
(Chen et al. 2018), in nats. Pure functions of the posterior's parameters and samples; the objective
(ae_lab/objectives.py) weights them.
"""

from __future__ import annotations

import math

import torch


def free_bits_kl(kl_per_unit: torch.Tensor, free_bits: float | torch.Tensor) -> torch.Tensor:
    """sum_j max(free_bits, mean_i KL_ij) (Kingma et al. 2016, one group per unit, in nats): a unit whose
    batch-mean KL is below `free_bits` adds the constant `free_bits` and gets no gradient from the term.
    Written as KL_j + relu(free_bits - KL_j) so that `free_bits` may be a tensor inside vmap."""
    per_unit = kl_per_unit.mean(0)
    return (per_unit + torch.relu(free_bits - per_unit)).sum()


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, exp(logvar)) elementwise (broadcasting), in nats."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mean).pow(2) * torch.exp(-logvar))


def log_importance_weights(estimator: str, batch: int, dataset_size: int, dtype: torch.dtype,
                           device: torch.device) -> torch.Tensor:
    """log w_ij (batch, batch): the weight of q(z_i | x_j) in the batch's estimate of the aggregate
    posterior q(z_i) = 1/N sum_n q(z_i|x_n), N = `dataset_size`, M = `batch` (see `kl_decomposition`)."""
    n, m = dataset_size, batch
    if estimator == "mws" or m == 1:  # one example: its own posterior, 1/N of the mixture, is all there is
        return torch.full((m, m), -math.log(n * m if estimator == "mws" else n), dtype=dtype, device=device)
    if estimator == "mss_uniform":
        weights = torch.full((m, m), (n - 1) / (n * (m - 1)), dtype=dtype, device=device)
    else:  # "mss": 1/N itself, (N - M + 1)/(N (M - 1)) its neighbour i + 1 (mod M), 1/(M - 1) the others
        weights = torch.full((m, m), 1 / (m - 1), dtype=dtype, device=device)
        rows = torch.arange(m, device=device)
        weights[rows, (rows + 1) % m] = (n - m + 1) / (n * (m - 1))
    return weights.fill_diagonal_(1 / n).log()


def kl_decomposition(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, dataset_size: int,
                     estimator: str = "mws") -> dict[str, torch.Tensor]:
    """Chen et al. (2018)'s split of the sampled KL, batch means in nats:

        E[log q(z|x) - log p(z)] = MI (E[log q(z|x) - log q(z)]) + TC (E[log q(z) - sum_d log q(z_d)])
                                   + dimension-wise KL (E[sum_d log q(z_d) - log p(z_d)])

    with z_i ~ q(z|x_i) the batch's reparameterised samples. The aggregate posterior
    q(z) = 1/N sum_n q(z|x_n) over the N = `dataset_size` training examples is estimated from the M
    examples of the batch as log q(z_i) ~ log sum_j w_ij q(z_i|x_j) (marginals likewise, per unit;
    `log_importance_weights`):

    - `mws`, minibatch-weighted sampling (Chen et al. 2018, section 4.1, and their code's default):
      w_ij = 1 / (N M). Biased: besides the log of a sum estimate (Jensen: low), the weights sum to
      1/N, not 1. Against `mss_uniform`, each log density (the joint and every marginal) is lower by
      between log M (where the sample's own posterior dominates the sum) and log N (where the others
      do), so the reported TC is shifted up by between D log M - log N and D log N - log M (exactly
      (D - 1) log N when the batch is the whole set; tested), the dimension-wise KL down and MI up.
      The shift moves with the parameters only as the balance between those two cases does, so the
      gradients are far less affected than the values.
    - `mss`, minibatch stratified sampling (Chen et al. 2018, appendix C.2; their code's `--mss`):
      w_ii = 1/N (the example z_i was drawn from), (N - M + 1) / (N (M - 1)) for one other example
      (here the next one, i + 1 mod M) and 1 / (M - 1) for the remaining M - 2. With the others a
      uniform draw from the rest of the set, sum_j w_ij q(z_i|x_j) is an unbiased estimate of q(z_i).
      This is the matrix their `_log_importance_weight_matrix` is written to build; as published it
      strides by M, not M + 1, so it fills columns 0 and 1 rather than the diagonal and its neighbour
      (rtqichen/beta-tcvae pull request 1), which over-weights every other row's own posterior.
    - `mss_uniform`: w_ii = 1/N and (N - 1) / (N (M - 1)) for each other example: the same stratum
      (the example itself, then a uniform draw from the rest), the rest weighted equally. Also
      unbiased, with less variance than `mss`; exact when the batch is the whole set.

    With `mss` and `mss_uniform` only Jensen's bias of the log (which shrinks as M grows) remains. The
    three terms sum exactly to the one-sample estimate of the KL whatever the weights.
    """
    pairwise = gaussian_log_density(z.unsqueeze(1), mean.unsqueeze(0), logvar.unsqueeze(0))  # (i, j, d)
    log_posterior = pairwise.diagonal(dim1=0, dim2=1).sum(0)  # log q(z_i | x_i)
    log_w = log_importance_weights(estimator, z.shape[0], dataset_size, z.dtype, z.device)
    log_aggregate = torch.logsumexp(log_w + pairwise.sum(2), dim=1)
    log_marginals = torch.logsumexp(log_w.unsqueeze(2) + pairwise, dim=1).sum(1)
    log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z)).sum(1)
    return {"mi": (log_posterior - log_aggregate).mean(), "tc": (log_aggregate - log_marginals).mean(),
            "dwkl": (log_marginals - log_prior).mean()}
