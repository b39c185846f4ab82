"""Samplers of codes, which the decoder turns into new examples: the prior N(0, I) of a Gaussian latent
head, and a Gaussian mixture fitted on the training codes, which makes any autoencoder generative (a
plain or denoising one has no prior; a VAE's aggregate posterior is often far from N(0, I), and the
mixture follows it: Ghosh et al. 2020, "From variational to deterministic autoencoders", and pythae's
`GaussianMixtureSampler`).

Every sampler's `sample(n, generator)` returns (n, latent_dim) float32 codes on the CPU, drawn from
`generator` alone, so the same generator state gives the same codes. A fitted mixture is kept in the
run folder as `samplers/gmm-<components>.npz` (plain arrays, read without pickle) with what it was
fitted from: the sha256 of the checkpoint whose encoder made the codes, how many codes at most
(`eval.gmm_train_size`) and the fit's seed (`eval.seed`). A second call reads it back; a mixture of
another checkpoint (e.g. a resumed run's new best) is fitted again.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from ae_lab.errors import ConfigError
from ae_lab.storage import atomic_write

log = logging.getLogger(__name__)

SAMPLERS = ("prior", "gmm")


class Sampler(Protocol):
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor: ...


@dataclass
class PriorSampler:
    """N(0, I) in `latent_dim` dimensions: the prior of a Gaussian latent head."""

    latent_dim: int

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator)


@dataclass
class GaussianMixtureSampler:
    """A mixture of `len(weights)` Gaussians with full covariances: `weights` (K,), `means` (K, D),
    `covariances` (K, D, D), float64. Sampling draws a component by its weight, then its mean plus its
    covariance's Cholesky factor times N(0, I)."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    @classmethod
    def fit(cls, codes: torch.Tensor | np.ndarray, components: int, seed: int) -> "GaussianMixtureSampler":
        """scikit-learn's `GaussianMixture` (full covariances, k-means initialisation from `seed`, its
        default covariance regulariser 1e-6, which keeps a dead code unit from making a covariance
        singular) fitted on `codes` (N, D), N >= `components`."""
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        data = np.asarray(codes, dtype=np.float64)
        _check_components(components, len(data))
        mixture = GaussianMixture(components, covariance_type="full", random_state=seed)
        # one thread (BLAS and k-means' OpenMP): on 2 busy cores, 1,258 digits codes took 0.35 s so and 1.4 s with 2
        with threadpool_limits(limits=1):
            mixture.fit(data)
        if not mixture.converged_:
            log.warning("the Gaussian mixture of %d components on %d codes did not converge in %d EM steps",
                        components, len(data), mixture.max_iter)
        return cls(mixture.weights_, mixture.means_, mixture.covariances_)

    @property
    def components(self) -> int:
        return len(self.weights)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        weights = torch.from_numpy(self.weights)
        chosen = torch.multinomial(weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        factors = torch.linalg.cholesky(torch.from_numpy(self.covariances))
        codes = torch.from_numpy(self.means)[chosen] + (factors[chosen] @ noise.unsqueeze(-1)).squeeze(-1)
        return codes.to(torch.float32)

    def save(self, path: Path, fitted_from: dict[str, str | int]) -> None:
        """Into `path` (.npz), with `fitted_from`'s values (strings and integers) beside the arrays."""
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda file: np.savez(
            file, weights=self.weights, means=self.means, covariances=self.covariances,
            **{f"fitted_from_{key}": np.array(value) for key, value in fitted_from.items()}))

    @classmethod
    def load(cls, path: Path) -> tuple["GaussianMixtureSampler", dict[str, str | int]]:
        """The mixture saved at `path` and what it was fitted from."""
        with np.load(path, allow_pickle=False) as saved:
            fitted_from = {key.removeprefix("fitted_from_"): saved[key].item() for key in saved.files
                           if key.startswith("fitted_from_")}
            return cls(saved["weights"], saved["means"], saved["covariances"]), fitted_from


def _check_components(components: Any, codes: int | None) -> None:
    """Refuse a component count that is not an integer from 1 to `codes` (None: not known yet)."""
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ConfigError(f"components={components!r} is not allowed: an integer >= 1")
    if codes is not None and components > codes:
        raise ConfigError(f"components={components} is not allowed: at most {codes}, the number of training "
                          "codes the mixture is fitted on")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mixture_rows(count: int, max_codes: int, seed: int) -> torch.Tensor:
    """Which of `count` training examples the mixture is fitted on: all of them, or `max_codes` drawn
    by `seed` (sorted). One rule for evaluation and the loader, so both fit the same mixture."""
    if count <= max_codes:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:max_codes].sort().values


def fitted_mixture(run_dir: Path, checkpoint: Path | None, codes: Callable[[], torch.Tensor], components: int,
                   max_codes: int, seed: int) -> GaussianMixtureSampler:
    """The mixture of `components` Gaussians on the training codes `codes()` (those of `mixture_rows`)
    of the weights in `checkpoint`: read from `run_dir/samplers/gmm-<components>.npz` when that was
    fitted from this checkpoint file (its sha256) with these `max_codes` and `seed`, else fitted
    (`codes()` is called only then) and saved there. Without a checkpoint (weights no file holds) it is
    fitted and not saved."""
    if checkpoint is None:
        return GaussianMixtureSampler.fit(codes(), components, seed)
    path = run_dir / "samplers" / f"gmm-{components}.npz"
    wanted = {"checkpoint_sha256": file_sha256(checkpoint), "max_codes": max_codes, "seed": seed}
    if path.is_file():
        mixture, fitted_from = GaussianMixtureSampler.load(path)
        if fitted_from == wanted:
            return mixture
        log.info("%s was fitted from another checkpoint or settings: fitting it again", path)
    mixture = GaussianMixtureSampler.fit(codes(), components, seed)
    mixture.save(path, wanted)
    return mixture


def sampler_for(model: Any, name: str, **options: Any) -> Sampler:
    """The sampler `name` for a trained model (`ae_lab.load`'s object): "prior", N(0, I), for a Gaussian
    latent head; "gmm", a Gaussian mixture on its training codes, for any model, with option
    `components` (default: the run's `eval.gmm_components`; fitted on at most `eval.gmm_train_size`
    codes, as the evaluation's `fd_gmm`). Raises ConfigError, one line, for an unknown name or option
    and for "prior" without a Gaussian head."""
    if name not in SAMPLERS:
        raise ConfigError(f"sampler={name!r} is not allowed: one of {', '.join(SAMPLERS)}")
    allowed = {"prior": (), "gmm": ("components",)}[name]
    for option in options:
        if option not in allowed:
            raise ConfigError(f"{option}={options[option]!r} is not an option of sampler={name!r}: "
                              + (f"it takes {', '.join(allowed)}" if allowed else "it takes none"))
    if name == "prior":
        if not model.module.objective.gaussian_head:
            raise ConfigError(f"sampler='prior' is not allowed for {model.run_dir}: its latent head is "
                              "deterministic and has no prior; use sampler='gmm' (a Gaussian mixture fitted on "
                              "its training codes)")
        return PriorSampler(model.latent_dim)
    ev = model.cfg.eval
    components = options.get("components", ev.gmm_components)
    _check_components(components, None)

    def codes() -> torch.Tensor:
        every = model.training_codes()
        return every[mixture_rows(len(every), ev.gmm_train_size, ev.seed)]

    return fitted_mixture(model.run_dir, model.checkpoint, codes, components, ev.gmm_train_size, ev.seed)
