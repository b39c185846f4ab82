"""Per-example anomaly scores, higher = more anomalous: the one definition behind the evaluation's
`eval/anomaly_auroc_*` and `TrainedModel.score` (ae_lab/trained.py).

- `recon`: the reconstruction error of `loss.recon` (bce in nats, or mse), summed over the input, of
  the reconstruction from the code (the posterior mean for a VAE), in the model's units;
- `elbo` (a Gaussian head with `loss.recon=bce`): -ELBO = KL(q(z|x) || N(0, I)) in closed form plus the
  Bernoulli negative log-likelihood averaged over `samples` draws z_s = mean + exp(logvar / 2) * eps_s.
  The eps_s (samples, latent_dim) are drawn once from `seed` and shared by every example (common
  random numbers): an example's score is the same whatever batch it comes in, and draws nothing from
  torch's global RNG.
"""

from __future__ import annotations

import torch

from ae_lab.evaluation.likelihood import bernoulli_log_likelihood
from ae_lab.module import Autoencoder
from ae_lab.objectives import gaussian_kl, reconstruction_error


def score_kinds(module: Autoencoder) -> tuple[str, ...]:
    """The scores `anomaly_scores` gives for `module`: `recon`, and `elbo` for a VAE with a Bernoulli decoder."""
    with_elbo = module.objective.gaussian_head and module.recon_kind == "bce"
    return ("recon", "elbo") if with_elbo else ("recon",)


def elbo_noise(samples: int, latent_dim: int, seed: int) -> torch.Tensor:
    """The ELBO score's standard normal draws eps_s (samples, latent_dim), on the CPU, from `seed` alone."""
    return torch.randn(samples, latent_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def anomaly_scores(module: Autoencoder, x: torch.Tensor, samples: int, seed: int, max_decode_batch: int,
                   kinds: tuple[str, ...] | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The scores `kinds` (all of `score_kinds(module)` by default) of the batch `x` (B, *input_shape) in
    model units, on the module's device: (B,) each. The ELBO's draws are decoded at most
    `max_decode_batch` at a time; `noise`, when given, is `elbo_noise(samples, latent_dim, seed)` made
    beforehand (so that an exported graph holds it as a constant instead of a random generator)."""
    features = module.encoder(x)
    kinds = score_kinds(module) if kinds is None else kinds
    scores = {}
    if "recon" in kinds:
        code = module.head.code(features)
        scores["recon"] = reconstruction_error(module.decoder(code), x, module.recon_kind, module.output)
    if "elbo" in kinds:
        mean, logvar = module.head.posterior(features)
        noise = (elbo_noise(samples, mean.shape[1], seed) if noise is None else noise).to(x.device)
        log_likelihood = bernoulli_log_likelihood(module.decoder, x)
        chunk = max(1, max_decode_batch // x.shape[0])
        total = torch.zeros(x.shape[0], device=x.device)
        for start in range(0, samples, chunk):
            z = mean + torch.exp(0.5 * logvar) * noise[start:start + chunk, None, :]
            total += log_likelihood(z).sum(0)
        scores["elbo"] = gaussian_kl(mean, logvar) - total / samples
    return scores
