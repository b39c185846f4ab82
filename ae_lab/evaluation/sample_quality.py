"""Sample quality as numbers: Fréchet distances (`frechet.py`) between decoded samples and test
examples, in the features of a classifier trained on the data set's labels (`classifier.py`).

Metrics, at n = min(`eval.fd_samples`, test examples of the classes the classifier knows):
- `fd_gmm`: samples from a Gaussian mixture of `eval.gmm_components` fitted on the codes of (at most
  `eval.gmm_train_size`) training examples (`ae_lab.samplers`; saved in the run folder, where the
  loader's `gmm` sampler finds it), for every model;
- `fd_prior`: samples from N(0, I), for a Gaussian latent head;
- `fd_real`: n training examples themselves, what a perfect generator scores at this n (FD estimated
  from n samples is biased upwards; compare runs at the same `fd_n`);
- `fd_n`, and `fd_classifier_accuracy`, the classifier's accuracy on the test split.
A sample is the decoder's mean (`module.output` of its logits), in the units the model was trained in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ae_lab.data import ArrayDataModule, Split
from ae_lab.evaluation.classifier import feature_classifier, whole
from ae_lab.evaluation.frechet import feature_frechet_distance
from ae_lab.module import Autoencoder
from ae_lab.samplers import PriorSampler, Sampler, fitted_mixture, mixture_rows


@torch.no_grad()
def split_codes(module: Autoencoder, split: Split, positions: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The codes (len(positions), latent_dim) of those examples of `split` (the posterior mean for a
    VAE), on the CPU."""
    return torch.cat([module.head.code(module.encoder(split.batch(chunk)["x"].to(module.device))).cpu()
                      for chunk in positions.split(batch_size)])


@torch.no_grad()
def decode_samples(module: Autoencoder, sampler: Sampler, n: int, generator: torch.Generator,
                   batch_size: int) -> torch.Tensor:
    """n examples (n, *input_shape) decoded from the sampler's codes, on the module's device."""
    codes = sampler.sample(n, generator).to(module.device)
    return torch.cat([module.output(module.decoder(codes[start:start + batch_size]))
                      for start in range(0, n, batch_size)])


def sample_quality(module: Autoencoder, data: ArrayDataModule, test_split: Split, cfg: DictConfig,
                   run_dir: Path, checkpoint: Path | None, with_gmm: bool, details: dict[str, Any]
                   ) -> dict[str, float]:
    """The FD metrics above on labelled `data` (`fd_gmm` when `with_gmm`); `test_split` is the part of
    the test split evaluated. `checkpoint` is the file of the module's weights (None: weights no file
    holds), which the mixture saved in `run_dir` is fitted from. The classifier's cache file goes into
    `details`."""
    ev = cfg.eval
    train = data.splits["train"]
    classifier = feature_classifier(data, cfg.dataset, list(ev.fd_classifier_hidden), ev.fd_classifier_epochs,
                                    ev.fd_classifier_cache)
    test_x, test_y = whole(test_split)
    test_x = test_x[torch.isin(test_y, classifier.classes)]  # not a held-out class
    n = min(ev.fd_samples, len(test_x))
    device = module.device

    def features(x: torch.Tensor) -> np.ndarray:
        return classifier.features(x.to(device), ev.batch_size).numpy()

    real = features(test_x[:n])
    generator = torch.Generator().manual_seed(ev.seed)
    training = train.batch(torch.randperm(len(train), generator=generator)[:n])["x"]
    metrics = {"fd_n": float(n), "fd_classifier_accuracy": classifier.test_accuracy,
               "fd_real": feature_frechet_distance(features(training), real)}
    samplers: dict[str, Sampler] = {}
    if module.objective.gaussian_head:
        samplers["prior"] = PriorSampler(int(module.model_cfg.latent_dim))
    if with_gmm:
        rows = mixture_rows(len(train), ev.gmm_train_size, ev.seed)
        samplers["gmm"] = fitted_mixture(run_dir, checkpoint, lambda: split_codes(module, train, rows, ev.batch_size),
                                         ev.gmm_components, ev.gmm_train_size, ev.seed)
    for name, sampler in samplers.items():
        samples = decode_samples(module, sampler, n, generator, ev.batch_size)
        metrics[f"fd_{name}"] = feature_frechet_distance(features(samples), real)
    details["fd_classifier"] = {"path": str(classifier.path), "hidden": list(ev.fd_classifier_hidden),
                                "epochs": ev.fd_classifier_epochs, "test_accuracy": classifier.test_accuracy}
    return metrics
